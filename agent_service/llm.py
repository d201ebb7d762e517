"""The model client: one streamed Chat Completions step, for any OpenAI-compatible endpoint.

Every model goes through the `openai` SDK, the built-in one too (served in process through
`httpx2.ASGITransport`), so there is one code path. Requests always stream, so the chat
stream can forward real text deltas; the chunks are read as the JSON the server sent (a field of
the wrong type is skipped, never a 5xx), and tool-call argument fragments are put back together
by their index.

Retries are ours, not the SDK's (its `max_retries` is 0): LLM_MAX_RETRIES more attempts on
connection errors, timeouts, 408, 409, 429 and 5xx, with exponential backoff (0.5 s doubling,
at most 8 s) or after the delay the server names in `retry-after(-ms)` (up to 20 s). A request the
server calls invalid — 400/422, or a 500 whose body says so (llama.cpp's server answers a
request it cannot parse with a 500) — is not retried: it would fail the same way. Nothing is
retried once text has reached the client. Each failed request is logged once, with the
status, a short excerpt of the body and the model name (never the messages or the key).
What still fails becomes a gRPC status here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx2
import openai
from openai import AsyncStream
from openai.types.chat import ChatCompletion

from agent_service.builtin_model import create_app
from common import metrics, tracing
from common.errors import DeadlineExceeded, ServiceError, Unavailable
from common.settings import Settings

log = logging.getLogger("llm")

BUILTIN_BASE_URL = "http://builtin-model/v1"
RETRIED_STATUSES = {408, 409, 429}
# Words in a 5xx body that mean the server could not accept the request itself, so the same
# request would fail again (llama.cpp's server: "Input should be a valid string").
INVALID_REQUEST_WORDS = ("invalid", "validation", "input should", "unsupported", "not supported", "malformed")
BODY_EXCERPT_CHARS = 200
MAX_BACKOFF_SECONDS = 8.0
MAX_RETRY_AFTER_SECONDS = 20.0


class ModelRejected(ServiceError):
    """The endpoint refused the request itself (bad key, unknown model...): a server-side misconfiguration."""

    code = grpc.StatusCode.INTERNAL


@dataclass
class ModelToolCall:
    """One function call the model asked for, its arguments still the raw JSON text it sent."""

    id: str = ""
    name: str = ""
    arguments: str = ""
    kind: str = "function"


@dataclass
class ModelReply:
    text: str = ""
    tool_calls: list[ModelToolCall] = field(default_factory=list)
    # The model asked for more calls than the step reads (`step(max_tool_calls=...)`): the rest
    # of its answer was not read.
    calls_cut: bool = False


OnText = Callable[[str], Awaitable[None]]


class ModelClient:
    """Talks to the configured model; `step()` is one request/response of the tool loop."""

    def __init__(self, settings: Settings) -> None:
        self.model = settings.llm_model
        self.timeout = settings.llm_timeout_seconds
        self.attempts = settings.llm_max_retries + 1
        self._client = _openai_client(settings)
        self._tools: list[dict[str, Any]] | None = None
        self._tools_json = b"[]"

    async def close(self) -> None:
        await self._client.close()

    async def step(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], on_text: OnText, max_tool_calls: int = 0
    ) -> ModelReply:
        """One streamed completion; text pieces go to `on_text` as they arrive. With
        `max_tool_calls`, reading stops when the model starts one call more than that (the
        reply says `calls_cut`): a step asking for a thousand calls would otherwise cost the
        agent the parsing of every one, on the loop all turns share, for calls it will not run."""
        spoke = False

        async def tracked(piece: str) -> None:
            nonlocal spoke
            spoke = True
            await on_text(piece)

        for attempt in range(1, self.attempts + 1):
            try:
                return await self._stream(messages, tools, tracked, max_tool_calls)
            except openai.APIError as error:
                log_failure(self.model, attempt, error)
                delay = retry_delay(error, attempt)
                if spoke or attempt == self.attempts or delay is None:
                    raise self._status(error, attempt) from error
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt raises")

    def _body(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> bytes:
        """The request's JSON. The tool schemas are the same in every request (a third of the
        bytes): serialized once, then spliced in; the SDK sends bytes as they are."""
        if tools is not self._tools:
            self._tools, self._tools_json = tools, _dumps(tools)
        head = _dumps(
            {"model": self.model, "stream": True, "stream_options": {"include_usage": True}, "messages": messages}
        )
        return head[:-1] + b',"tools":' + self._tools_json + b"}"

    def _status(self, error: openai.APIError, attempts: int) -> ServiceError:
        """A failed model request as the gRPC status the turn fails with."""
        if isinstance(error, openai.APITimeoutError):
            return DeadlineExceeded(f"the model did not answer within {self.timeout:g} s ({attempts} attempt(s))")
        if isinstance(error, openai.APIConnectionError):
            return Unavailable("the model is unavailable; try again later")
        if isinstance(error, openai.RateLimitError):
            return Unavailable("the model is rate limited; try again later")
        if isinstance(error, openai.APIStatusError):
            if is_invalid_request(error):
                return ModelRejected(f"the model rejected the request (HTTP {error.status_code})")
            return Unavailable("the model is unavailable; try again later")
        return Unavailable("the model failed while answering; try again later")  # an error event inside the stream

    async def _stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], on_text: OnText, max_tool_calls: int
    ) -> ModelReply:
        # The SDK's documented raw `post`, with the same path, auth and chunk types as
        # `chat.completions.create`, minus its walk of every message against its typed params:
        # our dicts already are the wire JSON, and that walk was 30-45% of the agent's CPU per
        # turn (bench/NOTES.md).
        # include_usage: the last chunk reports the tokens used (todo_model_tokens_total).
        body = self._body(messages, tools)
        reply = ModelReply()
        calls: dict[int, ModelToolCall] = {}
        span_attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": self.model}
        # One span and one todo_model_requests_total / todo_model_request_seconds sample per
        # request (each retry is its own); the request carries the span's traceparent.
        with tracing.span(f"chat {self.model}", span_attributes), metrics.model_request() as measured:
            stream = await self._client.post(
                "/chat/completions",
                cast_to=ChatCompletion,
                body=body,
                options={"security": {"bearer_auth": True}, "headers": tracing.inject_headers()},
                stream=True,
                # object: the chunks come as the JSON the server sent, not as SDK models. Building
                # a model per chunk was the largest cost of a streamed answer, and of a step
                # asking for a thousand calls (all in one event) the whole of it (bench/NOTES.md).
                stream_cls=AsyncStream[object],
            )
            async with stream:  # leaving it early closes the response: the server stops sending
                async for chunk in stream:
                    if not isinstance(chunk, dict):
                        continue  # not a completion chunk (a stray keep-alive value): nothing to read
                    usage = chunk.get("usage")
                    if isinstance(usage, dict):
                        measured.tokens(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))
                    for delta in _deltas(chunk):
                        content = delta.get("content")
                        if content and isinstance(content, str):
                            reply.text += content
                            await on_text(content)
                        if _merge_fragments(calls, delta.get("tool_calls"), max_tool_calls):
                            reply.calls_cut = True
                            break
                    if reply.calls_cut:
                        break
        reply.tool_calls = [call for _, call in sorted(calls.items()) if call.kind == "function"]
        return reply


def _dumps(value: Any) -> bytes:
    # What the SDK itself would send for a dict body (openai._utils._json.openapi_dumps).
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def body_excerpt(error: openai.APIStatusError) -> str:
    """The start of the error body the server sent (our request's contents are never in it)."""
    try:
        text = error.response.text
    except Exception:  # a streamed response whose body was not read
        text = str(error.body or error.message)
    return " ".join(text.split())[:BODY_EXCERPT_CHARS]


def is_invalid_request(error: openai.APIStatusError) -> bool:
    """The server says the request itself is wrong: sending it again would fail the same way."""
    if error.status_code < 500:
        return error.status_code not in RETRIED_STATUSES
    return any(word in body_excerpt(error).lower() for word in INVALID_REQUEST_WORDS)


def retry_delay(error: openai.APIError, attempt: int) -> float | None:
    """How long to wait before the next attempt, or None when this failure is not worth retrying."""
    backoff = min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
    if not isinstance(error, openai.APIStatusError):
        return backoff  # connection errors, timeouts, an error event in the stream
    if is_invalid_request(error):
        return None
    headers = error.response.headers
    try:
        if "retry-after-ms" in headers:
            named = float(headers["retry-after-ms"]) / 1000
        elif "retry-after" in headers:
            named = float(headers["retry-after"])
        else:
            return backoff
    except ValueError:
        return backoff
    return named if 0 <= named <= MAX_RETRY_AFTER_SECONDS else None


def log_failure(model: str, attempt: int, error: openai.APIError) -> None:
    """One line per failed model request: what the server said, never what we sent."""
    fields: dict[str, Any] = {"model": model, "attempt": attempt, "error": type(error).__name__}
    if isinstance(error, openai.APIStatusError):
        fields.update(status=error.status_code, body=body_excerpt(error))
    else:
        fields["detail"] = str(error)[:BODY_EXCERPT_CHARS]
    log.warning("model request failed", extra=fields)


def _deltas(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    """The deltas of a chunk's choices (we ask for one choice; servers may send none)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    deltas = (choice.get("delta") for choice in choices if isinstance(choice, dict))
    return [delta for delta in deltas if isinstance(delta, dict)]


def _merge_fragments(calls: dict[int, ModelToolCall], fragments: Any, max_tool_calls: int) -> bool:
    """Adds a delta's tool-call fragments to the calls they belong to. With `max_tool_calls`,
    stops at the first fragment of one call more than that (it and any begun after the bound are
    dropped) and says so: a server may send a thousand calls in one event."""
    if not isinstance(fragments, list):
        return False
    for fragment in fragments:
        if isinstance(fragment, dict):
            _merge_fragment(calls, fragment)
        if max_tool_calls and len(calls) > max_tool_calls:
            for index in sorted(calls)[max_tool_calls:]:  # too many, perhaps only begun
                del calls[index]
            return True
    return False


def _merge_fragment(calls: dict[int, ModelToolCall], fragment: dict[str, Any]) -> None:
    """Adds one streamed tool-call fragment to the call it belongs to (by index)."""
    index = fragment.get("index")
    fragment_id = _text(fragment.get("id"))
    # Some servers omit the index: a new id starts a new call, else it continues the last.
    if not isinstance(index, int):
        same_id = [i for i, call in calls.items() if fragment_id and call.id == fragment_id]
        if same_id:
            index = same_id[0]
        elif fragment_id:
            index = max(calls, default=-1) + 1
        else:
            index = max(calls, default=0)
    call = calls.setdefault(index, ModelToolCall())
    if fragment_id and not call.id:
        call.id = fragment_id
    if kind := _text(fragment.get("type")):
        call.kind = kind
    function = fragment.get("function")
    if isinstance(function, dict):
        name = _text(function.get("name"))
        if name and not call.name:
            call.name = name
        call.arguments += _text(function.get("arguments"))


def _count(value: Any) -> int | None:
    """A token count the server reported, if it is one."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _text(value: Any) -> str:
    """A field the protocol sends as a string; anything else (null, a number) as empty."""
    return value if isinstance(value, str) else ""


def _openai_client(settings: Settings) -> openai.AsyncOpenAI:
    if settings.llm_base_url:
        return openai.AsyncOpenAI(
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key or "none",
            timeout=settings.llm_timeout_seconds,
            max_retries=0,  # ModelClient.step retries, knowing which failures are worth it
        )
    # No endpoint configured: the built-in model, served in process over the same protocol.
    transport = httpx2.ASGITransport(app=create_app())
    return openai.AsyncOpenAI(
        base_url=BUILTIN_BASE_URL,
        api_key="builtin",
        timeout=settings.llm_timeout_seconds,
        max_retries=0,  # in process: nothing to retry
        http_client=httpx2.AsyncClient(transport=transport, base_url=BUILTIN_BASE_URL),
    )
