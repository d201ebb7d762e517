"""ConversationService over gRPC: validate, scope by the caller, call the store, answer protos.

Sizes are bounded where Envoy's transcoder would choke: it buffers a whole gRPC reply and
answers 500 when one exceeds 1 MiB of protobuf. So a stored message is at most MESSAGE_MAX_BYTES
of protobuf, and a reply carrying messages or conversations stops at REPLY_MAX_BYTES (at least
one item; a page then ends early and its next_page_token goes on from there).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, struct_pb2
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.timestamp_pb2 import Timestamp

from common import db, structs, validation
from common.auth import authorized_user
from common.errors import InvalidArgument, NotFound
from common.pagination import MAX_PAGE_SIZE, PageTokens, page_size
from common.settings import Settings
from conversation_service.store import ROLES, ConversationRow, ConversationStore, MessageRow, NewMessage
from todo.v1 import conversation_pb2, conversation_pb2_grpc

SERVICE_NAMES = [conversation_pb2.DESCRIPTOR.services_by_name["ConversationService"].full_name]
MIGRATIONS = Path(__file__).parent / "migrations"

REQUEST_ID_MAX = 255
IDEMPOTENCY_KEY_MAX = 200  # as the agent's Idempotency-Key
IDEMPOTENCY_METADATA_KEY = "idempotency-key"  # Envoy forwards the REST header as this
TOOL_NAME_MAX = 255
TOOL_CALLS_MAX = 100
# Protobuf bytes (what the transcoder buffers), not JSON: small numbers take several times more.
TOOL_PART_MAX_BYTES = 256 * 1024  # each of a tool call's arguments, result and error
MESSAGE_MAX_BYTES = 512 * 1024  # a whole appended message
REPLY_MAX_BYTES = 512 * 1024  # the messages (or conversations) of one reply; at least one goes
METADATA_MAX_BYTES = 8 * 1024  # as compact JSON: the client's view of it
TITLE_FROM_MESSAGE_MAX = 60
DEFAULT_RECENT_LIMIT = 20
ELLIPSIS = "…"
REUSED_KEY = "Idempotency-Key was already used for a different message"

Row = TypeVar("Row")
Proto = TypeVar("Proto", bound=ProtoMessage)


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    # Always set, so the transcoder prints an empty object as {} instead of leaving it out.
    return structs.to_struct(data)


def conversation_message(row: ConversationRow) -> conversation_pb2.Conversation:
    return conversation_pb2.Conversation(
        id=row.id,
        title=row.title,
        created_at=_timestamp(row.created_at),
        updated_at=_timestamp(row.updated_at),
        metadata=_struct(row.metadata),
    )


def message_message(row: MessageRow) -> conversation_pb2.Message:
    return conversation_pb2.Message(
        id=row.id,
        role=row.role,
        content=row.content,
        created_at=_timestamp(row.created_at),
        tool_calls=[tool_call_message(item) for item in row.tool_calls],
        conversation_id=row.conversation_id,
        metadata=_struct(row.metadata),
    )


def tool_call_message(item: dict[str, Any]) -> conversation_pb2.ToolCall:
    call = conversation_pb2.ToolCall(name=item["name"])
    # Only the parts that were sent are set, so a call reads back exactly as it was appended.
    if "arguments" in item:
        structs.set_struct(call.arguments, item["arguments"])
    if "result" in item:
        call.result.CopyFrom(structs.to_value(item["result"]))
    if "error" in item:
        call.error = item["error"]
    return call


def json_bytes(value: Any) -> int:
    """The size of `value` as compact JSON (UTF-8)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def within_reply(items: Sequence[Proto]) -> list[Proto]:
    """The longest prefix of `items` within REPLY_MAX_BYTES of protobuf; never empty when items is not."""
    kept: list[Proto] = []
    total = 0
    for item in items:
        total += item.ByteSize()
        if kept and total > REPLY_MAX_BYTES:
            break
        kept.append(item)
    return kept


def newest_within_reply(rows: Sequence[MessageRow]) -> list[conversation_pb2.Message]:
    """Of messages oldest first, the newest ones within REPLY_MAX_BYTES, oldest first."""
    return within_reply([message_message(row) for row in reversed(rows)])[::-1]


def _json_data(message: Any, field: str) -> Any:
    try:
        if isinstance(message, struct_pb2.Struct):
            return structs.from_struct(message)
        return structs.from_value(message)
    except ValueError as error:  # NaN or infinity has no JSON form
        raise InvalidArgument(f"{field} must hold only JSON values: {error}") from error


