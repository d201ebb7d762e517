"""The task tools: each one gRPC call (or a few) to task_service as the caller."""

from __future__ import annotations

from typing import Any

from agent_service.tools.base import Tool, ToolContext, ToolError, object_schema
from todo.v1 import task_pb2

# list_tasks returns at most this many tasks (2 pages of 100): enough for a chat, and small
# enough (under 1 MB even with 4,000-character descriptions) to store and send to a model.
LIST_LIMIT = 200

_TASK_ID = {"type": "integer", "minimum": 1, "description": "The task's number, as shown by list_tasks."}
_TITLE = {"type": "string", "minLength": 1, "maxLength": 255, "description": "The task's title."}
_DESCRIPTION = {"type": "string", "maxLength": 4000, "description": "Optional longer notes."}
_ACTION_RESULT = object_schema(
    {"task_id": {"type": "integer"}, "status": {"type": "string"}, "title": {"type": "string"}},
    ["task_id", "status", "title"],
)
_LISTED_TASK = object_schema(
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


async def _add_task(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    request = task_pb2.CreateTaskRequest(title=args["title"], description=args.get("description", ""))
    return _action(await context.tasks.CreateTask(request, metadata=context.metadata), "created")


async def _list_tasks(context: ToolContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = []
    page_token = ""
    while len(listed) < LIST_LIMIT:
        request = task_pb2.ListTasksRequest(status=args.get("status", "all"), page_size=100, page_token=page_token)
        reply = await context.tasks.ListTasks(request, metadata=context.metadata)
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


async def _complete_task(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    request = task_pb2.SetTaskCompletedRequest(task_id=args["task_id"], completed=True)
    return _action(await context.tasks.SetTaskCompleted(request, metadata=context.metadata), "completed")


async def _delete_task(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    request = task_pb2.DeleteTaskRequest(task_id=args["task_id"])
    return _action(await context.tasks.DeleteTask(request, metadata=context.metadata), "deleted")


async def _update_task(context: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    if "title" not in args and "description" not in args:
        raise ToolError("update_task needs a new title or description")
    request = task_pb2.UpdateTaskRequest(
        task_id=args["task_id"], title=args.get("title"), description=args.get("description")
    )
    return _action(await context.tasks.UpdateTask(request, metadata=context.metadata), "updated")


TOOLS = (
    Tool(
        "add_task",
        "Add a task to the user's todo list.",
        object_schema({"title": _TITLE, "description": _DESCRIPTION}, ["title"]),
        _ACTION_RESULT,
        _add_task,
        annotations={"title": "Add a task", "read_only_hint": False, "destructive_hint": False},
    ),
    Tool(
        "list_tasks",
        "List the user's tasks, oldest first, optionally only pending or only completed ones.",
        object_schema({"status": {"type": "string", "enum": ["all", "pending", "completed"], "default": "all"}}, []),
        {"type": "array", "items": _LISTED_TASK},
        _list_tasks,
        annotations={"title": "List tasks", "read_only_hint": True},
    ),
    Tool(
        "complete_task",
        "Mark one of the user's tasks as completed.",
        object_schema({"task_id": _TASK_ID}, ["task_id"]),
        _ACTION_RESULT,
        _complete_task,
        annotations={
            "title": "Complete a task",
            "read_only_hint": False,
            "destructive_hint": False,
            "idempotent_hint": True,
        },
    ),
    Tool(
        "delete_task",
        "Delete one of the user's tasks.",
        object_schema({"task_id": _TASK_ID}, ["task_id"]),
        _ACTION_RESULT,
        _delete_task,
        annotations={"title": "Delete a task", "read_only_hint": False, "destructive_hint": True},
    ),
    Tool(
        "update_task",
        "Change the title and/or description of one of the user's tasks.",
        object_schema({"task_id": _TASK_ID, "title": _TITLE, "description": _DESCRIPTION}, ["task_id"]),
        _ACTION_RESULT,
        _update_task,
        annotations={
            "title": "Update a task",
            "read_only_hint": False,
            "destructive_hint": True,
            "idempotent_hint": True,
        },
    ),
)
