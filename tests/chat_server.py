"""A scripted OpenAI-compatible Chat Completions server for tests: real HTTP, real SSE.

It runs (uvicorn + starlette) in a background thread of the test process on a free port.
Each test scripts the replies for its own key: a marker `[[key]]` in the latest user message
of a request selects the script, so tests sharing one server never see each other's replies.
A script is a queue of replies, optionally followed by one reply repeated forever (`then=`).
Every request is recorded (JSON body and headers) under its key.

Like llama.cpp's OpenAI-compatible server, it validates what it is sent: a message whose
`content` is null is refused with a 500 whose body says "Input should be a valid string"
(the OpenAI API allows null on an assistant tool-call message; that server does not).

Replies: `text(...)`, `tool_calls(...)`, `events(...)`, `error(status, headers)`, `hang(seconds)` (no
answer at all), `stall(text, seconds)` (starts streaming, then goes silent),
`trickle(piece, every, seconds)` (streams slowly without ever going silent) and
`delayed(seconds, reply)`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import free_port

KEY_PATTERN = re.compile(r"\[\[([\w.-]+)\]\]")
ARGUMENT_PIECE = 7  # arguments are streamed in pieces this long, as real endpoints do
TEXT_PIECE = 5


def text(content: str) -> dict[str, Any]:
    return {"kind": "text", "text": content}


def call(name: str, arguments: str | dict[str, Any], call_id: str = "") -> dict[str, Any]:
    """One function call; `arguments` as raw text (maybe invalid JSON) or a dict."""
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"name": name, "arguments": raw, "id": call_id}


def tool_calls(*calls: dict[str, Any], content: str = "", one_event: bool = False) -> dict[str, Any]:
    """Calls streamed in pieces, each in its own event, or with `one_event` all whole in a single
    event (as some servers send a step's calls)."""
    return {"kind": "tool_calls", "calls": list(calls), "text": content, "one_event": one_event}


def events(*payloads: Any) -> dict[str, Any]:
    """SSE events exactly as given (any JSON value, or raw text), then `[DONE]`: for shapes no
    well-behaved server sends."""
    return {"kind": "events", "payloads": list(payloads)}


def error(status: int, headers: dict[str, str] | None = None, message: str = "") -> dict[str, Any]:
    return {"kind": "error", "status": status, "headers": headers or {}, "message": message or f"scripted {status}"}


def hang(seconds: float) -> dict[str, Any]:
    return {"kind": "hang", "seconds": seconds}


def stall(content: str, seconds: float) -> dict[str, Any]:
    return {"kind": "stall", "text": content, "seconds": seconds}


def trickle(piece: str, every: float, seconds: float) -> dict[str, Any]:
    """Keeps streaming `piece` every `every` seconds for `seconds`: never silent long enough to time out."""
    return {"kind": "trickle", "piece": piece, "every": every, "seconds": seconds}


def delayed(seconds: float, reply: dict[str, Any]) -> dict[str, Any]:
    return {**reply, "delay": seconds}


@dataclass
class Script:
    replies: list[dict[str, Any]] = field(default_factory=list)
    then: dict[str, Any] | None = None


@dataclass
class Received:
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))


