"""The tables task_service owns. Migrations in migrations/versions must match them."""

from __future__ import annotations

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
