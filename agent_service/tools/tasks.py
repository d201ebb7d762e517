"""The task tools: each one gRPC call (or a few) to task_service as the caller.

The argument schemas stay simple on purpose (types, `enum`, `minimum`; no maxLength, pattern,
format or maxItems): grammar-constrained model servers (llama.cpp's) fail on some of those
(issue 13). task_service enforces every limit and answers INVALID_ARGUMENT naming the field,
which reaches the model as the tool's error; counts such as task_ids' 1..50 are checked here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2

from agent_service.tools.base import TOOL_ERROR_CODES, Tool, ToolContext, ToolError, object_schema
from todo.v1 import task_pb2

# list_tasks returns at most this many tasks (2 pages of 100), each description cut to
# LISTED_DESCRIPTION_CHARS: enough for a chat, and small enough (about 150 KB at most) for
# conversation_service to store as one tool result (it refuses one over 256 KiB).
LIST_LIMIT = 200
LISTED_DESCRIPTION_CHARS = 300
MAX_TASK_IDS = 50
PRIORITIES = ["none", "low", "medium", "high"]

_TASK_ID = {"type": "integer", "minimum": 1, "description": "The task's number, as shown by list_tasks."}
_TASK_IDS = {
    "type": "array",
    "items": {"type": "integer", "minimum": 1},
    "description": f"Instead of task_id: several task numbers (1 to {MAX_TASK_IDS}), each done separately.",
}
_TITLE = {"type": "string", "description": "The task's title (at most 255 characters)."}
_DESCRIPTION = {"type": "string", "description": "Optional longer notes (at most 4,000 characters)."}
_DUE_TEXT = (
    "When the task is due, in the user's own words: 'tomorrow', 'next friday 5pm', 'in 3 days', "
    "'dec 24' or '2026-12-24'. Pass the phrase as the user said it; the service reads it in the "
    "user's timezone. Never work out dates yourself."
)
_DUE = {"type": "string", "description": _DUE_TEXT}
_DUE_UPDATE = {"type": "string", "description": _DUE_TEXT + " An empty string removes the due date."}
_PRIORITY = {"type": "string", "enum": PRIORITIES, "description": "How important the task is."}
_TAGS_TEXT = "Tags: single words of letters, digits, - or _ (at most 10), e.g. ['work', 'urgent']."
_TAGS = {"type": "array", "items": {"type": "string"}, "description": _TAGS_TEXT}
_TAGS_UPDATE = {
    "type": "array",
    "items": {"type": "string"},
    "description": _TAGS_TEXT + " Replaces the task's tags; [] removes them all.",
}

_PLANNED = {
    "due_date": {"type": "string", "description": "YYYY-MM-DD, or empty when not due."},
    "due_time": {"type": "string", "description": "HH:MM (24 h), or empty for all day."},
    "priority": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
}
_ACTION_RESULT = object_schema(
    {"task_id": {"type": "integer"}, "status": {"type": "string"}, "title": {"type": "string"}, **_PLANNED},
    ["task_id", "status", "title", *_PLANNED],
)
_FAILED_ENTRY = object_schema({"task_id": {"type": "integer"}, "error": {"type": "string"}}, ["task_id", "error"])
_BULK_RESULT = object_schema(
    {"results": {"type": "array", "items": {"anyOf": [_ACTION_RESULT, _FAILED_ENTRY]}}}, ["results"]
)
# complete_task / delete_task: one result for task_id, a result per task for task_ids.
_ONE_OR_MANY_RESULT = {"type": "object", "anyOf": [_ACTION_RESULT, _BULK_RESULT]}
_LISTED_TASK = object_schema(
    {
        "id": {"type": "integer"},
        "title": {"type": "string"},
        "description": {"type": "string"},
        "completed": {"type": "boolean"},
        "created_at": {"type": "string", "format": "date-time"},
        **_PLANNED,
        "completed_at": {"type": "string", "format": "date-time", "description": "Only on completed tasks."},
    },
    ["id", "title", "description", "completed", "created_at", *_PLANNED],
)
_SETTINGS_RESULT = object_schema({"status": {"type": "string"}, "timezone": {"type": "string"}}, ["status", "timezone"])


def _planned(task: task_pb2.Task) -> dict[str, Any]:
    return {"due_date": task.due_date, "due_time": task.due_time, "priority": task.priority, "tags": list(task.tags)}


def _action(task: task_pb2.Task, status: str) -> dict[str, Any]:
    return {"task_id": task.id, "status": status, "title": task.title, **_planned(task)}


def shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listed(task: task_pb2.Task) -> dict[str, Any]:
    item = {
        "id": task.id,
        "title": task.title,
        "description": shortened(task.description, LISTED_DESCRIPTION_CHARS),
        "completed": task.completed,
        "created_at": task.created_at.ToJsonString(),
        **_planned(task),
    }
    if task.HasField("completed_at"):
        item["completed_at"] = task.completed_at.ToJsonString()
    return item


async def _add_task(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    request = task_pb2.CreateTaskRequest(
        title=args["title"],
        description=args.get("description", ""),
        due=args.get("due", ""),
        priority=args.get("priority", ""),
        tags=args.get("tags", []),
    )
    return _action(await context.tasks.CreateTask(request, metadata=context.metadata), "created")


async def _list_tasks(context: ToolContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = []
    page_token = ""
    while len(listed) < LIST_LIMIT:
        request = task_pb2.ListTasksRequest(
            status=args.get("status", "all"),
            q=args.get("query", ""),
            due=args.get("due", ""),
            tag=args.get("tag", ""),
            priority=args.get("priority", ""),
            sort=args.get("sort", ""),
            page_size=100,
            page_token=page_token,
        )
        reply = await context.tasks.ListTasks(request, metadata=context.metadata)
        listed.extend(_listed(task) for task in reply.tasks)
        page_token = reply.next_page_token
        if not page_token:
            break
    return listed[:LIST_LIMIT]


def _task_ids(args: dict[str, Any]) -> list[int] | None:
    """The task_ids asked for (task_id too, if given), or None for a single task_id."""
    if "task_ids" not in args:
        if "task_id" not in args:
            raise ToolError("give task_id (one task) or task_ids (several)")
        return None
    ids = list(dict.fromkeys([*([args["task_id"]] if "task_id" in args else []), *args["task_ids"]]))
    if not 1 <= len(ids) <= MAX_TASK_IDS:
        raise ToolError(f"task_ids must hold 1 to {MAX_TASK_IDS} task numbers")
    return ids


async def _for_each(args: dict[str, Any], act: Callable[[int], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """One task (task_id): its result. Several (task_ids): a result or an error per task, in
    order; a task that fails (not found...) is an entry, not a failure of the whole call."""
    ids = _task_ids(args)
    if ids is None:
        return await act(args["task_id"])
    results: list[dict[str, Any]] = []
    budget_spent = ""
    for task_id in ids:
        if budget_spent:  # past the write budget every call would be refused: don't send them
            results.append({"task_id": task_id, "error": budget_spent})
            continue
        try:
            results.append(await act(task_id))
        except grpc.aio.AioRpcError as error:
            if error.code() not in TOOL_ERROR_CODES:
                raise
            message = error.details() or error.code().name
            results.append({"task_id": task_id, "error": message})
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                budget_spent = message
    return {"results": results}


async def _complete_task(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    async def complete(task_id: int) -> dict[str, Any]:
        request = task_pb2.SetTaskCompletedRequest(task_id=task_id, completed=True)
        return _action(await context.tasks.SetTaskCompleted(request, metadata=context.metadata), "completed")

    return await _for_each(args, complete)


async def _delete_task(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    async def delete(task_id: int) -> dict[str, Any]:
        request = task_pb2.DeleteTaskRequest(task_id=task_id)
        return _action(await context.tasks.DeleteTask(request, metadata=context.metadata), "deleted")

    return await _for_each(args, delete)


_UPDATABLE = ("title", "description", "due", "priority", "tags")


async def _update_task(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    if not any(name in args for name in _UPDATABLE):
        raise ToolError("update_task needs something to change: a new title or description, due, priority or tags")
    request = task_pb2.UpdateTaskRequest(
        task_id=args["task_id"],
        title=args.get("title"),
        description=args.get("description"),
        due=args.get("due"),
        priority=args.get("priority"),
    )
    if "tags" in args:  # a ListValue, so that [] (clear them) differs from no tags argument
        request.tags.CopyFrom(struct_pb2.ListValue(values=[struct_pb2.Value(string_value=t) for t in args["tags"]]))
    return _action(await context.tasks.UpdateTask(request, metadata=context.metadata), "updated")


async def _reopen_task(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    request = task_pb2.SetTaskCompletedRequest(task_id=args["task_id"], completed=False)
    return _action(await context.tasks.SetTaskCompleted(request, metadata=context.metadata), "reopened")


async def _undo_last_change(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """The revert's action is the status ("deleted" for an undone add, "restored" for an undone
    delete...), with the task as it is now (as it was, for one the undo deleted)."""
    event = await context.tasks.Undo(task_pb2.UndoRequest(), metadata=context.metadata)
    task = event.after if event.HasField("after") else event.before
    return {**_action(task, event.action), "task_id": event.task_id}


async def _set_timezone(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    request = task_pb2.UpdateSettingsRequest(timezone=args["timezone"])
    settings = await context.tasks.UpdateSettings(request, metadata=context.metadata)
    return {"status": "updated", "timezone": settings.timezone}


def _hints(
    title: str, *, read_only: bool = False, destructive: bool = False, idempotent: bool = False
) -> dict[str, Any]:
    """MCP ToolAnnotations: every tool acts only on the user's own list (a closed world)."""
    return {
        "title": title,
        "read_only_hint": read_only,
        "destructive_hint": destructive,
        "idempotent_hint": idempotent,
        "open_world_hint": False,
    }


