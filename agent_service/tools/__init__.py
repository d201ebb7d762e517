"""The tools, defined once for the chat agent, the MCP server and ChatKit alike.

`TOOLS` holds every tool by name; each says on which surfaces it is offered (`for_surface`).
The task tools live in `tasks.py`; a new tool is one entry there (or in a sibling module
registered below) and appears on its surfaces without further code.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc

from agent_service.tools import conversations, tasks
from agent_service.tools.base import (
    TOOL_ERROR_CODES,
    Surface,
    Tool,
    ToolContext,
    ToolError,
    check_arguments,
    parse_arguments,
)
from common import audit, metrics

__all__ = [
    "TOOLS",
    "Tool",
    "ToolContext",
    "ToolError",
    "account",
    "account_refused",
    "execute",
    "for_surface",
    "is_write",
    "parse_arguments",
]

TOOLS: dict[str, Tool] = {tool.name: tool for tool in (*tasks.TOOLS, *conversations.TOOLS)}


def is_write(name: str) -> bool:
    """Whether a tool changes data (unknown names count as writes: the cautious side)."""
    tool = TOOLS.get(name)
    return tool is None or not tool.annotations.get("read_only_hint", False)


def for_surface(surface: Surface) -> list[Tool]:
    """The tools offered on one surface, in definition order."""
    return [tool for tool in TOOLS.values() if surface in tool.surfaces]


async def execute(name: str, raw_arguments: str | dict[str, Any] | None, context: ToolContext) -> Any:
    """Run one tool as `context.caller`; ToolError for a mistake in the call, other errors propagate.

    Every call is counted (todo_tool_calls_total) and audited with its tool, user, surface and
    outcome (never its arguments or result: they hold what the user wrote)."""
    try:
        result = await _run(name, raw_arguments, context)
    except ToolError as error:
        account(name, context, "error", error.code.name if error.code else "invalid_call")
        raise
    except BaseException:
        account(name, context, "failed")
        raise
    account(name, context, "ok")
    return result


def account(name: str, context: ToolContext, outcome: str, reason: str = "", *, calls: int | None = None) -> None:
    """One tool call in the metrics and the audit trail; `outcome`: ok, error, failed or refused.
    With `calls`, that many calls of the tool in one record (`account_refused`)."""
    label = _label(name)
    metrics.tool_call(label, outcome, calls or 1)
    counted = {} if calls is None else {"calls": calls}
    audit.record(
        "tool_call",
        tool=label,
        user=context.caller.user_id,
        surface=context.source,
        outcome=outcome,
        reason=reason,
        **counted,
    )


def account_refused(names: Counter[str], context: ToolContext, reason: str) -> None:
    """Calls refused before they ran (the turn's tool budget), counted as one per call and
    audited as one record per tool with their number: a step asking for a thousand calls
    writes a line, not a thousand."""
    refused: Counter[str] = Counter()
    for name, count in names.items():
        refused[_label(name)] += count
    for label, count in refused.items():
        account(label, context, "refused", reason, calls=count)


def _label(name: str) -> str:
    return name if name in TOOLS else "unknown"  # a model can make up any name


async def _run(name: str, raw_arguments: str | dict[str, Any] | None, context: ToolContext) -> Any:
    offered = {tool.name: tool for tool in for_surface(context.source)}
    tool = offered.get(name)
    if tool is None:
        raise ToolError(f"unknown tool {name!r}; the tools are: {', '.join(offered)}")
    arguments = check_arguments(tool, parse_arguments(raw_arguments), context.caller)
    try:
        return await tool.run(context, arguments)
    except grpc.aio.AioRpcError as error:
        if error.code() in TOOL_ERROR_CODES:
            raise ToolError(error.details() or error.code().name, error.code()) from error
        raise
