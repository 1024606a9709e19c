"""The interface every explainer backend implements, and what its operations return.

An :class:`Explainer` answers two questions about an SAE feature, both from images only:

- :meth:`Explainer.explain`: given the masked renderings of a feature's top images (PNG bytes; inactive
  regions darkened, as the mine stage draws them), what do the highlighted regions share? Returns an
  :class:`Explanation`: status ``ok`` with a short text, ``unable`` (the explainer saw no common pattern:
  an answer, not an error), or ``failed`` (a reply that could not be parsed, kept in ``raw_reply``; or a
  request the server refused, its message in ``error``).
- :meth:`Explainer.detect`: given an explanation and N images, does each image show what the explanation
  describes? Returns a :class:`Detection` with one bool per image (what the score stage's detection scorer
  compares with the feature's real activations).

Backends: ``mmsae.explainers.openai_client.OpenAIExplainer`` (any OpenAI-compatible chat-completions server
serving a vision LMM) and ``mmsae.explainers.local.LocalExplainer`` (a LLaVA-family checkpoint in this
process, captioning each image). ``mmsae.explainers.cache.CachedExplainer`` wraps either with the run's
response cache; ``mmsae.explainers.open_explainer`` builds the configured one. All methods are coroutines:
call them from one event loop, as many at once as you like; each backend bounds its own concurrency (and
the local one batches the images of the calls in flight). Call :meth:`Explainer.aclose` when done.

Errors. A problem that concerns every request (an endpoint that cannot be reached after the retries, a model
it does not serve, a model that cannot take images, a refused API key) raises :class:`EndpointError` at
once, from the first call that meets it: the caller stops there rather than record one failure per feature.
A problem of one request only becomes that answer's ``failed`` status.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

__all__ = [
    "ANSWER_STATUSES",
    "DETECTION_STATUSES",
    "Detection",
    "EndpointError",
    "ExplainError",
    "Explainer",
    "Explanation",
    "image_digest",
]

OK = "ok"
UNABLE = "unable"
FAILED = "failed"
NO_EXAMPLES = "no_examples"
ANSWER_STATUSES = (OK, UNABLE, FAILED)
"""Statuses of an :class:`Explanation` (the explain stage adds ``no_examples`` for a feature that never fired,
which is never asked)."""
DETECTION_STATUSES = (OK, FAILED)


class ExplainError(RuntimeError):
    """An explain setting, input or explainer that cannot be used; the message says which and what to do."""


class EndpointError(ExplainError):
    """The explainer cannot answer any request (unreachable, unknown model, no images, refused key)."""


def image_digest(png: bytes) -> str:
    """The sha256 of an image's bytes (what the response cache keys answers by)."""
    return hashlib.sha256(png).hexdigest()


@dataclass(frozen=True)
class _Answer:
    """What both operations return besides their result: the reply, its cost, and where it came from."""

    status: str
    raw_reply: str | None = None
    """The reply as it came (the local backend's: its captions, one per line); None without one."""
    latency_s: float | None = None
    """Seconds from sending to the reply, retries included (the original call's, for a cached answer)."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    """Why the request got no usable reply (the server refused it); such answers are never cached."""
    cached: bool = False
    """Taken from the response cache rather than asked now."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def as_cached(self):
        return replace(self, cached=True)


@dataclass(frozen=True)
class Explanation(_Answer):
    """The answer to :meth:`Explainer.explain`; ``status`` is one of :data:`ANSWER_STATUSES`."""

    explanation: str | None = None
    """The short description (status ``ok`` only)."""


@dataclass(frozen=True)
class Detection(_Answer):
    """The answer to :meth:`Explainer.detect`; ``status`` is one of :data:`DETECTION_STATUSES`."""

    matches: list[bool] | None = None
    """Per image, in the order given: does it show what the explanation describes (status ``ok`` only)."""


class Explainer(abc.ABC):
    """An explainer backend: explains a feature from its masked top images, and judges images against an
    explanation. See the module docstring for the contract."""

    backend: ClassVar[str]
    """``openai`` or ``local``."""
    model: str
    """The explaining model as recorded with each answer (a served model's name, a checkpoint's URI)."""
    prompt_hash: str
    """Short hash of the explanation prompt (the template's text, or the local backend's captioning setup)."""
    detect_prompt_hash: str
    """Short hash of the detection prompt."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything that shapes this explainer's answers (model, prompts, image size, generation settings);
        answers of two explainers with equal identities are interchangeable. JSON-able; holds no secret."""

    @abc.abstractmethod
    async def explain(self, images: Sequence[bytes]) -> Explanation:
        """What the highlighted regions of these masked images (PNG bytes) have in common."""

    @abc.abstractmethod
    async def detect(self, explanation: str, images: Sequence[bytes]) -> Detection:
        """Per image (PNG bytes), whether it shows what ``explanation`` describes."""

    async def aclose(self) -> None:  # noqa: B027 - a no-op by default, overridden by backends that hold resources
        """Release connections, threads or models."""
