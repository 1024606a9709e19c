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
    "SaeConfigError", "CheckpointError", "ExplainError", "ScoreError", "SteerError", "AttributionError", "KfpError", "RunsError",
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
pipeline_app = typer.Typer(help="The Kubeflow pipelines: compile, upload, submit a run, schedule recurring runs.")
runs_app = typer.Typer(help="Pipeline runs tracked in MLflow: compare them.")
config_app = typer.Typer(help="Inspect and validate run configs.")
sae_app = typer.Typer(help="SAE checkpoints: convert between layouts.")
app.add_typer(sae_app, name="sae")
app.add_typer(toyworld_app, name="toyworld")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(runs_app, name="runs")
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
    top_examples: Annotated[
        str | None, typer.Option(help="Top-examples URI (overrides explain.top_examples).")
    ] = None,
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
def score(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    explanations: Annotated[str | None, typer.Option(help="Explanations URI (overrides score.explanations).")] = None,
    top_examples: Annotated[str | None, typer.Option(help="Top-examples URI (overrides score.top_examples).")] = None,
    out: Annotated[str | None, typer.Option(help="Output URI (overrides score.out).")] = None,
) -> None:
    """Score each explanation (IoU, CLIP score, detection, ground truth), each beside its random baseline.

    Reads the `score` config section, the explanations of the explain stage (default RUN.WORKDIR/explain), the
    top examples they were made from (default RUN.WORKDIR/mine), the image set and model the shards name, and
    the configured checkpoints (score.clip_model, score.grounding_model, score.sam_model); detection asks the
    explain stage's explainer through its response cache. Writes scores.jsonl and a manifest to score.out
    (default RUN.WORKDIR/score).
    """
    from mmsae.stages import score as stage

    cfg = _config(config, set_)
    if out:
        cfg.score.out = out
    result = stage.run(cfg, explanations=explanations, top_examples=top_examples)
    typer.echo(storage.json_text({"scores": result.uri, **result.figures}, indent=2))


@app.command(epilog=EXPLAIN_HINT)
def steer(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    top_examples: Annotated[str | None, typer.Option(help="Top-examples URI (overrides steer.top_examples).")] = None,
    explanations: Annotated[str | None, typer.Option(help="Explanations URI (overrides steer.explanations).")] = None,
    attributions: Annotated[str | None, typer.Option(help="Attributions URI (overrides steer.attributions).")] = None,
    out: Annotated[str | None, typer.Option(help="Output URI (overrides steer.out).")] = None,
) -> None:
    """Clamp features while the LMM generates and measure how the output moves (a dose-response per feature).

    Reads the `steer` config section, the top examples of the mine stage (default RUN.WORKDIR/mine: the SAE, its
    hook point, the LMM and image set, the features' max activations), the explanations (default
    RUN.WORKDIR/explain when there: the features explained, their concepts) or the attributions' top features.
    Writes steering.jsonl, random_baseline.jsonl, dose_response.json and .png and a manifest to steer.out
    (default RUN.WORKDIR/steer).
    """
    from mmsae.stages import steer as stage

    cfg = _config(config, set_)
    if out:
        cfg.steer.out = out
    result = stage.run(cfg, top_examples=top_examples, explanations=explanations, attributions=attributions)
    typer.echo(storage.json_text({"steering": result.uri, **result.figures}, indent=2))


@app.command(epilog=EXPLAIN_HINT)
def attribute(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    top_examples: Annotated[
        str | None, typer.Option(help="Top-examples URI (overrides attribute.top_examples).")
    ] = None,
    out: Annotated[str | None, typer.Option(help="Output URI (overrides attribute.out).")] = None,
) -> None:
    """Find the SAE features behind an answer token: every feature at every position, one forward and one backward.

    Reads the `attribute` config section and the top examples of the mine stage (default RUN.WORKDIR/mine: the
    SAE, its hook point, the LMM and image set). Writes attributions.jsonl (top features per example),
    maps.safetensors (per-token maps), heat maps of the image-token attributions and a manifest to
    attribute.out (default RUN.WORKDIR/attribute).
    """
    from mmsae.stages import attribute as stage

    cfg = _config(config, set_)
    if out:
        cfg.attribute.out = out
    result = stage.run(cfg, top_examples=top_examples)
    typer.echo(storage.json_text({"attributions": result.uri, **result.figures}, indent=2))


