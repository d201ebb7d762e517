"""Every query on conversations and messages. Each one is scoped by the user id it is given.

Reads are single statements in autocommit (`common.db.single_statements`). On PostgreSQL an
append is one statement (`_APPEND`: number, touch, title and insert) and one read of the
history; only a keyed append whose key is already taken, or a missing conversation, goes the
step-by-step way, which tells the two apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, case, delete, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.db import is_sqlite, next_number, single_statements, utc
from conversation_service.models import conversation_counters, conversations, messages

ROLES = ("user", "assistant")


@dataclass(frozen=True)
class ConversationRow:
    id: int
    title: str
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NewMessage:
    role: str
    content: str
    # JSON-ready tool calls: {"name", "arguments"?, "result"?, "error"?}.
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    # The agent's key (AppendMessage), unique per user.
    request_id: str = ""
    # The conversation's title if it has none yet (set by the first user message).
    title_if_untitled: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    # A client's Idempotency-Key (RecordMessage), unique per user, apart from request ids.
    client_key: str = ""


@dataclass(frozen=True)
class MessageRow:
    id: int
    role: str
    content: str
    tool_calls: list[dict[str, Any]]
    created_at: datetime
    conversation_id: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Appended:
    message: MessageRow
    created: bool
    history: list[MessageRow]


def _conversation(row: Any) -> ConversationRow:
    return ConversationRow(row.id, row.title, utc(row.created_at), utc(row.updated_at), dict(row.metadata or {}))


def _message(row: Any) -> MessageRow:
    return MessageRow(
        row.id,
        row.role,
        row.content,
        list(row.tool_calls or []),
        utc(row.created_at),
        row.conversation_id,
        dict(row.metadata or {}),
    )


_CONVERSATION_COLUMNS = (
    conversations.c.id,
    conversations.c.title,
    conversations.c.created_at,
    conversations.c.updated_at,
    conversations.c.metadata,
)
_MESSAGE_COLUMNS = (
    messages.c.id,
    messages.c.role,
    messages.c.content,
    messages.c.tool_calls,
    messages.c.created_at,
    messages.c.conversation_id,
    messages.c.metadata,
)


def _one_conversation(user_id: str, conversation_id: int) -> Any:
    return and_(conversations.c.user_id == user_id, conversations.c.id == conversation_id)


def _in_conversation(user_id: str, conversation_id: int) -> Any:
    return and_(messages.c.user_id == user_id, messages.c.conversation_id == conversation_id)


# PostgreSQL's append in one statement: bump the conversation's message number (row-locking
# it until the statement commits), touch updated_at, title an untitled conversation, insert
# the message with that number. Nothing happens (no row back) when the conversation is not the
# user's or the message's key is already taken; `_append` then finds out which. Two appends
# with one new key racing each other: the loser's insert breaks the unique key (IntegrityError),
# as in the step-by-step path.
_APPEND = text(
    """
