"""Sequential latency of each hop a chat turn makes, measured one at a time from outside.

A turn is a chain of hops (client -> Envoy -> agent; agent -> conversation_service x N;
agent -> model x 2; agent -> task_service); timing each hop alone, sequentially, tells where
the sequential turn's milliseconds go without instrumenting the services.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import openai
from openai import AsyncStream
from openai._models import construct_type  # what AsyncStream builds each chunk with
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from agent_service import tools
from bench.report import percentile
from common.tokens import mint
from todo.v1 import conversation_pb2, conversation_pb2_grpc, task_pb2, task_pb2_grpc

TOOLS = [
    {
        "type": "function",
        "function": {"name": "add_task", "parameters": {"type": "object", "properties": {"title": {"type": "string"}}}},
    }
]


def long_history() -> Any:
    """A system prompt and ten earlier add-task exchanges: what the agent sends with a 20-message window."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You manage the user's todo list. " * 20}]
    for number in range(10):
        call = {"id": f"c{number}", "type": "function", "function": {"name": "add_task", "arguments": '{"title": "t"}'}}
        messages += [
            {"role": "user", "content": f"add task {number}"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{number}", "content": '{"task_id": 1, "status": "created"}'},
            {"role": "assistant", "content": "Done."},
        ]
    return [*messages, {"role": "user", "content": "Add a task to buy milk"}]


AGENT_TOOLS = [tool.openai_schema() for tool in tools.for_surface("chat")]  # the schemas the agent sends


async def _timed(calls: int, call: Callable[[int], Awaitable[Any]]) -> dict[str, float]:
    for number in range(min(20, calls)):  # warm: connections, caches, prepared statements
        await call(number)
    latencies = []
    for number in range(calls):
        started = time.perf_counter()
        await call(number)
        latencies.append((time.perf_counter() - started) * 1000)
    return {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)}


async def fan_out_event_rows(calls: int) -> list[tuple[str, dict[str, float]]]:
    """What one SSE event carrying a fan-out step's 1,000 calls costs to read (issue 20: the
    bench model server sends them so), as SDK models and as the JSON the agent reads."""
    fragments = [
        {
            "index": n,
            "id": f"call_{n}",
            "type": "function",
            "function": {"name": "add_task", "arguments": json.dumps({"title": f"x {n}"})},
        }
        for n in range(1000)
    ]
    delta = {"tool_calls": fragments}
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [{"delta": delta}],
    }
    event = json.dumps(chunk)

    async def as_models(number: int) -> None:
        construct_type(type_=ChatCompletionChunk, value=json.loads(event))

    async def as_json(number: int) -> None:
        json.loads(event)

    return [
        ("one SSE event of 1,000 tool calls, read as SDK models", await _timed(calls, as_models)),
        ("same, read as JSON (the agent)", await _timed(calls, as_json)),
    ]


async def measure_hops(
    task_addr: str, conversation_addr: str, gateway_url: str, model_url: str, secret: str, calls: int
) -> list[tuple[str, dict[str, float]]]:
    user = "bench-hops"
    metadata = (("authorization", f"Bearer {mint(secret, user, 3600)}"),)
    results: list[tuple[str, dict[str, float]]] = []
    async with grpc.aio.insecure_channel(task_addr) as task_channel:
        tasks = task_pb2_grpc.TaskServiceStub(task_channel)

        async def create_task(number: int) -> None:
            await tasks.CreateTask(task_pb2.CreateTaskRequest(user_id=user, title=f"hop {number}"), metadata=metadata)

        results.append(("gRPC CreateTask (task_service, PostgreSQL)", await _timed(calls, create_task)))
    async with grpc.aio.insecure_channel(conversation_addr) as conversation_channel:
        conversations = conversation_pb2_grpc.ConversationServiceStub(conversation_channel)
        conversation = await conversations.CreateConversation(
            conversation_pb2.CreateConversationRequest(user_id=user), metadata=metadata
        )

        async def append(number: int) -> None:
            request = conversation_pb2.AppendMessageRequest(
                user_id=user, conversation_id=conversation.id, role="user", content=f"message {number}"
            )
            await conversations.AppendMessage(request, metadata=metadata)

        async def recent(number: int) -> None:
            request = conversation_pb2.GetRecentMessagesRequest(user_id=user, conversation_id=conversation.id)
            await conversations.GetRecentMessages(request, metadata=metadata)

        results.append(("gRPC AppendMessage (conversation_service, PostgreSQL)", await _timed(calls, append)))
        results.append(("gRPC GetRecentMessages (conversation_service)", await _timed(calls, recent)))
    model = openai.AsyncOpenAI(base_url=model_url, api_key="bench", max_retries=0)

    async def model_step(number: int) -> None:
        messages: Any = [{"role": "user", "content": f"Add a task to buy milk {number}"}]
        tools: Any = TOOLS
        stream = await model.chat.completions.create(model="bench", messages=messages, tools=tools, stream=True)
        async for _chunk in stream:
            pass

    results.append(("openai SDK streamed step, 1 message -> bench model server", await _timed(calls, model_step)))
    history = long_history()

    async def model_step_history(number: int) -> None:
        tools: Any = AGENT_TOOLS
        stream = await model.chat.completions.create(model="bench", messages=history, tools=tools, stream=True)
        async for _chunk in stream:
            pass

    def raw_step(chunk_type: Any) -> Callable[[int], Awaitable[None]]:
        async def step(number: int) -> None:
            # The same request through the SDK's generic post(): skips its per-call TypedDict
            # transform; with `object` the chunks also stay the JSON the server sent (the agent's way).
            body = {"model": "bench", "messages": history, "tools": AGENT_TOOLS, "stream": True}
            stream = await model.post(
                "/chat/completions", body=body, cast_to=ChatCompletion, stream=True, stream_cls=AsyncStream[chunk_type]
            )
            async for _chunk in stream:
                pass

        return step

    results.append(("openai SDK streamed step, 41-message history", await _timed(calls, model_step_history)))
    results.append(("same via client.post() (no param transform)", await _timed(calls, raw_step(ChatCompletionChunk))))
    results.append(("same, chunks as JSON, not SDK models (the agent)", await _timed(calls, raw_step(object))))
    results += await fan_out_event_rows(calls)
    await model.close()
    headers = {"authorization": f"Bearer {mint(secret, user, 3600)}", "content-type": "application/json"}

    def rest_create(number: int) -> None:
        body = json.dumps({"title": f"rest hop {number}"}).encode()
        request = urllib.request.Request(f"{gateway_url}/api/{user}/tasks", data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    async def rest_create_async(number: int) -> None:
        await asyncio.to_thread(rest_create, number)

    results.append(("REST POST /tasks via Envoy (new connection each)", await _timed(calls, rest_create_async)))
    return results
