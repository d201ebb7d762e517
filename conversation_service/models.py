"""The tables conversation_service owns. Migrations in migrations/versions must match them."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

conversations = Table(
    "conversations",
    metadata,
    Column("user_id", String(255), primary_key=True),
    # The user's own conversation number: 1, 2, 3, ... per user, never reused.
    Column("id", Integer, primary_key=True, autoincrement=False),
    # Empty until set by CreateConversation, the first user message, or UpdateConversation.
    Column("title", String(255), nullable=False, default=""),
    # The client's key for CreateConversation retries; NULL when none was given.
    Column("request_id", String(255), nullable=True),
    # The last message number handed out in this conversation. An append bumps it with one
    # UPDATE ... RETURNING, which also row-locks the conversation until the append commits.
    Column("last_message_id", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # The client's JSON object (at most 8 KiB serialized).
    Column("metadata", JSON, nullable=False, default=dict),
    UniqueConstraint("user_id", "request_id", name="uq_conversations_user_request"),
    # ListConversations: newest activity first.
    Index("ix_conversations_user_updated_id", "user_id", "updated_at", "id"),
)

# The last conversation number handed out per user. Deleting a conversation never lowers it,
# so numbers are never reused; the upsert that bumps it serializes concurrent creates of one user.
conversation_counters = Table(
    "conversation_counters",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("last_id", Integer, nullable=False),
)

messages = Table(
    "messages",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("conversation_id", Integer, primary_key=True, autoincrement=False),
    # The message's position in its conversation: 1, 2, 3, ...
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False),
    # [{"name": str, "arguments"?: object, "result"?: any JSON, "error"?: str}, ...]
    Column("tool_calls", JSON, nullable=False),
    # The agent's key for AppendMessage retries, unique per user; NULL when none was given.
    Column("request_id", String(255), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The client's JSON object (at most 8 KiB serialized).
    Column("metadata", JSON, nullable=False, default=dict),
    # A client's Idempotency-Key of RecordMessage, unique per user; NULL when none was given.
    # A column of its own, so a client key can never be mistaken for one of the agent's.
    Column("client_key", String(255), nullable=True),
    ForeignKeyConstraint(
        ["user_id", "conversation_id"],
        ["conversations.user_id", "conversations.id"],
        name="fk_messages_conversation",
        ondelete="CASCADE",
    ),
    UniqueConstraint("user_id", "request_id", name="uq_messages_user_request"),
    UniqueConstraint("user_id", "client_key", name="uq_messages_user_client_key"),
    # ListHistory: the user's messages, newest first.
    Index("ix_messages_user_created", "user_id", "created_at", "conversation_id", "id"),
)
