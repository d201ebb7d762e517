"""planning fields on tasks; the activity log; user settings

Tasks created before this revision keep working: no due date, priority "none", no tags. A task
already completed gets its last change as completed_at (the best record there is of when).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NEW_TASK_COLUMNS = ("due_date", "due_time", "priority", "tags", "search_text", "completed_at")


def upgrade() -> None:
    op.add_column("tasks", sa.Column("due_date", sa.String(10), nullable=False, server_default=""))
    op.add_column("tasks", sa.Column("due_time", sa.String(5), nullable=False, server_default=""))
    op.add_column("tasks", sa.Column("priority", sa.String(6), nullable=False, server_default="none"))
    op.add_column("tasks", sa.Column("tags", sa.Text, nullable=False, server_default=""))
    op.add_column("tasks", sa.Column("search_text", sa.Text, nullable=False, server_default=""))
    op.add_column("tasks", sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
    _backfill_tasks()
    op.create_table(
        "task_events",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("task_id", sa.Integer, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("before", sa.Text, nullable=True),
        sa.Column("after", sa.Text, nullable=True),
        sa.Column("undone", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("reverts", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "event_counters",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("last_id", sa.Integer, nullable=False),
    )
    op.create_table(
        "user_settings",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def _backfill_tasks() -> None:
    """search_text is casefolded in Python (as the service writes it); completed_at from updated_at."""
    tasks = sa.table(
        "tasks",
        sa.column("user_id", sa.String),
        sa.column("id", sa.Integer),
        sa.column("title", sa.String),
        sa.column("description", sa.Text),
        sa.column("search_text", sa.Text),
        sa.column("completed", sa.Boolean),
        sa.column("updated_at", sa.DateTime(timezone=True)),
        sa.column("completed_at", sa.DateTime(timezone=True)),
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(tasks.c.user_id, tasks.c.id, tasks.c.title, tasks.c.description)).all()
    if rows:
        fill = (
            sa.update(tasks)
            .where(tasks.c.user_id == sa.bindparam("owner"), tasks.c.id == sa.bindparam("number"))
            .values(search_text=sa.bindparam("text"))
        )
        values = [
            {"owner": row.user_id, "number": row.id, "text": row.title.casefold() + "\n" + row.description.casefold()}
            for row in rows
        ]
        connection.execute(fill, values)  # one executemany
    done = sa.update(tasks).where(tasks.c.completed == sa.true()).values(completed_at=tasks.c.updated_at)
    connection.execute(done)


def downgrade() -> None:
    op.drop_table("user_settings")
    op.drop_table("event_counters")
    op.drop_table("task_events")
    with op.batch_alter_table("tasks") as batch:  # SQLite drops columns by rebuilding the table
        for name in NEW_TASK_COLUMNS:
            batch.drop_column(name)
