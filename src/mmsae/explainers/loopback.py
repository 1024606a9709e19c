"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the tests and the benchmark.

It speaks ``POST /v1/chat/completions`` and ``GET /v1/models``. Every request is decoded into a
:class:`Question` (model, messages' text, images as PNG bytes, how many times this exact request came
before) and recorded in :attr:`LoopbackServer.questions`; a handler (a plain function of the question)
says what to answer with a :class:`Reply`: a message, an HTTP error (with headers such as Retry-After), a
stall (a delay before answering), or a raw body (a malformed reply). A model the server does not serve is
answered 404 as vLLM does.

In a process of its own (what the benchmark does, so that the client's CPU time is measured alone)::

    python -m mmsae.explainers.loopback --latency 0.1 --model toy
    # prints "http://127.0.0.1:<port>/v1" on its first line, serves until stdin closes
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoopbackServer", "Question", "Reply", "fixed_reply"]


@dataclass
class Question:
    """One request as the server saw it."""

    model: str
    system: str
    text: str
    images: list[bytes]
    attempt: int
    """1 the first time this exact request body arrives, 2 the second time, and so on."""
    authorization: str
    body: dict[str, Any]
    time: float = 0.0
    """When it arrived (``time.monotonic()``)."""


@dataclass(frozen=True)
class Reply:
    """What to answer: ``content`` with status 200, else an error ``status`` with ``message`` and ``headers``;
    ``raw`` replaces the whole body; ``delay_s`` waits before answering."""

    content: str | None = None
    status: int = 200
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    raw: bytes | None = None


def fixed_reply(text: str = "[EXPLANATION]: red objects", latency_s: float = 0.0
                ) -> Callable[[Question], Reply]:
    """A handler answering every question with ``text`` after ``latency_s`` seconds."""
    return lambda question: Reply(text, delay_s=latency_s)


class LoopbackServer:
    """The server, run by an event loop in a thread of its own (:meth:`start` / :meth:`stop`, or ``with``)."""

    def __init__(self, handler: Callable[[Question], Reply], models: tuple[str, ...] = ("toy-explainer",),
                 keep_images: bool = True) -> None:
        self.handler = handler
        self.models = models
        self.keep_images = keep_images
        """False: images are not decoded (handlers see none; long runs keep little)."""
        self.questions: list[Question] = []
        self.base_url = ""
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None

    def __enter__(self) -> LoopbackServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        """Start serving; returns the base URL (``http://127.0.0.1:<port>/v1``)."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._open())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="loopback-chat", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the loopback chat server did not start within 30 s")
        return self.base_url

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
        self._loop = None

    def count(self, predicate: Callable[[Question], bool] = lambda q: True) -> int:
        """How many requests (attempts included) matched ``predicate``."""
        with self._lock:
            return sum(1 for q in self.questions if predicate(q))

    async def _open(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._list_models)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)  # stalled replies: no wait
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def _list_models(self, request):
        from aiohttp import web

        data = [{"id": m, "object": "model"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request):
        from aiohttp import web

        raw = await request.read()
        question = self._question(raw, request.headers.get("Authorization", ""), decode=self.keep_images)
        if question.model not in self.models:
            return _error(web, 404, f"The model `{question.model}` does not exist.")
        reply = self.handler(question)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.raw is not None:
            return web.Response(body=reply.raw, status=reply.status, content_type="application/json")
        if reply.status != 200:
            return _error(web, reply.status, reply.message or f"error {reply.status}", reply.headers)
        return web.json_response(_completion(question, reply.content or ""), headers=reply.headers)

    def _question(self, raw: bytes, authorization: str, decode: bool) -> Question:
        body = json.loads(raw)
        system, texts, images = "", [], []
        for message in body.get("messages", []):
            content = message.get("content")
            if message.get("role") == "system":
                system = content if isinstance(content, str) else ""
                continue
            for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
                if part.get("type") == "text":
                    texts.append(part["text"])
                elif part.get("type") == "image_url" and decode:
                    images.append(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            self._seen[digest] = self._seen.get(digest, 0) + 1
            question = Question(str(body.get("model")), system, "\n".join(texts), images, self._seen[digest],
                                authorization, body, time.monotonic())
            self.questions.append(question)
        return question


def _completion(question: Question, content: str) -> dict[str, Any]:
    prompt_tokens = len(question.text.split()) + 100 * len(question.images)
    completion_tokens = len(content.split())
    return {"id": "chatcmpl-loopback", "object": "chat.completion", "created": 0, "model": question.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _error(web, status: int, message: str, headers: dict[str, str] | None = None):
    body = {"error": {"message": message, "type": "error", "code": status}}
    return web.json_response(body, status=status, headers=headers or {})


def main(argv: list[str] | None = None) -> None:
    """Serve fixed replies after a fixed latency until stdin closes; print the base URL first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--model", default="toy-explainer", help="the model served")
    args = parser.parse_args(argv)
    server = LoopbackServer(fixed_reply(latency_s=args.latency), models=(args.model,), keep_images=False)
    with server:
        sys.stdout.write(server.base_url + "\n")
        sys.stdout.flush()
        sys.stdin.read()


if __name__ == "__main__":
    main()