def metadata_data(request: Any) -> dict[str, Any]:
    """The request's `metadata` object checked ({} when absent). Not an object: the transcoder
    refuses it (400) before it gets here; over gRPC a Struct is always an object."""
    if not request.HasField("metadata"):
        return {}
    data: dict[str, Any] = _json_data(request.metadata, "metadata")
    if json_bytes(data) > METADATA_MAX_BYTES:
        raise InvalidArgument(f"metadata must be at most {METADATA_MAX_BYTES // 1024} KiB as JSON")
    return data


def tool_calls_data(calls: Sequence[conversation_pb2.ToolCall]) -> list[dict[str, Any]]:
    """The tool calls as JSON-ready dicts (structured, not strings), checked."""
    if len(calls) > TOOL_CALLS_MAX:
        raise InvalidArgument(f"tool_calls must be at most {TOOL_CALLS_MAX}")
    return [_tool_call_data(call, f"tool_calls[{index}]") for index, call in enumerate(calls)]


def _tool_call_data(call: conversation_pb2.ToolCall, field: str) -> dict[str, Any]:
    if not call.name.strip():
        raise InvalidArgument(f"{field}.name must not be empty")
    if len(call.name) > TOOL_NAME_MAX:
        raise InvalidArgument(f"{field}.name must be at most {TOOL_NAME_MAX} characters")
    item: dict[str, Any] = {"name": call.name}
    if call.HasField("arguments"):
        item["arguments"] = _json_data(call.arguments, field)
    if call.HasField("result"):
        item["result"] = _json_data(call.result, field)
    if call.HasField("error"):
        item["error"] = call.error
    sizes = {
        "arguments": call.arguments.ByteSize(),
        "result": call.result.ByteSize(),
        "error": len(call.error.encode()),
    }
    for part, size in sizes.items():
        if size > TOOL_PART_MAX_BYTES:
            raise InvalidArgument(f"{field}.{part} must be at most {TOOL_PART_MAX_BYTES // 1024} KiB")
    return item


def title_from_message(content: str) -> str:
    """A conversation title from its first user message: whitespace collapsed, at most 60
    characters, cut at a word boundary with an ellipsis when longer."""
    text = " ".join(content.split())
    if len(text) <= TITLE_FROM_MESSAGE_MAX:
        return text
    head = text[: TITLE_FROM_MESSAGE_MAX - len(ELLIPSIS)]
    next_char = text[len(head)]
    if next_char != " " and " " in head:
        head = head[: head.rindex(" ")]  # drop the partial word
    # Trailing punctuation before the ellipsis reads badly; keep the cut text if that is all there is.
    return (head.rstrip(" ,.;:-") or head) + ELLIPSIS


def _conversation_id(value: int) -> int:
    return validation.positive_id(value, "conversation_id")


def _role(value: str) -> str:
    if value not in ROLES:
        raise InvalidArgument("role must be one of: user, assistant")
    return value


def idempotency_key(context: grpc.aio.ServicerContext) -> str:
    """The `idempotency-key` metadata (the REST Idempotency-Key header), checked; "" when none."""
    for key, value in context.invocation_metadata() or ():
        if key == IDEMPOTENCY_METADATA_KEY:
            text = (value.decode("latin-1") if isinstance(value, bytes) else str(value)).strip()
            if len(text) > IDEMPOTENCY_KEY_MAX or not text.isprintable():
                raise InvalidArgument(f"Idempotency-Key must be at most {IDEMPOTENCY_KEY_MAX} printable characters")
            return text
    return ""


def _request_id(value: str, required: bool = False) -> str:
    if required and not value:
        raise InvalidArgument("request_id must not be empty")
    if len(value) > REQUEST_ID_MAX:
        raise InvalidArgument(f"request_id must be at most {REQUEST_ID_MAX} characters")
    if "\x00" in value:  # a PostgreSQL text column cannot hold it (inside JSON it is escaped)
        raise InvalidArgument("request_id must not contain NUL characters")
    return value


def _page(rows: Sequence[Row], limit: int, to_proto: Callable[[Row], Proto]) -> tuple[list[Row], list[Proto], bool]:
    """One page of `rows` (fetched with one extra): at most `limit` within REPLY_MAX_BYTES, as
    rows and as protos, and whether more follow."""
    protos = within_reply([to_proto(row) for row in rows[:limit]])
    return list(rows[: len(protos)]), protos, len(rows) > len(protos)


def _not_found(conversation_id: int) -> NotFound:
    # Another user's conversation and a missing one get the same answer.
    return NotFound(f"conversation {conversation_id} not found")


def _found(row: ConversationRow | None, conversation_id: int) -> conversation_pb2.Conversation:
    if row is None:
        raise _not_found(conversation_id)
    return conversation_message(row)


