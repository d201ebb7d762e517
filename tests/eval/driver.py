"""A minimal agent loop for tests: the built-in model through the real `openai` SDK, its tool
calls run by agent_service.tools.execute against a real task_service.

It keeps history the way agent_service replays it (one assistant message with all of a
turn's tool calls, then their results, then the text), so model tests don't need the agent.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import openai

from agent_service import tools
from agent_service.builtin_model import create_app
from common.auth import Caller

MAX_STEPS = 8
SYSTEM_PROMPT = "You are a todo assistant."  # the built-in model ignores it


def builtin_client() -> openai.AsyncOpenAI:
    transport = httpx2.ASGITransport(app=create_app())
    return openai.AsyncOpenAI(
        base_url="http://builtin-model/v1", api_key="builtin", http_client=httpx2.AsyncClient(transport=transport)
    )


_CLIENT: openai.AsyncOpenAI | None = None


def _client() -> openai.AsyncOpenAI:
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = builtin_client()
    return _CLIENT


async def _run_tool(name: str, arguments: str, caller: Caller, stub: Any) -> Any:
    try:
        return await tools.execute(name, arguments, tools.ToolContext(caller, stub))
    except tools.ToolError as error:
        return {"error": str(error)}


async def run_turn(
    history: list[dict[str, Any]], message: str, user: str, token: str, stub: Any
) -> tuple[str, list[dict[str, Any]]]:
    """One turn; returns the answer and the messages to append to the history."""
    caller = Caller(user, token)
    schemas = [tool.openai_schema() for tool in tools.for_surface("chat")]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, *history, {"role": "user", "content": message}]
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for _ in range(MAX_STEPS):
        completion = await _client().chat.completions.create(
            model="builtin",
            messages=messages,
            tools=schemas,  # type: ignore[arg-type]
        )
        answer = completion.choices[0].message
        if not answer.tool_calls:
            text = answer.content or ""
            stored = [{"role": "user", "content": message}]
            if calls:
                stored += [{"role": "assistant", "content": None, "tool_calls": calls}, *results]
            stored.append({"role": "assistant", "content": text})
            return text, stored
        step_calls = [call.model_dump(include={"id", "type", "function"}) for call in answer.tool_calls]
        outcomes = await asyncio.gather(
            *(_run_tool(call.function.name, call.function.arguments, caller, stub) for call in answer.tool_calls)
        )
        step_results = [
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps(outcome)}
            for call, outcome in zip(answer.tool_calls, outcomes, strict=True)
        ]
        messages += [{"role": "assistant", "content": None, "tool_calls": step_calls}, *step_results]
        calls += step_calls
        results += step_results
    return "I stopped: too many steps.", [{"role": "user", "content": message}]
