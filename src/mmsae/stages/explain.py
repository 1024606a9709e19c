"""Stage explain: a short description of each selected feature, from the masked renderings of its top images.

Reads: a top-examples artifact (``explain.top_examples``; ``mmsae.examples``): the features the mine stage
selected, and for each the masked heat maps of its first ``explain.max_images`` top images; for the local
backend also the checkpoint the shards were cached from. Writes an explanations artifact at ``explain.out``:

    manifest.json              kind "explanations", format 1; extra: backend, explainer_model, prompt_hash,
                               hookpoint, figures, output_key
    explanations.jsonl         one object per selected feature, by feature id: feature, explanation,
                               status (ok / unable / failed / no_examples), explainer_model, prompt_hash,
                               raw_reply, latency_s, prompt_tokens, completion_tokens, cached, images (the
                               image_idx shown), error (why a request got no reply; else null)
    explanations_paper.json    the paper's layout: a JSON list of one-key dicts
                               {"<hookpoint>_feature<i>": text} (unable: "Unable to produce descriptions";
                               failed: "Explanation could not be parsed."; features that never fired are
                               left out)

The explainer is `mmsae.explainers` (``explain.backend``), wrapped in the response cache
(``explain.cache``): every answer is written as it arrives, so a rerun, a retried step or a killed run asks
only what is still unanswered. A feature that never fired is ``no_examples`` and costs no call. An explainer
that cannot answer at all (endpoint unreachable after its retries, unknown model, no images) fails the stage
with one error; nothing is sealed, and what was answered stays cached.

A sealed artifact made from the same key (the settings that shape the explanations, the fingerprints of the
top examples and, locally, of the checkpoint) is reused; another is refused unless ``run.overwrite`` is set.
Concurrency, time-outs, retries, the endpoint's address, the device and batch size are not in the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from mmsae import examples, storage
from mmsae.config import ExplainConfig, RunConfig
from mmsae.explainers import (
    FAILED,
    NO_EXAMPLES,
    OK,
    UNABLE,
    CachedExplainer,
    ExplainerPlan,
    ExplainError,
    Explanation,
    plan_explainer,
)
from mmsae.explainers.prompts import PAPER_UNABLE_TEXT, PAPER_UNPARSED_TEXT
from mmsae.stages._base import (
    KEY_FIELD,
    OutputKey,
    StageContext,
    StageOutputs,
    resolve_uri,
    reusable_output,
    stage_context,
)

log = logging.getLogger(__name__)

STEP = "explain"
KIND = "explanations"
FORMAT_VERSION = 1
RECORDS_FILE = "explanations.jsonl"
PAPER_FILE = "explanations_paper.json"
STATUSES = (OK, UNABLE, FAILED, NO_EXAMPLES)
PROGRESS_STEPS = 20
"""Progress figures are logged about this many times over a run."""


def run(cfg: RunConfig, top_examples: str | None = None, parent_run_id: str | None = None) -> StageOutputs:
    """Explain the selected features; ``top_examples`` overrides the config's URI (the pipeline's input)."""
    workdir = cfg.run.workdir
    e = cfg.explain.model_copy(update={
        "top_examples": resolve_uri(top_examples, cfg.explain.top_examples, workdir, "mine"),
        "out": resolve_uri(None, cfg.explain.out, workdir, STEP),
        "cache": resolve_uri(None, cfg.explain.cache, workdir, "explain-cache"),
    })
    with stage_context(cfg, STEP, {"explain": e.model_dump(mode="json")}, parent_run_id, output=e.out) as ctx:
        top = _open_top_examples(e.top_examples)
        plan = plan_explainer(e, default_model=lambda: _shards_model(top))
        key = output_key(e, plan)
        sealed = reusable_output(e.out, KIND, key, overwrite=cfg.run.overwrite, setting="explain.out")
        figures = dict(sealed.extra["figures"]) if sealed is not None else _explain(e, plan, top, key, ctx)
        ctx.finish(figures)
    return StageOutputs(e.out, figures)


def output_key(e: ExplainConfig, plan: ExplainerPlan) -> OutputKey:
    """What explanations are made from: the settings that shape them and the fingerprints of their inputs."""
    return OutputKey.of({**plan.key_settings(), "max_images": e.max_images},
                        {"top_examples": e.top_examples, **plan.inputs()})


# ---------------------------------------------------------------------------------------------------
# inputs


def _open_top_examples(uri: str) -> examples.TopExamples:
    try:
        return examples.TopExamples(uri)
    except FileNotFoundError as e:
        raise ExplainError(f"explain.top_examples {uri} holds no top examples ({e}); run the mine stage "
                           "first") from e


def _shards_model(top: examples.TopExamples) -> str:
    """The checkpoint the shards behind the top examples were cached from ('' when they name none)."""
    from mmsae.activations import ActivationShards

    shards = top.manifest.inputs.get("shards", "")
    try:
        return ActivationShards(shards).model if shards else ""
    except (FileNotFoundError, storage.ManifestError) as e:
        raise ExplainError(f"the shards {shards!r} named by the top examples at {top.uri} cannot be read "
                           f"({e}); set explain.model to the checkpoint that explains") from e


@dataclass
class _Feature:
    """One selected feature: the top images whose masked heat maps are shown (empty: it never fired)."""

    feature: int
    images: list[int]


def _features(e: ExplainConfig, top: examples.TopExamples) -> list[_Feature]:
    """The selected features and the images to show; an error when a feature that fired has no masked map."""
    out = []
    for feature in top.selected:
        record = top.feature(feature)
        shown = [i for i in record.top_images if top.heatmap_uri(feature, i, "masked") is not None]
        if record.top and not shown:
            raise ExplainError(f"the top examples at {e.top_examples} hold no masked heat map of feature "
                               f"{feature}; run the mine stage with mine.heatmaps=mined or selected")
        out.append(_Feature(feature, shown[: e.max_images]))
    return out


# ---------------------------------------------------------------------------------------------------
# asking


def _explain(e: ExplainConfig, plan: ExplainerPlan, top: examples.TopExamples, key: OutputKey,
             ctx: StageContext) -> dict[str, Any]:
    """Ask about every selected feature, write the artifact (sealed last) and return its figures."""
    features = _features(e, top)
    asked = [f for f in features if f.images]
    log.info("explaining %d features (%d never fired) with the %s backend, model %s", len(asked),
             len(features) - len(asked), plan.backend, plan.model)
    start = time.perf_counter()
    answers, cache_hits = asyncio.run(_ask_all(e, plan, top, asked, ctx))
    seconds = time.perf_counter() - start
    records = [_record(f, answers.get(f.feature), plan) for f in features]
    figures = _figures(records, len(asked), seconds, cache_hits)
    hookpoint = str(top.extra.get("hookpoint", "features"))
    files = {RECORDS_FILE: "".join(storage.json_text(r) + "\n" for r in records).encode(),
             PAPER_FILE: storage.json_text(_paper_layout(records, hookpoint), indent=1).encode()}
    for name, data in files.items():
        storage.write_bytes(storage.join(e.out, name), data)
    entries = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
               for name, data in files.items()}
    storage.write_manifest(
        e.out, KIND, files=entries, config={"explain": e.model_dump(mode="json")},
        inputs={"top_examples": e.top_examples, **plan.inputs()}, format_version=FORMAT_VERSION,
        extra={"backend": plan.backend, "explainer_model": plan.model, "prompt_hash": plan.prompt_hash,
               "hookpoint": hookpoint, "features": [r["feature"] for r in records], "figures": figures,
               KEY_FIELD: key.to_json()})
    log.info("explained %d features at %s: %s", len(records), e.out, figures)
    return figures


async def _ask_all(e: ExplainConfig, plan: ExplainerPlan, top: examples.TopExamples, asked: list[_Feature],
                   ctx: StageContext) -> tuple[dict[int, Explanation], int]:
    """Every feature's answer (by feature id) and the number taken from the cache; the first error that stops
    the explainer cancels the rest and is raised alone."""
    explainer = CachedExplainer(plan.open(), e.cache)
    slots = asyncio.Semaphore(2 * e.concurrency)  # the next requests are ready as slots free; bounds memory

    async def one(feature: _Feature) -> tuple[int, Explanation]:
        async with slots:
            images = await asyncio.to_thread(_masked_images, top, feature)
            return feature.feature, await explainer.explain(images)

    answers: dict[int, Explanation] = {}
    progress = _Progress(len(asked), ctx)
    tasks = [asyncio.create_task(one(f)) for f in asked]
    try:
        for next_done in asyncio.as_completed(tasks):
            feature, answer = await next_done
            answers[feature] = answer
            progress.update(answer)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.close()
        await explainer.aclose()
    return answers, explainer.hits


def _masked_images(top: examples.TopExamples, feature: _Feature) -> list[bytes]:
    return [top.heatmap_bytes(feature.feature, i, "masked") for i in feature.images]


@dataclass
class _Progress:
    """The progress bar (with counts per status) and the progress figures logged along the way."""

    total: int
    ctx: StageContext
    counts: Counter = field(default_factory=Counter)
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.bar = tqdm(total=self.total, desc="explain", unit="feature")
        self.every = max(1, self.total // PROGRESS_STEPS)

    def update(self, answer: Explanation) -> None:
        self.counts[answer.status] += 1
        self.bar.update(1)
        self.bar.set_postfix({s: self.counts[s] for s in ("ok", "unable", "failed")}, refresh=False)
        done = self.bar.n
        if done % self.every == 0 or done == self.total:
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            self.ctx.log_progress({"features_done": done, "features_per_s": rate, **self.counts}, step=done)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------------
# the artifact


def _record(feature: _Feature, answer: Explanation | None, plan: ExplainerPlan) -> dict[str, Any]:
    """One line of explanations.jsonl."""
    if answer is None:  # never fired: not asked
        answer = Explanation(NO_EXAMPLES)
    return {"feature": feature.feature, "explanation": answer.explanation if answer.status == OK else None,
            "status": answer.status, "explainer_model": plan.model,
            "prompt_hash": plan.prompt_hash, "raw_reply": answer.raw_reply,
            "latency_s": answer.latency_s, "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens, "cached": answer.cached, "images": feature.images,
            "error": answer.error}


def _paper_layout(records: list[dict[str, Any]], hookpoint: str) -> list[dict[str, str]]:
    """The paper's explanations file: ``[{"<hookpoint>_feature<i>": text}, ...]``."""
    texts: dict[str, Callable[[dict[str, Any]], str]] = {
        OK: lambda r: r["explanation"], UNABLE: lambda r: PAPER_UNABLE_TEXT,
        FAILED: lambda r: PAPER_UNPARSED_TEXT}
    return [{f"{hookpoint}_feature{r['feature']}": texts[r["status"]](r)}
            for r in records if r["status"] in texts]


def _figures(records: list[dict[str, Any]], asked: int, seconds: float, cache_hits: int) -> dict[str, Any]:
    counts = Counter(r["status"] for r in records)
    fresh = [r for r in records if r["status"] != NO_EXAMPLES and not r["cached"]]
    latencies = [r["latency_s"] for r in fresh if r["latency_s"] is not None]
    return {
        "features": len(records),
        **{status: counts.get(status, 0) for status in STATUSES},
        "cached": cache_hits,
        "requests": len(fresh),
        "features_per_s": asked / seconds if seconds > 0 else 0.0,
        "mean_latency_s": sum(latencies) / len(latencies) if latencies else None,
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in fresh),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in fresh),
    }
