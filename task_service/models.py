"""The tables task_service owns, and the row types read from them.

Migrations in migrations/versions must match the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Boolean, Column, DateTime, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

tasks = Table(
    "tasks",
    metadata,
    Column("user_id", String(255), primary_key=True),
    # The user's own task number: 1, 2, 3, ... per user, never reused.
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("title", String(255), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("completed", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # "YYYY-MM-DD" / "HH:MM" or "" for none: as text, they sort and compare the same way on
    # SQLite and PostgreSQL, and a due date is a calendar day of the user, not an instant.
    Column("due_date", String(10), nullable=False, default=""),
    Column("due_time", String(5), nullable=False, default=""),
    Column("priority", String(6), nullable=False, default="none"),
    # The tags joined by commas ("home,work"); a comma can never be part of a tag.
    Column("tags", Text, nullable=False, default=""),
    # casefold(title) + "\n" + casefold(description): what `q` searches, so that the search is
    # case-insensitive beyond ASCII on both backends (SQLite's lower() only folds ASCII).
    Column("search_text", Text, nullable=False, default=""),
    Column("completed_at", DateTime(timezone=True), nullable=True),
    Index("ix_tasks_user_completed_id", "user_id", "completed", "id"),
)

# The last task number handed out per user. Deleting a task never lowers it, so numbers are
# never reused; the upsert that bumps it is what serializes concurrent creates of one user.
task_counters = Table(
    "task_counters",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("last_id", Integer, nullable=False),
)

# The activity log: one row per change to a task, written in the change's own transaction.
task_events = Table(
    "task_events",
    metadata,
    Column("user_id", String(255), primary_key=True),
    # The user's own event number, from event_counters.
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("task_id", Integer, nullable=False),
    Column("action", String(16), nullable=False),
    Column("source", String(8), nullable=False),
    # The task before and after the change as JSON (activity.py); NULL when it did not exist.
    Column("before", Text, nullable=True),
    Column("after", Text, nullable=True),
    Column("undone", Boolean, nullable=False, default=False),
    # The event this one reverted (an undo), else NULL. Reverts are never undone themselves:
    # undo walks back through the user's own changes.
    Column("reverts", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# The last event number per user. Every change bumps it first, so the row lock it takes also
# serializes one user's changes and undos (no two undos can revert the same change).
event_counters = Table(
    "event_counters",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("last_id", Integer, nullable=False),
)

user_settings = Table(
    "user_settings",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("timezone", String(64), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class TaskRow:
    id: int
    title: str
    description: str
    completed: bool
    created_at: datetime
    updated_at: datetime
    due_date: str = ""
    due_time: str = ""
    priority: str = "none"
    tags: tuple[str, ...] = ()
    completed_at: datetime | None = None
