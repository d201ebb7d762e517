"""The model client: one streamed Chat Completions step, for any OpenAI-compatible endpoint.

Every model goes through the `openai` SDK, the built-in one too (served in process through
`httpx2.ASGITransport`), so there is one code path. Requests always stream, so the chat
stream can forward real text deltas; tool-call argument fragments are put back together by
their index.

Retries are the SDK's: with `max_retries=N` it retries 429, 408, 409, every 5xx, connection
errors and timeouts with exponential backoff (0.5 s doubling, at most 8 s, minus up to 25 %
jitter), or after the delay the server names in `retry-after-ms` / `retry-after` (up to two
minutes; longer ones are not retried). What still fails after that becomes a gRPC status here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx2
import openai
from openai import AsyncStream
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from agent_service.builtin_model import create_app
from common.errors import DeadlineExceeded, ServiceError, Unavailable
from common.settings import Settings

log = logging.getLogger("llm")

BUILTIN_BASE_URL = "http://builtin-model/v1"


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


OnText = Callable[[str], Awaitable[None]]


class ModelClient:
    """Talks to the configured model; `step()` is one request/response of the tool loop."""

    def __init__(self, settings: Settings) -> None:
        self.model = settings.llm_model
        self.timeout = settings.llm_timeout_seconds
        self.attempts = settings.llm_max_retries + 1
        self._client = _openai_client(settings)

    async def close(self) -> None:
        await self._client.close()

    async def step(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], on_text: OnText) -> ModelReply:
        """One streamed completion; text pieces go to `on_text` as they arrive."""
        try:
            return await self._stream(messages, tools, on_text)
        except openai.APITimeoutError as error:
            raise DeadlineExceeded(
                f"the model did not answer within {self.timeout:g} s ({self.attempts} attempt(s))"
            ) from error
        except openai.APIConnectionError as error:
            log.warning("model unreachable: %s", error)
            raise Unavailable("the model is unavailable; try again later") from error
        except openai.RateLimitError as error:
            raise Unavailable("the model is rate limited; try again later") from error
        except openai.APIStatusError as error:
            if error.status_code >= 500 or error.status_code in (408, 409):
                raise Unavailable("the model is unavailable; try again later") from error
            log.error("the model rejected the request: HTTP %s %s", error.status_code, error.message)
            raise ModelRejected(f"the model rejected the request (HTTP {error.status_code})") from error
        except openai.APIError as error:  # an error event inside the stream
            log.warning("model stream error: %s", error.message)
            raise Unavailable("the model failed while answering; try again later") from error

    async def _stream(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], on_text: OnText) -> ModelReply:
        # The SDK's documented raw `post`, with the same path, auth, retries and chunk types as
        # `chat.completions.create`, minus its walk of every message against its typed params:
        # our dicts already are the wire JSON, and that walk was 30-45% of the agent's CPU per
        # turn (bench/NOTES.md).
        body = {"model": self.model, "messages": messages, "tools": tools, "stream": True}
        stream = await self._client.post(
            "/chat/completions",
            cast_to=ChatCompletion,
            body=body,
            options={"security": {"bearer_auth": True}},
            stream=True,
            stream_cls=AsyncStream[ChatCompletionChunk],
        )
        reply = ModelReply()
        calls: dict[int, ModelToolCall] = {}
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices or []:
                    delta = choice.delta
                    if delta is None:
                        continue
                    if delta.content:
                        reply.text += delta.content
                        await on_text(delta.content)
                    for fragment in delta.tool_calls or []:
                        _merge_fragment(calls, fragment)
        reply.tool_calls = [call for _, call in sorted(calls.items()) if call.kind == "function"]
        return reply


def _merge_fragment(calls: dict[int, ModelToolCall], fragment: Any) -> None:
    """Adds one streamed tool-call fragment to the call it belongs to (by index)."""
    index = fragment.index
    if index is None:  # some servers omit the index: a new id starts a new call, else it continues the last
        same_id = [i for i, call in calls.items() if fragment.id and call.id == fragment.id]
        if same_id:
            index = same_id[0]
        elif fragment.id:
            index = max(calls, default=-1) + 1
        else:
            index = max(calls, default=0)
    call = calls.setdefault(index, ModelToolCall())
    if fragment.id and not call.id:
        call.id = fragment.id
    if fragment.type:
        call.kind = fragment.type
    function = fragment.function
    if function is not None:
        if function.name and not call.name:
            call.name = function.name
        if function.arguments:
            call.arguments += function.arguments


def _openai_client(settings: Settings) -> openai.AsyncOpenAI:
    if settings.llm_base_url:
        return openai.AsyncOpenAI(
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key or "none",
            timeout=settings.llm_timeout_seconds,
            max_retries=settings.llm_max_retries,
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
