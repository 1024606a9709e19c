"""Explainers: what turns a feature's masked top images into a short description, and judges images
against one.

- `base`: the interface (:class:`Explainer`: ``explain(images)``, ``detect(explanation, images)``), what it
  returns (:class:`Explanation`, :class:`Detection`) and its errors.
- `openai_client`: any OpenAI-compatible chat-completions server serving a vision LMM.
- `local`: a LLaVA-family checkpoint in this process (the toy LMM in the demo), captioning each image.
- `prompts`: the replaceable prompt templates and the parsing of replies.
- `cache`: the response cache every backend is wrapped in.
- `loopback`: a scripted chat-completions server on 127.0.0.1, for the tests and the benchmark.

How a stage gets the configured explainer (the explain stage does this; the score stage does the same)::

    plan = plan_explainer(cfg.explain, default_model=lambda: shards.model)
    async def work():
        explainer = CachedExplainer(plan.open(), cache_uri)
        try:
            answer = await explainer.detect("red objects", [png1, png2])
        finally:
            await explainer.aclose()

:func:`plan_explainer` reads the settings and templates and loads nothing, so a stage can compute its output
key (:meth:`ExplainerPlan.key_settings`) before deciding whether there is any work to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmsae import storage
from mmsae.config import ExplainConfig
from mmsae.explainers.base import (
    ANSWER_STATUSES,
    DETECTION_STATUSES,
    FAILED,
    NO_EXAMPLES,
    OK,
    UNABLE,
    Detection,
    EndpointError,
    Explainer,
    ExplainError,
    Explanation,
)
from mmsae.explainers.cache import CachedExplainer
from mmsae.explainers.openai_client import BASE_URL_ENV, DEFAULT_MAX_TOKENS, ClientSettings
from mmsae.explainers.prompts import (
    DEFAULT_DETECT_TEMPLATE,
    DEFAULT_EXPLAIN_TEMPLATE,
    PromptTemplate,
    load_template,
)

__all__ = [
    "ANSWER_STATUSES",
    "DETECTION_STATUSES",
    "FAILED",
    "NO_EXAMPLES",
    "OK",
    "UNABLE",
    "CachedExplainer",
    "Detection",
    "EndpointError",
    "ExplainError",
    "Explainer",
    "ExplainerPlan",
    "Explanation",
    "plan_explainer",
]


@dataclass(frozen=True)
class ExplainerPlan:
    """The explainer the config asks for, resolved (backend, model, templates) but not opened."""

    backend: str
    """``openai`` or ``local``."""
    settings: Any
    """`mmsae.explainers.openai_client.ClientSettings` or `mmsae.explainers.local.LocalSettings`."""
    explain_template: PromptTemplate | None = None
    detect_template: PromptTemplate | None = None

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def prompt_hash(self) -> str:
        """The explanation prompt's hash, as the opened explainer reports it."""
        if self.explain_template is not None:
            return self.explain_template.digest
        return self.settings.prompt_hash

    def open(self) -> Explainer:
        """The backend itself (the local one loads its checkpoint here); call it from the event loop it
        serves."""
        if self.backend == "openai":
            from mmsae.explainers.openai_client import OpenAIExplainer

            return OpenAIExplainer(self.settings, self.explain_template, self.detect_template)
        from mmsae.explainers.local import LocalExplainer

        return LocalExplainer(self.settings)

    def key_settings(self) -> dict[str, Any]:
        """What shapes the explanations (not detection, not where the server is): for an output key."""
        s = self.settings
        if self.backend == "openai":
            return {"backend": "openai", "model": s.model, "prompt_template": self.explain_template.digest,
                    "image_long_side": s.image_long_side, "max_new_tokens": s.max_tokens,
                    "temperature": s.temperature}
        return {"backend": "local", "prompt": s.prompt, "vocabulary": list(s.vocabulary),
                "agreement": s.agreement, "max_new_tokens": s.max_new_tokens, "dtype": s.dtype}

    def inputs(self) -> dict[str, str]:
        """Inputs the answers depend on besides the images (the local checkpoint), for an output key."""
        return {"explainer_model": self.settings.model} if self.backend == "local" else {}


def plan_explainer(cfg: ExplainConfig, default_model: Callable[[], str]) -> ExplainerPlan:
    """Resolve ``explain.backend`` (``auto``: openai when an endpoint is configured or ``$OPENAI_BASE_URL`` is
    set, else local), its model and its templates. ``default_model`` gives the local backend's checkpoint when
    ``explain.model`` is empty (the model the shards were cached from)."""
    endpoint = cfg.endpoint or os.environ.get(BASE_URL_ENV, "")
    backend = cfg.backend if cfg.backend != "auto" else ("openai" if endpoint else "local")
    if backend == "openai":
        return _plan_openai(cfg, endpoint)
    return _plan_local(cfg, default_model)


def _plan_openai(cfg: ExplainConfig, endpoint: str) -> ExplainerPlan:
    if not endpoint:
        raise ExplainError(f"explain.backend=openai needs the server's base URL: set explain.endpoint (or "
                           f"${BASE_URL_ENV}), e.g. http://vllm:8000/v1")
    if not cfg.model:
        raise ExplainError(f"explain.model is empty: name the model the server at {endpoint} serves (GET "
                           f"{endpoint.rstrip('/')}/models lists them)")
    settings = ClientSettings(
        endpoint=endpoint, model=cfg.model, image_long_side=cfg.image_long_side,
        max_tokens=cfg.max_new_tokens or DEFAULT_MAX_TOKENS, temperature=cfg.temperature,
        concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries)
    explain_template = load_template(cfg.prompt_template, DEFAULT_EXPLAIN_TEMPLATE, "explain.prompt_template")
    detect_template = load_template(cfg.detect_template, DEFAULT_DETECT_TEMPLATE, "explain.detect_template")
    return ExplainerPlan("openai", settings, explain_template, detect_template)


def _plan_local(cfg: ExplainConfig, default_model: Callable[[], str]) -> ExplainerPlan:
    from mmsae.explainers.local import LocalSettings, default_vocabulary
    from mmsae.stages._base import choose_device, model_prompt

    model = cfg.model or default_model()
    if not model:
        raise ExplainError("the local explainer needs a checkpoint: set explain.model (the shards name none)")
    model = storage.absolute(model)
    try:
        fingerprint = storage.fingerprint(model)
    except FileNotFoundError as e:
        raise ExplainError(f"the local explainer's checkpoint {model} does not exist ({e}); "
                           "set explain.model") from e
    settings = LocalSettings(
        model=model, prompt=model_prompt(model), vocabulary=tuple(cfg.vocabulary or default_vocabulary()),
        agreement=cfg.agreement, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
        dtype=cfg.dtype, device=str(choose_device(cfg.device)), model_fingerprint=fingerprint)
    return ExplainerPlan("local", settings)
