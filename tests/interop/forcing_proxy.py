"""A small HTTP proxy between the agent and a real model server, for the interop suite.

A 135M-parameter model rarely decides to call a tool by itself, so the proxy decides for it,
using the server's own `tool_choice`: a request whose latest user message holds the marker
`[[force:<tool>]]` and has no tool results yet gets `tool_choice` naming that tool; once tool
results are in the request, `tool_choice` is "none" so the model answers in text. Everything
else the agent sent reaches the server unchanged (but for a `max_tokens` bound, which the agent
does not set), and every request body is recorded so a test can check what the agent sent.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.support import free_port

FORCE_MARKER = re.compile(r"\[\[force:(\w+)\]\]")
MAX_TOKENS = 160


def forced_tool(messages: list[dict[str, Any]]) -> str | None:
    """The tool named by the marker in the latest user message, if no tool ran since."""
    for message in reversed(messages):
        if message.get("role") == "tool":
            return None
        if message.get("role") == "user":
            found = FORCE_MARKER.search(str(message.get("content") or ""))
            return found.group(1) if found else None
    return None


class ForcingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.received: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self._client = httpx2.AsyncClient(timeout=300)
        app = Starlette(routes=[Route("/v1/chat/completions", self._completions, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="forcing-proxy", daemon=True)

    def start(self) -> ForcingProxy:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the forcing proxy did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(json.loads(json.dumps(body)))
        messages = body.get("messages", [])
        # A 135M model can ramble until its context is full (minutes on this machine): bound it.
        body.setdefault("max_tokens", MAX_TOKENS)
        tool = forced_tool(messages)
        if tool is not None:
            body["tool_choice"] = {"type": "function", "function": {"name": tool}}
        elif any(message.get("role") == "tool" for message in messages[-3:]):
            body["tool_choice"] = "none"
        upstream = self._client.build_request(
            "POST", f"{self.upstream}/v1/chat/completions", json=body, headers={"Authorization": "Bearer none"}
        )
        answer = await self._client.send(upstream, stream=True)
        self.statuses.append(answer.status_code)
        return StreamingResponse(
            _relay(answer),
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type"),
            background=BackgroundTask(answer.aclose),
        )


async def _relay(answer: httpx2.Response) -> AsyncIterator[bytes]:
    async for piece in answer.aiter_raw():
        yield piece
