"""What every tool is made of, and how a call is checked and run.

A tool has a name, a description, a JSON schema for its arguments (no user id: the user is
always the authenticated caller), a JSON schema for its result, MCP annotations, the surfaces
it is offered on, and a `run` that turns validated arguments into gRPC calls to our services
carrying the caller's token (`ToolContext`).

`execute()` (in `agent_service.tools`) parses and checks arguments with `check_arguments`,
refuses a `user_id` naming anyone but the caller, runs the tool, and raises `ToolError` (a
message meant for the model or MCP client) for anything the caller got wrong. Infrastructure
failures (a service down) are not ToolErrors: they propagate so the turn fails with a clear status.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from common.auth import Caller
from common.clients import caller_metadata
from todo.v1 import conversation_pb2_grpc, task_pb2_grpc

# Where a call came from; task_service records it in the activity log.
Surface = Literal["chat", "mcp"]
SOURCE_METADATA_KEY = "x-todo-source"

# Service answers that are about this call (the model can tell the user), not outages.
# RESOURCE_EXHAUSTED is the user's budget: the model says to slow down.
TOOL_ERROR_CODES = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


class ToolError(Exception):
    """The tool call was wrong (bad arguments, no such task...): tell the model, don't fail the turn.

    `code` is the service's status when the error came from one (RESOURCE_EXHAUSTED: the
    user's budget is spent, so the turn stops issuing writes)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ToolContext:
    """Who calls, from which surface, and the stubs a tool may use (the conversation stub is
    only there where conversation tools are offered)."""

    caller: Caller
    tasks: task_pb2_grpc.TaskServiceStub
    conversations: conversation_pb2_grpc.ConversationServiceStub | None = None
    source: Surface = "chat"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (*caller_metadata(self.caller), (SOURCE_METADATA_KEY, self.source))


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    run: Callable[[ToolContext, dict[str, Any]], Awaitable[Any]]
    # MCP ToolAnnotations fields (title, read_only_hint, destructive_hint, idempotent_hint...).
    annotations: dict[str, Any] = field(default_factory=dict)
    surfaces: frozenset[Surface] = frozenset({"chat", "mcp"})

    def openai_schema(self) -> dict[str, Any]:
        """The Chat Completions `tools` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.input_schema},
        }


def object_schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def parse_arguments(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    """A tool call's arguments as a dict; models sometimes send invalid JSON."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return dict(raw)
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ToolError(f"arguments are not valid JSON: {error.msg}") from error
    if not isinstance(parsed, dict):
        raise ToolError("arguments must be a JSON object")
    return parsed


def check_arguments(tool: Tool, arguments: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """Arguments checked against the tool's schema; a user_id must name the caller and is dropped."""
    arguments = dict(arguments)
    claimed_user = arguments.pop("user_id", None)
    if claimed_user is not None and str(claimed_user) != caller.user_id:
        raise ToolError("user_id must be the authenticated user; tools only act on the caller's own tasks")
    properties = tool.input_schema["properties"]
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        raise ToolError(f"unknown argument(s) for {tool.name}: {', '.join(unknown)}")
    missing = [name for name in tool.input_schema["required"] if arguments.get(name) in (None, "")]
    if missing:
        raise ToolError(f"missing argument(s) for {tool.name}: {', '.join(missing)}")
    return {
        name: coerce(name, value, properties[name])
        for name, value in arguments.items()
        if value is not None and not _blank_choice(value, properties[name])
    }


def _blank_choice(value: Any, schema: dict[str, Any]) -> bool:
    # Models often send "" for an optional choice they don't mean to make: treat it as absent.
    return value == "" and "enum" in schema


# The schemas sent to models carry no length limits (some grammar-constrained servers fail on
# maxLength, issue 13): task_service enforces the real limits; this only stops absurd payloads.
MAX_ARGUMENT_CHARS = 10_000


def coerce(name: str, value: Any, schema: dict[str, Any]) -> Any:
    """One argument as its schema's type; models often quote numbers ("3") and send a list as
    one comma-separated string ("work, home") or a single item."""
    kind = schema["type"]
    if kind == "integer":
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, str) and value.strip().isdecimal())
        ):
            raise ToolError(f"{name} must be a whole number")
        value = int(value)
        if value < schema.get("minimum", value) or value > 2**31 - 1:
            raise ToolError(f"{name} must be a positive number")
        return value
    if kind == "array":
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        elif not isinstance(value, list):
            value = [value]
        return [coerce(name, item, schema["items"]) for item in value]
    if not isinstance(value, str):
        raise ToolError(f"{name} must be a string")
    if len(value) > MAX_ARGUMENT_CHARS:
        raise ToolError(f"{name} is far too long ({len(value)} characters)")
    if "enum" in schema and value.strip().lower() not in schema["enum"]:
        raise ToolError(f"{name} must be one of: {', '.join(schema['enum'])}")
    return value.strip().lower() if "enum" in schema else value
