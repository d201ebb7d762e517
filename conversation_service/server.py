"""ConversationService over gRPC: validate, scope by the caller, call the store, answer protos."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2, json_format
from google.protobuf.timestamp_pb2 import Timestamp

from common import db, validation
from common.auth import authorized_user
from common.errors import InvalidArgument, NotFound
from common.pagination import MAX_PAGE_SIZE, PageTokens, page_size
from common.settings import Settings
from conversation_service.store import ROLES, ConversationRow, ConversationStore, MessageRow, NewMessage
from todo.v1 import conversation_pb2, conversation_pb2_grpc

SERVICE_NAMES = [conversation_pb2.DESCRIPTOR.services_by_name["ConversationService"].full_name]
MIGRATIONS = Path(__file__).parent / "migrations"

REQUEST_ID_MAX = 255
TOOL_NAME_MAX = 255
TITLE_FROM_MESSAGE_MAX = 60
DEFAULT_RECENT_LIMIT = 20
ELLIPSIS = "…"


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def conversation_message(row: ConversationRow) -> conversation_pb2.Conversation:
    return conversation_pb2.Conversation(
        id=row.id, title=row.title, created_at=_timestamp(row.created_at), updated_at=_timestamp(row.updated_at)
    )


def message_message(row: MessageRow) -> conversation_pb2.Message:
    return conversation_pb2.Message(
        id=row.id,
        role=row.role,
        content=row.content,
        created_at=_timestamp(row.created_at),
        tool_calls=[tool_call_message(item) for item in row.tool_calls],
    )


def tool_call_message(item: dict[str, Any]) -> conversation_pb2.ToolCall:
    call = conversation_pb2.ToolCall(name=item["name"])
    # Only the parts that were sent are set, so a call reads back exactly as it was appended.
    if "arguments" in item:
        json_format.ParseDict(item["arguments"], call.arguments)
    if "result" in item:
        json_format.ParseDict(item["result"], call.result)
    if "error" in item:
        call.error = item["error"]
    return call


def tool_calls_data(calls: Sequence[conversation_pb2.ToolCall]) -> list[dict[str, Any]]:
    """The tool calls as JSON-ready dicts (structured, not strings), checked."""
    data = []
    for index, call in enumerate(calls):
        field = f"tool_calls[{index}]"
        if not call.name.strip():
            raise InvalidArgument(f"{field}.name must not be empty")
        if len(call.name) > TOOL_NAME_MAX:
            raise InvalidArgument(f"{field}.name must be at most {TOOL_NAME_MAX} characters")
        item: dict[str, Any] = {"name": call.name}
        try:
            if call.HasField("arguments"):
                item["arguments"] = json_format.MessageToDict(call.arguments)
            if call.HasField("result"):
                item["result"] = json_format.MessageToDict(call.result)
        except (ValueError, json_format.Error) as error:  # NaN or infinity has no JSON form
            raise InvalidArgument(f"{field} must hold only JSON values: {error}") from error
        if call.HasField("error"):
            item["error"] = call.error
        data.append(item)
    return data


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


def _request_id(value: str, required: bool = False) -> str:
    if required and not value:
        raise InvalidArgument("request_id must not be empty")
    if len(value) > REQUEST_ID_MAX:
        raise InvalidArgument(f"request_id must be at most {REQUEST_ID_MAX} characters")
    if "\x00" in value:  # a PostgreSQL text column cannot hold it (inside JSON it is escaped)
        raise InvalidArgument("request_id must not contain NUL characters")
    return value


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
        rows = await self._store.list_conversations(user_id, after, limit + 1)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            position = [rows[-1].updated_at.isoformat(), rows[-1].id]
            next_token = self._page_tokens.encode(user_id, "conversations", position)
        return conversation_pb2.ListConversationsResponse(
            conversations=[conversation_message(row) for row in rows], next_page_token=next_token
        )

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
        title = validation.title(request.title)
        return _found(await self._store.rename(user_id, conversation_id, title), conversation_id)

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
        if request.role not in ROLES:
            raise InvalidArgument("role must be one of: user, assistant")
        content = validation.message_text(request.content, "content")
        new = NewMessage(
            role=request.role,
            content=content,
            tool_calls=tool_calls_data(request.tool_calls),
            request_id=_request_id(request.request_id),
            title_if_untitled=title_from_message(content) if request.role == "user" else "",
        )
        if not 0 <= request.history_limit <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"history_limit must be between 0 and {MAX_PAGE_SIZE}")
        appended = await self._store.append(user_id, conversation_id, new, request.history_limit)
        if appended is None:
            raise _not_found(conversation_id)
        return conversation_pb2.AppendMessageResponse(
            message=message_message(appended.message),
            created=appended.created,
            history=[message_message(row) for row in appended.history],
        )

    async def GetMessageByRequestId(
        self, request: conversation_pb2.GetMessageByRequestIdRequest, context: grpc.aio.ServicerContext
    ) -> conversation_pb2.Message:
        user_id = authorized_user(request.user_id)
        conversation_id = _conversation_id(request.conversation_id)
        request_id = _request_id(request.request_id, required=True)
        exists, row = await self._store.message_by_request_id(user_id, conversation_id, request_id)
        if not exists:
            raise _not_found(conversation_id)
        if row is None:
            raise NotFound(f"no message with this request_id in conversation {conversation_id}")
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
        rows = await self._store.list_messages(user_id, conversation_id, after_id, limit + 1)
        if rows is None:
            raise _not_found(conversation_id)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = self._page_tokens.encode(user_id, query, rows[-1].id)
        return conversation_pb2.ListMessagesResponse(
            messages=[message_message(row) for row in rows], next_page_token=next_token
        )

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
        return conversation_pb2.GetRecentMessagesResponse(messages=[message_message(row) for row in rows])


@asynccontextmanager
async def lifespan(server: grpc.aio.Server, settings: Settings) -> AsyncIterator[None]:
    async with db.migrated_engine(
        MIGRATIONS, settings.database_url("conversation"), settings.database_pool_size
    ) as engine:
        conversation_pb2_grpc.add_ConversationServiceServicer_to_server(
            ConversationServicer(ConversationStore(engine), PageTokens(settings)), server
        )
        yield
