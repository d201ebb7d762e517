"""The five task tools, defined once for the chat agent and the MCP server alike.

Each tool has a name, a description, a JSON schema for its arguments (no user id: the
user is always the authenticated caller), a JSON schema for its result, and a `run` that
turns validated arguments into one gRPC call to task_service carrying the caller's token.

`execute()` is the single entry point: it parses and checks arguments, refuses a `user_id`
naming anyone but the caller, runs the tool, and raises `ToolError` (a message meant for the
model or MCP client) for anything the caller got wrong. Infrastructure failures (task_service
down) are not ToolErrors: they propagate so the turn fails with a clear status.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from common.auth import Caller
from common.clients import caller_metadata
from todo.v1 import task_pb2, task_pb2_grpc

# task_service answers that are about this call (the model can tell the user), not outages.
# RESOURCE_EXHAUSTED is the user's write budget: the model says to slow down.
TASK_TOOL_ERRORS = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# list_tasks returns at most this many tasks (2 pages of 100): enough for a chat, and small
# enough (under 1 MB even with 4,000-character descriptions) to store and send to a model.
LIST_LIMIT = 200


class ToolError(Exception):
    """The tool call was wrong (bad arguments, no such task...): tell the model, don't fail the turn."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    run: Callable[[task_pb2_grpc.TaskServiceStub, tuple[tuple[str, str], ...], dict[str, Any]], Awaitable[Any]]

    def openai_schema(self) -> dict[str, Any]:
        """The Chat Completions `tools` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.input_schema},
        }


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_TASK_ID = {"type": "integer", "minimum": 1, "description": "The task's number, as shown by list_tasks."}
_TITLE = {"type": "string", "minLength": 1, "maxLength": 255, "description": "The task's title."}
_DESCRIPTION = {"type": "string", "maxLength": 4000, "description": "Optional longer notes."}
_ACTION_RESULT = _object(
    {"task_id": {"type": "integer"}, "status": {"type": "string"}, "title": {"type": "string"}},
    ["task_id", "status", "title"],
)
_LISTED_TASK = _object(
    {
        "id": {"type": "integer"},
        "title": {"type": "string"},
        "description": {"type": "string"},
        "completed": {"type": "boolean"},
        "created_at": {"type": "string", "format": "date-time"},
    },
    ["id", "title", "description", "completed", "created_at"],
)


def _action(task: task_pb2.Task, status: str) -> dict[str, Any]:
    return {"task_id": task.id, "status": status, "title": task.title}


async def _add_task(stub: Any, metadata: Any, args: dict[str, Any]) -> dict[str, Any]:
    request = task_pb2.CreateTaskRequest(title=args["title"], description=args.get("description", ""))
    return _action(await stub.CreateTask(request, metadata=metadata), "created")


async def _list_tasks(stub: Any, metadata: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = []
    page_token = ""
    while len(listed) < LIST_LIMIT:
        request = task_pb2.ListTasksRequest(status=args.get("status", "all"), page_size=100, page_token=page_token)
        reply = await stub.ListTasks(request, metadata=metadata)
        listed.extend(
            {
                "id": task.id,
                "title": task.title,
                "description": task.description,
                "completed": task.completed,
                "created_at": task.created_at.ToJsonString(),
            }
            for task in reply.tasks
        )
        page_token = reply.next_page_token
        if not page_token:
            break
    return listed[:LIST_LIMIT]


async def _complete_task(stub: Any, metadata: Any, args: dict[str, Any]) -> dict[str, Any]:
    request = task_pb2.SetTaskCompletedRequest(task_id=args["task_id"], completed=True)
    return _action(await stub.SetTaskCompleted(request, metadata=metadata), "completed")


async def _delete_task(stub: Any, metadata: Any, args: dict[str, Any]) -> dict[str, Any]:
    request = task_pb2.DeleteTaskRequest(task_id=args["task_id"])
    return _action(await stub.DeleteTask(request, metadata=metadata), "deleted")


async def _update_task(stub: Any, metadata: Any, args: dict[str, Any]) -> dict[str, Any]:
    if "title" not in args and "description" not in args:
        raise ToolError("update_task needs a new title or description")
    request = task_pb2.UpdateTaskRequest(
        task_id=args["task_id"], title=args.get("title"), description=args.get("description")
    )
    return _action(await stub.UpdateTask(request, metadata=metadata), "updated")


TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool(
            "add_task",
            "Add a task to the user's todo list.",
            _object({"title": _TITLE, "description": _DESCRIPTION}, ["title"]),
            _ACTION_RESULT,
            _add_task,
        ),
        Tool(
            "list_tasks",
            "List the user's tasks, oldest first, optionally only pending or only completed ones.",
            _object({"status": {"type": "string", "enum": ["all", "pending", "completed"], "default": "all"}}, []),
            {"type": "array", "items": _LISTED_TASK},
            _list_tasks,
        ),
        Tool(
            "complete_task",
            "Mark one of the user's tasks as completed.",
            _object({"task_id": _TASK_ID}, ["task_id"]),
            _ACTION_RESULT,
            _complete_task,
        ),
        Tool(
            "delete_task",
            "Delete one of the user's tasks.",
            _object({"task_id": _TASK_ID}, ["task_id"]),
            _ACTION_RESULT,
            _delete_task,
        ),
        Tool(
            "update_task",
            "Change the title and/or description of one of the user's tasks.",
            _object({"task_id": _TASK_ID, "title": _TITLE, "description": _DESCRIPTION}, ["task_id"]),
            _ACTION_RESULT,
            _update_task,
        ),
    )
}


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
    return {name: _coerce(name, value, properties[name]) for name, value in arguments.items() if value is not None}


def _coerce(name: str, value: Any, schema: dict[str, Any]) -> Any:
    kind = schema["type"]
    if kind == "integer":
        # Models often quote numbers ("3"); a number is what the user meant.
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
        ):
            raise ToolError(f"{name} must be a whole number")
        value = int(value)
        if value < schema.get("minimum", value) or value > 2**31 - 1:
            raise ToolError(f"{name} must be a positive task number")
        return value
    if not isinstance(value, str):
        raise ToolError(f"{name} must be a string")
    if "enum" in schema and value.strip().lower() not in schema["enum"]:
        raise ToolError(f"{name} must be one of: {', '.join(schema['enum'])}")
    return value.strip().lower() if "enum" in schema else value


async def execute(
    name: str, raw_arguments: str | dict[str, Any] | None, caller: Caller, stub: task_pb2_grpc.TaskServiceStub
) -> Any:
    """Run one tool as `caller`; ToolError for a mistake in the call, other errors propagate."""
    tool = TOOLS.get(name)
    if tool is None:
        raise ToolError(f"unknown tool {name!r}; the tools are: {', '.join(TOOLS)}")
    arguments = check_arguments(tool, parse_arguments(raw_arguments), caller)
    try:
        return await tool.run(stub, caller_metadata(caller), arguments)
    except grpc.aio.AioRpcError as error:
        if error.code() in TASK_TOOL_ERRORS:
            raise ToolError(error.details() or error.code().name) from error
        raise
