"""An in-memory stand-in for the stack, for a fast eval loop: `run_eval --memory`.

It runs the built-in model (`respond`) directly, with an agent loop shaped like
agent_service's (one assistant message per turn holding all its tool calls and results,
a history window of 20 stored messages, at most 20 tool calls per model step and 50 per
turn), against tools that follow the public contract (shared/spec/API.md, including the
round 2 planning tools: due dates, priority, tags, filters, reopen, undo, timezone).

It is a development aid, not the score of record: the eval's score of record runs through
the real services (`--local`, `--grpc`, `--rest`). Due phrases are read with dateparser here;
task_service has its own reader, so the two may differ on unusual phrases.
"""

from __future__ import annotations

import copy
import datetime as dt
import inspect
import json
import re
import zoneinfo
from dataclasses import dataclass, field
from typing import Any

from agent_service.builtin_model import respond

MAX_STEPS = 8
MAX_CALLS_PER_STEP = 20
MAX_CALLS_PER_TURN = 50
HISTORY_WINDOW = 20
SYSTEM_PROMPT = "You are a todo assistant."

_ID = {"type": "integer", "minimum": 1}
_IDS = {"type": "array", "items": _ID, "minItems": 1, "maxItems": 50}
_PRIORITY = {"type": "string", "enum": ["none", "low", "medium", "high"]}
_TAGS = {"type": "array", "items": {"type": "string"}, "maxItems": 10}


def _tool(name: str, properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required or []}
    return {"type": "function", "function": {"name": name, "description": name, "parameters": parameters}}


# The chat tools as the round 2 contract describes them.
PLANNING_TOOLS = [
    _tool(
        "add_task",
        {
            "title": {"type": "string"},
            "description": {"type": "string"},
            "due": {"type": "string"},
            "priority": _PRIORITY,
            "tags": _TAGS,
        },
        ["title"],
    ),
    _tool(
        "list_tasks",
        {
            "status": {"type": "string"},
            "query": {"type": "string"},
            "due": {"type": "string"},
            "tag": {"type": "string"},
            "priority": _PRIORITY,
            "sort": {"type": "string"},
        },
    ),
    _tool("complete_task", {"task_id": _ID, "task_ids": _IDS}),
    _tool("delete_task", {"task_id": _ID, "task_ids": _IDS}),
    _tool(
        "update_task",
        {
            "task_id": _ID,
            "title": {"type": "string"},
            "description": {"type": "string"},
            "due": {"type": "string"},
            "priority": _PRIORITY,
            "tags": _TAGS,
        },
        ["task_id"],
    ),
    _tool("reopen_task", {"task_id": _ID}, ["task_id"]),
    _tool("undo_last_change", {}),
    _tool("set_timezone", {"timezone": {"type": "string"}}, ["timezone"]),
]


class ToolError(Exception):
    pass


@dataclass
class MemoryTask:
    id: int
    title: str
    description: str = ""
    completed: bool = False
    due_date: str = ""
    due_time: str = ""
    priority: str = "none"
    tags: list[str] = field(default_factory=list)
    created: int = 0
    updated: int = 0

    def item(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "completed": self.completed,
            "created_at": "2026-01-01T00:00:00Z",
            "due_date": self.due_date,
            "due_time": self.due_time,
            "priority": self.priority,
            "tags": list(self.tags),
        }

    def result(self, status: str) -> dict[str, Any]:
        return {
            "task_id": self.id,
            "status": status,
            "title": self.title,
            "due_date": self.due_date,
            "due_time": self.due_time,
            "priority": self.priority,
            "tags": list(self.tags),
        }


_TIME_WORDS = re.compile(
    r"\d\s*(?:am|pm|a\.m\.|p\.m\.)|\d:\d\d|\b(?:noon|midnight|morning|evening|tonight|afternoon)\b", re.I
)
_NAMED_TIMES = {
    "noon": "12:00",
    "midnight": "00:00",
    "morning": "09:00",
    "afternoon": "15:00",
    "evening": "18:00",
    "tonight": "20:00",
}


