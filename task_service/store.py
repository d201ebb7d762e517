"""Every query on the tasks table. Each one is scoped by the user id it is given."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from common.db import next_number, utc
from task_service.models import task_counters, tasks

STATUS_FILTERS = ("all", "pending", "completed")


@dataclass(frozen=True)
class TaskRow:
    id: int
    title: str
    description: str
    completed: bool
    created_at: datetime
    updated_at: datetime


def _row(row: Any) -> TaskRow:
    return TaskRow(
        id=row.id,
        title=row.title,
        description=row.description,
        completed=row.completed,
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
    )


_COLUMNS = (tasks.c.id, tasks.c.title, tasks.c.description, tasks.c.completed, tasks.c.created_at, tasks.c.updated_at)


class TaskStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create(self, user_id: str, title: str, description: str) -> TaskRow:
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            task_id = await next_number(conn, task_counters, user_id)
            row = TaskRow(task_id, title, description, completed=False, created_at=now, updated_at=now)
            await conn.execute(insert(tasks).values(user_id=user_id, **vars(row)))
        return row

    async def get(self, user_id: str, task_id: int) -> TaskRow | None:
        async with self._engine.connect() as conn:
            result = await conn.execute(select(*_COLUMNS).where(tasks.c.user_id == user_id, tasks.c.id == task_id))
            row = result.first()
        return _row(row) if row else None

    async def list(self, user_id: str, status: str, after_id: int, limit: int) -> list[TaskRow]:
        """Up to `limit` tasks with id > after_id, oldest first."""
        query = select(*_COLUMNS).where(tasks.c.user_id == user_id, tasks.c.id > after_id)
        if status != "all":
            query = query.where(tasks.c.completed == (status == "completed"))
        query = query.order_by(tasks.c.id).limit(limit)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_row(row) for row in rows]

    async def update(self, user_id: str, task_id: int, changes: dict[str, Any]) -> TaskRow | None:
        """Apply `changes` (column -> value); None if the user has no such task."""
        async with self._engine.begin() as conn:
            statement: Any
            if changes:
                statement = (
                    update(tasks)
                    .where(tasks.c.user_id == user_id, tasks.c.id == task_id)
                    .values(**changes, updated_at=datetime.now(UTC))
                    .returning(*_COLUMNS)
                )
            else:
                statement = select(*_COLUMNS).where(tasks.c.user_id == user_id, tasks.c.id == task_id)
            row = (await conn.execute(statement)).first()
        return _row(row) if row else None

    async def set_completed(self, user_id: str, task_id: int, completed: bool) -> TaskRow | None:
        """Set the flag; updated_at moves only when the value changes (idempotent)."""
        async with self._engine.begin() as conn:
            statement = (
                update(tasks)
                .where(tasks.c.user_id == user_id, tasks.c.id == task_id, tasks.c.completed != completed)
                .values(completed=completed, updated_at=datetime.now(UTC))
                .returning(*_COLUMNS)
            )
            row = (await conn.execute(statement)).first()
            if row is None:
                lookup = select(*_COLUMNS).where(tasks.c.user_id == user_id, tasks.c.id == task_id)
                row = (await conn.execute(lookup)).first()
        return _row(row) if row else None

    async def delete(self, user_id: str, task_id: int) -> TaskRow | None:
        async with self._engine.begin() as conn:
            statement = delete(tasks).where(tasks.c.user_id == user_id, tasks.c.id == task_id).returning(*_COLUMNS)
            row = (await conn.execute(statement)).first()
        return _row(row) if row else None