WITH numbered AS (
    UPDATE conversations
    SET last_message_id = last_message_id + 1,
        updated_at = :now,
        title = CASE WHEN title = '' THEN CAST(:title AS varchar) ELSE title END
    WHERE user_id = :user_id AND id = :conversation_id
      AND NOT EXISTS (
          SELECT 1 FROM messages
          WHERE user_id = :user_id
            AND (request_id = CAST(:request_id AS varchar) OR client_key = CAST(:client_key AS varchar))
      )
    RETURNING last_message_id
), inserted AS (
    INSERT INTO messages (user_id, conversation_id, id, role, content, tool_calls, request_id,
                          created_at, metadata, client_key)
    SELECT :user_id, :conversation_id, last_message_id, :role, :content, CAST(:tool_calls AS json),
           :request_id, :now, CAST(:metadata AS json), :client_key
    FROM numbered
)
SELECT last_message_id FROM numbered
"""
)


class ConversationStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._single = single_statements(engine)
        self._one_statement_append = not is_sqlite(str(engine.url))

    # Conversations.

    async def create(
        self, user_id: str, title: str, request_id: str, metadata: dict[str, Any] | None = None
    ) -> ConversationRow:
        """A new conversation, or the one this user already created with `request_id`."""
        now = datetime.now(UTC)
        async with self._engine.connect() as conn, conn.begin() as transaction:
            # Bumping the counter first row-locks it until commit, so a concurrent create with
            # the same request_id has committed (and is visible) by the time we look for it.
            number = await next_number(conn, conversation_counters, user_id)
            if request_id:
                existing = (
                    await conn.execute(
                        select(*_CONVERSATION_COLUMNS).where(
                            conversations.c.user_id == user_id, conversations.c.request_id == request_id
                        )
                    )
                ).first()
                if existing is not None:
                    await transaction.rollback()  # hands the number back: nothing is stored
                    return _conversation(existing)
            row = ConversationRow(number, title, now, now, metadata or {})
            values = {**vars(row), "user_id": user_id, "request_id": request_id or None, "last_message_id": 0}
            await conn.execute(insert(conversations).values(**values))
        return row

    async def get(self, user_id: str, conversation_id: int) -> ConversationRow | None:
        async with self._single.connect() as conn:
            row = await self._get(conn, user_id, conversation_id)
        return row

    async def _get(self, conn: AsyncConnection, user_id: str, conversation_id: int) -> ConversationRow | None:
        query = select(*_CONVERSATION_COLUMNS).where(_one_conversation(user_id, conversation_id))
        row = (await conn.execute(query)).first()
        return _conversation(row) if row else None

    async def list_conversations(
        self, user_id: str, after: tuple[datetime, int] | None, limit: int
    ) -> list[ConversationRow]:
        """Up to `limit` conversations, newest activity first, strictly after the `after` key."""
        query = select(*_CONVERSATION_COLUMNS).where(conversations.c.user_id == user_id)
        if after is not None:
            updated_at, conversation_id = after
            query = query.where(
                or_(
                    conversations.c.updated_at < updated_at,
                    and_(conversations.c.updated_at == updated_at, conversations.c.id < conversation_id),
                )
            )
        query = query.order_by(conversations.c.updated_at.desc(), conversations.c.id.desc()).limit(limit)
        async with self._single.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_conversation(row) for row in rows]

    async def update(self, user_id: str, conversation_id: int, changes: dict[str, Any]) -> ConversationRow | None:
        """Set `changes` (title, metadata); none given changes nothing, not even updated_at."""
        if not changes:
            return await self.get(user_id, conversation_id)
        statement = (
            update(conversations)
            .where(_one_conversation(user_id, conversation_id))
            .values(**changes, updated_at=datetime.now(UTC))
            .returning(*_CONVERSATION_COLUMNS)
        )
        async with self._engine.begin() as conn:
            row = (await conn.execute(statement)).first()
        return _conversation(row) if row else None

    async def delete(self, user_id: str, conversation_id: int) -> bool:
        """Delete the conversation and its messages; False if the user has no such conversation."""
        async with self._engine.begin() as conn:
            # The conversation row first: on PostgreSQL that waits for (and then blocks) appends.
            statement = delete(conversations).where(_one_conversation(user_id, conversation_id))
            deleted = (await conn.execute(statement.returning(conversations.c.id))).first()
            # The foreign key cascades too; this keeps it true even where the FK is not enforced.
            await conn.execute(delete(messages).where(_in_conversation(user_id, conversation_id)))
        return deleted is not None

    # Messages.

    async def append(
        self, user_id: str, conversation_id: int, new: NewMessage, history_limit: int = 0
    ) -> Appended | None:
        """The message and whether it is new (a known request_id or client_key returns the
        original with created=False, whichever of the user's conversations holds it), with up
        to `history_limit` messages before it; None if the user has no such conversation."""
        try:
            return await self._append(user_id, conversation_id, new, history_limit)
        except IntegrityError:
            # The same key appended to another conversation at the same moment (PostgreSQL: the
            # two appends lock different conversations). It has committed now: find it.
            return await self._append(user_id, conversation_id, new, history_limit)

    async def _append(self, user_id: str, conversation_id: int, new: NewMessage, history_limit: int) -> Appended | None:
        if self._one_statement_append:
            appended = await self._append_in_one_statement(user_id, conversation_id, new, history_limit)
            if appended is not None:
                return appended
        return await self._append_step_by_step(user_id, conversation_id, new, history_limit)

    async def _append_in_one_statement(
        self, user_id: str, conversation_id: int, new: NewMessage, history_limit: int
    ) -> Appended | None:
        """The new message appended, or None when the step-by-step way must decide (see _APPEND)."""
        now = datetime.now(UTC)
        params = {
            "user_id": user_id,
            "conversation_id": conversation_id,
            "now": now,
            "title": new.title_if_untitled or "",
            "role": new.role,
            "content": new.content,
            "tool_calls": json.dumps(new.tool_calls),
            "metadata": json.dumps(new.metadata),
            "request_id": new.request_id or None,
            "client_key": new.client_key or None,
        }
        async with self._single.connect() as conn:
            number = (await conn.execute(_APPEND, params)).scalar_one_or_none()
            if number is None:
                return None
            # Read after the append committed: every message numbered before it is visible.
            history = await self._before(conn, user_id, conversation_id, number, history_limit)
        row = MessageRow(number, new.role, new.content, new.tool_calls, now, conversation_id, new.metadata)
        return Appended(row, True, history)

    async def _append_step_by_step(
        self, user_id: str, conversation_id: int, new: NewMessage, history_limit: int
    ) -> Appended | None:
        async with self._engine.connect() as conn, conn.begin() as transaction:
            number = await self._next_message_number(conn, user_id, conversation_id, new)
            if number is None:
                return None
            # Looked up after the row lock, so a concurrent retry has committed or not started.
            earlier = await self._by_key(conn, user_id, new)
            if earlier is not None:
                history = await self._before(conn, user_id, earlier.conversation_id, earlier.id, history_limit)
                await transaction.rollback()  # neither the number nor updated_at moves
                return Appended(earlier, False, history)
            row = MessageRow(
                number, new.role, new.content, new.tool_calls, datetime.now(UTC), conversation_id, new.metadata
            )
            keys = {"request_id": new.request_id or None, "client_key": new.client_key or None}
            await conn.execute(insert(messages).values(**vars(row), **keys, user_id=user_id))
            history = await self._before(conn, user_id, conversation_id, number, history_limit)
        return Appended(row, True, history)

    async def _before(
        self, conn: AsyncConnection, user_id: str, conversation_id: int, message_id: int, limit: int
    ) -> list[MessageRow]:
        """Up to `limit` messages before `message_id`, oldest first."""
        if limit <= 0:
            return []
        query = (
            select(*_MESSAGE_COLUMNS)
            .where(_in_conversation(user_id, conversation_id), messages.c.id < message_id)
            .order_by(messages.c.id.desc())
            .limit(limit)
        )
        rows = (await conn.execute(query)).all()
        return [_message(row) for row in reversed(rows)]

    async def _next_message_number(
        self, conn: AsyncConnection, user_id: str, conversation_id: int, new: NewMessage
    ) -> int | None:
        """Bump the conversation's last message number (row-locked until commit), touch
        updated_at, and title an untitled conversation from a user message."""
        changes: dict[str, Any] = {
            "last_message_id": conversations.c.last_message_id + 1,
            "updated_at": datetime.now(UTC),
        }
        if new.title_if_untitled:
            changes["title"] = case((conversations.c.title == "", new.title_if_untitled), else_=conversations.c.title)
        statement = (
            update(conversations)
            .where(_one_conversation(user_id, conversation_id))
            .values(**changes)
            .returning(conversations.c.last_message_id)
        )
        number = (await conn.execute(statement)).scalar_one_or_none()
        return None if number is None else int(number)

    async def _by_key(self, conn: AsyncConnection, user_id: str, new: NewMessage) -> MessageRow | None:
        """The user's message stored earlier with new's request_id or client_key, in any conversation."""
        if new.request_id:
            same_key = messages.c.request_id == new.request_id
        elif new.client_key:
            same_key = messages.c.client_key == new.client_key
        else:
            return None
        return await self._first_message(conn, messages.c.user_id == user_id, same_key)

    async def _first_message(self, conn: AsyncConnection, *conditions: Any) -> MessageRow | None:
        row = (await conn.execute(select(*_MESSAGE_COLUMNS).where(*conditions))).first()
        return _message(row) if row else None

    async def message_by_request_id(
        self, user_id: str, conversation_id: int, request_id: str
    ) -> tuple[bool, MessageRow | None]:
        """(whether the conversation exists, the message appended with request_id). Conversation
        0 means any of the user's conversations (request ids are unique per user)."""
        conditions = [messages.c.user_id == user_id, messages.c.request_id == request_id]
        async with self._single.connect() as conn:
            if conversation_id:
                if await self._get(conn, user_id, conversation_id) is None:
                    return False, None
                conditions.append(messages.c.conversation_id == conversation_id)
            return True, await self._first_message(conn, *conditions)

    async def message(self, user_id: str, conversation_id: int, message_id: int) -> tuple[bool, MessageRow | None]:
        """(whether the conversation exists, its message number `message_id`)."""
        async with self._single.connect() as conn:
            if await self._get(conn, user_id, conversation_id) is None:
                return False, None
            return True, await self._first_message(
                conn, _in_conversation(user_id, conversation_id), messages.c.id == message_id
            )

    async def list_messages(
        self, user_id: str, conversation_id: int, after_id: int, limit: int
    ) -> list[MessageRow] | None:
        """Up to `limit` messages with id > after_id, oldest first; None if no such conversation."""
        query = (
            select(*_MESSAGE_COLUMNS)
            .where(_in_conversation(user_id, conversation_id), messages.c.id > after_id)
            .order_by(messages.c.id)
            .limit(limit)
        )
        async with self._single.connect() as conn:
            if await self._get(conn, user_id, conversation_id) is None:
                return None
            rows = (await conn.execute(query)).all()
        return [_message(row) for row in rows]

    async def recent_messages(self, user_id: str, conversation_id: int, limit: int) -> list[MessageRow] | None:
        """The last `limit` messages, oldest first; None if no such conversation."""
        query = (
            select(*_MESSAGE_COLUMNS)
            .where(_in_conversation(user_id, conversation_id))
            .order_by(messages.c.id.desc())
            .limit(limit)
        )
        async with self._single.connect() as conn:
            if await self._get(conn, user_id, conversation_id) is None:
                return None
            rows = (await conn.execute(query)).all()
        return [_message(row) for row in reversed(rows)]

    async def history(self, user_id: str, after: tuple[datetime, int, int] | None, limit: int) -> list[MessageRow]:
        """Up to `limit` of the user's messages in all conversations, newest first, strictly after
        the `after` key (created_at, conversation_id, id): a total order, so pages never overlap."""
        query = select(*_MESSAGE_COLUMNS).where(messages.c.user_id == user_id)
        if after is not None:
            created_at, conversation_id, message_id = after
            query = query.where(
                or_(
                    messages.c.created_at < created_at,
                    and_(messages.c.created_at == created_at, messages.c.conversation_id < conversation_id),
                    and_(
                        messages.c.created_at == created_at,
                        messages.c.conversation_id == conversation_id,
                        messages.c.id < message_id,
                    ),
                )
            )
        order = (messages.c.created_at.desc(), messages.c.conversation_id.desc(), messages.c.id.desc())
        async with self._single.connect() as conn:
            rows = (await conn.execute(query.order_by(*order).limit(limit))).all()
        return [_message(row) for row in rows]
