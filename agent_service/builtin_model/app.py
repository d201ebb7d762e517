"""The built-in model as an OpenAI-compatible Chat Completions server (an ASGI app).

POST /v1/chat/completions (plain or `stream: true` as server-sent events) and GET /v1/models.
Nothing here reads a clock or a random source: the same request always gets the same bytes
back (ids are derived from the request), so tests and benchmarks are reproducible.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agent_service.builtin_model.brain import Reply, respond

MODEL_NAME = "builtin-todo"
_WORDS_PER_CHUNK = 3


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}},
        status_code=status,
    )


def _count_tokens(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def _request_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(_count_tokens(json.dumps(message.get("content") or "")) for message in messages)


def _tool_calls(reply: Reply, salt: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{salt[:12]}_{index}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for index, call in enumerate(reply.calls)
    ]


def _usage(messages: list[dict[str, Any]], reply: Reply) -> dict[str, int]:
    prompt = _request_tokens(messages)
    completion = _count_tokens(reply.text) + sum(_count_tokens(json.dumps(call.arguments)) + 1 for call in reply.calls)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(model: str, messages: list[dict[str, Any]], reply: Reply, digest: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    if reply.calls:
        message["tool_calls"] = _tool_calls(reply, digest)
    return {
        "id": f"chatcmpl-{digest[:24]}",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if reply.calls else "stop", "logprobs": None}
        ],
        "usage": _usage(messages, reply),
        "system_fingerprint": "builtin",
    }


def text_pieces(text: str) -> list[str]:
    """The text in pieces of a few words that join back to exactly the text."""
    tokens = re.findall(r"\S+\s*|\s+", text)
    return ["".join(tokens[i : i + _WORDS_PER_CHUNK]) for i in range(0, len(tokens), _WORDS_PER_CHUNK)]


def _chunks(
    model: str, messages: list[dict[str, Any]], reply: Reply, digest: str, with_usage: bool
) -> list[dict[str, Any]]:
    base = {"id": f"chatcmpl-{digest[:24]}", "object": "chat.completion.chunk", "created": 0, "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in text_pieces(reply.text)]
    for index, call in enumerate(_tool_calls(reply, digest)):
        head = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        chunks.append(chunk({"tool_calls": [head]}))
        arguments = call["function"]["arguments"]
        middle = len(arguments) // 2
        for piece in (arguments[:middle], arguments[middle:]):
            if piece:
                chunks.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    chunks.append(chunk({}, "tool_calls" if reply.calls else "stop"))
    if with_usage:
        chunks.append({**base, "choices": [], "usage": _usage(messages, reply)})
    return chunks


async def _sse(chunks: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _check(body: Any) -> tuple[list[dict[str, Any]] | None, JSONResponse | None]:
    if not isinstance(body, dict):
        return None, _error(400, "The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        return None, _error(400, "'messages' must be a non-empty array of message objects.", "messages")
    return messages, None


async def chat_completions(request: Request) -> Response:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "The request body is not valid JSON.")
    messages, problem = _check(body)
    if problem is not None or messages is None:
        return problem or _error(400, "bad request")
    model = str(body.get("model") or MODEL_NAME)
    reply = respond(messages, body.get("tools"))  # the tools offered say what the model may use
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True, default=str).encode()).hexdigest()
    if body.get("stream"):
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = _chunks(model, messages, reply, digest, with_usage)
        return StreamingResponse(_sse(chunks), media_type="text/event-stream", headers={"cache-control": "no-cache"})
    return JSONResponse(_completion(model, messages, reply, digest))


async def models(request: Request) -> Response:
    return JSONResponse(
        {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "builtin"}]}
    )


def create_app() -> Starlette:
    """The built-in model's ASGI app; serve it with `httpx2.ASGITransport(app=create_app())`."""
    # lemminflect loads its word lists on first use (~0.2 s): pay that now, not in a user's turn
    respond([{"role": "user", "content": "i called mom"}])
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/models", models, methods=["GET"]),
        ]
    )
