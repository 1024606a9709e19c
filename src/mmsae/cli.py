"""The ``mmsae`` command: one sub-command per stage, plus the demo and the pipeline tools.

Every command takes ``--config FILE`` (a run config in YAML) and ``--set key.sub=value`` overrides;
``mmsae config show --explain`` prints every setting with its value and meaning. An expected error (a bad
config, a missing input, an output made from another config, a stage's own error) is printed as one
``error: <message>`` and exits non-zero; ``mmsae --debug`` (or ``$MMSAE_DEBUG=1``) shows its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from mmsae import storage
from mmsae.config import RunConfig, dump_config, explain_config, load_config

DEBUG_ENV = "MMSAE_DEBUG"
"""``MMSAE_DEBUG=1`` does what ``mmsae --debug`` does: expected errors are raised with their traceback."""

USER_ERRORS = frozenset({
    "ConfigError", "OutputMismatchError", "CacheError", "TrainError", "MineError", "SelectionError",
    "ReportError", "ShardFormatError", "TopExamplesError", "StorageError", "StorageURIError", "ManifestError",
    "TrackingError", "ImageSetError", "ToyWorldError", "ModelFormatError", "HookPointError", "ToyLMMError",
    "SaeConfigError", "CheckpointError", "ExplainError",
})
"""Names of mmsae's error classes that a user can cause and fix (a config, an input, an existing output),
reported as one line rather than a traceback; their subclasses too. Matched by name among the classes of
the error (defined in ``mmsae``), so that no stage is imported to report an error."""

CONFIG_ERROR_EXIT = 2
"""Exit status of a config error (as for a bad command line); other expected errors exit with 1."""


def user_error_exit_code(exc: BaseException) -> int | None:
    """The exit status for an expected user error, or None for an unexpected one (shown with its traceback).

    Expected: an error of (or derived from) a class named in :data:`USER_ERRORS`, or a missing file.
    """
    names = {cls.__name__ for cls in type(exc).__mro__ if cls.__module__.split(".")[0] == "mmsae"}
    if "ConfigError" in names:
        return CONFIG_ERROR_EXIT
    if names & USER_ERRORS or isinstance(exc, FileNotFoundError):
        return 1
    return None


def debug_requested(ctx: click.Context) -> bool:
    """``--debug`` on the command line or ``$MMSAE_DEBUG`` set to 1 / true."""
    return bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


class ErrorReportingGroup(TyperGroup):
    """The top-level command group: the one place where expected errors of every command become one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            code = user_error_exit_code(exc)
            if code is None or debug_requested(ctx):
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code) from None


EXPLAIN_HINT = "Every setting, with its value and meaning: mmsae config show --explain."

app = typer.Typer(help="Find and explain the SAE features of large multimodal models.", no_args_is_help=True,
                  cls=ErrorReportingGroup)
toyworld_app = typer.Typer(help="The built-in toy world: generated scenes and a tiny captioning LLaVA-NeXT.")
pipeline_app = typer.Typer(help="The Kubeflow pipeline: compile it for a cluster.")
config_app = typer.Typer(help="Inspect and validate run configs.")
sae_app = typer.Typer(help="SAE checkpoints: convert between layouts.")
app.add_typer(sae_app, name="sae")
app.add_typer(toyworld_app, name="toyworld")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(config_app, name="config")

