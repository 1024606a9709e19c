"""The response cache: every answer an explainer gave, one small JSON file each, in the run's storage.

The key of an answer is the sha256 of the question: the operation (explain or detect), the explainer's
:meth:`~mmsae.explainers.base.Explainer.identity` (model, prompt template hash, image size, generation
settings), the sha256 of each image in order, and for detection the explanation judged. An answer is
written as soon as it arrives, so a rerun, a retried pipeline step, a killed run or a second layer of the
same run never asks the same question twice. Answers without a reply (a request the server refused) are
not kept.

Layout: ``<cache>/<key[:2]>/<key>.json`` holding ``{"key", "operation", "identity", "answer"}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from mmsae import storage
from mmsae.explainers.base import Detection, Explainer, Explanation, image_digest

log = logging.getLogger(__name__)

__all__ = ["CachedExplainer", "question_key"]


def question_key(operation: str, identity: dict[str, Any], images: Sequence[bytes],
                 explanation: str | None = None) -> str:
    """The cache key of one question (hex sha256)."""
    question = {"operation": operation, "identity": identity, "images": [image_digest(png) for png in images],
                "explanation": explanation}
    return hashlib.sha256(json.dumps(question, sort_keys=True).encode()).hexdigest()


class CachedExplainer(Explainer):
    """An explainer whose answers are read from, and written to, the response cache at ``uri``."""

    def __init__(self, inner: Explainer, uri: str) -> None:
        self.inner = inner
        self.uri = uri
        self.backend = inner.backend  # type: ignore[misc]
        self.model = inner.model
        self.prompt_hash = inner.prompt_hash
        self.detect_prompt_hash = inner.detect_prompt_hash
        self.hits = 0
        self.misses = 0

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    async def explain(self, images: Sequence[bytes]) -> Explanation:
        key = question_key("explain", self.identity(), images)
        found = await self._read(key)
        if found is not None:
            return Explanation.from_json(found).as_cached()
        answer = await self.inner.explain(images)
        await self._write(key, "explain", answer)
        return answer

    async def detect(self, explanation: str, images: Sequence[bytes]) -> Detection:
        key = question_key("detect", self.identity(), images, explanation)
        found = await self._read(key)
        if found is not None:
            return Detection.from_json(found).as_cached()
        answer = await self.inner.detect(explanation, images)
        await self._write(key, "detect", answer)
        return answer

    async def aclose(self) -> None:
        await self.inner.aclose()

    def _path(self, key: str) -> str:
        return storage.join(self.uri, key[:2], f"{key}.json")

    async def _read(self, key: str) -> dict[str, Any] | None:
        """The cached answer of ``key``; None when absent (or unreadable: it is asked again and rewritten)."""
        try:
            data = await asyncio.to_thread(storage.read_json, self._path(key))
        except FileNotFoundError:
            self.misses += 1
            return None
        except storage.StorageError as e:
            log.warning("response cache entry %s is unreadable (%s): asking again", self._path(key), e)
            self.misses += 1
            return None
        if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("answer"), dict):
            self.misses += 1
            return None
        self.hits += 1
        return data["answer"]

    async def _write(self, key: str, operation: str, answer: Explanation | Detection) -> None:
        if answer.error is not None:
            return
        entry = {"key": key, "operation": operation, "identity": self.identity(), "answer": answer.to_json()}
        await asyncio.to_thread(storage.write_json, self._path(key), entry, indent=None)