class ConversationServicer(conversation_pb2_grpc.ConversationServiceServicer):
    def __init__(self, store: ConversationStore, page_tokens: PageTokens) -> None:
        self._store = store
        self._page_tokens = page_tokens

    async def CreateConversation(
        self, request: conversation_pb2.CreateConversationRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.Conversation:
        user_id = authorized_user(request.user_id)
        # Optional: an empty (or blank) title is set later by the first user message.
        title = validation.title(request.title) if request.title.strip() else ""
        request_id = _request_id(request.request_id)
        return conversation_message(await self._store.create(user_id, title, request_id))

    async def StartConversation(
        self, request: conversation_pb2.StartConversationRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.Conversation:
        user_id = authorized_user(request.user_id)
        title = validation.title(request.title) if request.title.strip() else ""
        # No request_id: that key space is the agent's (CreateConversation).
        return conversation_message(await self._store.create(user_id, title, "", metadata_data(request)))

    async def GetConversation(
        self, request: conversation_pb2.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.Conversation:
        user_id = authorized_user(request.user_id)
        conversation_id = _conversation_id(request.conversation_id)
        return _found(await self._store.get(user_id, conversation_id), conversation_id)

    async def ListConversations(
        self, request: conversation_pb2.ListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.ListConversationsResponse:
        user_id = authorized_user(request.user_id)
        limit = page_size(request.page_size)
        after = self._conversations_position(user_id, request.page_token)
        # One extra row tells whether another page follows.
        found = await self._store.list_conversations(user_id, after, limit + 1)
        rows, protos, more = _page(found, limit, conversation_message)
        next_token = ""
        if more:
            position = [rows[-1].updated_at.isoformat(), rows[-1].id]
            next_token = self._page_tokens.encode(user_id, "conversations", position)
        return conversation_pb2.ListConversationsResponse(conversations=protos, next_page_token=next_token)

    def _conversations_position(self, user_id: str, token: str) -> tuple[datetime, int] | None:
        """The (updated_at, id) key the next page starts after (keyset: stable under inserts)."""
        position = self._page_tokens.decode(user_id, "conversations", token)
        if position is None:
            return None
        try:
            updated_at, conversation_id = position
            return datetime.fromisoformat(updated_at), int(conversation_id)
        except (TypeError, ValueError) as error:
            raise InvalidArgument("page_token is invalid") from error

    async def UpdateConversation(
        self, request: conversation_pb2.UpdateConversationRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.Conversation:
        user_id = authorized_user(request.user_id)
        conversation_id = _conversation_id(request.conversation_id)
        changes: dict[str, Any] = {}
        if request.HasField("title"):
            changes["title"] = validation.title(request.title)
        if request.HasField("metadata"):
            changes["metadata"] = metadata_data(request)
        return _found(await self._store.update(user_id, conversation_id, changes), conversation_id)

    async def DeleteConversation(
        self, request: conversation_pb2.DeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        user_id = authorized_user(request.user_id)
        conversation_id = _conversation_id(request.conversation_id)
        if not await self._store.delete(user_id, conversation_id):
            raise _not_found(conversation_id)
        return empty_pb2.Empty()

    async def AppendMessage(
        self, request: conversation_pb2.AppendMessageRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.AppendMessageResponse:
        user_id = authorized_user(request.user_id)
        conversation_id = _conversation_id(request.conversation_id)
        role = _role(request.role)
        content = validation.message_text(request.content, "content")
        new = NewMessage(
            role=role,
            content=content,
            tool_calls=tool_calls_data(request.tool_calls),
            request_id=_request_id(request.request_id),
            title_if_untitled=title_from_message(content) if role == "user" else "",
        )
        if not 0 <= request.history_limit <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"history_limit must be between 0 and {MAX_PAGE_SIZE}")
        # The request is the message plus a few short fields: what a reply would carry of it.
        if request.ByteSize() > MESSAGE_MAX_BYTES:
            raise InvalidArgument(f"the message must be at most {MESSAGE_MAX_BYTES // 1024} KiB with its tool calls")
        appended = await self._store.append(user_id, conversation_id, new, request.history_limit)
        if appended is None:
            raise _not_found(conversation_id)
        return conversation_pb2.AppendMessageResponse(
            message=message_message(appended.message),
            created=appended.created,
            history=newest_within_reply(appended.history),
        )

    async def RecordMessage(
        self, request: conversation_pb2.RecordMessageRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.Message:
        user_id = authorized_user(request.user_id)
        conversation_id = _conversation_id(request.conversation_id)
        role = _role(request.role)
        content = validation.message_text(request.content, "content")
        new = NewMessage(
            role=role,
            content=content,
            title_if_untitled=title_from_message(content) if role == "user" else "",
            metadata=metadata_data(request),
            client_key=idempotency_key(context),
        )
        # No size check needed: 8,000 characters and 8 KiB of metadata are far below MESSAGE_MAX_BYTES.
        appended = await self._store.append(user_id, conversation_id, new)
        if appended is None:
            raise _not_found(conversation_id)
        earlier = appended.message
        if not appended.created and (earlier.conversation_id, earlier.role, earlier.content, earlier.metadata) != (
            conversation_id,
            new.role,
            new.content,
            new.metadata,
        ):
            # Answering the first message to a different request would hide a client bug.
            raise InvalidArgument(REUSED_KEY)
        return message_message(earlier)

    async def GetMessageByRequestId(
        self, request: conversation_pb2.GetMessageByRequestIdRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.Message:
        user_id = authorized_user(request.user_id)
        conversation_id = request.conversation_id
        if conversation_id < 0:  # 0: any of the user's conversations (request ids are unique per user)
            raise InvalidArgument("conversation_id must be a positive number, or 0 for any conversation")
        request_id = _request_id(request.request_id, required=True)
        exists, row = await self._store.message_by_request_id(user_id, conversation_id, request_id)
        if not exists:
            raise _not_found(conversation_id)
        if row is None:
            where = f"conversation {conversation_id}" if conversation_id else "any conversation"
            raise NotFound(f"no message with this request_id in {where}")
        return message_message(row)

    async def GetMessage(
        self, request: conversation_pb2.GetMessageRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.Message:
        user_id = authorized_user(request.user_id)
        conversation_id = _conversation_id(request.conversation_id)
        message_id = validation.positive_id(request.message_id, "message_id")
        exists, row = await self._store.message(user_id, conversation_id, message_id)
        if not exists:
            raise _not_found(conversation_id)
        if row is None:
            raise NotFound(f"message {message_id} not found in conversation {conversation_id}")
        return message_message(row)

    async def ListMessages(
        self, request: conversation_pb2.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.ListMessagesResponse:
        user_id = authorized_user(request.user_id)
        conversation_id = _conversation_id(request.conversation_id)
        limit = page_size(request.page_size)
        query = f"messages:{conversation_id}"
        after_id = self._page_tokens.decode(user_id, query, request.page_token) or 0
        if not isinstance(after_id, int):
            raise InvalidArgument("page_token is invalid")
        # Keyset by message number: messages appended between pages land after the cursor.
        found = await self._store.list_messages(user_id, conversation_id, after_id, limit + 1)
        if found is None:
            raise _not_found(conversation_id)
        rows, protos, more = _page(found, limit, message_message)
        next_token = self._page_tokens.encode(user_id, query, rows[-1].id) if more else ""
        return conversation_pb2.ListMessagesResponse(messages=protos, next_page_token=next_token)

    async def GetRecentMessages(
        self, request: conversation_pb2.GetRecentMessagesRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.GetRecentMessagesResponse:
        user_id = authorized_user(request.user_id)
        conversation_id = _conversation_id(request.conversation_id)
        limit = request.limit or DEFAULT_RECENT_LIMIT
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        rows = await self._store.recent_messages(user_id, conversation_id, limit)
        if rows is None:
            raise _not_found(conversation_id)
        return conversation_pb2.GetRecentMessagesResponse(messages=newest_within_reply(rows))

    async def ListHistory(
        self, request: conversation_pb2.ListHistoryRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.ListHistoryResponse:
        user_id = authorized_user(request.user_id)
        limit = page_size(request.page_size)
        after = self._history_position(user_id, request.page_token)
        rows, protos, more = _page(await self._store.history(user_id, after, limit + 1), limit, message_message)
        next_token = ""
        if more:
            last = rows[-1]
            position = [last.created_at.isoformat(), last.conversation_id, last.id]
            next_token = self._page_tokens.encode(user_id, "history", position)
        return conversation_pb2.ListHistoryResponse(messages=protos, next_page_token=next_token)

    def _history_position(self, user_id: str, token: str) -> tuple[datetime, int, int] | None:
        """The (created_at, conversation_id, id) key the next page starts after (keyset: messages
        arriving between pages are newer, so they land before it)."""
        position = self._page_tokens.decode(user_id, "history", token)
        if position is None:
            return None
        try:
            created_at, conversation_id, message_id = position
            return datetime.fromisoformat(created_at), int(conversation_id), int(message_id)
        except (TypeError, ValueError) as error:
            raise InvalidArgument("page_token is invalid") from error


@asynccontextmanager
async def lifespan(server: grpc.aio.Server, settings: Settings) -> AsyncIterator[None]:
    async with db.migrated_engine(
        MIGRATIONS, settings.database_url("conversation"), settings.database_pool_size
    ) as engine:
        conversation_pb2_grpc.add_ConversationServiceServicer_to_server(
            ConversationServicer(ConversationStore(engine), PageTokens(settings)), server
        )
        yield
