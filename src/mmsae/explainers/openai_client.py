"""The OpenAI-compatible backend: any chat-completions server serving a vision LMM (vLLM, SGLang, KServe, a
hosted API), through the official SDK's ``AsyncOpenAI``.

Each question is one chat completion: the template's system message, then a user message of its text
followed by the images as base64 PNG ``image_url`` parts (resized so the long side is ``image_long_side``).
The SDK retries time-outs, 429s (honouring Retry-After) and 5xx with exponential backoff, ``max_retries``
times; ``timeout_s`` bounds each attempt. At most ``concurrency`` requests are in flight.

The first request is sent alone and the others wait for its reply, so a wrong endpoint, model or API key,
or a model that cannot take images, is one error after one call
(:class:`~mmsae.explainers.base.EndpointError`), never one failure per feature. The API key comes from
``$OPENAI_API_KEY`` only and goes nowhere but the request's Authorization header.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import openai
from PIL import Image

from mmsae.explainers.base import FAILED, OK, Detection, EndpointError, Explainer, Explanation
from mmsae.explainers.prompts import PromptTemplate, parse_detection, parse_explanation

log = logging.getLogger(__name__)

API_KEY_ENV = "OPENAI_API_KEY"
BASE_URL_ENV = "OPENAI_BASE_URL"
NO_KEY = "EMPTY"
"""Sent as the key when ``$OPENAI_API_KEY`` is unset (servers started without a key, as vLLM by default)."""
DEFAULT_MAX_TOKENS = 300
_ABOUT_IMAGES = re.compile(r"image|vision|multi-?modal|modalit", re.IGNORECASE)


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the server and what to ask it for."""

    endpoint: str
    model: str
    image_long_side: int | None = 384
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    concurrency: int = 32
    timeout_s: float = 120.0
    max_retries: int = 5


@dataclass(frozen=True)
class _Reply:
    text: str | None
    latency_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


class OpenAIExplainer(Explainer):
    """Explains and detects through an OpenAI-compatible chat-completions endpoint (see the module
    docstring)."""

    backend: ClassVar[str] = "openai"

    def __init__(self, settings: ClientSettings, explain_template: PromptTemplate,
                 detect_template: PromptTemplate) -> None:
        self.settings = settings
        self.model = settings.model
        self.explain_template = explain_template
        self.detect_template = detect_template
        self.prompt_hash = explain_template.digest
        self.detect_prompt_hash = detect_template.digest
        _quiet_sdk_debug()
        self._client = openai.AsyncOpenAI(base_url=settings.endpoint,
                                          api_key=os.environ.get(API_KEY_ENV) or NO_KEY,
                                          timeout=settings.timeout_s, max_retries=settings.max_retries)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._first = asyncio.Lock()
        self._answered = False
        self._fatal: EndpointError | None = None

    def identity(self) -> dict[str, Any]:
        s = self.settings
        return {"backend": self.backend, "model": s.model, "explain_prompt": self.prompt_hash,
                "detect_prompt": self.detect_prompt_hash, "image_long_side": s.image_long_side,
                "max_tokens": s.max_tokens, "temperature": s.temperature}

    async def explain(self, images: Sequence[bytes]) -> Explanation:
        reply = await self._ask(self.explain_template, {"n_images": len(images)}, images)
        if reply.error is not None:
            return Explanation(FAILED, reply.text, reply.latency_s, error=reply.error)
        status, text = parse_explanation(reply.text)
        return Explanation(status, reply.text, reply.latency_s, reply.prompt_tokens,
                           reply.completion_tokens, explanation=text)

    async def detect(self, explanation: str, images: Sequence[bytes]) -> Detection:
        values = {"n_images": len(images), "explanation": explanation}
        reply = await self._ask(self.detect_template, values, images)
        if reply.error is not None:
            return Detection(FAILED, reply.text, reply.latency_s, error=reply.error)
        matches = parse_detection(reply.text, len(images))
        return Detection(OK if matches is not None else FAILED, reply.text, reply.latency_s,
                         reply.prompt_tokens, reply.completion_tokens, matches=matches)

    async def aclose(self) -> None:
        await self._client.close()

    # ----------------------------------------------------------------------------------------------
    # requests

    async def _ask(self, template: PromptTemplate, values: dict[str, Any], images: Sequence[bytes]) -> _Reply:
        system, user = template.render(**values)
        body = await asyncio.to_thread(request_body, self.settings, system, user, images)
        if not self._answered:  # the first request goes alone: a wrong endpoint or model is one error
            async with self._first:
                if self._fatal is not None:
                    raise self._fatal
                if not self._answered:
                    reply = await self._send(body)
                    self._answered = True
                    return reply
        return await self._send(body)

    async def _send(self, body: bytes) -> _Reply:
        async with self._slots:
            start = time.perf_counter()
            try:  # the SDK's plain POST (its retries and time-outs) of a body encoded off the event loop
                response = await self._client.post(
                    "/chat/completions", cast_to=httpx.Response, content=body,
                    options={"headers": {"Content-Type": "application/json"}})
            except openai.APIError as e:
                fatal = self._endpoint_error(e)
                if fatal is not None:
                    self._fatal = fatal
                    raise fatal from e
                return _Reply(None, time.perf_counter() - start, error=_describe(e))
            latency = time.perf_counter() - start
        return _message(response.text, latency)

    def _endpoint_error(self, e: openai.APIError) -> EndpointError | None:
        """The error that stops every request, or None for one that concerns this request only."""
        s = self.settings
        where = f"the explainer endpoint {s.endpoint}"
        tries = f"after {s.max_retries} retries" if s.max_retries else "(explain.max_retries is 0)"
        if isinstance(e, openai.APITimeoutError):
            return EndpointError(f"{where} did not answer within explain.timeout_s={s.timeout_s:g} s, "
                                 f"{tries}")
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e
            return EndpointError(f"cannot reach {where} {tries} ({type(cause).__name__}: {cause}); check "
                                 f"explain.endpoint (or ${BASE_URL_ENV})")
        if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
            have = "is refused" if os.environ.get(API_KEY_ENV) else "is not set"
            return EndpointError(f"{where} refused the request ({_describe(e)}): the API key in "
                                 f"${API_KEY_ENV} {have}")
        if isinstance(e, openai.NotFoundError):
            models = f"{s.endpoint.rstrip('/')}/models"
            return EndpointError(f"{where} has no model {s.model!r} ({_describe(e)}); set explain.model to a "
                                 f"model it serves (GET {models} lists them), and check that "
                                 "explain.endpoint ends with the API's base path (usually /v1)")
        refused = isinstance(e, openai.BadRequestError | openai.UnprocessableEntityError)
        if refused and _ABOUT_IMAGES.search(str(e)):
            return EndpointError(f"the model {s.model!r} at {s.endpoint} refused the images "
                                 f"({_describe(e)}); "
                                 "explaining needs a vision LMM that takes several images per request "
                                 "(explain.max_images, explain.image_long_side)")
        if isinstance(e, openai.RateLimitError | openai.InternalServerError):
            return EndpointError(f"{where} kept failing {tries} ({_describe(e)})")
        return None


