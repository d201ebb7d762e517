"""The activity log and undo: every change to a task is an event, written in the change's own
transaction (so the log never disagrees with the tasks), with the surface it came from.

Undo reverts the user's latest change that is not undone yet and records the revert as an
event of its own, marking the original `undone`. Reverts are never undone themselves, so
repeated undos walk back through history, newest change first (no redo). What a revert does:

| original   | revert does                                     | revert's action |
|------------|-------------------------------------------------|-----------------|
| created    | deletes the task                                | deleted         |
| updated    | puts the fields back as they were before        | updated         |
| completed  | reopens it                                      | reopened        |
| reopened   | completes it again (with its old completed_at)  | completed       |
| deleted    | brings it back with the same id                 | restored        |

Because every later change is undone before an earlier one, the task is always exactly as the
original change left it when its revert runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from common.db import next_number, utc
from task_service.models import TaskRow, event_counters, task_events

SOURCES = ("rest", "chat", "mcp")
SOURCE_METADATA_KEY = "x-todo-source"  # agent_service/tools/base.py sends it

REVERSE = {
    "created": "deleted",
    "updated": "updated",
    "completed": "reopened",
    "reopened": "completed",
    "deleted": "restored",
}


@dataclass(frozen=True)
class Event:
    id: int
    task_id: int
    action: str
    source: str
    before: TaskRow | None
    after: TaskRow | None
    undone: bool
    created_at: datetime


def source_of(metadata: Any) -> str:
    """The surface a call came from: the agent's tools say "chat" or "mcp"; anything else is REST."""
    for key, value in metadata or ():
        if key == SOURCE_METADATA_KEY and value in SOURCES:
            return str(value)
    return "rest"


async def begin_change(conn: AsyncConnection, user_id: str) -> int:
    """The number of the event this transaction will write. Taken first in every change: the
    counter's row lock then serializes the user's changes and undos in one order (no deadlock)."""
    return await next_number(conn, event_counters, user_id)


async def record(
    conn: AsyncConnection,
    user_id: str,
    event_id: int,
    action: str,
    source: str,
    before: TaskRow | None,
    after: TaskRow | None,
    reverts: int | None = None,
) -> Event:
    task = after or before
    assert task is not None, "an event is about a task"
    event = Event(event_id, task.id, action, source, before, after, undone=False, created_at=datetime.now(UTC))
    await conn.execute(
        insert(task_events).values(
            user_id=user_id,
            id=event.id,
            task_id=event.task_id,
            action=action,
            source=source,
            before=snapshot(before),
            after=snapshot(after),
            undone=False,
            reverts=reverts,
            created_at=event.created_at,
        )
    )
    return event


async def latest_undoable(conn: AsyncConnection, user_id: str) -> Event | None:
    query = (
        select(*_COLUMNS)
        .where(task_events.c.user_id == user_id, task_events.c.undone.is_(False), task_events.c.reverts.is_(None))
        .order_by(task_events.c.id.desc())
        .limit(1)
    )
    row = (await conn.execute(query)).first()
    return _event(row) if row else None


async def mark_undone(conn: AsyncConnection, user_id: str, event_id: int) -> None:
    statement = update(task_events).where(task_events.c.user_id == user_id, task_events.c.id == event_id)
    await conn.execute(statement.values(undone=True))


async def page(conn: AsyncConnection, user_id: str, before_id: int | None, limit: int) -> list[Event]:
    """Up to `limit` events with id < before_id (all when None), newest first."""
    query = select(*_COLUMNS).where(task_events.c.user_id == user_id)
    if before_id is not None:
        query = query.where(task_events.c.id < before_id)
    rows = (await conn.execute(query.order_by(task_events.c.id.desc()).limit(limit))).all()
    return [_event(row) for row in rows]


_COLUMNS = (
    task_events.c.id,
    task_events.c.task_id,
    task_events.c.action,
    task_events.c.source,
    task_events.c.before,
    task_events.c.after,
    task_events.c.undone,
    task_events.c.created_at,
)


def _event(row: Any) -> Event:
    return Event(
        id=row.id,
        task_id=row.task_id,
        action=row.action,
        source=row.source,
        before=_load(row.before),
        after=_load(row.after),
        undone=bool(row.undone),
        created_at=utc(row.created_at),
    )


# Snapshots: the task as JSON, every field, so that a deleted task can be restored whole.


def snapshot(task: TaskRow | None) -> str | None:
    if task is None:
        return None
    fields = {
        **vars(task),
        "tags": list(task.tags),
        "created_at": task.created_at.isoformat(),
        "updated_at": task.updated_at.isoformat(),
        "completed_at": task.completed_at.isoformat() if task.completed_at else None,
    }
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def _load(text: str | None) -> TaskRow | None:
    if text is None:
        return None
    fields = json.loads(text)
    completed_at = fields["completed_at"]
    return TaskRow(
        **{
            **fields,
            "tags": tuple(fields["tags"]),
            "created_at": datetime.fromisoformat(fields["created_at"]),
            "updated_at": datetime.fromisoformat(fields["updated_at"]),
            "completed_at": datetime.fromisoformat(completed_at) if completed_at else None,
        }
    )
