"""The in-process backend: a LLaVA-family checkpoint (the toy LMM in the demo) captions every image, and the
concept words most captions share are the explanation.

It sees only the images. :meth:`LocalExplainer.explain` captions each masked top image with the model's own
prompt and keeps the words of a vocabulary (by default the toy world's colours and textures) that more than
``agreement`` of the captions name; none is ``unable``. :meth:`LocalExplainer.detect` captions each image
and calls it a match when every concept word of the explanation appears in its caption. Words match as
whole words ("red" is not in "checkered").

Generation runs greedily in a worker thread; the images of every call in flight are captioned together, in
batches of up to ``batch_size``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

from mmsae.explainers.base import FAILED, OK, UNABLE, Detection, Explainer, Explanation

__all__ = ["LocalExplainer", "LocalSettings", "concept_words", "default_vocabulary", "shared_words"]


def default_vocabulary() -> list[str]:
    """The toy world's colour and texture words (the concepts it plants)."""
    from mmsae.data import toyworld

    return [*toyworld.COLORS, *toyworld.TEXTURES]


def concept_words(text: str, vocabulary: Sequence[str]) -> list[str]:
    """The words (or phrases) of ``vocabulary`` that ``text`` names as whole words, in vocabulary order."""
    lowered = " ".join(re.findall(r"\w+", text.lower()))
    return [w for w in vocabulary if re.search(rf"(?<!\w){re.escape(_words(w))}(?!\w)", lowered)]


def _words(text: str) -> str:
    return " ".join(text.lower().split())


def shared_words(captions: Sequence[str], vocabulary: Sequence[str], agreement: float) -> list[str]:
    """The vocabulary words named by more than ``agreement`` of the captions, in vocabulary order."""
    named = [set(concept_words(c, vocabulary)) for c in captions]
    if not captions:
        return []
    return [w for w in vocabulary if sum(w in n for n in named) > agreement * len(captions)]


@dataclass(frozen=True)
class LocalSettings:
    """The checkpoint, how to caption with it, and how to read the captions."""

    model: str
    """URI of the checkpoint (``save_pretrained`` layout, local or s3://)."""
    prompt: str
    """The captioning prompt, with ``<image>`` where the image goes (the model's own)."""
    vocabulary: tuple[str, ...]
    agreement: float = 0.5
    batch_size: int = 16
    max_new_tokens: int | None = None
    """None: the checkpoint's generation config."""
    dtype: str = "float32"
    device: str = "cpu"
    model_fingerprint: str = ""
    """`mmsae.storage.fingerprint` of the checkpoint: a rewritten checkpoint's answers are asked anew."""

    @property
    def prompt_hash(self) -> str:
        """Short hash of the captioning prompt (the ``prompt_hash`` of the answers)."""
        return hashlib.sha256(self.prompt.encode()).hexdigest()[:16]


@dataclass
class _Captions:
    texts: list[str]
    prompt_tokens: list[int]
    completion_tokens: list[int]


class LocalExplainer(Explainer):
    """Explains by captioning with a checkpoint in this process (see the module docstring)."""

    backend: ClassVar[str] = "local"

    def __init__(self, settings: LocalSettings) -> None:
        from mmsae.models import load_lmm

        self.settings = settings
        self.model = settings.model
        self.prompt_hash = self.detect_prompt_hash = settings.prompt_hash
        self._lmm = load_lmm(settings.model, dtype=settings.dtype, device=settings.device)
        self._queue: asyncio.Queue[tuple[list[bytes], asyncio.Future[_Captions]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    def identity(self) -> dict[str, Any]:
        s = self.settings
        return {"backend": self.backend, "model": s.model, "model_fingerprint": s.model_fingerprint,
                "prompt": s.prompt, "vocabulary": list(s.vocabulary), "agreement": s.agreement,
                "max_new_tokens": s.max_new_tokens, "dtype": s.dtype}

    async def explain(self, images: Sequence[bytes]) -> Explanation:
        start = time.perf_counter()
        captions = await self._caption(images)
        words = shared_words(captions.texts, self.settings.vocabulary, self.settings.agreement)
        return Explanation(OK if words else UNABLE, "\n".join(captions.texts), time.perf_counter() - start,
                           sum(captions.prompt_tokens), sum(captions.completion_tokens),
                           explanation=" ".join(words) if words else None)

    async def detect(self, explanation: str, images: Sequence[bytes]) -> Detection:
        start = time.perf_counter()
        words = concept_words(explanation, self.settings.vocabulary)
        if not words:
            return Detection(FAILED, None, 0.0, error=f"the explanation {explanation!r} names none of the "
                             f"concept words {list(self.settings.vocabulary)}")
        captions = await self._caption(images)
        matches = [set(words) <= set(concept_words(c, words)) for c in captions.texts]
        return Detection(OK, "\n".join(captions.texts), time.perf_counter() - start,
                         sum(captions.prompt_tokens), sum(captions.completion_tokens), matches=matches)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    # ----------------------------------------------------------------------------------------------
    # batched captioning

    async def _caption(self, images: Sequence[bytes]) -> _Captions:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._batches())
        done: asyncio.Future[_Captions] = asyncio.get_running_loop().create_future()
        await self._queue.put((list(images), done))
        return await done

    async def _batches(self) -> None:
        """Caption what is queued, in batches of up to ``batch_size`` images, one batch at a time."""
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            count = len(jobs[0][0])
            while count < self.settings.batch_size and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                count += len(jobs[-1][0])
            try:
                pngs = [png for images, _ in jobs for png in images]
                out = await asyncio.to_thread(self._caption_all, pngs)
            except Exception as e:  # every waiting call gets the error
                for _, done in jobs:
                    if not done.done():
                        done.set_exception(e)
                continue
            at = 0
            for images, done in jobs:
                n = len(images)
                if not done.done():
                    done.set_result(_Captions(out.texts[at:at + n], out.prompt_tokens[at:at + n],
                                              out.completion_tokens[at:at + n]))
                at += n

    def _caption_all(self, images: list[bytes]) -> _Captions:
        out = _Captions([], [], [])
        step = self.settings.batch_size
        for begin in range(0, len(images), step):
            part = self._caption_batch([_rgb(png) for png in images[begin:begin + step]])
            out.texts += part.texts
            out.prompt_tokens += part.prompt_tokens
            out.completion_tokens += part.completion_tokens
        return out

    @torch.inference_mode()
    def _caption_batch(self, images: list[Image.Image]) -> _Captions:
        """Greedy captions of one batch; prompts left-padded (their image token counts may differ)."""
        model, processor = self._lmm.model, self._lmm.processor
        tokenizer = processor.tokenizer
        old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            enc = processor(images=images, text=[self.settings.prompt] * len(images), padding=True,
                            return_tensors="pt").to(model.device)
        finally:
            tokenizer.padding_side = old_side
        max_new = self.settings.max_new_tokens or int(model.generation_config.max_new_tokens or 40)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generated = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
        new = generated[:, enc["input_ids"].shape[1]:]
        texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        completion = [int(_length(row, tokenizer.eos_token_id, pad)) for row in new]
        return _Captions(texts, enc["attention_mask"].sum(dim=1).tolist(), completion)


def _length(row: torch.Tensor, eos: int | None, pad: int | None) -> int:
    """Generated tokens up to and including the first end-of-sequence token."""
    if eos is not None:
        ends = (row == eos).nonzero()
        if len(ends):
            return int(ends[0, 0]) + 1
    return int((row != pad).sum()) if pad is not None else len(row)


def _rgb(png: bytes) -> Image.Image:
    with Image.open(io.BytesIO(png)) as img:
        return img.convert("RGB")
