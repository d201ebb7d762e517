"""create tasks and task_counters

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("title", sa.String(255), nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("completed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_tasks_user_completed_id", "tasks", ["user_id", "completed", "id"])
    op.create_table(
        "task_counters",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("last_id", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("task_counters")
    op.drop_index("ix_tasks_user_completed_id", table_name="tasks")
    op.drop_table("tasks")