@app.command(epilog=EXPLAIN_HINT)
def report(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    top_examples: Annotated[str | None, typer.Option(help="Top-examples URI (overrides report.top_examples).")] = None,
    explanations: Annotated[str | None, typer.Option(help="Explanations JSONL or folder.")] = None,
    scores: Annotated[str | None, typer.Option(help="Scores JSONL or folder.")] = None,
    steering: Annotated[str | None, typer.Option(help="Steering artifact folder or JSONL.")] = None,
    attributions: Annotated[str | None, typer.Option(
        help="Attributions artifact folder (overrides report.attributions).")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder (overrides report.out).")] = None,
) -> None:
    """Render the run's dashboard: one self-contained HTML page.

    Reads the top-examples artifact of the mine stage (default RUN.WORKDIR/mine), the run's step summaries
    and, when given, explanations, scores and steering results (JSONL; a steering artifact's dose-response
    too) and an attributions artifact (the attribute stage's examples and heat maps). Writes OUT/index.html
    (default RUN.WORKDIR/report) with a manifest, and logs the page to MLflow.
    """
    from mmsae.stages import report as stage

    cfg = _config(config, set_)
    if out:
        cfg.report.out = out
    result = stage.run(cfg, top_examples=top_examples, explanations=explanations, scores=scores, steering=steering,
                       attributions=attributions)
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

    Reads the run config (default: the built-in demo profile, src/mmsae/profiles/demo.yaml). Writes OUT/work (artifacts), OUT/mlflow.db (tracking), OUT/summary.json (each step's figures, per layer).
    """
    from mmsae.demo import DEMO_PROFILE, run_demo

    summary = run_demo(_config(config or DEMO_PROFILE, set_), out)
    typer.echo(storage.json_text(summary, indent=2, sort_keys=True))
    typer.echo(f"summary: {Path(out).resolve() / 'summary.json'}")
    typer.echo(f"MLflow: mlflow ui --backend-store-uri {summary['tracking_uri']}")
    for layer, steps in summary["layers"].items():
        index = steps.get("report", {}).get("index")
        if index:
            typer.echo(f"dashboard of layer {layer}: {index}")


EndpointOpt = Annotated[
    str | None,
    typer.Option(help="KFP API URL (default $KF_PIPELINES_ENDPOINT); the token comes from $KF_PIPELINES_TOKEN, "
                      "else a projected service-account token ($KF_PIPELINES_SA_TOKEN_PATH)."),
]
NamespaceOpt = Annotated[
    str | None,
    typer.Option(help="KFP namespace: your profile namespace on multi-user Kubeflow (default "
                      "$KF_PIPELINES_NAMESPACE; none: shared pipelines)."),
]
ExperimentOpt = Annotated[str, typer.Option(help="KFP experiment of the runs (made if missing).")]


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="Folder for the compiled pipeline IR YAML files.")] = Path("pipelines/compiled"),
    pipeline: Annotated[list[str] | None, typer.Option(help="A pipeline to compile (repeatable); default all.")] = None,
) -> None:
    """Compile the pipelines to KFP IR YAML (upload them in the KFP UI, or with `mmsae pipeline upload`).

    Reads the pipeline definitions (pipelines/) and the compile-time settings they name ($MMSAE_BASE_IMAGE,
    $MMSAE_TRAIN_IMAGE, the GPU and cluster settings of pipelines/cluster.py). Writes OUT/<pipeline>.yaml for
    each pipeline (sae_interp: every configured layer; retrain_layer: the next layer that needs it).
    """
    from mmsae import kfp_client

    for name in pipeline or kfp_client.pipeline_names():
        typer.echo(str(kfp_client.compile_pipeline(name, out)))


@pipeline_app.command("upload")
def pipeline_upload(
    pipeline: Annotated[list[str] | None, typer.Option(help="A pipeline to upload (repeatable); default all.")] = None,
    endpoint: EndpointOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Compile the pipelines and upload each to KFP as a new version of its pipeline (made if missing).

    Reads the pipeline definitions and the KFP endpoint and credentials. Writes to KFP one pipeline version
    per pipeline, named <mmsae version>-<content hash>: an unchanged pipeline's version is already there and
    is left as it is. Prints each pipeline's and version's id.
    """
    from mmsae import kfp_client

    conn = kfp_client.connection(endpoint, namespace=namespace)
    uploaded = kfp_client.upload_all(kfp_client.connect(conn), conn, pipeline or kfp_client.pipeline_names())
    typer.echo(storage.json_text(uploaded, indent=2))


@pipeline_app.command("submit", epilog=EXPLAIN_HINT)
def pipeline_submit(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    pipeline: Annotated[str, typer.Option(help="The pipeline to run.")] = "sae_interp",
    run_name: Annotated[str | None, typer.Option(help="Name of the KFP run (and MLflow parent run); "
                                                      "default <run.name>-<date>-<time>.")] = None,
    experiment: ExperimentOpt = "mmsae",
    endpoint: EndpointOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Start a run of a pipeline on Kubeflow with a run config.

    Reads the run config (checked here before anything is sent) and the KFP endpoint and credentials. Writes
    to KFP the pipeline's version (unless it is there already) and a run whose `config_yaml` parameter is the
    resolved run config as YAML. Prints the run's id and URL.
    """
    import time

    from mmsae import kfp_client

    cfg = _config(config, set_)
    name = run_name or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with kfp_client.compiled(pipeline) as package:
        conn = kfp_client.connection(endpoint, namespace=namespace)
        result = kfp_client.submit(kfp_client.connect(conn), conn, package, dump_config(cfg),
                                   experiment=experiment, run_name=name)
    typer.echo(storage.json_text(result, indent=2))


@pipeline_app.command("schedule", epilog=EXPLAIN_HINT)
def pipeline_schedule(
    cron: Annotated[str, typer.Option(help="When to run, in KFP's cron format: 6 fields, seconds first "
                                           "('0 0 3 * * *': 03:00 daily), or @daily, @every 12h.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    pipeline: Annotated[str, typer.Option(help="The pipeline to run.")] = "retrain_layer",
    max_concurrency: Annotated[int, typer.Option(help="Most runs of the schedule at once (1 to 10).")] = 1,
    catch_up: Annotated[bool, typer.Option(help="Also start the runs of times missed while paused.")] = False,
    name: Annotated[str | None, typer.Option(help="Name of the recurring run; default <run.name>-<pipeline>.")] = None,
    experiment: ExperimentOpt = "mmsae",
    endpoint: EndpointOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Create a recurring run of a pipeline on Kubeflow: the same run config at every time of a cron schedule.

    Reads the run config (checked here first) and the KFP endpoint and credentials. Writes to KFP the
    pipeline's version (unless it is there already) and an enabled recurring run whose runs get the resolved
    run config as their `config_yaml` parameter. With retrain_layer, each run trains the next configured layer
    that has no finished SAE yet. Prints the recurring run's id and URL.
    """
    from mmsae import kfp_client

    cfg = _config(config, set_)
    kfp_client.check_cron(cron)
    with kfp_client.compiled(pipeline) as package:
        conn = kfp_client.connection(endpoint, namespace=namespace)
        result = kfp_client.schedule(kfp_client.connect(conn), conn, package, dump_config(cfg),
                                     experiment=experiment, name=name or f"{cfg.run.name}-{pipeline}", cron=cron,
                                     max_concurrency=max_concurrency, catch_up=catch_up)
    typer.echo(storage.json_text(result, indent=2))


@runs_app.command("compare")
def runs_compare(
    experiment: Annotated[list[str] | None, typer.Option(
        "--experiment", "-e", help="MLflow experiment (repeatable); default mmsae, or every one with --kfp-run.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Only pipeline runs with this tag: KEY=VALUE (repeatable).")] = None,
    kfp_run: Annotated[list[str] | None, typer.Option(help="Only the pipeline run of this KFP run id (repeatable).")] = None,
    column: Annotated[list[str] | None, typer.Option(
        help="Another figure: LABEL=STAGE:METRIC, e.g. mean_l0=mine:mean_l0 (repeatable).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default $MLFLOW_TRACKING_URI).")] = None,
    plot: Annotated[Path, typer.Option(help="Where to write the plot (PNG).")] = Path("runs-compare.png"),
    csv: Annotated[Path | None, typer.Option(help="Also write the table as CSV here.")] = None,
) -> None:
    """Compare pipeline runs: FVU, dead share, detection accuracy, explanation scores and steering success
    beside layer, width, k, model and image set.

    Reads from MLflow the pipeline runs of the experiments, narrowed by --tag and --kfp-run, and their stage
    runs. Prints a table (one row per SAE; blank: not logged); writes the plot of each figure against layer,
    width and k to PLOT and, with --csv, the table to CSV.
    """
    from mmsae import runs

    tags = {}
    for item in tag or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise runs.RunsError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key] = value
    comparison = runs.compare(tracking_uri, experiment or [], tags, kfp_run or [],
                              [runs.parse_column(text) for text in column or []])
    typer.echo(runs.format_table(comparison))
    typer.echo(f"plot: {runs.plot(comparison, plot)}")
    if csv:
        runs.write_csv(comparison, csv)
        typer.echo(f"table: {csv}")


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
