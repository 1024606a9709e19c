"""The mmsae command: help texts, config errors, expected errors, and the small commands."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from mmsae.cli import DEBUG_ENV, USER_ERRORS, app, user_error_exit_code
from mmsae.sae.checkpoint import load_saelens, save_sae
from mmsae.sae.model import SaeConfig, TopKSAE

runner = CliRunner()

# each stage command and the options (or arguments) that name what it reads and writes
STAGE_COMMANDS = {
    ("cache",): ["--image-set", "--model", "--out"],
    ("train",): ["--shards", "--out"],
    ("mine",): ["--shards", "--sae", "--out"],
    ("explain",): ["--top-examples", "--out"],
    ("score",): ["--explanations", "--top-examples", "--out"],
    ("steer",): ["--top-examples", "--explanations", "--attributions", "--out"],
    ("attribute",): ["--top-examples", "--out"],
    ("report",): ["--top-examples", "--explanations", "--scores", "--steering", "--attributions", "--out"],
    ("toyworld", "build"): ["--workdir"],
    ("demo",): ["--out"],
}
TOP_LEVEL_COMMANDS = {"cache", "train", "mine", "explain", "score", "report", "demo", "sae", "toyworld", "pipeline",
                      "config", "runs", "steer", "attribute"}


def _help(*cmd: str) -> str:
    res = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def test_every_stage_command_says_what_it_reads_and_writes():
    for cmd in (["cache"], ["train"], ["toyworld", "build"], ["demo"], ["pipeline", "compile"],
                ["sae", "export-saelens"], ["mine"], ["report"]):
        text = _help(*cmd)
        assert "Reads" in text or "Read" in text or "reads" in text, (cmd, text)
        assert "Write" in text or "write" in text, (cmd, text)


@pytest.mark.parametrize("cmd", list(STAGE_COMMANDS), ids=" ".join)
def test_stage_help_names_its_input_and_output_options_and_points_to_explain(cmd):
    text = _help(*cmd)
    for option in ["--config", "--set", *STAGE_COMMANDS[cmd]]:
        assert f"{option} " in text, (cmd, option)
    assert "mmsae config show --explain" in text


def test_top_level_help_lists_every_command_and_the_debug_flag():
    registered = set(typer.main.get_command(app).commands)
    assert registered == TOP_LEVEL_COMMANDS
    text = _help()
    for name in TOP_LEVEL_COMMANDS:
        assert f" {name} " in text, name
    assert "--debug" in text and DEBUG_ENV in text
    assert "export-saelens" in _help("sae") and "build" in _help("toyworld") and "compile" in _help("pipeline")


def test_config_errors_exit_2_naming_the_key(tmp_path):
    res = runner.invoke(app, ["config", "show", "--set", "train.kk=3"])
    assert res.exit_code == 2
    assert "unknown key `train.kk`" in res.output
    bad = tmp_path / "run.yaml"
    bad.write_text("cache:\n  batch_size: many\n")
    res = runner.invoke(app, ["cache", "--config", str(bad)])
    assert res.exit_code == 2 and "`cache.batch_size`" in res.output


def test_config_show_explain_prints_each_value_with_its_docstring():
    res = runner.invoke(app, ["config", "show", "--explain", "--set", "cache.batch_size=3"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    at = lines.index("  batch_size: 3", lines.index("cache:"))
    assert lines[at - 1] == "  # Images per forward pass."
    plain = runner.invoke(app, ["config", "show"]).output
    assert "# " not in plain and "  batch_size: 8\n" in plain  # without --explain: YAML only, the default


def _fail_with(monkeypatch, stage: str, error: BaseException) -> None:
    module = importlib.import_module(f"mmsae.stages.{stage}")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(module, "run", fail)


def test_expected_stage_errors_print_one_line_and_exit_1(monkeypatch):
    from mmsae.stages._base import OutputMismatchError

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    _fail_with(monkeypatch, "mine", OutputMismatchError("mine.out /x holds a 'top_examples' artifact made from "
                                                        "another config (setting top_k: 10 -> 3)"))
    res = runner.invoke(app, ["mine"])
    assert res.exit_code == 1
    assert res.stderr == ("error: mine.out /x holds a 'top_examples' artifact made from another config "
                          "(setting top_k: 10 -> 3)\n")
    assert "Traceback" not in res.output and res.stdout == ""
    _fail_with(monkeypatch, "train", FileNotFoundError("input shards /nope does not exist"))
    res = runner.invoke(app, ["train"])
    assert (res.exit_code, res.stderr) == (1, "error: input shards /nope does not exist\n")


def test_debug_flag_or_env_shows_the_traceback(monkeypatch):
    from mmsae.stages._base import OutputMismatchError

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    error = OutputMismatchError("changed")
    _fail_with(monkeypatch, "mine", error)
    res = runner.invoke(app, ["--debug", "mine"])
    assert res.exit_code == 1 and res.exception is error and "error: changed" not in res.output
    res = runner.invoke(app, ["mine"], env={DEBUG_ENV: "1"})
    assert res.exit_code == 1 and res.exception is error


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    error = RuntimeError("a bug")
    _fail_with(monkeypatch, "cache", error)
    res = runner.invoke(app, ["cache"])
    assert res.exception is error and "error: a bug" not in res.output


def test_missing_input_of_a_real_stage_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    res = runner.invoke(app, ["report", "--top-examples", str(tmp_path / "nothing"), "--set",
                              "tracking.enabled=false", "--set", f"run.workdir={tmp_path / 'work'}"])
    assert res.exit_code == 1, res.output
    assert res.stderr.startswith("error: ") and str(tmp_path / "nothing") in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output


def _mmsae_errors() -> dict[str, type]:
    """Every public exception class defined in mmsae, by name."""
    import pkgutil

    import mmsae

    found = {}
    for info in pkgutil.walk_packages(mmsae.__path__, "mmsae."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Exception) and value.__module__ == info.name
                    and not value.__name__.startswith("_")):
                found[value.__name__] = value
    return found


# errors of the stage modules that are not a user's to fix, so they keep their traceback
NOT_USER_ERRORS = {"CacheWriteError", "GeometryError", "HeatmapError", "MlflowServerError", "S3ServerError"}


def test_every_listed_user_error_exists_and_every_stage_error_is_classified():
    errors = _mmsae_errors()
    assert USER_ERRORS <= set(errors), sorted(USER_ERRORS - set(errors))
    for name in USER_ERRORS:
        error = errors[name]
        assert user_error_exit_code(error("x")) == (2 if name == "ConfigError" else 1), name
    unclassified = {name for name, error in errors.items() if name not in USER_ERRORS | NOT_USER_ERRORS
                    and not (set(error.__mro__[1:]) & {errors[n] for n in USER_ERRORS})}
    assert not unclassified, f"add each to USER_ERRORS (cli.py) or NOT_USER_ERRORS: {sorted(unclassified)}"
    derived = errors["FeatureNotMinedError"]("feature 3")  # a subclass of a listed one
    assert user_error_exit_code(derived) == 1
    assert user_error_exit_code(ValueError("x")) is None and user_error_exit_code(KeyError("x")) is None
    assert user_error_exit_code(FileNotFoundError("gone")) == 1


def test_stage_outputs_are_printed_and_mine_takes_out(monkeypatch, tmp_path):
    from mmsae.stages._base import StageOutputs

    seen = {}

    def fake_mine(cfg, shards=None, sae=None):
        seen["mine"] = (cfg.mine.out, shards, sae)
        return StageOutputs(cfg.mine.out, {"features_mined": 4})

    def fake_toyworld(cfg):
        seen["toyworld"] = cfg.run.workdir
        return StageOutputs("/w/images", {"accuracy": 0.9}, {"lmm": "/w/lmm"})

    def fake_report(cfg, **inputs):
        seen["report"] = (cfg.report.out, inputs["top_examples"])
        return StageOutputs(cfg.report.out, {"features": 2}, {"index": f"{cfg.report.out}/index.html"})

    for stage, fake in (("mine", fake_mine), ("toyworld", fake_toyworld), ("report", fake_report)):
        monkeypatch.setattr(importlib.import_module(f"mmsae.stages.{stage}"), "run", fake)
    res = runner.invoke(app, ["mine", "--out", str(tmp_path / "m"), "--shards", "/s", "--sae", "/sae"])
    assert res.exit_code == 0, res.output
    assert seen["mine"] == (str(tmp_path / "m"), "/s", "/sae")
    assert json.loads(res.stdout) == {"top_examples": str(tmp_path / "m"), "features_mined": 4}
    res = runner.invoke(app, ["toyworld", "build", "--workdir", "/w"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"image_set": "/w/images", "lmm": "/w/lmm", "accuracy": 0.9}
    res = runner.invoke(app, ["report", "--out", "/r", "--top-examples", "/t"])
    assert res.exit_code == 0, res.output
    assert seen["report"] == ("/r", "/t")
    assert json.loads(res.stdout) == {"report": "/r/index.html", "features": 2}


def test_export_saelens_round_trips(tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(d_in=8, num_latents=16, k=2))
    save_sae(sae, str(tmp_path / "layers.3"))
    res = runner.invoke(app, ["sae", "export-saelens", str(tmp_path / "layers.3"), str(tmp_path / "lens")])
    assert res.exit_code == 0, res.output
    back = load_saelens(str(tmp_path / "lens"))
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x).sae_out, sae(x).sae_out)