log = logging.getLogger("mmsae")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Run config (YAML); defaults if omitted. Keys: mmsae config show --explain."),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a config key: --set cache.batch_size=8 (repeatable).")
]


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Show the traceback of expected errors too (or ${DEBUG_ENV}=1).")
    ] = False,
) -> None:
    """Set up logging; ``debug`` is read from the context by :class:`ErrorReportingGroup`."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _config(path: Path | None, overrides: list[str] | None) -> RunConfig:
    return load_config(path, overrides or [])


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    explain: Annotated[bool, typer.Option("--explain", help="Each key's meaning above it, as a comment.")] = False,
) -> None:
    """Print the resolved run config (file + overrides + defaults) as YAML.

    With --explain, each section and key comes under its description (the text still reads as YAML).
    """
    cfg = _config(config, set_)
    typer.echo(explain_config(cfg) if explain else dump_config(cfg), nl=False)


@toyworld_app.command("build", epilog=EXPLAIN_HINT)
def toyworld_build(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: Annotated[str | None, typer.Option(help="Where to write (local path or s3://); default run.workdir.")] = None,
) -> None:
    """Build the toy world and train (or reuse) the toy LMM.

    Reads the `toyworld` and `toylmm` config sections. Writes WORKDIR/toyworld/images (HF dataset on disk
    with images, captions, concepts and per-concept masks) and WORKDIR/toyworld/lmm (the trained toy
    LLaVA-NeXT). Prints the toy LMM's held-out (colour, texture) caption accuracy.
    """
    from mmsae.stages import toyworld

    cfg = _config(config, set_)
    if workdir:
        cfg.run.workdir = workdir
    out = toyworld.run(cfg)
    typer.echo(storage.json_text({"image_set": out.uri, "lmm": out.uris["lmm"], **out.figures}, indent=2))


@app.command(epilog=EXPLAIN_HINT)
def cache(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    image_set: Annotated[str | None, typer.Option(help="Image set URI (overrides cache.image_set).")] = None,
    model: Annotated[str | None, typer.Option(help="LMM URI (overrides cache.model).")] = None,
    out: Annotated[str | None, typer.Option(help="Output URI (overrides cache.out).")] = None,
) -> None:
    """Cache one or more layers' activations of an LMM over an image set.

    Reads the `cache` config section, the image set (HF dataset on disk, parquet or image folder) and the
    LMM (LLaVA / LLaVA-NeXT / LLaVA-OneVision, save_pretrained layout), local or s3://. Writes activation
    shards (acts + image_idx, token_pos, view, row, col) and a manifest to cache.out (default
    RUN.WORKDIR/cache). Resumes an interrupted run; under torchrun or the deepspeed launcher each rank
    caches its share of the images.
    """
    from mmsae.stages import cache as stage

    cfg = _config(config, set_)
    if out:
        cfg.cache.out = out
    result = stage.run(cfg, image_set=image_set, model=model)
    if result.figures:
        typer.echo(storage.json_text({"shards": result.uri, **result.figures}, indent=2))


@app.command(epilog=EXPLAIN_HINT)
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    shards: Annotated[str | None, typer.Option(help="Activation-shard URI (overrides train.shards).")] = None,
    out: Annotated[str | None, typer.Option(help="Output URI (overrides train.out).")] = None,
) -> None:
    """Train TopK SAEs on cached activations with DeepSpeed.

    Reads the `train` config section and an activation-shard artifact (local or s3://). Writes the SAEs in
    sparsify's layout (<hookpoint>/cfg.json + sae.safetensors, one folder per sweep variant), metrics.json,
    the DeepSpeed training state (state/, for resume) and a manifest to train.out (default
    RUN.WORKDIR/train). Run it as is for one process, or under the deepspeed launcher or torchrun.
    """
    from mmsae.stages import train as stage

    cfg = _config(config, set_)
    if out:
        cfg.train.out = out
    result = stage.run(cfg, shards=shards)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(storage.json_text({"sae": result.uri, **result.figures}, indent=2))


@app.command(epilog=EXPLAIN_HINT)
def mine(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    shards: Annotated[str | None, typer.Option(help="Activation-shard URI (overrides mine.shards).")] = None,
    sae: Annotated[str | None, typer.Option(help="Trained SAE folder URI (overrides mine.sae).")] = None,
    out: Annotated[str | None, typer.Option(help="Output URI (overrides mine.out).")] = None,
) -> None:
    """Find each SAE feature's top activating images, their per-token maps and heat maps.

    Reads the `mine` config section, the activation shards (default RUN.WORKDIR/cache), the SAE (default
    RUN.WORKDIR/train) and the image set and model named in the shards' manifest. Writes the top-examples
    artifact (features.jsonl, maps.safetensors, images.json, heatmaps/, ground_truth.json on the toy world)
    to mine.out (default RUN.WORKDIR/mine).
    """
    from mmsae.stages import mine as stage

    cfg = _config(config, set_)
    if out:
        cfg.mine.out = out
    result = stage.run(cfg, shards=shards, sae=sae)
    typer.echo(storage.json_text({"top_examples": result.uri, **result.figures}, indent=2))


@app.command(epilog=EXPLAIN_HINT)
def explain(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    top_examples: Annotated[str | None, typer.Option(help="Top-examples URI (overrides explain.top_examples).")] = None,
    out: Annotated[str | None, typer.Option(help="Output URI (overrides explain.out).")] = None,
) -> None:
    """Describe each selected feature from the masked renderings of its top images.

    Reads the `explain` config section and the top-examples artifact of the mine stage (default
    RUN.WORKDIR/mine). Asks an OpenAI-compatible server (explain.endpoint or $OPENAI_BASE_URL, the key from
    $OPENAI_API_KEY) or, without one, the LMM the shards were cached from, in this process. Writes
    explanations.jsonl, explanations_paper.json and a manifest to explain.out (default RUN.WORKDIR/explain);
    every answer is kept in explain.cache (default RUN.WORKDIR/explain-cache), so a rerun asks only what is
    still unanswered.
    """
    from mmsae.stages import explain as stage

    cfg = _config(config, set_)
    if out:
        cfg.explain.out = out
    result = stage.run(cfg, top_examples=top_examples)
    typer.echo(storage.json_text({"explanations": result.uri, **result.figures}, indent=2))


@app.command(epilog=EXPLAIN_HINT)
def report(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    top_examples: Annotated[str | None, typer.Option(help="Top-examples URI (overrides report.top_examples).")] = None,
    explanations: Annotated[str | None, typer.Option(help="Explanations JSONL or folder.")] = None,
    scores: Annotated[str | None, typer.Option(help="Scores JSONL or folder.")] = None,
    steering: Annotated[str | None, typer.Option(help="Steering JSONL or folder.")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder (overrides report.out).")] = None,
) -> None:
    """Render the run's dashboard: one self-contained HTML page.

    Reads the top-examples artifact of the mine stage (default RUN.WORKDIR/mine), the run's step summaries
    and, when given, explanations, scores and steering results (JSONL). Writes OUT/index.html (default
    RUN.WORKDIR/report) with a manifest, and logs the page to MLflow.
    """
    from mmsae.stages import report as stage

    cfg = _config(config, set_)
    if out:
        cfg.report.out = out
    result = stage.run(cfg, top_examples=top_examples, explanations=explanations, scores=scores, steering=steering)
    typer.echo(storage.json_text({"report": result.uris["index"], **result.figures}, indent=2))


@sae_app.command("export-saelens")
def sae_export_saelens(
    sae: Annotated[str, typer.Argument(help="A trained SAE in sparsify's layout: the folder with cfg.json.")],
    out: Annotated[str, typer.Argument(help="Output folder (local or s3://) for SAELens' layout.")],
    hook_name: Annotated[str | None, typer.Option(help="SAELens hook name; default the folder's name.")] = None,
    model_name: Annotated[str | None, typer.Option(help="Model name recorded in the SAELens metadata.")] = None,
) -> None:
    """Write an SAE in SAELens' layout (cfg.json + sae_weights.safetensors).

    Reads SAE/cfg.json and SAE/sae.safetensors (sparsify's layout, as `mmsae train` writes). Writes
    OUT/cfg.json and OUT/sae_weights.safetensors.
    """
    from mmsae.sae.checkpoint import export_saelens, load_sae

    model = load_sae(sae)
    export_saelens(model, out, hook_name=hook_name or sae.rstrip("/").rsplit("/", 1)[-1], model_name=model_name)
    typer.echo(out)


@app.command(epilog=EXPLAIN_HINT)
def demo(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option(help="Folder for everything the demo makes.")] = Path("demo-output"),
) -> None:
    """Run the whole pipeline on this machine (kfp.local) on the toy world.

    Reads the run config (default: the built-in demo profile, src/mmsae/profiles/demo.yaml). Writes OUT/work (artifacts), OUT/mlflow.db (tracking), OUT/summary.json (each step's figures).
    """
    from mmsae.demo import DEMO_PROFILE, run_demo

    summary = run_demo(_config(config or DEMO_PROFILE, set_), out)
    typer.echo(storage.json_text(summary, indent=2, sort_keys=True))
    typer.echo(f"summary: {Path(out).resolve() / 'summary.json'}")
    typer.echo(f"MLflow: mlflow ui --backend-store-uri {summary['tracking_uri']}")
    index = summary["steps"].get("report", {}).get("index")
    if index:
        typer.echo(f"dashboard: {index}")


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="Folder for the compiled pipeline IR YAML files.")] = Path("pipelines/compiled"),
) -> None:
    """Compile the pipelines to KFP IR YAML (upload them in the KFP UI or with `kfp pipeline create`).

    Reads the pipeline definitions (pipelines/). Writes OUT/sae_interp.yaml.
    """
    from kfp import compiler

    from mmsae.pipelines.sae_interp import sae_interp

    out.mkdir(parents=True, exist_ok=True)
    path = out / "sae_interp.yaml"
    compiler.Compiler().compile(sae_interp, str(path))
    typer.echo(str(path))


def entry() -> None:
    """Console entry point; accepts the ``--local_rank=N`` the deepspeed launcher appends."""
    args = []
    for a in sys.argv[1:]:
        if a.startswith("--local_rank"):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1] if "=" in a else "0")
            continue
        args.append(a)
    app(args)


if __name__ == "__main__":  # pragma: no cover
    entry()
