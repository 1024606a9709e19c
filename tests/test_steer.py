"""Steering: the clamp at the SAE's hook point (error term kept), KV-cached and batched generation, bad input."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.models.loading import LoadedLMM
from mmsae.models.tiny import build_tiny
from mmsae.sae.model import SaeConfig, TopKSAE
from mmsae.steering import Clamp, Prompt, Steerer, SteerError, _ClampHook, first_token_kl

FAMILIES = ["llava", "llava_next", "llava_onevision"]
PROMPT = "USER: <image>\nwhat is in this image? ASSISTANT:"
NEW_TOKENS = 6


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Tiny models: one thread (see conftest)."""


_LMMS: dict[str, LoadedLMM] = {}


def tiny_lmm(family: str, text_layers: int = 2) -> LoadedLMM:
    key = f"{family}-{text_layers}"
    if key not in _LMMS:
        model, processor = build_tiny(family, seed=1, text_layers=text_layers)
        _LMMS[key] = LoadedLMM(model, processor, family, model.config, Path(f"tiny-{key}"))
    return _LMMS[key]


def tiny_sae(width: int = 64, latents: int = 256, k: int = 8, seed: int = 0) -> TopKSAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = TopKSAE(SaeConfig(d_in=width, num_latents=latents, k=k))
        with torch.no_grad():
            sae.encoder.weight.mul_(4.0)  # activations of a few units on the tiny model's hidden states
    return sae


def image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def prompts(n: int, sizes: list[tuple[int, int]] | None = None) -> list[Prompt]:
    sizes = sizes or [(32, 32)] * n
    return [Prompt(PROMPT, image(i, sizes[i % len(sizes)])) for i in range(n)]


def plain_generate(lmm: LoadedLMM, steerer: Steerer, batch: list[Prompt]):
    """The unmodified model's greedy generation of the same batch (no hook at all)."""
    enc = steerer.encode(batch)
    tok = lmm.processor.tokenizer
    with torch.no_grad():
        out = lmm.model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, enc["input_ids"].shape[1]:], out.logits[0]


# ---------------------------------------------------------------------------------------------------
# the clamp itself


