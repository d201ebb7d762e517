"""create conversations, conversation_counters and messages

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
        "conversations",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("title", sa.String(255), nullable=False, server_default=""),
        sa.Column("request_id", sa.String(255), nullable=True),
        sa.Column("last_message_id", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("user_id", "request_id", name="uq_conversations_user_request"),
    )
    op.create_index("ix_conversations_user_updated_id", "conversations", ["user_id", "updated_at", "id"])
    op.create_table(
        "conversation_counters",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("last_id", sa.Integer, nullable=False),
    )
    op.create_table(
        "messages",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("conversation_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("tool_calls", sa.JSON, nullable=False),
        sa.Column("request_id", sa.String(255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id", "conversation_id"],
            ["conversations.user_id", "conversations.id"],
            name="fk_messages_conversation",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("user_id", "conversation_id", "request_id", name="uq_messages_conversation_request"),
    )


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_table("conversation_counters")
    op.drop_index("ix_conversations_user_updated_id", table_name="conversations")
    op.drop_table("conversations")
