"""A scripted OpenAI-compatible Chat Completions server for benchmarks (a separate process).

It answers as fast as Python can over real HTTP/1.1 keep-alive, so a chat turn measured
against it is everything *except* the model's own time. It is deliberately not a framework:
raw asyncio streams, one tiny request parser, bodies prebuilt as far as possible.

Script (decided from the last message the agent sends):
- last message is a tool result          -> a short text answer (the turn ends);
- last user message asks to list/show     -> a `list_tasks` tool call;
- any other user message                  -> an `add_task` tool call whose title is the
  message with a leading "add (a) task (to)" removed.

`POST /bench/delay` with body `{"seconds": 1.0}` sets how long every step waits before it
answers (the "model time"); `GET /bench/stats` returns how many completions were served.
Streaming (`"stream": true`, which the agent always uses) is answered as SSE chunks.

Run: `python -m bench.model_server --port 0` prints `PORT <n>` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from typing import Any

_ADD_PREFIX = re.compile(r"^\s*(please\s+)?(add|create|new)\s+(a\s+)?(task\s+)?(to\s+)?", re.IGNORECASE)
_LIST_WORDS = re.compile(r"\b(list|show|what)\b", re.IGNORECASE)
# "fanout N": one step asking for N add_task calls at once (the attack of issue 20).
_FANOUT = re.compile(r"^fanout (\d+)")


class Script:
    """Which answer each step gets, plus the knob for the simulated model time."""

    def __init__(self) -> None:
        self.delay_seconds = 0.0
        self.completions = 0
        self.calls = 0

    def answer(self, messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
        """(text, tool_calls): text, or one or more tool calls."""
        last = messages[-1] if messages else {}
        if last.get("role") == "tool":
            return "Done.", []
        text = _text_of(last)
        self.calls += 1
        fanout = _FANOUT.match(text)
        if fanout:
            arguments = json.dumps({"title": "x"})
            return None, [
                {"id": f"call_{self.calls}_{n}", "name": "add_task", "arguments": arguments}
                for n in range(int(fanout.group(1)))
            ]
        if _LIST_WORDS.search(text):
            return None, [{"id": f"call_{self.calls}", "name": "list_tasks", "arguments": '{"status": "all"}'}]
        title = _ADD_PREFIX.sub("", text).strip() or "Benchmark task"
        return None, [{"id": f"call_{self.calls}", "name": "add_task", "arguments": json.dumps({"title": title[:200]})}]


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # content parts
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def completion_body(model: str, text: str | None, tool_calls: list[dict[str, Any]]) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [_tool_call_json(call) for call in tool_calls]
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool_calls else "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return json.dumps(body).encode()


def stream_body(model: str, text: str | None, tool_calls: list[dict[str, Any]]) -> bytes:
    """The whole SSE stream at once: role chunk, content or tool call chunk, finish chunk, [DONE]."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        payload = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    parts = [chunk({"role": "assistant", "content": ""}, None)]
    if tool_calls:
        calls = [{"index": index, **_tool_call_json(call)} for index, call in enumerate(tool_calls)]
        parts.append(chunk({"tool_calls": calls}, None))
        parts.append(chunk({}, "tool_calls"))
    else:
        parts.append(chunk({"content": text}, None))
        parts.append(chunk({}, "stop"))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def _tool_call_json(tool_call: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": tool_call["id"],
        "type": "function",
        "function": {"name": tool_call["name"], "arguments": tool_call["arguments"]},
    }


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


class ModelServer:
    def __init__(self, script: Script) -> None:
        self.script = script

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                method, path, body = request
                writer.write(await self.route(method, path, body))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes) -> bytes:
        if method == "POST" and path.endswith("/chat/completions"):
            return await self.chat(json.loads(body))
        if method == "POST" and path == "/bench/delay":
            self.script.delay_seconds = float(json.loads(body)["seconds"])
            return _response("200 OK", "application/json", b"{}")
        if path == "/bench/stats":
            stats = {"completions": self.script.completions, "delay_seconds": self.script.delay_seconds}
            return _response("200 OK", "application/json", json.dumps(stats).encode())
        return _response("404 Not Found", "application/json", b'{"error": {"message": "not found"}}')

    async def chat(self, request: dict[str, Any]) -> bytes:
        if self.script.delay_seconds:
            await asyncio.sleep(self.script.delay_seconds)
        self.script.completions += 1
        text, tool_calls = self.script.answer(request.get("messages", []))
        model = request.get("model", "bench")
        if request.get("stream"):
            return _response("200 OK", "text/event-stream", stream_body(model, text, tool_calls))
        return _response("200 OK", "application/json", completion_body(model, text, tool_calls))


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    length = 0
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    body = await _read_chunked(reader) if chunked else await reader.readexactly(length) if length else b""
    return method, path.split("?", 1)[0], body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def serve(host: str, port: int, delay: float) -> None:
    script = Script()
    script.delay_seconds = delay
    server = await asyncio.start_server(ModelServer(script).handle, host, port, backlog=8192, limit=1 << 20)
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds every model step takes")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, args.delay))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
