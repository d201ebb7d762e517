"""Every query task_service makes. Each one is scoped by the user id it is given.

Every change to a task runs in one transaction with its activity event (activity.py): the
event number is taken first (it also serializes the user's changes), then the task is read,
changed and logged. A change that changes nothing writes nothing and logs nothing.

Reads, and a create on PostgreSQL, are single statements in autocommit
(`common.db.single_statements`): a create there is one round trip, the counters, the task and
its event written by one statement (`_CREATE`), where the step-by-step transaction took six.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, delete, insert, literal, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.db import is_sqlite, next_number, single_statements, utc
from common.errors import NotFound
from task_service import activity, planning
from task_service.activity import Event
from task_service.models import TaskRow, task_counters, tasks, user_settings

_COLUMNS = (
    tasks.c.id,
    tasks.c.title,
    tasks.c.description,
    tasks.c.completed,
    tasks.c.created_at,
    tasks.c.updated_at,
    tasks.c.due_date,
    tasks.c.due_time,
    tasks.c.priority,
    tasks.c.tags,
    tasks.c.completed_at,
)


def _row(row: Any) -> TaskRow:
    return TaskRow(
        id=row.id,
        title=row.title,
        description=row.description,
        completed=row.completed,
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
        due_date=row.due_date,
        due_time=row.due_time,
        priority=row.priority,
        tags=tuple(row.tags.split(",")) if row.tags else (),
        completed_at=utc(row.completed_at) if row.completed_at else None,
    )


def _values(task: TaskRow) -> dict[str, Any]:
    """The columns that store `task` (everything but the user id)."""
    return {
        **vars(task),
        "tags": ",".join(task.tags),
        "search_text": planning.search_text(task.title, task.description),
    }


class _Unchanged(Exception):
    """Control flow, not an error: roll the transaction back (the event number with it) and
    answer the task as it is."""

    def __init__(self, task: TaskRow) -> None:
        self.task = task


# --- sorting and keyset pages ----------------------------------------------------------------
# Each sort is a list of (SQL expression, ascending) with the id last, so the order is total;
# a page token holds the key of the last row shown and the next page starts after it.

_RANK = case(
    *((tasks.c.priority == name, rank) for name, rank in planning.PRIORITY_RANK.items() if name != "none"),
    else_=planning.PRIORITY_RANK["none"],
)
_UNDATED = case((tasks.c.due_date == "", 1), else_=0)
SORT_KEYS: dict[str, list[tuple[ColumnElement[Any], bool]]] = {
    "created": [(tasks.c.id, True)],
    # Undated last; on one day all-day tasks ("") first, then by time.
    "due": [(_UNDATED, True), (tasks.c.due_date, True), (tasks.c.due_time, True), (tasks.c.id, True)],
    "priority": [(_RANK, True), (tasks.c.id, True)],
    "updated": [(tasks.c.updated_at, False), (tasks.c.id, False)],
}


def sort_key(task: TaskRow, sort: str) -> list[Any]:
    """The values of SORT_KEYS[sort] for `task`, as JSON (what a page token carries)."""
    if sort == "due":
        return [0 if task.due_date else 1, task.due_date, task.due_time, task.id]
    if sort == "priority":
        return [planning.PRIORITY_RANK[task.priority], task.id]
    if sort == "updated":
        return [task.updated_at.isoformat(), task.id]
    return [task.id]


def _after(sort: str, position: Sequence[Any]) -> ColumnElement[bool]:
    """Rows strictly after `position` in the sort's order (row-value comparison, spelled out)."""
    keys = SORT_KEYS[sort]
    values = list(position)
    if sort == "updated":
        values[0] = datetime.fromisoformat(values[0])
    steps = []
    for index, (expression, ascending) in enumerate(keys):
        ties = [keys[prior][0] == values[prior] for prior in range(index)]
        step = expression > values[index] if ascending else expression < values[index]
        steps.append(and_(*ties, step))
    return or_(*steps)


def _filters(query: planning.ListQuery, today: str, upcoming: tuple[str, str]) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if query.status != "all":
        conditions.append(tasks.c.completed == (query.status == "completed"))
    for word in query.words:
        conditions.append(tasks.c.search_text.contains(word, autoescape=True))
    if query.tag:
        # tags is "a,b,c": the tag between commas (",a,b,c," contains ",b,").
        conditions.append((literal(",") + tasks.c.tags + literal(",")).contains(f",{query.tag},", autoescape=True))
    if query.priority:
        conditions.append(tasks.c.priority == query.priority)
    if query.due == "today":
        conditions.append(tasks.c.due_date == today)
    elif query.due == "overdue":
        conditions += [tasks.c.due_date != "", tasks.c.due_date < today, tasks.c.completed.is_(False)]
    elif query.due == "upcoming":
        conditions += [tasks.c.due_date >= upcoming[0], tasks.c.due_date <= upcoming[1]]
    elif query.due == "scheduled":
        conditions.append(tasks.c.due_date != "")
    elif query.due == "none":
        conditions.append(tasks.c.due_date == "")
    return conditions