def request_body(settings: ClientSettings, system: str, user: str, images: Sequence[bytes]) -> bytes:
    """The chat-completion request as JSON: the system message, then the user message's text followed by the
    images as base64 PNG ``image_url`` parts, resized to ``settings.image_long_side`` (aspect kept).

    Base64 needs no JSON escaping, so each image is spliced into the encoded text as it is, rather than
    scanned character by character by the JSON encoder (a request holds megabytes of it)."""
    token = secrets.token_hex(16)  # stands for each image in the encoded text until it is spliced in
    marks = [f"{token}-{i}" for i in range(len(images))]
    content: list[dict[str, Any]] = [{"type": "text", "text": user}]
    content += [{"type": "image_url", "image_url": {"url": mark}} for mark in marks]
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    rest = json.dumps({"model": settings.model, "messages": messages, "temperature": settings.temperature,
                       "max_completion_tokens": settings.max_tokens}).encode()
    pieces = []
    for mark, png in zip(marks, images, strict=True):
        before, rest = rest.split(mark.encode(), 1)
        encoded = base64.b64encode(resized_png(png, settings.image_long_side))
        pieces += [before, b"data:image/png;base64,", encoded]
    return b"".join([*pieces, rest])


def resized_png(png: bytes, long_side: int | None) -> bytes:
    """``png`` with its long side scaled to ``long_side`` pixels (as it is when None or already so)."""
    if long_side is None:
        return png
    with Image.open(io.BytesIO(png)) as img:
        width, height = img.size
        if max(width, height) == long_side:
            return png
        scale = long_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        out = io.BytesIO()
        img.convert("RGB").resize(size, resample).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _quiet_sdk_debug() -> None:
    """Keep the SDK's logger at INFO unless its level was set (``$OPENAI_LOG``): at DEBUG it logs every
    request body, megabytes of base64 images each."""
    sdk = logging.getLogger("openai")
    if sdk.level == logging.NOTSET:
        sdk.setLevel(logging.INFO)


def _describe(e: openai.APIError) -> str:
    """The status and the server's own message (``{"error": {"message": ...}}``), else the SDK's."""
    status = getattr(e, "status_code", None)
    body = e.body.get("error", e.body) if isinstance(e.body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    message = message or getattr(e, "message", None) or str(e)
    return f"{status}: {message}" if status else message


def _message(body: str, latency: float) -> _Reply:
    """The assistant's message in a chat-completion body; a body without one is kept whole, with why."""
    try:
        reply = json.loads(body)
        text = reply["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:  # not JSON, or not a chat completion
        why = f"the reply is not a chat completion with a message ({type(e).__name__})"
        return _Reply(body, latency, error=why)
    if not isinstance(text, str):
        return _Reply(body, latency, error="the reply's message has no text content")
    usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
    return _Reply(text, latency, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
