"""The stages' one rule for reusing an output (`mmsae.stages._base`), and the stages that only it governs.

The cache, train and mine stages' own tests rewrite an input under a sealed output in the same way
(tests/test_cache.py, test_train.py, test_mine.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mmsae import storage
from mmsae.config import RunConfig
from mmsae.stages import report, toyworld
from mmsae.stages._base import (
    KEY_FIELD,
    OutputKey,
    OutputMismatchError,
    reusable_output,
)
from tests.test_report import FEATURES, make_top_examples


def _artifact(folder: Path, kind: str, key: OutputKey) -> str:
    uri = str(folder)
    storage.write_bytes(storage.join(uri, "data.bin"), b"made from the key")
    storage.write_manifest(uri, kind, files=["data.bin"], extra={KEY_FIELD: key.to_json()})
    return uri


def test_key_names_each_changed_setting_and_rewritten_input(tmp_path):
    source = tmp_path / "input.txt"
    source.write_text("one")
    old = OutputKey.of({"k": 8, "nested": {"lr": 0.1}}, {"shards": str(source)})
    assert old.changes(old.to_json()) == []
    source.write_text("other content, other size")
    new = OutputKey.of({"k": 16, "nested": {"lr": 0.1}}, {"shards": str(source)})
    assert new.changes(old.to_json()) == ["setting k: 8 -> 16", "input shards was rewritten or replaced"]
    assert new.digest() != old.digest()
    assert OutputKey.of({}, {}).changes(None) == ["it records no config and input fingerprints "
                                                  "(made by an older version)"]


def test_missing_input_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"input sae {tmp_path}/nowhere does not exist"):
        OutputKey.of({}, {"sae": str(tmp_path / "nowhere")})


def test_sealed_output_is_reused_only_under_the_same_key(tmp_path, caplog):
    key = OutputKey.of({"k": 8}, {})
    out = _artifact(tmp_path / "out", "sae", key)
    assert reusable_output(out, "sae", key, overwrite=False, setting="train.out").kind == "sae"

    other = OutputKey.of({"k": 16}, {})
    with pytest.raises(OutputMismatchError) as err:
        reusable_output(out, "sae", other, overwrite=False, setting="train.out")
    assert str(err.value).startswith(f"train.out {out} holds a 'sae' artifact made from another config")
    assert "setting k: 8 -> 16" in str(err.value) and "run.overwrite=true" in str(err.value)
    assert storage.read_manifest(out).kind == "sae"  # refused: nothing touched

    with caplog.at_level(logging.WARNING, logger="mmsae.stages._base"):
        assert reusable_output(out, "sae", other, overwrite=True, setting="train.out") is None
    assert "replacing" in caplog.text
    assert not storage.exists(storage.join(out, "manifest.json"))
    assert not storage.exists(storage.join(out, "data.bin"))


def test_another_kind_is_refused_even_under_overwrite(tmp_path):
    out = _artifact(tmp_path / "out", "activation_shards", OutputKey.of({}, {}))
    with pytest.raises(OutputMismatchError, match="holds a 'activation_shards' artifact, not a 'sae' one"):
        reusable_output(out, "sae", OutputKey.of({}, {}), overwrite=True, setting="train.out")
    assert storage.exists(storage.join(out, "data.bin"))
    assert reusable_output(str(tmp_path / "empty"), "sae", OutputKey.of({}, {}), overwrite=False,
                           setting="train.out") is None


# ---------------------------------------------------------------------------------------------------
# report and toyworld


def _report_cfg(tmp_path: Path) -> RunConfig:
    cfg = RunConfig()
    cfg.run.workdir = str(tmp_path / "work")
    cfg.tracking.enabled = False
    return cfg


def test_report_of_rewritten_top_examples_is_not_returned(tmp_path):
    cfg = _report_cfg(tmp_path)
    mine_uri = str(tmp_path / "work" / "mine")
    make_top_examples(mine_uri)
    first = report.run(cfg)
    page = Path(first.uris["index"]).read_bytes()
    assert report.run(cfg).figures == first.figures  # same inputs: reused
    assert Path(first.uris["index"]).read_bytes() == page

    fewer = {f: v for f, v in FEATURES.items() if f != max(FEATURES)}
    storage.delete(mine_uri)
    make_top_examples(mine_uri, features=fewer)
    with pytest.raises(OutputMismatchError, match="input top_examples was rewritten or replaced"):
        report.run(cfg)
    cfg.run.overwrite = True
    again = report.run(cfg)
    assert again.figures["features"] == len(fewer) == first.figures["features"] - 1


def test_report_follows_the_other_steps_figures(tmp_path):
    cfg = _report_cfg(tmp_path)
    make_top_examples(str(tmp_path / "work" / "mine"))
    report.run(cfg)
    storage.write_json(str(tmp_path / "work" / "summary" / "mine.json"), {"features_alive": 3})
    with pytest.raises(OutputMismatchError, match="setting summaries_sha256"):
        report.run(cfg)


@pytest.fixture
def fake_toy_lmm(tmp_path, monkeypatch):
    """The toy LMM's training replaced by a tiny saved model (the stage's logic, not the training, is tested)."""
    from mmsae.models import save_tiny, toy

    model_dir = save_tiny("llava_next", tmp_path / "tiny-lmm")
    metrics = {"pair_accuracy": 0.9, "color_accuracy": 0.95, "texture_accuracy": 0.93}
    monkeypatch.setattr(toy, "get_or_train", lambda lmm_cfg, world_cfg: (model_dir, metrics))


def test_toyworld_of_another_seed_is_refused_then_rebuilt_on_overwrite(tmp_path, fake_toy_lmm):
    cfg = RunConfig()
    cfg.run.workdir = str(tmp_path / "work")
    cfg.tracking.enabled = False
    cfg.toyworld = cfg.toyworld.model_copy(update={"n_train": 6, "n_heldout": 2, "seed": 0})
    first = toyworld.run(cfg)
    manifest = storage.read_manifest(first.uri, kind="image_set")
    assert toyworld.run(cfg).uri == first.uri
    assert storage.read_manifest(first.uri).created_at == manifest.created_at  # reused, not rebuilt

    cfg.toyworld = cfg.toyworld.model_copy(update={"seed": 1})
    with pytest.raises(OutputMismatchError, match=r"setting toyworld.seed: 0 -> 1"):
        toyworld.run(cfg)
    cfg.run.overwrite = True
    rebuilt = toyworld.run(cfg)
    assert storage.read_manifest(rebuilt.uri).config["seed"] == 1
    assert storage.read_manifest(rebuilt.uris["lmm"]).config["toyworld"]["seed"] == 1


def test_summaries_of_a_layer_stage_go_under_its_layer_and_run_wide_ones_stay_apart(tmp_path):
    from mmsae.stages._base import read_layer_summaries, read_summaries, stage_context

    def finish(layers: list, step: str, value: int, per_layer: bool = True) -> None:
        cfg = RunConfig.model_validate({"run": {"workdir": str(tmp_path)}, "tracking": {"enabled": False},
                                        "cache": {"layers": layers}})
        with stage_context(cfg, step, {}, per_layer=per_layer) as ctx:
            ctx.finish({"value": value})

    finish([0, 1], "toyworld", 1, per_layer=False)
    finish([0], "train", 10)
    finish([1], "train", 11)
    finish(["model.layers.3"], "train", 12)
    finish([0, 1], "cache", 2)  # a stage over several layers at once is run-wide
    assert read_summaries(str(tmp_path)) == {"toyworld": {"value": 1}, "cache": {"value": 2}}
    assert read_summaries(str(tmp_path), 1)["train"] == {"value": 11}
    assert read_summaries(str(tmp_path), 0) == {"toyworld": {"value": 1}, "cache": {"value": 2}, "train": {"value": 10}}
    layers = read_layer_summaries(str(tmp_path))
    assert layers == {"0": {"train": {"value": 10}}, "1": {"train": {"value": 11}},
                      "model.layers.3": {"train": {"value": 12}}}
