"""The tools, defined once for the chat agent, the MCP server and ChatKit alike.

`TOOLS` holds every tool by name; each says on which surfaces it is offered (`for_surface`).
The task tools live in `tasks.py`; a new tool is one entry there (or in a sibling module
registered below) and appears on its surfaces without further code.
"""

from __future__ import annotations

from typing import Any

import grpc

from agent_service.tools import tasks
from agent_service.tools.base import (
    TOOL_ERROR_CODES,
    Surface,
    Tool,
    ToolContext,
    ToolError,
    check_arguments,
    parse_arguments,
)

__all__ = ["TOOLS", "Tool", "ToolContext", "ToolError", "execute", "for_surface", "parse_arguments"]

TOOLS: dict[str, Tool] = {tool.name: tool for tool in tasks.TOOLS}


def for_surface(surface: Surface) -> list[Tool]:
    """The tools offered on one surface, in definition order."""
    return [tool for tool in TOOLS.values() if surface in tool.surfaces]


async def execute(name: str, raw_arguments: str | dict[str, Any] | None, context: ToolContext) -> Any:
    """Run one tool as `context.caller`; ToolError for a mistake in the call, other errors propagate."""
    offered = {tool.name: tool for tool in for_surface(context.source)}
    tool = offered.get(name)
    if tool is None:
        raise ToolError(f"unknown tool {name!r}; the tools are: {', '.join(offered)}")
    arguments = check_arguments(tool, parse_arguments(raw_arguments), context.caller)
    try:
        return await tool.run(context, arguments)
    except grpc.aio.AioRpcError as error:
        if error.code() in TOOL_ERROR_CODES:
            raise ToolError(error.details() or error.code().name) from error
        raise