class MemoryStore:
    """One user's tasks, settings and change log."""

    def __init__(self) -> None:
        self.tasks: dict[int, MemoryTask] = {}
        self.next_id = 1
        self.timezone = "UTC"
        self.log: list[tuple[str, int, MemoryTask | None]] = []  # (action, task id, task before)
        self.clock = 0

    # --- helpers

    def today(self) -> dt.date:
        return dt.datetime.now(zoneinfo.ZoneInfo(self.timezone)).date()

    def _get(self, task_id: Any) -> MemoryTask:
        task = self.tasks.get(int(task_id)) if str(task_id).lstrip("-").isdigit() else None
        if task is None:
            raise ToolError(f"task {task_id} not found")
        return task

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def read_due(self, phrase: str) -> tuple[str, str]:
        import dateparser

        text = phrase.strip().lower()
        if not text:
            return "", ""
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return text, ""
        cleaned = re.sub(r"^(?:by|on|due|before|for|until|at)\s+", "", text)
        cleaned = re.sub(r"\b(?:the )?end of (?:the )?week\b", "friday", cleaned)
        cleaned = re.sub(r"\b(?:this |the |next )?weekend\b", "saturday", cleaned)
        if re.search(r"\bend of (?:the )?month\b", cleaned):
            today = self.today()
            last = (today.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(days=1)
            return last.isoformat(), ""
        cleaned = re.sub(r"\bthis (?=monday|tuesday|wednesday|thursday|friday|saturday|sunday)", "", cleaned)
        cleaned = re.sub(r"\bnext (?=monday|tuesday|wednesday|thursday|friday|saturday|sunday)", "", cleaned)
        named = next((value for word, value in _NAMED_TIMES.items() if re.search(rf"\b{word}\b", cleaned)), "")
        cleaned = re.sub(r"\b(?:noon|midnight|morning|afternoon|evening)\b", "", cleaned)
        cleaned = re.sub(r"\btonight\b", "today", cleaned).strip() or "today"
        now = dt.datetime.now(zoneinfo.ZoneInfo(self.timezone)).replace(tzinfo=None)
        if cleaned == "next week":
            cleaned = "in 7 days"
        parsed = dateparser.parse(
            cleaned, settings={"PREFER_DATES_FROM": "future", "RELATIVE_BASE": now, "RETURN_AS_TIMEZONE_AWARE": False}
        )
        if parsed is None:
            raise ToolError(f"due: can't read {phrase!r} as a date")
        if parsed.date() < now.date() and not re.search(r"\d{4}", cleaned):
            parsed = parsed + dt.timedelta(days=7) if re.search(r"day\b", cleaned) else parsed
        due_time = parsed.strftime("%H:%M") if _TIME_WORDS.search(cleaned) else named
        return parsed.date().isoformat(), due_time

    def _apply_planning(self, task: MemoryTask, args: dict[str, Any]) -> None:
        if "due" in args:
            due = str(args["due"])
            keep_time = task.due_time
            task.due_date, task.due_time = self.read_due(due)
            if task.due_date and not task.due_time and not _TIME_WORDS.search(due):
                task.due_time = keep_time if keep_time and due else ""
        if "priority" in args:
            if args["priority"] not in ("none", "low", "medium", "high"):
                raise ToolError(f"priority: {args['priority']!r} is not none, low, medium or high")
            task.priority = str(args["priority"])
        if "tags" in args:
            tags = [str(tag).lower() for tag in args["tags"]]
            if any(not re.fullmatch(r"[a-z0-9_-]{1,32}", tag) for tag in tags) or len(tags) > 10:
                raise ToolError(f"tags: {args['tags']!r} are not valid tags")
            task.tags = list(dict.fromkeys(tags))

    # --- tools

    def add_task(self, args: dict[str, Any]) -> Any:
        title = str(args.get("title", "")).strip()
        if not 1 <= len(title) <= 255:
            raise ToolError("title must be 1..255 characters")
        task = MemoryTask(self.next_id, title, str(args.get("description", "")))
        self._apply_planning(task, args)
        task.created = task.updated = self._tick()
        self.tasks[task.id] = task
        self.next_id += 1
        self.log.append(("created", task.id, None))
        return task.result("created")

    def list_tasks(self, args: dict[str, Any]) -> Any:
        status = args.get("status", "all")
        if status not in ("all", "pending", "completed"):
            raise ToolError(f"status: unknown value {status!r}")
        tasks = [task for task in self.tasks.values() if status == "all" or task.completed == (status == "completed")]
        if query := str(args.get("query", "")).lower().split():
            tasks = [t for t in tasks if all(w in f"{t.title} {t.description}".lower() for w in query)]
        if tag := args.get("tag"):
            tasks = [t for t in tasks if str(tag).lower() in t.tags]
        if priority := args.get("priority"):
            tasks = [t for t in tasks if t.priority == priority]
        if due := args.get("due"):
            tasks = [t for t in tasks if self._due_matches(t, str(due))]
        sort = args.get("sort", "created")
        if sort == "due":
            tasks.sort(key=lambda t: (not t.due_date, t.due_date, t.due_time or "99", t.id))
        elif sort == "priority":
            rank = {"high": 0, "medium": 1, "low": 2, "none": 3}
            tasks.sort(key=lambda t: (rank[t.priority], t.id))
        elif sort == "updated":
            tasks.sort(key=lambda t: -t.updated)
        elif sort != "created":
            raise ToolError(f"sort: unknown value {sort!r}")
        return [task.item() for task in tasks]

    def _due_matches(self, task: MemoryTask, due: str) -> bool:
        today = self.today()
        day = dt.date.fromisoformat(task.due_date) if task.due_date else None
        if due == "today":
            return day == today
        if due == "overdue":
            return day is not None and day < today and not task.completed
        if due == "upcoming":
            return day is not None and today < day <= today + dt.timedelta(days=7)
        if due == "scheduled":
            return day is not None
        if due == "none":
            return day is None
        raise ToolError(f"due: unknown value {due!r}")

    def _each(self, args: dict[str, Any], one: Any) -> Any:
        if "task_ids" in args:
            ids = args["task_ids"]
            if not isinstance(ids, list) or not 1 <= len(ids) <= 50:
                raise ToolError("task_ids must hold 1..50 numbers")
            results = []
            for task_id in ids:
                try:
                    results.append(one(task_id))
                except ToolError as error:
                    results.append({"task_id": task_id, "error": str(error)})
            return {"results": results}
        return one(args.get("task_id"))

    def complete_task(self, args: dict[str, Any]) -> Any:
        def one(task_id: Any) -> dict[str, Any]:
            task = self._get(task_id)
            self.log.append(("completed", task.id, copy.deepcopy(task)))
            task.completed, task.updated = True, self._tick()
            return task.result("completed")

        return self._each(args, one)

    def delete_task(self, args: dict[str, Any]) -> Any:
        def one(task_id: Any) -> dict[str, Any]:
            task = self._get(task_id)
            self.log.append(("deleted", task.id, copy.deepcopy(task)))
            del self.tasks[task.id]
            return task.result("deleted")

        return self._each(args, one)

    def update_task(self, args: dict[str, Any]) -> Any:
        task = self._get(args.get("task_id"))
        if not any(key in args for key in ("title", "description", "due", "priority", "tags")):
            raise ToolError("update_task needs something to change")
        before = copy.deepcopy(task)
        changed = copy.deepcopy(task)
        if "title" in args:
            changed.title = str(args["title"]).strip()
            if not 1 <= len(changed.title) <= 255:
                raise ToolError("title must be 1..255 characters")
        if "description" in args:
            changed.description = str(args["description"])
        self._apply_planning(changed, args)
        changed.updated = self._tick()
        self.tasks[task.id] = changed
        self.log.append(("updated", task.id, before))
        return changed.result("updated")

    def reopen_task(self, args: dict[str, Any]) -> Any:
        task = self._get(args.get("task_id"))
        self.log.append(("reopened", task.id, copy.deepcopy(task)))
        task.completed, task.updated = False, self._tick()
        return task.result("reopened")

    def undo_last_change(self, args: dict[str, Any]) -> Any:
        if not self.log:
            raise ToolError("nothing to undo")
        action, task_id, before = self.log.pop()
        if action == "created":
            task = self.tasks.pop(task_id)
            return {**task.result("deleted"), "undone": action}
        assert before is not None
        self.tasks[task_id] = before
        return {**before.result("restored" if action == "deleted" else "reverted"), "undone": action}

    def set_timezone(self, args: dict[str, Any]) -> Any:
        name = str(args.get("timezone", ""))
        if name not in zoneinfo.available_timezones():
            raise ToolError(f"timezone: {name!r} is not an IANA time zone")
        self.timezone = name
        return {"timezone": name}

    def run(self, name: str, arguments: str) -> Any:
        try:
            args = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            return {"error": "arguments are not valid JSON"}
        method = getattr(self, name, None) if name in _TOOL_NAMES else None
        if method is None:
            return {"error": f"unknown tool {name!r}"}
        try:
            return method(args if isinstance(args, dict) else {})
        except ToolError as error:
            return {"error": str(error)}


_TOOL_NAMES = {tool["function"]["name"] for tool in PLANNING_TOOLS}


def _model_step(messages: list[dict[str, Any]], schemas: list[dict[str, Any]]) -> Any:
    if "tools" in inspect.signature(respond).parameters:
        return respond(messages, tools=schemas)  # type: ignore[call-arg]
    return respond(messages)


class TurnLimitError(Exception):
    pass


def run_turn(
    store: MemoryStore, history: list[list[dict[str, Any]]], message: str, schemas: list[dict[str, Any]]
) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """One chat turn; appends the stored user and assistant messages to `history`."""
    window = [m for stored in history[-HISTORY_WINDOW:] for m in stored]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        *window,
        {"role": "user", "content": message},
    ]
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    text = ""
    for step in range(MAX_STEPS):
        reply = _model_step(messages, schemas)
        if not reply.calls:
            text = reply.text
            break
        if len(reply.calls) > MAX_CALLS_PER_STEP or len(calls) + len(reply.calls) > MAX_CALLS_PER_TURN:
            raise TurnLimitError(f"{len(reply.calls)} calls in step {step + 1} ({len(calls)} before)")
        step_calls = [
            {
                "id": f"call_{len(history)}_{len(calls) + i}",
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for i, call in enumerate(reply.calls)
        ]
        step_results = [
            {
                "role": "tool",
                "tool_call_id": c["id"],
                "content": json.dumps(store.run(c["function"]["name"], c["function"]["arguments"])),
            }
            for c in step_calls
        ]
        messages += [{"role": "assistant", "content": None, "tool_calls": step_calls}, *step_results]
        calls += step_calls
        results += step_results
    else:
        text = "I stopped: too many steps."
    history.append([{"role": "user", "content": message}])
    stored: list[dict[str, Any]] = []
    if calls:
        stored += [{"role": "assistant", "content": None, "tool_calls": calls}, *results]
    stored.append({"role": "assistant", "content": text})
    history.append(stored)
    made = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    return text, made