TOOLS = (
    Tool(
        "add_task",
        "Add a task to the user's todo list, optionally with when it is due (due), a priority and tags. "
        "Keep the date out of the title: 'call mom tomorrow' is title 'Call mom', due 'tomorrow'.",
        object_schema(
            {"title": _TITLE, "description": _DESCRIPTION, "due": _DUE, "priority": _PRIORITY, "tags": _TAGS},
            ["title"],
        ),
        _ACTION_RESULT,
        _add_task,
        annotations=_hints("Add a task"),
    ),
    Tool(
        "list_tasks",
        "List the user's tasks (oldest first unless sorted), optionally only pending or completed ones, "
        "only those containing some words (query), due today / overdue / upcoming (the next 7 days) / "
        "scheduled / with no due date, with a tag or a priority.",
        object_schema(
            {
                "status": {"type": "string", "enum": ["all", "pending", "completed"], "default": "all"},
                "query": {"type": "string", "description": "Words that must all appear in the title or description."},
                "due": {"type": "string", "enum": ["today", "overdue", "upcoming", "scheduled", "none"]},
                "tag": {"type": "string", "description": "Only tasks with this tag."},
                "priority": {**_PRIORITY, "description": "Only tasks with this priority."},
                "sort": {
                    "type": "string",
                    "enum": ["created", "due", "priority", "updated"],
                    "description": "created (default), due (soonest first), priority (high first), updated (latest first).",
                },
            },
            [],
        ),
        {"type": "array", "items": _LISTED_TASK},
        _list_tasks,
        annotations=_hints("List tasks", read_only=True, idempotent=True),
    ),
    Tool(
        "complete_task",
        "Mark one of the user's tasks (task_id) or several (task_ids) as completed.",
        object_schema({"task_id": _TASK_ID, "task_ids": _TASK_IDS}, []),
        _ONE_OR_MANY_RESULT,
        _complete_task,
        annotations=_hints("Complete tasks", idempotent=True),
    ),
    Tool(
        "delete_task",
        "Delete one of the user's tasks (task_id) or several (task_ids). undo_last_change brings one back.",
        object_schema({"task_id": _TASK_ID, "task_ids": _TASK_IDS}, []),
        _ONE_OR_MANY_RESULT,
        _delete_task,
        annotations=_hints("Delete tasks", destructive=True, idempotent=True),
    ),
    Tool(
        "update_task",
        "Change one of the user's tasks: its title, description, when it is due (due), priority or tags. "
        "Only the arguments given change.",
        object_schema(
            {
                "task_id": _TASK_ID,
                "title": _TITLE,
                "description": _DESCRIPTION,
                "due": _DUE_UPDATE,
                "priority": _PRIORITY,
                "tags": _TAGS_UPDATE,
            },
            ["task_id"],
        ),
        _ACTION_RESULT,
        _update_task,
        annotations=_hints("Update a task", destructive=True, idempotent=True),
    ),
    Tool(
        "reopen_task",
        "Mark one of the user's completed tasks as not done (pending) again.",
        object_schema({"task_id": _TASK_ID}, ["task_id"]),
        _ACTION_RESULT,
        _reopen_task,
        annotations=_hints("Reopen a task", idempotent=True),
    ),
    Tool(
        "undo_last_change",
        "Undo the user's latest change to their tasks that is not undone yet (an add, update, completion, "
        "reopening or deletion); call it again to undo the one before. The status says what the undo did.",
        object_schema({}, []),
        _ACTION_RESULT,
        _undo_last_change,
        annotations=_hints("Undo the last change", destructive=True),
    ),
    Tool(
        "set_timezone",
        "Set the user's timezone, in which their dates ('tomorrow', 'today', overdue) are read.",
        object_schema(
            {"timezone": {"type": "string", "description": "An IANA timezone name, e.g. 'Europe/Paris' or 'UTC'."}},
            ["timezone"],
        ),
        _SETTINGS_RESULT,
        _set_timezone,
        annotations=_hints("Set the timezone", idempotent=True),
    ),
)