# PostgreSQL's create in one statement: both counters bumped (each upsert row-locks its counter
# until the statement commits, as the step-by-step transaction does), the task and its
# "created" event inserted with those numbers. Data-modifying CTEs always run to completion,
# whether or not the final SELECT reads them. The event's snapshot is the task's JSON with the
# new number set into it (jsonb: the same fields, spaced differently; activity.py reads either).
_CREATE = text(
    """
WITH event_number AS (
    INSERT INTO event_counters (user_id, last_id) VALUES (:user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET last_id = event_counters.last_id + 1
    RETURNING last_id
), task_number AS (
    INSERT INTO task_counters (user_id, last_id) VALUES (:user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET last_id = task_counters.last_id + 1
    RETURNING last_id
), new_task AS (
    INSERT INTO tasks (user_id, id, title, description, completed, created_at, updated_at,
                       due_date, due_time, priority, tags, search_text, completed_at)
    SELECT :user_id, last_id, :title, :description, :completed, :created_at, :updated_at,
           :due_date, :due_time, :priority, :tags, :search_text, :completed_at
    FROM task_number
), new_event AS (
    INSERT INTO task_events (user_id, id, task_id, action, source, before, after, undone, reverts, created_at)
    SELECT :user_id, event_number.last_id, task_number.last_id, 'created', :source, NULL,
           CAST(jsonb_set(CAST(:snapshot AS jsonb), '{id}', to_jsonb(task_number.last_id)) AS text),
           false, NULL, :created_at
    FROM event_number, task_number
)
SELECT last_id FROM task_number
"""
)


class TaskStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._single = single_statements(engine)
        self._one_statement_create = not is_sqlite(str(engine.url))

    # --- tasks ---------------------------------------------------------------------------

    async def create(self, user_id: str, change: planning.Change, source: str) -> TaskRow:
        now = datetime.now(UTC)
        if self._one_statement_create:
            draft = change.apply(TaskRow(0, title="", description="", completed=False, created_at=now, updated_at=now))
            params = {**_values(draft), "user_id": user_id, "source": source, "snapshot": activity.snapshot(draft)}
            async with self._single.connect() as conn:
                task_id = (await conn.execute(_CREATE, params)).scalar_one()
            return replace(draft, id=int(task_id))
        async with self._engine.begin() as conn:
            event_id = await activity.begin_change(conn, user_id)
            task_id = await next_number(conn, task_counters, user_id)
            blank = TaskRow(task_id, title="", description="", completed=False, created_at=now, updated_at=now)
            task = change.apply(blank)
            await conn.execute(insert(tasks).values(user_id=user_id, **_values(task)))
            await activity.record(conn, user_id, event_id, "created", source, None, task)
        return task

    async def get(self, user_id: str, task_id: int) -> TaskRow | None:
        async with self._single.connect() as conn:
            return await _fetch(conn, user_id, task_id)

    async def list(
        self, user_id: str, query: planning.ListQuery, today: str, after: Sequence[Any] | None, limit: int
    ) -> list[TaskRow]:
        """Up to `limit` tasks matching `query` after the position `after`, in its order."""
        conditions = _filters(query, today, planning.upcoming_window(datetime.fromisoformat(today).date()))
        if after is not None:
            conditions.append(_after(query.sort, after))
        order = [
            expression.asc() if ascending else expression.desc() for expression, ascending in SORT_KEYS[query.sort]
        ]
        statement = select(*_COLUMNS).where(tasks.c.user_id == user_id, *conditions).order_by(*order).limit(limit)
        async with self._single.connect() as conn:
            rows = (await conn.execute(statement)).all()
        return [_row(row) for row in rows]

    async def update(self, user_id: str, task_id: int, change: planning.Change, source: str) -> TaskRow:
        """Apply `change`; NotFound if the user has no such task."""
        try:
            async with self._engine.begin() as conn:
                event_id = await activity.begin_change(conn, user_id)
                before = await _existing(conn, user_id, task_id)
                after = change.apply(before)
                if after == before:
                    raise _Unchanged(before)
                after = replace(after, updated_at=datetime.now(UTC))
                await _write(conn, user_id, after)
                await activity.record(conn, user_id, event_id, "updated", source, before, after)
        except _Unchanged as unchanged:
            return unchanged.task
        return after

    async def set_completed(self, user_id: str, task_id: int, completed: bool, source: str) -> TaskRow:
        """Set the flag; nothing moves (and nothing is logged) when it already has that value."""
        try:
            async with self._engine.begin() as conn:
                event_id = await activity.begin_change(conn, user_id)
                before = await _existing(conn, user_id, task_id)
                if before.completed == completed:
                    raise _Unchanged(before)
                now = datetime.now(UTC)
                after = replace(before, completed=completed, updated_at=now, completed_at=now if completed else None)
                await _write(conn, user_id, after)
                action = "completed" if completed else "reopened"
                await activity.record(conn, user_id, event_id, action, source, before, after)
        except _Unchanged as unchanged:
            return unchanged.task
        return after

    async def delete(self, user_id: str, task_id: int, source: str) -> TaskRow:
        async with self._engine.begin() as conn:
            event_id = await activity.begin_change(conn, user_id)
            before = await _existing(conn, user_id, task_id)
            await conn.execute(delete(tasks).where(tasks.c.user_id == user_id, tasks.c.id == task_id))
            await activity.record(conn, user_id, event_id, "deleted", source, before, None)
        return before

    # --- activity and undo -----------------------------------------------------------------

    async def events(self, user_id: str, before_id: int | None, limit: int) -> Sequence[Event]:
        async with self._single.connect() as conn:
            return await activity.page(conn, user_id, before_id, limit)

    async def undo(self, user_id: str, source: str) -> Event:
        """Revert the latest change not undone yet (see activity.py); NotFound if there is none."""
        async with self._engine.begin() as conn:
            event_id = await activity.begin_change(conn, user_id)
            original = await activity.latest_undoable(conn, user_id)
            if original is None:
                raise NotFound("nothing to undo")
            action = activity.REVERSE[original.action]
            current = await _fetch(conn, user_id, original.task_id)
            reverted = await _revert(conn, user_id, original, current)
            await activity.mark_undone(conn, user_id, original.id)
            return await activity.record(conn, user_id, event_id, action, source, current, reverted, original.id)

    # --- settings ----------------------------------------------------------------------------

    async def timezone(self, user_id: str) -> str:
        statement = select(user_settings.c.timezone).where(user_settings.c.user_id == user_id)
        async with self._single.connect() as conn:
            found = (await conn.execute(statement)).scalar_one_or_none()
        return found or planning.DEFAULT_TIMEZONE

    async def set_timezone(self, user_id: str, timezone: str) -> str:
        values = {"timezone": timezone, "updated_at": datetime.now(UTC)}
        async with self._single.begin() as conn:  # one upsert: atomic on its own
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            upsert = dialect.insert(user_settings).values(user_id=user_id, **values)
            await conn.execute(upsert.on_conflict_do_update(index_elements=[user_settings.c.user_id], set_=values))
        return timezone


async def _fetch(conn: AsyncConnection, user_id: str, task_id: int) -> TaskRow | None:
    statement = select(*_COLUMNS).where(tasks.c.user_id == user_id, tasks.c.id == task_id)
    row = (await conn.execute(statement)).first()
    return _row(row) if row else None


async def _existing(conn: AsyncConnection, user_id: str, task_id: int) -> TaskRow:
    # Another user's task and a missing one get the same answer.
    task = await _fetch(conn, user_id, task_id)
    if task is None:
        raise NotFound(f"task {task_id} not found")
    return task


async def _write(conn: AsyncConnection, user_id: str, task: TaskRow) -> None:
    statement = update(tasks).where(tasks.c.user_id == user_id, tasks.c.id == task.id)
    await conn.execute(statement.values(**_values(task)))


async def _revert(conn: AsyncConnection, user_id: str, original: Event, current: TaskRow | None) -> TaskRow | None:
    """Put the task back as it was before `original`; the task as it is afterwards (None: deleted)."""
    now = datetime.now(UTC)
    if original.action == "deleted":
        assert original.before is not None and current is None, "a deleted task's number is never reused"
        restored = replace(original.before, updated_at=now)
        await conn.execute(insert(tasks).values(user_id=user_id, **_values(restored)))
        return restored
    if current is None:  # cannot happen while every change is logged: later changes are undone first
        raise NotFound(f"task {original.task_id} not found")
    if original.action == "created":
        await conn.execute(delete(tasks).where(tasks.c.user_id == user_id, tasks.c.id == current.id))
        return None
    assert original.before is not None
    reverted = replace(original.before, created_at=current.created_at, updated_at=now)
    await _write(conn, user_id, reverted)
    return reverted
