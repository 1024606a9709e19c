"""The mmsae command: help texts, config errors, and the small commands."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from mmsae.cli import app
from mmsae.sae.checkpoint import load_saelens, save_sae
from mmsae.sae.model import SaeConfig, TopKSAE

runner = CliRunner()


def test_every_stage_command_says_what_it_reads_and_writes():
    for cmd in (["cache"], ["train"], ["toyworld", "build"], ["demo"], ["pipeline", "compile"],
                ["sae", "export-saelens"], ["mine"], ["report"]):
        res = runner.invoke(app, [*cmd, "--help"])
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        assert "Reads" in text or "Read" in text or "reads" in text, (cmd, text)
        assert "Write" in text or "write" in text, (cmd, text)


def test_config_errors_exit_2_naming_the_key(tmp_path):
    res = runner.invoke(app, ["config", "show", "--set", "train.kk=3"])
    assert res.exit_code == 2
    assert "unknown key `train.kk`" in res.output
    bad = tmp_path / "run.yaml"
    bad.write_text("cache:\n  batch_size: many\n")
    res = runner.invoke(app, ["cache", "--config", str(bad)])
    assert res.exit_code == 2 and "`cache.batch_size`" in res.output


def test_export_saelens_round_trips(tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(d_in=8, num_latents=16, k=2))
    save_sae(sae, str(tmp_path / "layers.3"))
    res = runner.invoke(app, ["sae", "export-saelens", str(tmp_path / "layers.3"), str(tmp_path / "lens")])
    assert res.exit_code == 0, res.output
    back = load_saelens(str(tmp_path / "lens"))
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x).sae_out, sae(x).sae_out)