def test_the_hook_output_is_the_clamped_reconstruction_plus_the_error():
    sae = tiny_sae()
    hidden = torch.randn(2, 5, 64) * 3
    prefill = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    features = torch.tensor([7, 100])
    values = torch.tensor([5.0, 2.5])
    out = _ClampHook(sae, prefill, False, features, values, keep_error=True)(None, None, hidden)
    # the definition: decode(z with z[f] = v at the clamped positions) + (x - decode(z))
    acts, idx = sae.encode(hidden)
    dense = sae.dense_latents(hidden)
    clamped = dense.clone()
    for b in range(2):
        clamped[b, prefill[b], features[b]] = values[b]
    expected = clamped @ sae.W_dec + sae.b_dec + (hidden - sae.decode(acts, idx))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(out[~prefill], hidden[~prefill])  # untouched positions are x itself
    no_error = _ClampHook(sae, prefill, False, features, values, keep_error=False)(None, None, hidden)
    torch.testing.assert_close(no_error, clamped @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_clamping_nothing_reproduces_the_model_exactly_and_the_error_term_is_why(family):
    lmm = tiny_lmm(family)
    batch = prompts(3, [(32, 32), (64, 32), (40, 56)])
    plain_tokens, plain_logits = plain_generate(lmm, Steerer(lmm, tiny_sae(), "layers.0"), batch)
    for keep_error in (True, False):
        steerer = Steerer(lmm, tiny_sae(), "layers.0", keep_error=keep_error)
        # clamps that act nowhere: elements without a clamp, and a clamp whose positions exist in no element
        got = steerer.generate(batch, [None, None, None], NEW_TOKENS)
        same_tokens = [row[: len(t)].tolist() == t for row, t in zip(plain_tokens, got.tokens, strict=True)]
        if keep_error:
            assert all(same_tokens)
            assert torch.equal(got.first_logits, plain_logits.float())  # bit for bit
        else:  # the reconstruction alone (the paper's hook) is another model
            assert (got.first_logits - plain_logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_clamps_with_left_padding_match_one_prompt_at_a_time(family):
    lmm = tiny_lmm(family)
    steerer = Steerer(lmm, tiny_sae(), "layers.0")
    batch = prompts(4, [(32, 32), (64, 32), (32, 64), (48, 40)])  # different image token counts: padding
    clamps = [Clamp(3, 6.0), None, Clamp(200, 4.0), Clamp(3, 6.0)]
    together = steerer.generate(batch, clamps, NEW_TOKENS)
    assert len(together.texts) == len(together.tokens) == 4  # every element decoded
    for i, (one_prompt, clamp) in enumerate(zip(batch, clamps, strict=True)):
        alone = steerer.generate([one_prompt], [clamp], NEW_TOKENS)
        assert alone.tokens[0] == together.tokens[i]
        assert alone.texts[0] == together.texts[i]
        torch.testing.assert_close(alone.first_logits[0], together.first_logits[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cached_generation_clamps_every_generated_token(family):
    """The cached run equals a full forward over the final sequence with every position clamped."""
    lmm = tiny_lmm(family)
    steerer = Steerer(lmm, tiny_sae(), "layers.0")
    batch = prompts(2, [(32, 32), (64, 32)])
    clamps = [Clamp(11, 8.0), Clamp(42, 8.0)]
    enc = steerer.encode(batch)
    got = steerer.generate(batch, clamps, NEW_TOKENS, enc=enc)
    length = enc["input_ids"].shape[1]
    width = max(len(t) for t in got.tokens)
    ids = torch.full((2, width), lmm.processor.tokenizer.pad_token_id)
    for row, toks in enumerate(got.tokens):
        ids[row, : len(toks)] = torch.tensor(toks)
    full = torch.cat([enc["input_ids"], ids], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(ids)], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad(), steerer.clamping(clamps, enc):
        logits = lmm.model(input_ids=full, attention_mask=mask, position_ids=positions, **extra).logits
    predicted = logits[:, length - 1: length - 1 + width].argmax(-1)
    for row, toks in enumerate(got.tokens):
        assert predicted[row, : len(toks)].tolist() == toks
    # and without the generated positions the same clamp gives another continuation
    prompt_only = Steerer(lmm, tiny_sae(), "layers.0", positions=("image", "prompt"))
    assert prompt_only.generate(batch, clamps, NEW_TOKENS, enc=enc).tokens != got.tokens


def test_each_position_kind_acts_where_it_should():
    lmm = tiny_lmm("llava_next")
    batch = prompts(2)
    clamps = [Clamp(5, 10.0), Clamp(77, 10.0)]
    base = Steerer(lmm, tiny_sae(), "layers.0").generate(batch, [None, None], NEW_TOKENS)
    generated_only = Steerer(lmm, tiny_sae(), "layers.0", positions=("generated",)).generate(batch, clamps,
                                                                                              NEW_TOKENS)
    # the first token is predicted by the prompt pass, which a generated-only clamp leaves alone
    assert torch.equal(generated_only.first_logits, base.first_logits)
    assert generated_only.tokens != base.tokens
    for kind in ("image", "prompt"):
        got = Steerer(lmm, tiny_sae(), "layers.0", positions=(kind,)).generate(batch, clamps, NEW_TOKENS)
        assert first_token_kl(got.first_logits, base.first_logits).min() > 1e-6


def test_image_clamps_at_the_last_layer_are_inert_and_warned_about(caplog):
    lmm = tiny_lmm("llava_next")
    batch = prompts(2)
    base = Steerer(lmm, tiny_sae(), "layers.1").generate(batch, [None, None], NEW_TOKENS)
    with caplog.at_level(logging.WARNING, logger="mmsae.steering"):
        steerer = Steerer(lmm, tiny_sae(), "layers.1", positions=("image",))
    assert "last decoder layer" in caplog.text and "image" in caplog.text
    got = steerer.generate(batch, [Clamp(5, 50.0), Clamp(9, 50.0)], NEW_TOKENS)
    assert torch.equal(got.first_logits, base.first_logits) and got.tokens == base.tokens
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmsae.steering"):
        Steerer(lmm, tiny_sae(), "layers.0", positions=("image",))
    assert not caplog.text


@pytest.mark.parametrize("make, message", [
    (lambda lmm: (Steerer(lmm, tiny_sae(), "layers.0"), [Clamp(256, 1.0)]), "out of range"),
    (lambda lmm: (Steerer(lmm, tiny_sae(), "layers.0"), [Clamp(-1, 1.0)]), "out of range"),
    (lambda lmm: (Steerer(lmm, tiny_sae(), "layers.0"), [Clamp(3, float("nan"))]), "finite"),
    (lambda lmm: (Steerer(lmm, tiny_sae(), "layers.0"), [Clamp(3, float("inf"))]), "finite"),
    (lambda lmm: (Steerer(lmm, tiny_sae(width=32), "layers.0"), [None]), "width 32"),
    (lambda lmm: (Steerer(lmm, tiny_sae(), "layers.9"), [None]), "no hook point"),
    (lambda lmm: (Steerer(lmm, tiny_sae(), "layers.0", positions=("pixels",)), [None]), "positions"),
])
def test_bad_input_is_a_clear_error_before_any_generation(make, message, monkeypatch):
    lmm = tiny_lmm("llava")
    monkeypatch.setattr(lmm.model, "generate", lambda *a, **k: pytest.fail("generated despite bad input"))
    with pytest.raises(SteerError, match=message):
        steerer, clamps = make(lmm)
        steerer.generate(prompts(1), clamps, NEW_TOKENS)


def test_output_nll_is_the_unsteered_models_and_matches_generations_own_logits():
    lmm = tiny_lmm("llava_next")
    steerer = Steerer(lmm, tiny_sae(), "layers.0")
    batch = prompts(3, [(32, 32), (64, 32), (32, 64)])
    enc = steerer.encode(batch)
    base = steerer.generate(batch, [None] * 3, NEW_TOKENS, enc=enc)
    nll = steerer.output_nll(enc, [t[:1] for t in base.tokens])
    expected = -torch.log_softmax(base.first_logits, -1)[torch.arange(3), [t[0] for t in base.tokens]]
    torch.testing.assert_close(torch.tensor(nll), expected, rtol=1e-4, atol=1e-4)
    steered = steerer.generate(batch, [Clamp(5, 30.0)] * 3, NEW_TOKENS, enc=enc)
    assert all(np.isfinite(steerer.output_nll(enc, steered.tokens)))
    assert np.isnan(steerer.output_nll(enc, [[], [], []])).all()
    # every token's NLL is the one generation's own logits give it, step by step
    tok = lmm.processor.tokenizer
    with torch.no_grad():
        out = lmm.model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
    steps = torch.stack(out.logits, 1).float().log_softmax(-1)  # [batch, steps, vocab]
    for row, toks in enumerate(base.tokens):
        expected_row = -steps[row, torch.arange(len(toks)), toks].mean()
        assert steerer.output_nll(enc, base.tokens)[row] == pytest.approx(float(expected_row), rel=1e-4, abs=1e-5)
    # an output holding the image placeholder (a steered model may emit it) is scored like any other token
    image_token = lmm.config.image_token_id
    assert np.isfinite(steerer.output_nll(enc, [[image_token, 5], [5], [image_token]])).all()


# ---------------------------------------------------------------------------------------------------
# measuring


def test_concepts_are_matched_as_whole_words_and_success_needs_an_unsteered_miss():
    from mmsae.steering import concept_words_of, measure

    truth = {"concepts": [{"concept": "color:red", "feature": 3, "f1_feature": 9},
                          {"concept": "texture:striped", "feature": 4, "f1_feature": 3}]}
    assert concept_words_of(3, truth, "ignored") == ["red", "striped"]
    assert concept_words_of(9, truth, None) == ["red"]
    assert concept_words_of(5, truth, "The highlighted regions show a blue dog") == ["blue", "dog"]
    assert concept_words_of(5, None, None) == []
    logits = torch.zeros(10)
    checkered = measure("a small checkered square", logits, 0.1, "a blue square", logits, 0.1, ["red"])
    assert checkered["concept_hit"] is False and checkered["success"] is False
    hit = measure("a red square", logits + torch.arange(10.0), 0.5, "a blue square", logits, 0.1, ["red"])
    assert hit["success"] is True and hit["kl_first_token"] > 0 and hit["changed"]
    assert hit["steered_perplexity"] == pytest.approx(np.exp(0.5))
    already = measure("a red square", logits, 0.1, "a red one", logits, 0.1, ["red"])
    assert already["concept_hit"] is True and already["success"] is None  # left out of the success rate
    assert measure("x", logits, 0.1, "y", logits, 0.1, [])["concept_hit"] is None


def test_dose_response_picks_the_lowest_best_strength_beside_the_random_baseline():
    from mmsae.steering import dose_response

    def row(feature, strength, success, nll=0.0, **extra):
        return {"feature": feature, "strength": strength, "concept_words": ["red"], **extra,
                "metrics": {"success": success, "concept_hit": success, "changed": True, "kl_first_token": strength,
                            "steered_nll": nll, "baseline_perplexity": 1.0}}

    rows = [row(1, 1.0, False), row(1, 1.0, False), row(1, 2.0, True), row(1, 2.0, None),
            row(1, 4.0, True, nll=1.0), row(1, 4.0, None)]
    random_rows = [row(7, s, s == 4.0, for_feature=1) for s in (1.0, 2.0, 4.0)]
    summary = dose_response(rows, random_rows, [1.0, 2.0, 4.0])
    entry = summary["features"]["1"]
    assert [entry["strengths"][s]["success_rate"] for s in ("1.0", "2.0", "4.0")] == [0.0, 1.0, 1.0]
    assert entry["best"]["strength"] == 2.0 and entry["best"]["random_success_rate"] == 0.0
    assert entry["strengths"]["4.0"]["perplexity"] == pytest.approx(np.exp(0.5))
    assert summary["by_strength"]["x4"]["random_success_rate"] == 1.0


# ---------------------------------------------------------------------------------------------------
# the stage


STAGE_FEATURES = {2: "red", 5: "blue", 9: "green"}


@pytest.fixture(scope="module")
def stage_world(tmp_path_factory) -> dict[str, str]:
    """A small toy world, a tiny LLaVA-NeXT, a random SAE at layers.0 and a top-examples artifact naming them."""
    import json

    from mmsae import examples, storage
    from mmsae.config import ToyWorldConfig
    from mmsae.data import toyworld
    from mmsae.models import save_tiny
    from mmsae.sae.checkpoint import save_sae

    root = tmp_path_factory.mktemp("steer-world")
    images = str(root / "images")
    toyworld.build(ToyWorldConfig(n_train=8, n_heldout=4, min_size=64, max_size=64), images)
    model = str(save_tiny("llava_next", root / "lmm", image_size=32, patch_size=8))
    sae_path = str(root / "sae" / "layers.0")
    save_sae(tiny_sae(latents=16), sae_path)
    shards = str(root / "shards")
    storage.write_manifest(shards, "activation_shards", files=[], inputs={"image_set": images, "model": model},
                           extra={"hookpoints": ["layers.0"], "d": 64, "dtype": "float32", "split": "train",
                                  "prompt": "<image> describe :", "shards": {"layers.0": []}})
    records = [examples.FeatureRecord(f, 0.1, 0.2, 2.0 + f / 4, 1.0).to_json() for f in range(16) if f != 13]
    truth = {"concepts": [{"concept": f"color:{c}", "kind": "color", "feature": f, "f1_feature": f}
                          for f, c in STAGE_FEATURES.items()]}
    top = str(root / "mine")
    files = {examples.FEATURES_FILE: "".join(json.dumps(r) + "\n" for r in records).encode(),
             examples.MAPS_FILE: examples.encode_maps({c: torch.zeros(0) for c in examples.MAP_DTYPES}),
             examples.IMAGES_FILE: b"{}", examples.GROUND_TRUTH_FILE: json.dumps(truth).encode()}
    for name, data in files.items():
        storage.write_bytes(storage.join(top, name), data)
    storage.write_manifest(top, examples.KIND, files=list(files), format_version=2,
                           inputs={"sae": str(root / "sae"), "shards": shards, "image_set": images},
                           extra={"hookpoint": "layers.0", "sae_path": sae_path, "family": "llava_next",
                                  "features": [r["feature"] for r in records], "selected": [], "figures": {}})
    return {"root": str(root), "top": top, "images": images, "model": model}


def stage_config(tmp_path: Path, world: dict[str, str], **steer):
    from mmsae.config import RunConfig

    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(tmp_path / "work")
    cfg.steer = cfg.steer.model_copy(update={"top_examples": world["top"], "features": sorted(STAGE_FEATURES),
                                             "strengths": [1.0, 4.0], "images": 3, "max_new_tokens": 4,
                                             "out": str(tmp_path / "steer"), **steer})
    return cfg


def read_rows(uri: str, name: str) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(uri) / name).read_text().splitlines() if line.strip()]


def test_the_stage_steers_every_feature_strength_and_prompt_whatever_the_batching(stage_world, tmp_path):
    from mmsae.stages import steer

    out = steer.run(stage_config(tmp_path / "a", stage_world, batch_size=64))
    rows = read_rows(out.uri, steer.RECORDS_FILE)
    randoms = read_rows(out.uri, steer.RANDOM_FILE)
    assert len(rows) == len(randoms) == 3 * 2 * 3
    assert {(r["feature"], r["strength"], r["image_idx"]) for r in rows} == {
        (f, s, i) for f in STAGE_FEATURES for s in (1.0, 4.0) for i in range(3)}
    for r in rows:
        assert r["concept_words"] == [STAGE_FEATURES[r["feature"]]]
        assert r["value"] == pytest.approx(r["strength"] * (2.0 + r["feature"] / 4))  # x max activation
        assert r["prompt"] == "<image> describe :" and isinstance(r["steered_output"], str)
        assert set(r["metrics"]) >= {"kl_first_token", "concept_hit", "success", "steered_perplexity"}
    assert all(r["feature"] not in STAGE_FEATURES and r["feature"] != 13 for r in randoms)
    assert {r["for_feature"] for r in randoms} == set(STAGE_FEATURES)
    assert (Path(out.uri) / steer.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    assert out.figures["features_steered"] == 3 and out.figures["generations"] == 36
    assert set(out.figures["by_concept"]) == {"color:red", "color:blue", "color:green"}
    small = steer.run(stage_config(tmp_path / "b", stage_world, batch_size=5))
    assert read_rows(small.uri, steer.RECORDS_FILE) == rows  # batching and padding change nothing


def test_the_steered_features_come_from_the_explanations_and_an_unmined_one_is_refused(stage_world, tmp_path):
    import json

    from mmsae import storage
    from mmsae.stages import steer

    explained = str(tmp_path / "explain")
    lines = [{"feature": 11, "status": "ok", "explanation": "round things"},
             {"feature": 5, "status": "ok", "explanation": "blue things"},
             {"feature": 9, "status": "unable", "explanation": None}]
    storage.write_text(storage.join(explained, "explanations.jsonl"), "".join(json.dumps(x) + "\n" for x in lines))
    storage.write_manifest(explained, "explanations", files=["explanations.jsonl"])
    out = steer.run(stage_config(tmp_path, stage_world, features=[], explanations=explained, strengths=[2.0],
                                 random_baseline=False, max_features=1))
    rows = read_rows(out.uri, steer.RECORDS_FILE)
    assert {r["feature"] for r in rows} == {5} and not read_rows(out.uri, steer.RANDOM_FILE)  # planted first
    both = steer.run(stage_config(tmp_path / "both", stage_world, features=[], explanations=explained,
                                  strengths=[2.0], random_baseline=False))
    words = {r["feature"]: r["concept_words"] for r in read_rows(both.uri, steer.RECORDS_FILE)}
    assert words == {5: ["blue"], 11: ["round", "things"]}  # planted concept, else the explanation's words
    with pytest.raises(SteerError, match="not mined"):
        steer.run(stage_config(tmp_path / "x", stage_world, features=[13]))
    with pytest.raises(SteerError, match="no features to steer"):
        steer.run(stage_config(tmp_path / "y", stage_world, features=[]))


def test_bad_strengths_and_reuse_follow_the_rules(stage_world, tmp_path, monkeypatch):
    from mmsae.stages import steer
    from mmsae.stages._base import OutputMismatchError

    with pytest.raises(SteerError, match="finite"):
        steer.run(stage_config(tmp_path / "nan", stage_world, strengths=[1.0, float("nan")]))
    cfg = stage_config(tmp_path, stage_world, strengths=[2.0], images=1)
    first = steer.run(cfg)
    monkeypatch.setattr(steer, "_steer", lambda *a, **k: pytest.fail("steered again"))
    assert steer.run(cfg).figures == first.figures
    changed = stage_config(tmp_path, stage_world, strengths=[3.0], images=1)
    with pytest.raises(OutputMismatchError, match="strengths"):
        steer.run(changed)
    monkeypatch.undo()
    changed.run.overwrite = True
    assert {r["strength"] for r in read_rows(steer.run(changed).uri, steer.RECORDS_FILE)} == {3.0}


def test_the_command_steers_and_reports_bad_input_in_one_line(stage_world, tmp_path):
    import json

    from typer.testing import CliRunner

    from mmsae.cli import app

    common = ["--set", f"run.workdir={tmp_path / 'work'}", "--set", "tracking.enabled=false",
              "--set", "steer.strengths=[2.0]", "--set", "steer.images=1", "--set", "steer.max_new_tokens=2"]
    res = CliRunner().invoke(app, ["steer", *common, "--top-examples", stage_world["top"], "--set",
                                   "steer.features=[2]", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{"):])["steering"] == str(tmp_path / "out")
    res = CliRunner().invoke(app, ["steer", *common, "--top-examples", stage_world["top"], "--set",
                                   "steer.features=[13]", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and res.output.startswith("error: ") and "not mined" in res.output


# ---------------------------------------------------------------------------------------------------
# the toy world (slow: trains the toy LMM when it is not cached, then caches, trains and mines layer 0)


@pytest.fixture(scope="session")
def toy_layer0(tmp_path_factory) -> dict[str, str]:
    """One toy-world run at layer 0 per session, whichever test module asks first (a module importing this
    fixture gets its own copy of it, so the run is found by its folder)."""
    import json

    from bench.steer import toy_world_run

    base = tmp_path_factory.getbasetemp() / "toy-layer0"
    record = base / "run.json"
    if not record.is_file():
        run = toy_world_run(str(base / "work"))
        record.write_text(json.dumps(run))
    return json.loads(record.read_text())


@pytest.mark.slow
def test_steering_a_planted_concepts_feature_makes_the_toy_lmm_name_it(toy_layer0):
    """Measured with bench/steer.py (image-token clamps, 32 images without the concept): the detectors of green,
    red and solid reach 0.88, 0.81 and 1.0 at 16x their max activation; random features stay below 0.2."""
    from bench.steer import load_toy
    from mmsae.models.toy import PROMPT
    from mmsae.steering import Clamp, measure

    torch.set_num_threads(2)
    lmm, sae, hookpoint, top, heldout = load_toy(toy_layer0)
    steerer = Steerer(lmm, sae, hookpoint, positions=("image",))
    truth = {c["concept"]: c["f1_feature"] for c in top.ground_truth()["concepts"]}
    alive = [r.feature for r in top.features() if r.max_activation > 0]
    rng = random.Random(0)
    for concept in ("color:green", "color:red", "texture:solid"):
        word, feature = concept.split(":")[1], truth[concept]
        without = [i for i in range(len(heldout)) if concept not in heldout[i]["concepts"]][:24]
        batch = [Prompt(PROMPT, heldout[i]["image"].convert("RGB")) for i in without]
        enc = steerer.encode(batch)
        base = steerer.generate(batch, [None] * len(batch), 16, enc=enc)
        rates = {}
        other = rng.choice([f for f in alive if f != feature])
        for who in (feature, other):
            value = 16 * top.feature(who).max_activation
            got = steerer.generate(batch, [Clamp(who, value)] * len(batch), 16, enc=enc)
            wins = [measure(t, got.first_logits[0], 0.0, b, base.first_logits[0], 0.0, [word])["success"]
                    for t, b in zip(got.texts, base.texts, strict=True)]
            rates[who] = sum(bool(w) for w in wins) / sum(w is not None for w in wins)
        assert rates[feature] > 0.5 > rates[other], (concept, rates)


def test_the_attribute_stages_top_features_can_be_steered(stage_world, tmp_path):
    import json

    from mmsae import storage
    from mmsae.stages import steer

    attributed = str(tmp_path / "attribute")
    lines = [{"example": 0, "top_features": [{"feature": 9}, {"feature": 2}]},
             {"example": 1, "top_features": [{"feature": 5}, {"feature": 9}]},
             {"example": 2, "top_features": [{"feature": 9}, {"feature": 7}]}]
    storage.write_text(storage.join(attributed, "attributions.jsonl"), "".join(json.dumps(x) + "\n" for x in lines))
    storage.write_manifest(attributed, "attributions", files=["attributions.jsonl"])
    with pytest.raises(SteerError, match="steer.attributions"):
        steer.run(stage_config(tmp_path / "none", stage_world, features=[], source="attributed"))
    cfg = stage_config(tmp_path, stage_world, features=[], source="attributed", attributions=attributed,
                       strengths=[2.0], images=1, random_baseline=False)
    out = steer.run(cfg)
    assert [r["feature"] for r in read_rows(out.uri, steer.RECORDS_FILE)] == [9, 5]  # most often first, then by id
    assert storage.read_manifest(out.uri).inputs["attributions"] == attributed


def test_each_planted_concept_is_judged_on_its_own_word_even_when_two_share_a_feature():
    from mmsae.stages.steer import _by_concept, _Results

    def row(strength, steered, **extra):
        return {"feature": 5, "strength": strength, "steered_output": steered, "baseline_output": "a red square",
                "concept_words": ["orange", "yellow"], **extra,
                "metrics": {"success": True, "concept_hit": True, "changed": True, "kl_first_token": 0.0,
                            "steered_nll": 0.0, "baseline_perplexity": 1.0}}

    results = _Results(rows=[row(1.0, "a yellow square"), row(1.0, "a yellow one"), row(2.0, "an orange square")],
                       random_rows=[row(1.0, "a yellow square", for_feature=5) | {"feature": 8}])
    truth = {"concepts": [{"concept": "color:orange", "feature": 5, "f1_feature": 5},
                          {"concept": "color:yellow", "feature": 3, "f1_feature": 5},
                          {"concept": "color:blue", "feature": 1, "f1_feature": 2}]}
    figures = _by_concept(results, truth, [1.0, 2.0])
    assert set(figures) == {"color:orange", "color:yellow"}  # blue's features were not steered
    assert figures["color:yellow"]["strength"] == 1.0 and figures["color:yellow"]["success"] == 1.0
    assert figures["color:yellow"]["random"] == 1.0
    assert figures["color:orange"]["strength"] == 2.0 and figures["color:orange"]["success"] == 1.0
