"""The ChatKit Store (openai-chatkit's `chatkit.store.Store`) over conversation_service's gRPC API.

Ids: a thread is one of the user's conversations, `thr_<conversation id>` (the same number as
over REST: thread `thr_3` is `/api/{user}/conversations/3`; a bare `3` is accepted too). Its
items are the conversation's messages: a user message is `msg_<message id>`; an assistant
message is `msg_<message id>`, preceded by `wf_<message id>` (a workflow item listing the tool
calls of that turn) when the turn ran tools. Items of a turn that is still streaming carry
provisional ids (`msg_new_...`, `wf_new_...`): a reload shows the stored ids.

What the Store writes:
- threads: created by ChatKitApp before the SDK runs (`new_conversation_id` in the context,
  which `generate_thread_id` hands to the SDK); `save_thread` renames (UpdateConversation) only
  when the title really changed; `delete_thread` is DeleteConversation.
- items: nothing. The chat turn (Agent.turn, the code path of Chat and ChatStream) stores the
  user's message before it runs and the assistant's message with its tool calls when it ends,
  so `add_thread_item` (which the SDK calls for the user's message and for each finished item)
  must not store them again, and the history is append-only (`delete_thread_item` and
  `save_item` change nothing).
- attachments: not supported (refused with 400 before the SDK runs).

Pages: `after` is the id of the last item (or the opaque cursor of the last thread page) given;
at most MAX_PAGE items per page. Another user's thread is NOT_FOUND, as over REST.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from chatkit.store import Store, StoreItemType
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageItem,
    Attachment,
    CustomSummary,
    CustomTask,
    InferenceOptions,
    Page,
    ThreadItem,
    ThreadMetadata,
    UserMessageItem,
    UserMessageTextContent,
    Workflow,
    WorkflowItem,
)
from google.protobuf import json_format

from agent_service import history
from agent_service.agent import describe, upstream
from common.auth import Caller
from common.clients import caller_metadata
from common.errors import InvalidArgument, NotFound
from todo.v1 import conversation_pb2, conversation_pb2_grpc

RPC_TIMEOUT_SECONDS = 10.0
MAX_PAGE = 50  # items or threads per page
SCAN_PAGE = 100  # messages per ListMessages call when walking a conversation
MAX_SCAN_THREADS = 10_000  # threads walked for an oldest-first list
THREAD_PREFIX = "thr_"
_THREAD_ID = re.compile(r"(?:thr_)?([1-9][0-9]{0,9})")
_ITEM_ID = re.compile(r"(msg|wf)_([1-9][0-9]{0,9})")
_ID_PREFIXES = {"thread": "thr", "message": "msg", "workflow": "wf", "tool_call": "tc", "task": "tsk"}
NOT_SUPPORTED = "attachments are not supported by this ChatKit backend"


@dataclass
class Context:
    """One ChatKit request: who calls, the Idempotency-Key they sent, and what this request learnt."""

    caller: Caller
    idempotency_key: str = ""
    new_conversation_id: int | None = None  # threads.create: the conversation made for it
    titles: dict[str, str] = field(default_factory=dict)  # thread id -> title as stored
    threads: dict[str, ThreadMetadata] = field(default_factory=dict)  # loaded in this request


def thread_id_of(conversation_id: int) -> str:
    return f"{THREAD_PREFIX}{conversation_id}"


def conversation_of(thread_id: str) -> int:
    """The conversation number of a thread id (`thr_<n>` or `<n>`); anything else is no thread."""
    match = _THREAD_ID.fullmatch(thread_id) if isinstance(thread_id, str) else None
    if match is None or int(match.group(1)) > 2**31 - 1:
        raise NotFound("thread not found")
    return int(match.group(1))


def _position(item_id: str) -> tuple[int, int] | None:
    """Where a stored item sits: (message id, 0 for the workflow before it, 1 for the message)."""
    match = _ITEM_ID.fullmatch(item_id)
    if match is None or int(match.group(2)) > 2**31 - 1:
        return None
    return int(match.group(2)), 0 if match.group(1) == "wf" else 1


def _page_size(limit: int | None) -> int:
    return min(max(limit or 20, 1), MAX_PAGE)


def _created(message_or_conversation: Any) -> datetime:
    return message_or_conversation.created_at.ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]


def task_of(call: conversation_pb2.ToolCall) -> CustomTask:
    """One tool call as a workflow task: what it did in words, and its arguments and outcome."""
    arguments = json.dumps(history.plain(json_format.MessageToDict(call.arguments)), ensure_ascii=False)
    outcome = json.dumps(history.outcome_of(call), ensure_ascii=False)
    failed = call.HasField("error")
    return CustomTask(
        title=describe(call),
        icon="info" if failed else ("search" if call.name == "list_tasks" else "check-circle"),
        content=f"{call.name} {arguments}\n\n{'error' if failed else 'result'}: {outcome}"[:4000],
        status_indicator="complete",
    )


def workflow_of(calls: list[conversation_pb2.ToolCall]) -> Workflow:
    failed = sum(call.HasField("error") for call in calls)
    title = f"Ran {len(calls)} tool{'s' if len(calls) != 1 else ''}" + (f" ({failed} failed)" if failed else "")
    return Workflow(
        type="custom",
        tasks=[task_of(call) for call in calls],
        summary=CustomSummary(title=title, icon="bolt"),
        expanded=False,
    )


def items_of(message: conversation_pb2.Message, thread_id: str) -> list[ThreadItem]:
    """A stored message as ChatKit items, in thread order."""
    created = _created(message)
    if message.role == "user":
        return [
            UserMessageItem(
                id=f"msg_{message.id}",
                thread_id=thread_id,
                created_at=created,
                content=[UserMessageTextContent(text=message.content)],
                inference_options=InferenceOptions(),
            )
        ]
    items: list[ThreadItem] = []
    if message.tool_calls:
        items.append(
            WorkflowItem(
                id=f"wf_{message.id}",
                thread_id=thread_id,
                created_at=created,
                workflow=workflow_of(list(message.tool_calls)),
            )
        )
    items.append(
        AssistantMessageItem(
            id=f"msg_{message.id}",
            thread_id=thread_id,
            created_at=created,
            content=[AssistantMessageContent(text=message.content)],
        )
    )
    return items


class ConversationStore(Store[Context]):
    def __init__(self, conversations: conversation_pb2_grpc.ConversationServiceStub) -> None:
        self._conversations = conversations

    # Ids.

    def generate_thread_id(self, context: Context) -> str:
        if context.new_conversation_id is None:  # ChatKitApp creates it for every threads.create
            raise RuntimeError("threads.create without a conversation made for it")
        return thread_id_of(context.new_conversation_id)

    def generate_item_id(self, item_type: StoreItemType, thread: ThreadMetadata, context: Context) -> str:
        # Provisional ids of live items; never of the form of a stored one (msg_<n>, wf_<n>).
        return f"{_ID_PREFIXES.get(item_type, item_type)}_new_{uuid.uuid4().hex[:12]}"

    # Threads.

    async def load_thread(self, thread_id: str, context: Context) -> ThreadMetadata:
        known = context.threads.get(thread_id)
        if known is not None:
            return known.model_copy(deep=True)
        number = conversation_of(thread_id)
        with upstream("conversation service"):
            conversation = await self._conversations.GetConversation(
                conversation_pb2.GetConversationRequest(conversation_id=number),
                metadata=caller_metadata(context.caller),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        thread = self._thread(conversation, context)
        context.threads[thread_id] = thread
        return thread.model_copy(deep=True)

    def _thread(self, conversation: conversation_pb2.Conversation, context: Context) -> ThreadMetadata:
        thread_id = thread_id_of(conversation.id)
        context.titles[thread_id] = conversation.title
        return ThreadMetadata(id=thread_id, title=conversation.title or None, created_at=_created(conversation))

    async def save_thread(self, thread: ThreadMetadata, context: Context) -> None:
        """Threads exist before the SDK saves them; only a changed title is written."""
        number = conversation_of(thread.id)
        if thread.title is None or context.titles.get(thread.id) == thread.title:
            return
        with upstream("conversation service"):
            updated = await self._conversations.UpdateConversation(
                conversation_pb2.UpdateConversationRequest(conversation_id=number, title=thread.title),
                metadata=caller_metadata(context.caller),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        context.titles[thread.id] = updated.title
        context.threads.pop(thread.id, None)

    async def load_threads(self, limit: int, after: str | None, order: str, context: Context) -> Page[ThreadMetadata]:
        size = _page_size(limit)
        if order != "asc":  # newest first (by last activity), conversation_service's own order and cursor
            reply = await self._list_conversations(context, size, after or "")
            return Page(
                data=[self._thread(conversation, context) for conversation in reply.conversations],
                has_more=bool(reply.next_page_token),
                after=reply.next_page_token or None,
            )
        # Oldest first: walk them all (newest first), then page by thread id.
        threads: list[ThreadMetadata] = []
        token = ""
        while len(threads) < MAX_SCAN_THREADS:
            reply = await self._list_conversations(context, 100, token)
            threads.extend(self._thread(conversation, context) for conversation in reply.conversations)
            token = reply.next_page_token
            if not token:
                break
        threads.reverse()
        if after:
            ids = [thread.id for thread in threads]
            if after not in ids:
                raise InvalidArgument("after is not a thread of this list")
            threads = threads[ids.index(after) + 1 :]
        page = threads[:size]
        has_more = len(threads) > size
        return Page(data=page, has_more=has_more, after=page[-1].id if has_more and page else None)

    async def _list_conversations(
        self, context: Context, size: int, token: str
    ) -> conversation_pb2.ListConversationsResponse:
        with upstream("conversation service"):
            return await self._conversations.ListConversations(
                conversation_pb2.ListConversationsRequest(page_size=size, page_token=token),
                metadata=caller_metadata(context.caller),
                timeout=RPC_TIMEOUT_SECONDS,
            )

    async def delete_thread(self, thread_id: str, context: Context) -> None:
        with upstream("conversation service"):
            await self._conversations.DeleteConversation(
                conversation_pb2.DeleteConversationRequest(conversation_id=conversation_of(thread_id)),
                metadata=caller_metadata(context.caller),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        context.threads.pop(thread_id, None)

    # Items.

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: Context
    ) -> Page[ThreadItem]:
        number = conversation_of(thread_id)
        size = _page_size(limit)
        cursor = _position(after) if after else None
        if after and cursor is None:
            raise InvalidArgument("after is not an item of this thread")
        if order == "desc":
            if cursor is None:
                messages, more_before = await self._recent(number, size + 1, context)
            else:
                messages, more_before = await self._up_to(number, cursor[0], size + 1, context)
            items = [item for message in messages for item in items_of(message, thread_id)]
            if cursor is not None:
                items = [item for item in items if (_position(item.id) or (0, 0)) < cursor]
            items.reverse()
            has_more = len(items) > size or more_before
        else:
            first = cursor[0] if cursor is not None else 1
            messages, more_after = await self._from(number, first, size + 1, context)
            items = [item for message in messages for item in items_of(message, thread_id)]
            if cursor is not None:
                items = [item for item in items if (_position(item.id) or (0, 0)) > cursor]
            has_more = len(items) > size or more_after
        page = items[:size]
        has_more = has_more and bool(page)
        return Page(data=page, has_more=has_more, after=page[-1].id if has_more else None)

    async def _recent(self, number: int, count: int, context: Context) -> tuple[list[conversation_pb2.Message], bool]:
        """The last `count` messages, oldest first, and whether earlier ones exist beyond them."""
        with upstream("conversation service"):
            reply = await self._conversations.GetRecentMessages(
                conversation_pb2.GetRecentMessagesRequest(conversation_id=number, limit=count),
                metadata=caller_metadata(context.caller),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        messages = list(reply.messages)
        # Fewer than asked is everything, unless the reply was cut by size: message 1 is the first.
        return messages, len(messages) < count and bool(messages) and messages[0].id > 1

    async def _pages(self, number: int, context: Context) -> Any:
        """Every message of the conversation, oldest first, a ListMessages page at a time."""
        token = ""
        while True:
            with upstream("conversation service"):
                reply = await self._conversations.ListMessages(
                    conversation_pb2.ListMessagesRequest(conversation_id=number, page_size=SCAN_PAGE, page_token=token),
                    metadata=caller_metadata(context.caller),
                    timeout=RPC_TIMEOUT_SECONDS,
                )
            yield list(reply.messages), bool(reply.next_page_token)
            token = reply.next_page_token
            if not token:
                return

    async def _from(
        self, number: int, first_id: int, count: int, context: Context
    ) -> tuple[list[conversation_pb2.Message], bool]:
        """Up to `count` messages with id >= first_id, oldest first, and whether more follow."""
        found: list[conversation_pb2.Message] = []
        async for messages, more in self._pages(number, context):
            found.extend(message for message in messages if message.id >= first_id)
            if len(found) >= count:
                return found[:count], len(found) > count or more
        return found, False

    async def _up_to(
        self, number: int, last_id: int, count: int, context: Context
    ) -> tuple[list[conversation_pb2.Message], bool]:
        """The last `count` messages with id <= last_id, oldest first, and whether earlier ones exist."""
        found: list[conversation_pb2.Message] = []
        async for messages, _ in self._pages(number, context):
            found.extend(message for message in messages if message.id <= last_id)
            if messages and messages[-1].id > last_id:
                break
        return found[-count:], len(found) > count

    async def load_item(self, thread_id: str, item_id: str, context: Context) -> ThreadItem:
        number = conversation_of(thread_id)
        position = _position(item_id)
        if position is None:
            raise NotFound("item not found")
        with upstream("conversation service"):
            message = await self._conversations.GetMessage(
                conversation_pb2.GetMessageRequest(conversation_id=number, message_id=position[0]),
                metadata=caller_metadata(context.caller),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        for item in items_of(message, thread_id):
            if item.id == item_id:
                return item
        raise NotFound("item not found")

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: Context) -> None:
        """Nothing to store: the turn itself stored the user's message and the answer."""

    async def save_item(self, thread_id: str, item: ThreadItem, context: Context) -> None:
        """Nothing to store: items are the conversation's messages, written by turns only."""

    async def delete_thread_item(self, thread_id: str, item_id: str, context: Context) -> None:
        """Nothing to delete: a conversation's history is append-only."""

    # Attachments (refused before the SDK runs; these are the Store's required methods).

    async def save_attachment(self, attachment: Attachment, context: Context) -> None:
        raise InvalidArgument(NOT_SUPPORTED)

    async def load_attachment(self, attachment_id: str, context: Context) -> Attachment:
        raise InvalidArgument(NOT_SUPPORTED)

    async def delete_attachment(self, attachment_id: str, context: Context) -> None:
        raise InvalidArgument(NOT_SUPPORTED)