class ChatServer:
    """The server and its scripts; `start()` / `stop()` around a test module."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._lock = threading.Lock()
        self._scripts: dict[str, Script] = {}
        self._received: dict[str, list[Received]] = {}
        app = Starlette(routes=[Route("/v1/chat/completions", self._completions, methods=["POST"])])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,  # scripted hangs are still sleeping at the end
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="chat-server", daemon=True)

    def start(self) -> ChatServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the scripted chat server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def script(self, key: str, *replies: dict[str, Any], then: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._scripts[key] = Script(list(replies), then)

    def received(self, key: str) -> list[Received]:
        with self._lock:
            return list(self._received.get(key, []))

    def left(self, key: str) -> int:
        """Replies of the script not asked for yet."""
        with self._lock:
            return len(self._scripts[key].replies)

    def _next_reply(self, key: str, received: Received) -> dict[str, Any] | None:
        with self._lock:
            self._received.setdefault(key, []).append(received)
            script = self._scripts.get(key)
            if script is None:
                return None
            return script.replies.pop(0) if script.replies else script.then

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        key = _key_of(body.get("messages", []))
        reply = self._next_reply(key, Received(body, dict(request.headers)))
        if any(message.get("content", "") is None for message in body.get("messages", [])):
            detail = [
                {"type": "string_type", "loc": ["body", "messages", "content"], "msg": "Input should be a valid string"}
            ]
            return JSONResponse({"error": {"message": str(detail), "type": "invalid_request_error"}}, status_code=500)
        if reply is None:
            return JSONResponse({"error": {"message": f"no script for {key!r}"}}, status_code=400)
        await asyncio.sleep(reply.get("delay", 0))
        if reply["kind"] == "error":
            payload = {"error": {"message": reply["message"], "type": "test"}}
            return JSONResponse(payload, status_code=reply["status"], headers=reply["headers"])
        if reply["kind"] == "hang":
            await asyncio.sleep(reply["seconds"])
            return JSONResponse({"error": {"message": "too late"}}, status_code=500)
        model = body.get("model", "scripted")
        if not body.get("stream"):
            return JSONResponse(_completion(model, reply))
        return StreamingResponse(_sse(model, reply), media_type="text/event-stream")


def _key_of(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            found = KEY_PATTERN.search(str(message.get("content") or ""))
            return found.group(1) if found else "default"
    return "default"


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    payload = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(payload)}\n\n"


def _pieces(value: str, size: int) -> list[str]:
    return [value[start : start + size] for start in range(0, len(value), size)]


async def _sse(model: str, reply: dict[str, Any]) -> AsyncIterator[str]:
    if reply["kind"] == "events":
        for payload in reply["payloads"]:
            yield f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield _chunk(model, {"role": "assistant", "content": ""})
    for piece in _pieces(reply.get("text", ""), TEXT_PIECE):
        yield _chunk(model, {"content": piece})
    if reply["kind"] == "stall":
        await asyncio.sleep(reply["seconds"])
    if reply["kind"] == "trickle":
        until = time.monotonic() + reply["seconds"]
        while time.monotonic() < until:
            yield _chunk(model, {"content": reply["piece"]})
            await asyncio.sleep(reply["every"])
    calls = _whole_calls(reply.get("calls", []), streamed=True)
    if reply.get("one_event"):
        yield _chunk(model, {"tool_calls": calls})
    else:  # a call's head (its arguments empty), then its arguments in pieces, as real endpoints do
        for whole in calls:
            yield _chunk(model, {"tool_calls": [{**whole, "function": {**whole["function"], "arguments": ""}}]})
            for piece in _pieces(whole["function"]["arguments"], ARGUMENT_PIECE):
                yield _chunk(model, {"tool_calls": [{"index": whole["index"], "function": {"arguments": piece}}]})
    yield _chunk(model, {}, "tool_calls" if reply.get("calls") else "stop")
    yield "data: [DONE]\n\n"


def _whole_calls(requested_calls: list[dict[str, Any]], streamed: bool = False) -> list[dict[str, Any]]:
    calls = [
        {
            "id": requested["id"] or f"call_scripted_{index}",
            "type": "function",
            "function": {"name": requested["name"], "arguments": requested["arguments"]},
        }
        for index, requested in enumerate(requested_calls)
    ]
    if streamed:  # a streamed call carries its index
        calls = [{"index": index, **whole} for index, whole in enumerate(calls)]
    return calls


def _completion(model: str, reply: dict[str, Any]) -> dict[str, Any]:
    calls = _whole_calls(reply.get("calls", []))
    message: dict[str, Any] = {"role": "assistant", "content": reply.get("text") or None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
    }
