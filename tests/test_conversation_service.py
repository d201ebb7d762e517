"""conversation_service end to end: a real server process per backend (SQLite, PostgreSQL),
called over gRPC with real tokens; a few checks also read the database directly."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from google.protobuf import empty_pb2, json_format, struct_pb2

from common.db import sync_url
from conversation_service.models import messages
from tests.support import ROOT, ServiceProcess, auth_metadata, free_port
from todo.v1 import conversation_pb2 as pb
from todo.v1 import conversation_pb2_grpc

BACKENDS = ["sqlite", "postgres"]
TIMEOUT = 30


@dataclass
class Service:
    process: ServiceProcess
    database_url: str

    @property
    def address(self) -> str:
        return self.process.address


@pytest.fixture(scope="module", params=BACKENDS)
def service(
    request: pytest.FixtureRequest,
    database_url_factory: Callable[[str, str], str],
    base_env: dict[str, str],
    log_dir: Any,
) -> Iterator[Service]:
    url = database_url_factory(request.param, "conversations")
    address = f"127.0.0.1:{free_port()}"
    env = {**base_env, "CONVERSATION_DATABASE_URL": url, "CONVERSATION_SERVICE_ADDR": address}
    process = ServiceProcess("conversation_service", env, address, log_dir).start()
    try:
        yield Service(process, url)
    finally:
        process.stop()


@pytest.fixture
async def stub(service: Service) -> AsyncIterator[conversation_pb2_grpc.ConversationServiceStub]:
    async with grpc.aio.insecure_channel(service.address) as channel:
        yield conversation_pb2_grpc.ConversationServiceStub(channel)


class As:
    """The stub, calling as one user (a fresh, unique user per test keeps tests independent)."""

    def __init__(self, stub: conversation_pb2_grpc.ConversationServiceStub, user_id: str) -> None:
        self.user_id = user_id
        self._stub = stub
        self._metadata = auth_metadata(user_id)

    def __getattr__(self, name: str) -> Callable[[Any], Awaitable[Any]]:
        method = getattr(self._stub, name)
        return lambda request: method(request, metadata=self._metadata, timeout=TIMEOUT)

    async def create(self, title: str = "", request_id: str = "") -> pb.Conversation:
        return await self.CreateConversation(pb.CreateConversationRequest(title=title, request_id=request_id))

    async def append(self, conversation_id: int, content: str, role: str = "user", **fields: Any) -> Any:
        request = pb.AppendMessageRequest(conversation_id=conversation_id, role=role, content=content, **fields)
        return await self.AppendMessage(request)

    async def all_messages(self, conversation_id: int) -> list[pb.Message]:
        reply = await self.ListMessages(pb.ListMessagesRequest(conversation_id=conversation_id, page_size=100))
        assert reply.next_page_token == ""
        return list(reply.messages)

    async def get(self, conversation_id: int) -> pb.Conversation:
        return await self.GetConversation(pb.GetConversationRequest(conversation_id=conversation_id))

    async def list_ids(self, page_size: int = 100) -> list[int]:
        reply = await self.ListConversations(pb.ListConversationsRequest(page_size=page_size))
        return [conversation.id for conversation in reply.conversations]


def new_user(stub: conversation_pb2_grpc.ConversationServiceStub, name: str) -> As:
    return As(stub, f"{name}-{uuid.uuid4().hex[:8]}")


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def expect(code: grpc.StatusCode, call: Awaitable[Any], mentions: str = "") -> str:
    error = await rpc_error(call)
    assert error.code() == code, error.details()
    assert mentions in (error.details() or "")
    return error.details() or ""


def stored_messages(service: Service, user_id: str) -> list[Any]:
    """The message rows of `user_id`, read straight from the database."""
    engine = sa.create_engine(sync_url(service.database_url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            query = sa.select(messages).where(messages.c.user_id == user_id)
            query = query.order_by(messages.c.conversation_id, messages.c.id)
            return list(conn.execute(query).all())
    finally:
        engine.dispose()


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


def json_value(value: Any) -> struct_pb2.Value:
    holder = struct_pb2.Struct()
    holder.update({"v": value})
    return holder.fields["v"]


async def test_conversations_create_get_update_list_delete(stub: conversation_pb2_grpc.ConversationServiceStub) -> None:
    alice = new_user(stub, "alice")
    first = await alice.create("  Groceries  ")
    assert (first.id, first.title) == (1, "Groceries")  # stored trimmed
    assert first.created_at == first.updated_at and first.created_at.seconds > 0
    untitled = await alice.create()
    assert (untitled.id, untitled.title) == (2, "")
    assert await alice.get(1) == first

    keyed = await alice.create("Keyed", request_id="create-1")
    retried = await alice.create("Something else", request_id="create-1")
    assert retried == keyed and keyed.id == 3
    fourth = await alice.create()
    assert fourth.id == 4  # the retry used no number

    renamed = await alice.UpdateConversation(pb.UpdateConversationRequest(conversation_id=2, title=" Renamed "))
    assert (renamed.id, renamed.title, renamed.created_at) == (2, "Renamed", untitled.created_at)
    assert renamed.updated_at.ToDatetime() >= untitled.updated_at.ToDatetime()
    assert await alice.get(2) == renamed
    assert await alice.list_ids() == [2, 4, 3, 1]  # newest activity first

    deleted = await alice.DeleteConversation(pb.DeleteConversationRequest(conversation_id=4))
    assert deleted == empty_pb2.Empty()
    await expect(grpc.StatusCode.NOT_FOUND, alice.get(4), "conversation 4 not found")
    await expect(grpc.StatusCode.NOT_FOUND, alice.DeleteConversation(pb.DeleteConversationRequest(conversation_id=4)))
    assert (await alice.create()).id == 5  # numbers are never reused
    assert await alice.list_ids() == [5, 2, 3, 1]


async def test_concurrent_creates_with_one_request_id_make_one_conversation(
    stub: conversation_pb2_grpc.ConversationServiceStub,
) -> None:
    alice = new_user(stub, "alice")
    replies = await asyncio.gather(*(alice.create("Once", request_id="same-key") for _ in range(8)))
    assert {reply.id for reply in replies} == {1}
    assert await alice.list_ids() == [1]
    assert (await alice.create()).id == 2


async def test_history_order_recent_window_and_lookup_by_request_id(
    stub: conversation_pb2_grpc.ConversationServiceStub,
) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.create("Chat")
    for number in range(1, 26):
        role = "user" if number % 2 else "assistant"
        reply = await alice.append(conversation.id, f"message {number}", role=role, request_id=f"req-{number}")
        assert (reply.message.id, reply.message.role, reply.created) == (number, role, True)

    history = await alice.all_messages(conversation.id)
    assert [message.id for message in history] == list(range(1, 26))
    assert [message.content for message in history] == [f"message {n}" for n in range(1, 26)]

    async def recent(limit: int) -> list[int]:
        reply = await alice.GetRecentMessages(pb.GetRecentMessagesRequest(conversation_id=conversation.id, limit=limit))
        return [message.id for message in reply.messages]

    assert await recent(0) == list(range(6, 26))  # 0 means the default window, 20
    assert await recent(3) == [23, 24, 25]  # the last ones, oldest first
    assert await recent(100) == list(range(1, 26))
    for bad_limit in (101, -1):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, recent(bad_limit), "limit")

    found = await alice.GetMessageByRequestId(pb.GetMessageByRequestIdRequest(conversation_id=1, request_id="req-7"))
    assert found == history[6]
    missing = pb.GetMessageByRequestIdRequest(conversation_id=1, request_id="never-sent")
    await expect(grpc.StatusCode.NOT_FOUND, alice.GetMessageByRequestId(missing), "request_id")
    empty = pb.GetMessageByRequestIdRequest(conversation_id=1, request_id="")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.GetMessageByRequestId(empty), "request_id")


async def test_append_returns_the_history_window_before_the_new_message(
    stub: conversation_pb2_grpc.ConversationServiceStub,
) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.create("Window")
    assert list((await alice.append(conversation.id, "first", history_limit=5)).history) == []
    for number in range(2, 8):
        await alice.append(conversation.id, f"message {number}", request_id=f"w-{number}")
    reply = await alice.append(conversation.id, "the eighth", history_limit=3, request_id="w-8")
    assert reply.message.id == 8
    assert [message.id for message in reply.history] == [5, 6, 7]  # just before it, oldest first
    assert [message.content for message in reply.history] == ["message 5", "message 6", "message 7"]
    assert list((await alice.append(conversation.id, "no window")).history) == []  # 0: none

    # A retry answers with the window before the original message, not before the newest one.
    retry = await alice.append(conversation.id, "the eighth", history_limit=2, request_id="w-8")
    assert not retry.created and [message.id for message in retry.history] == [6, 7]

    for bad_limit in (101, -1):
        refused = alice.append(conversation.id, "never stored", history_limit=bad_limit)
        await expect(grpc.StatusCode.INVALID_ARGUMENT, refused, "history_limit")
    assert [message.id for message in await alice.all_messages(conversation.id)] == list(range(1, 10))


async def test_appending_moves_the_conversation_to_the_front(
    stub: conversation_pb2_grpc.ConversationServiceStub,
) -> None:
    alice = new_user(stub, "alice")
    older = await alice.create("Older")
    await alice.create("Newer")
    assert await alice.list_ids() == [2, 1]
    await alice.append(older.id, "back to this one")
    assert await alice.list_ids() == [1, 2]
    touched = await alice.get(1)
    assert touched.updated_at.ToDatetime() > older.updated_at.ToDatetime()
    assert touched.created_at == older.created_at


async def test_first_user_message_titles_an_untitled_conversation(
    stub: conversation_pb2_grpc.ConversationServiceStub,
) -> None:
    alice = new_user(stub, "alice")
    untitled = await alice.create()
    await alice.append(untitled.id, "Hello! How can I help?", role="assistant")
    assert (await alice.get(untitled.id)).title == ""  # only a user message titles it

    long_text = "  Please   add a task to buy groceries,\nmilk, eggs, and bread for the weekend party  "
    await alice.append(untitled.id, long_text)
    title = (await alice.get(untitled.id)).title
    assert title == "Please add a task to buy groceries, milk, eggs, and bread…"
    assert len(title) <= 60
    await alice.append(untitled.id, "A later message changes nothing")
    assert (await alice.get(untitled.id)).title == title

    short = await alice.create()
    await alice.append(short.id, "  Buy   milk ")
    assert (await alice.get(short.id)).title == "Buy milk"

    named = await alice.create("My own title")
    await alice.append(named.id, "Buy milk")
    assert (await alice.get(named.id)).title == "My own title"
    update = pb.UpdateConversationRequest(conversation_id=named.id, title="Renamed")
    assert (await alice.UpdateConversation(update)).title == "Renamed"


async def test_retried_append_stores_one_message(
    service: Service, stub: conversation_pb2_grpc.ConversationServiceStub
) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.create("Retries")
    first = await alice.append(conversation.id, "add a task", request_id="turn-1")
    before_retry = await alice.get(conversation.id)
    retry = await alice.append(conversation.id, "a different body", role="assistant", request_id="turn-1")
    assert first.created and not retry.created
    assert retry.message == first.message  # the original, untouched
    assert await alice.all_messages(conversation.id) == [first.message]
    assert await alice.get(conversation.id) == before_retry  # not even updated_at moved

    # The key is scoped to the user: in another conversation it finds the original too.
    other = await alice.create("Other")
    elsewhere = await alice.append(other.id, "add a task", request_id="turn-1")
    assert not elsewhere.created and elsewhere.message == first.message
    assert elsewhere.message.conversation_id == conversation.id

    # Concurrent retries of one append: exactly one stores.
    burst = await asyncio.gather(
        *(alice.append(conversation.id, f"try {n}", request_id="burst") for n in range(8)),
    )
    assert sum(reply.created for reply in burst) == 1
    assert {reply.message.id for reply in burst} == {2}
    assert [message.id for message in await alice.all_messages(conversation.id)] == [1, 2]
    assert [(row.conversation_id, row.id) for row in stored_messages(service, alice.user_id)] == [(1, 1), (1, 2)]


async def test_concurrent_appends_keep_a_strict_order(stub: conversation_pb2_grpc.ConversationServiceStub) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.create("Busy")
    replies = await asyncio.gather(*(alice.append(conversation.id, f"parallel {n}") for n in range(20)))
    assert sorted(reply.message.id for reply in replies) == list(range(1, 21))
    content_of = {reply.message.id: reply.message.content for reply in replies}
    history = await alice.all_messages(conversation.id)
    assert [message.id for message in history] == list(range(1, 21))
    assert {message.id: message.content for message in history} == content_of
    assert len(set(content_of.values())) == 20  # nothing lost, nothing doubled


async def test_list_messages_pages_have_no_duplicates_or_gaps_while_messages_arrive(
    stub: conversation_pb2_grpc.ConversationServiceStub,
) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.create("Paging")
    other = await alice.create("Other")
    for number in range(1, 6):
        await alice.append(conversation.id, f"m{number}")

    seen: list[int] = []
    token = ""
    arrivals = {1: 3, 3: 1}  # after page N, this many new messages arrive
    for page_number in range(1, 20):
        request = pb.ListMessagesRequest(conversation_id=conversation.id, page_size=2, page_token=token)
        reply = await alice.ListMessages(request)
        seen += [message.id for message in reply.messages]
        for _ in range(arrivals.get(page_number, 0)):
            await alice.append(conversation.id, "late arrival")
        token = reply.next_page_token
        if not token:
            break
    assert seen == list(range(1, 10))

    first_page = await alice.ListMessages(pb.ListMessagesRequest(conversation_id=conversation.id, page_size=2))
    foreign = pb.ListMessagesRequest(conversation_id=other.id, page_token=first_page.next_page_token)
    await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.ListMessages(foreign), "page_token")
    forged = pb.ListMessagesRequest(conversation_id=conversation.id, page_token="bm90LWEtdG9rZW4")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.ListMessages(forged), "page_token")
    too_big = pb.ListMessagesRequest(conversation_id=conversation.id, page_size=101)
    await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.ListMessages(too_big), "page_size")


async def test_list_conversations_pages_have_no_duplicates_or_gaps_while_conversations_arrive(
    stub: conversation_pb2_grpc.ConversationServiceStub,
) -> None:
    alice = new_user(stub, "alice")
    for number in range(1, 6):
        await alice.create(f"c{number}")
    seen: list[int] = []
    token = ""
    for _ in range(10):
        reply = await alice.ListConversations(pb.ListConversationsRequest(page_size=2, page_token=token))
        seen += [conversation.id for conversation in reply.conversations]
        await alice.create("arrived between pages")  # newer: belongs before the cursor
        token = reply.next_page_token
        if not token:
            break
    assert seen == [5, 4, 3, 2, 1]
    assert (await alice.list_ids())[:3] == [8, 7, 6]
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        alice.ListConversations(pb.ListConversationsRequest(page_size=101)),
        "page_size",
    )


async def test_deleting_a_conversation_removes_its_messages(
    service: Service, stub: conversation_pb2_grpc.ConversationServiceStub
) -> None:
    alice = new_user(stub, "alice")
    doomed = await alice.create("Doomed")
    kept = await alice.create("Kept")
    for number in range(3):
        await alice.append(doomed.id, f"doomed {number}", request_id=f"d{number}")
    await alice.append(kept.id, "kept")
    assert len(stored_messages(service, alice.user_id)) == 4

    await alice.DeleteConversation(pb.DeleteConversationRequest(conversation_id=doomed.id))
    assert [(row.conversation_id, row.content) for row in stored_messages(service, alice.user_id)] == [(2, "kept")]
    for call in _calls_on(alice, doomed.id):
        await expect(grpc.StatusCode.NOT_FOUND, call, f"conversation {doomed.id} not found")
    assert (await alice.create()).id == 3  # the deleted number is not reused
    assert [message.content for message in await alice.all_messages(kept.id)] == ["kept"]


def _calls_on(user: As, conversation_id: int, user_id: str = "", lookup: bool = True) -> list[Awaitable[Any]]:
    """Every RPC that names a conversation, aimed at `conversation_id` (`lookup`: with
    GetMessageByRequestId, for which conversation 0 means any)."""
    calls = [
        user.GetConversation(pb.GetConversationRequest(user_id=user_id, conversation_id=conversation_id)),
        user.UpdateConversation(
            pb.UpdateConversationRequest(user_id=user_id, conversation_id=conversation_id, title="Hijacked")
        ),
        user.AppendMessage(
            pb.AppendMessageRequest(user_id=user_id, conversation_id=conversation_id, role="user", content="hi")
        ),
        user.RecordMessage(
            pb.RecordMessageRequest(user_id=user_id, conversation_id=conversation_id, role="user", content="hi")
        ),
        user.ListMessages(pb.ListMessagesRequest(user_id=user_id, conversation_id=conversation_id)),
        user.GetRecentMessages(pb.GetRecentMessagesRequest(user_id=user_id, conversation_id=conversation_id)),
        user.DeleteConversation(pb.DeleteConversationRequest(user_id=user_id, conversation_id=conversation_id)),
    ]
    if lookup:
        request = pb.GetMessageByRequestIdRequest(user_id=user_id, conversation_id=conversation_id, request_id="d0")
        calls.append(user.GetMessageByRequestId(request))
    return calls


async def test_tenant_isolation(service: Service, stub: conversation_pb2_grpc.ConversationServiceStub) -> None:
    alice, bob = new_user(stub, "alice"), new_user(stub, "bob")
    mine = await alice.create("Alice's plans")
    await alice.append(mine.id, "secret plan", request_id="d0")
    alice_before = (await alice.get(mine.id), await alice.all_messages(mine.id))

    # Alice's conversation 1 looks to Bob exactly like his missing conversation 2.
    for call in _calls_on(bob, mine.id):
        assert await expect(grpc.StatusCode.NOT_FOUND, call) == "conversation 1 not found"
    for call in _calls_on(bob, 2):
        assert await expect(grpc.StatusCode.NOT_FOUND, call) == "conversation 2 not found"
    assert await bob.list_ids() == []
    assert list((await bob.ListHistory(pb.ListHistoryRequest())).messages) == []
    await expect(grpc.StatusCode.NOT_FOUND, bob.GetMessageByRequestId(pb.GetMessageByRequestIdRequest(request_id="d0")))

    bobs = await bob.create("Bob's own")
    assert bobs.id == 1  # per-user numbers
    await bob.append(bobs.id, "bob's message")
    assert [message.content for message in await bob.all_messages(1)] == ["bob's message"]
    assert (await alice.get(mine.id), await alice.all_messages(mine.id)) == alice_before
    assert [row.content for row in stored_messages(service, alice.user_id)] == ["secret plan"]

    # Naming another user is refused outright, on every RPC.
    for call in [
        *_calls_on(alice, mine.id, user_id=bob.user_id),
        alice.CreateConversation(pb.CreateConversationRequest(user_id=bob.user_id)),
        alice.StartConversation(pb.StartConversationRequest(user_id=bob.user_id)),
        alice.ListConversations(pb.ListConversationsRequest(user_id=bob.user_id)),
        alice.ListHistory(pb.ListHistoryRequest(user_id=bob.user_id)),
    ]:
        await expect(grpc.StatusCode.PERMISSION_DENIED, call, "user_id")
    own = await alice.GetConversation(pb.GetConversationRequest(user_id=alice.user_id, conversation_id=mine.id))
    assert own == alice_before[0]

    # A page token is bound to the user it was made for.
    await alice.create("second")
    alice_page = await alice.ListConversations(pb.ListConversationsRequest(page_size=1))
    stolen = pb.ListConversationsRequest(page_size=1, page_token=alice_page.next_page_token)
    await expect(grpc.StatusCode.INVALID_ARGUMENT, bob.ListConversations(stolen), "page_token")

    anonymous = stub.GetConversation(pb.GetConversationRequest(conversation_id=1), timeout=TIMEOUT)
    await expect(grpc.StatusCode.UNAUTHENTICATED, anonymous)


async def test_limits_are_enforced_and_nothing_is_written(
    service: Service, stub: conversation_pb2_grpc.ConversationServiceStub
) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.create()
    rejected: list[tuple[dict[str, Any], str]] = [
        ({"content": ""}, "content"),
        ({"content": "   \n "}, "content"),
        ({"content": "x" * 8001}, "content"),
        ({"content": "hi", "role": "system"}, "role"),
        ({"content": "hi", "role": ""}, "role"),
        ({"content": "hi", "request_id": "r" * 256}, "request_id"),
        ({"content": "hi", "request_id": "nul\x00"}, "request_id"),
        ({"content": "nul\x00inside"}, "content"),
        ({"content": "hi", "tool_calls": [pb.ToolCall(name="")]}, "tool_calls[0].name"),
        ({"content": "hi", "tool_calls": [pb.ToolCall(name="t", result=json_value(float("nan")))]}, "tool_calls[0]"),
    ]
    for fields, field_name in rejected:
        request = pb.AppendMessageRequest(conversation_id=conversation.id, **{"role": "user", **fields})
        await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.AppendMessage(request), field_name)
    assert stored_messages(service, alice.user_id) == []
    assert await alice.get(conversation.id) == conversation  # no title, no updated_at change

    longest = "word " * 1599 + "last!"
    assert len(longest) == 8000
    accepted = await alice.append(conversation.id, longest)
    assert accepted.created and accepted.message.content == longest

    for bad_id in (0, -1):
        for call in [*_calls_on(alice, bad_id, lookup=bad_id != 0), alice.get(bad_id)]:
            await expect(grpc.StatusCode.INVALID_ARGUMENT, call, "conversation_id")
    for bad_title in ("t" * 256, "   "):
        update = pb.UpdateConversationRequest(conversation_id=conversation.id, title=bad_title)
        await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.UpdateConversation(update), "title")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.create("t" * 256), "title")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.create("ok", request_id="r" * 256), "request_id")
    assert await alice.list_ids() == [conversation.id]
    assert [message.id for message in await alice.all_messages(conversation.id)] == [1]


def _sample_tool_calls() -> list[pb.ToolCall]:
    return [
        pb.ToolCall(
            name="add_task",
            arguments=struct({"title": "Buy milk", "description": ""}),
            result=json_value({"task_id": 1, "status": "created", "title": "Buy milk"}),
        ),
        pb.ToolCall(
            name="list_tasks",
            arguments=struct({"status": "all"}),
            result=json_value(
                [{"id": 1, "title": "Buy milk", "completed": False, "tags": ["a", None, "nul\x00inside"]}]
            ),
        ),
        pb.ToolCall(name="complete_task", arguments=struct({"task_id": 99}), error="task 99 not found"),
        pb.ToolCall(name="no_arguments", result=json_value(None)),
    ]


async def test_tool_calls_round_trip_as_structured_data(
    service: Service, stub: conversation_pb2_grpc.ConversationServiceStub
) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.create("Tools")
    sent = _sample_tool_calls()
    reply = await alice.append(conversation.id, "Done.", role="assistant", tool_calls=sent, request_id="t1")
    assert list(reply.message.tool_calls) == sent

    by_key = await alice.GetMessageByRequestId(pb.GetMessageByRequestIdRequest(conversation_id=1, request_id="t1"))
    recent = await alice.GetRecentMessages(pb.GetRecentMessagesRequest(conversation_id=1))
    for message in [by_key, recent.messages[0], *(await alice.all_messages(1))]:
        assert list(message.tool_calls) == sent
    failed = by_key.tool_calls[2]
    assert failed.HasField("error") and not failed.HasField("result")
    assert not by_key.tool_calls[0].HasField("error")
    assert by_key.tool_calls[3].HasField("result") and not by_key.tool_calls[3].HasField("arguments")

    # Stored as JSON structures, not as strings.
    (row,) = stored_messages(service, alice.user_id)
    assert row.tool_calls[0] == {
        "name": "add_task",
        "arguments": {"title": "Buy milk", "description": ""},
        "result": {"task_id": 1, "status": "created", "title": "Buy milk"},
    }
    assert row.tool_calls[2] == {"name": "complete_task", "arguments": {"task_id": 99}, "error": "task 99 not found"}


# --- Round 2: metadata, client-recorded messages, per-user keys, history, size bounds -------------


def _record(conversation_id: int, content: str, role: str = "user", **metadata: Any) -> pb.RecordMessageRequest:
    request = pb.RecordMessageRequest(conversation_id=conversation_id, role=role, content=content)
    if metadata:
        request.metadata.update(metadata)
    return request


async def record_with_key(user: As, request: pb.RecordMessageRequest, key: str) -> pb.Message:
    """RecordMessage with an `idempotency-key` (as Envoy forwards the REST header)."""
    metadata = (*auth_metadata(user.user_id), ("idempotency-key", key))
    return await user._stub.RecordMessage(request, metadata=metadata, timeout=TIMEOUT)  # type: ignore[no-any-return]


def stored_row_keys(service: Service, user_id: str) -> list[tuple[Any, Any]]:
    """(request_id, client_key) of each of the user's message rows."""
    return [(row.request_id, row.client_key) for row in stored_messages(service, user_id)]


async def test_conversation_metadata_is_set_replaced_and_kept(
    stub: conversation_pb2_grpc.ConversationServiceStub,
) -> None:
    alice = new_user(stub, "alice")
    started = await alice.StartConversation(
        pb.StartConversationRequest(title="  Trip ", metadata=struct({"color": "blue", "pins": [1, 2]}))
    )
    assert (started.id, started.title) == (1, "Trip")
    assert json_format_dict(started.metadata) == {"color": "blue", "pins": [1, 2]}
    plain = await alice.StartConversation(pb.StartConversationRequest())
    assert (plain.id, plain.title, plain.HasField("metadata"), dict(plain.metadata)) == (2, "", True, {})
    assert dict((await alice.create()).metadata) == {}  # the agent's CreateConversation: {} too

    async def update(**fields: Any) -> pb.Conversation:
        return await alice.UpdateConversation(pb.UpdateConversationRequest(conversation_id=1, **fields))

    renamed = await update(title="Trip to Rome")
    assert renamed.title == "Trip to Rome" and renamed.metadata == started.metadata  # metadata kept
    recolored = await update(metadata=struct({"color": "red"}))
    assert recolored.title == "Trip to Rome" and json_format_dict(recolored.metadata) == {"color": "red"}  # replaced
    unchanged = await update()
    assert unchanged == recolored  # nothing given: nothing changes, not even updated_at
    cleared = await update(metadata=struct({}))
    assert dict(cleared.metadata) == {} and cleared.title == "Trip to Rome"
    assert await alice.get(1) == cleared


async def test_metadata_limits_write_nothing(
    service: Service, stub: conversation_pb2_grpc.ConversationServiceStub
) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.StartConversation(pb.StartConversationRequest(title="Limits"))
    exactly = {"k": "x" * (8192 - len('{"k":""}'))}  # 8 KiB as compact JSON: allowed
    too_big = {"k": "x" * (8193 - len('{"k":""}'))}
    not_json = struct({"n": 1})
    not_json.fields["n"].number_value = float("nan")

    for metadata, field_name in ((too_big, "metadata"), (not_json, "metadata")):
        value = metadata if isinstance(metadata, struct_pb2.Struct) else struct(metadata)
        calls = [
            alice.StartConversation(pb.StartConversationRequest(title="new", metadata=value)),
            alice.UpdateConversation(pb.UpdateConversationRequest(conversation_id=1, title="x", metadata=value)),
            alice.RecordMessage(pb.RecordMessageRequest(conversation_id=1, role="user", content="hi", metadata=value)),
        ]
        for call in calls:
            await expect(grpc.StatusCode.INVALID_ARGUMENT, call, field_name)
    assert await alice.list_ids() == [1] and await alice.get(1) == conversation
    assert stored_messages(service, alice.user_id) == []

    kept = await alice.UpdateConversation(pb.UpdateConversationRequest(conversation_id=1, metadata=struct(exactly)))
    assert json_format_dict(kept.metadata) == exactly
    recorded = await alice.RecordMessage(
        pb.RecordMessageRequest(conversation_id=1, role="user", content="hi", metadata=struct(exactly))
    )
    assert json_format_dict(recorded.metadata) == exactly


def json_format_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON data, whole numbers as ints."""
    return json.loads(json.dumps(json_format.MessageToDict(value)), parse_float=_number)


def _number(text: str) -> int | float:
    return int(float(text)) if float(text).is_integer() else float(text)


async def test_recorded_messages_are_stored_as_given(
    service: Service, stub: conversation_pb2_grpc.ConversationServiceStub
) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.StartConversation(pb.StartConversationRequest())
    said = await alice.RecordMessage(_record(conversation.id, "  What's on my list?  ", source="web"))
    answered = await alice.RecordMessage(_record(conversation.id, "Nothing yet. I will do all of it!", "assistant"))
    assert (said.id, said.role, said.content, said.conversation_id) == (1, "user", "  What's on my list?  ", 1)
    assert json_format_dict(said.metadata) == {"source": "web"} and said.created_at.seconds > 0
    assert (answered.id, answered.role, list(answered.tool_calls), dict(answered.metadata)) == (
        2,
        "assistant",
        [],
        {},
    )
    assert await alice.all_messages(conversation.id) == [said, answered]
    assert (await alice.get(conversation.id)).title == "What's on my list?"  # a user message names it
    assert stored_row_keys(service, alice.user_id) == [(None, None), (None, None)]  # no key: none stored

    for role in ("system", "tool", "", "USER"):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.RecordMessage(_record(1, "hi", role)), "role")
    for content in ("", "   ", "x" * 8001, "nul\x00"):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.RecordMessage(_record(1, content)), "content")
    await expect(grpc.StatusCode.NOT_FOUND, alice.RecordMessage(_record(99, "hi")), "conversation 99 not found")
    assert await alice.all_messages(conversation.id) == [said, answered]


async def test_a_recorded_message_with_an_idempotency_key_is_stored_once(
    service: Service, stub: conversation_pb2_grpc.ConversationServiceStub
) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.StartConversation(pb.StartConversationRequest())
    other = await alice.StartConversation(pb.StartConversationRequest())
    request = _record(conversation.id, "buy milk", tag="a")
    first = await record_with_key(alice, request, "key-1")
    assert await record_with_key(alice, request, "key-1") == first
    burst = await asyncio.gather(*(record_with_key(alice, request, "key-2") for _ in range(8)))
    assert {message.id for message in burst} == {2}
    assert [message.id for message in await alice.all_messages(conversation.id)] == [1, 2]

    # The same key for anything else is refused, not answered with the first message.
    for changed in (
        _record(conversation.id, "buy bread", tag="a"),
        _record(conversation.id, "buy milk", "assistant", tag="a"),
        _record(conversation.id, "buy milk", tag="b"),
        _record(other.id, "buy milk", tag="a"),
    ):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, record_with_key(alice, changed, "key-1"), "Idempotency-Key")
    for bad_key in ("k" * 201,):  # (gRPC itself refuses control characters in metadata)
        await expect(grpc.StatusCode.INVALID_ARGUMENT, record_with_key(alice, request, bad_key), "Idempotency-Key")
    assert [message.id for message in await alice.all_messages(conversation.id)] == [1, 2]
    assert await alice.all_messages(other.id) == []

    # Keys belong to a user: Bob's key-1 is his own.
    bob = new_user(stub, "bob")
    bobs = await bob.StartConversation(pb.StartConversationRequest())
    assert (await record_with_key(bob, _record(bobs.id, "buy milk", tag="a"), "key-1")).id == 1
    assert stored_row_keys(service, alice.user_id) == [(None, "key-1"), (None, "key-2")]


async def test_client_keys_never_meet_the_agents_request_ids(
    service: Service, stub: conversation_pb2_grpc.ConversationServiceStub
) -> None:
    # An attacker's recorded message under the agent's key must not become a chat turn's "answer".
    alice = new_user(stub, "alice")
    conversation = await alice.StartConversation(pb.StartConversationRequest())
    planted = await record_with_key(
        alice, _record(conversation.id, "I deleted everything", "assistant"), "K1:assistant"
    )
    lookup = pb.GetMessageByRequestIdRequest(request_id="K1:assistant")
    await expect(grpc.StatusCode.NOT_FOUND, alice.GetMessageByRequestId(lookup), "request_id")
    genuine = await alice.append(conversation.id, "Added task 1.", role="assistant", request_id="K1:assistant")
    assert genuine.created and genuine.message.id == planted.id + 1
    assert await alice.GetMessageByRequestId(lookup) == genuine.message
    assert stored_row_keys(service, alice.user_id) == [(None, "K1:assistant"), ("K1:assistant", None)]


async def test_request_ids_are_unique_per_user_across_conversations(
    service: Service, stub: conversation_pb2_grpc.ConversationServiceStub
) -> None:
    alice = new_user(stub, "alice")
    first_chat, second_chat = await alice.create("One"), await alice.create("Two")
    first = await alice.append(first_chat.id, "add milk", request_id="K:user")
    await alice.append(first_chat.id, "Added.", role="assistant", request_id="K:assistant")
    retried_elsewhere = await alice.append(second_chat.id, "add milk", request_id="K:user", history_limit=5)
    assert not retried_elsewhere.created and retried_elsewhere.message == first.message
    assert list(retried_elsewhere.history) == []  # the window before the original, in its conversation

    # Conversation 0 finds a key in any of the user's conversations; a given one looks only there.
    anywhere = await alice.GetMessageByRequestId(pb.GetMessageByRequestIdRequest(request_id="K:assistant"))
    assert (anywhere.conversation_id, anywhere.id, anywhere.content) == (first_chat.id, 2, "Added.")
    only_there = pb.GetMessageByRequestIdRequest(conversation_id=second_chat.id, request_id="K:assistant")
    await expect(grpc.StatusCode.NOT_FOUND, alice.GetMessageByRequestId(only_there), "request_id")
    negative = pb.GetMessageByRequestIdRequest(conversation_id=-1, request_id="K:assistant")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.GetMessageByRequestId(negative), "conversation_id")

    # Concurrent appends of one key to different conversations (they lock different rows): one stores.
    chats = [await alice.create(f"race {n}") for n in range(4)]
    raced = await asyncio.gather(*(alice.append(chat.id, "race", request_id="R:user") for chat in chats))
    assert sum(reply.created for reply in raced) == 1
    assert len({(reply.message.conversation_id, reply.message.id) for reply in raced}) == 1
    rows = stored_messages(service, alice.user_id)
    assert [row.request_id for row in rows].count("R:user") == 1
    assert [row.request_id for row in rows].count("K:user") == 1

    # Another user's identical key is theirs alone.
    bob = new_user(stub, "bob")
    bobs = await bob.create()
    assert (await bob.append(bobs.id, "add milk", request_id="K:user")).created
    await expect(
        grpc.StatusCode.NOT_FOUND, bob.GetMessageByRequestId(pb.GetMessageByRequestIdRequest(request_id="K:assistant"))
    )


async def test_history_is_newest_first_across_conversations_without_duplicates_or_gaps(
    stub: conversation_pb2_grpc.ConversationServiceStub,
) -> None:
    alice = new_user(stub, "alice")
    chats = [await alice.create(f"chat {n}") for n in range(3)]
    for number in range(9):  # interleaved across the three conversations
        await alice.append(chats[number % 3].id, f"m{number}", role="user" if number % 2 else "assistant")
    expected = [f"m{number}" for number in reversed(range(9))]

    seen: list[pb.Message] = []
    token = ""
    for page_number in range(1, 20):
        reply = await alice.ListHistory(pb.ListHistoryRequest(page_size=2, page_token=token))
        seen += reply.messages
        if page_number in (1, 3):  # arrivals between pages are newer: they land before the cursor
            await alice.append(chats[0].id, "late arrival")
            await alice.RecordMessage(_record(chats[1].id, "late recorded"))
        token = reply.next_page_token
        if not token:
            break
    assert [message.content for message in seen] == expected
    assert len({(message.conversation_id, message.id) for message in seen}) == 9
    assert [message.conversation_id for message in seen] == [chats[n % 3].id for n in reversed(range(9))]
    everything = await alice.ListHistory(pb.ListHistoryRequest(page_size=100))
    assert [message.content for message in everything.messages][:4] == ["late recorded", "late arrival"] * 2
    assert everything.next_page_token == ""
    timestamps = [message.created_at.ToDatetime() for message in everything.messages]
    assert timestamps == sorted(timestamps, reverse=True)

    # Deleting a conversation takes its messages out of the history.
    await alice.DeleteConversation(pb.DeleteConversationRequest(conversation_id=chats[2].id))
    remaining = (await alice.ListHistory(pb.ListHistoryRequest(page_size=100))).messages
    assert chats[2].id not in {message.conversation_id for message in remaining} and len(remaining) == 10

    first_page = await alice.ListHistory(pb.ListHistoryRequest(page_size=1))
    bob = new_user(stub, "bob")
    stolen = pb.ListHistoryRequest(page_size=1, page_token=first_page.next_page_token)
    await expect(grpc.StatusCode.INVALID_ARGUMENT, bob.ListHistory(stolen), "page_token")
    foreign = pb.ListHistoryRequest(
        page_token=(await alice.ListConversations(pb.ListConversationsRequest(page_size=1))).next_page_token
    )
    await expect(grpc.StatusCode.INVALID_ARGUMENT, alice.ListHistory(foreign), "page_token")
    for bad_size in (101, -1):
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT, alice.ListHistory(pb.ListHistoryRequest(page_size=bad_size)), "page_size"
        )


def _big_call(kib: int, part: str = "result", name: str = "list_tasks") -> pb.ToolCall:
    """A tool call whose `part` is about `kib` KiB of protobuf."""
    call = pb.ToolCall(name=name)
    text = "x" * (kib * 1024)
    if part == "result":
        call.result.string_value = text
    elif part == "arguments":
        call.arguments.update({"text": text})
    else:
        call.error = text
    return call


async def test_stored_tool_calls_are_bounded_and_refusals_write_nothing(
    service: Service, stub: conversation_pb2_grpc.ConversationServiceStub
) -> None:
    alice = new_user(stub, "alice")
    conversation = await alice.create("Bounds")
    too_many = [pb.ToolCall(name="list_tasks") for _ in range(101)]
    rejected: list[tuple[list[pb.ToolCall], str]] = [
        (too_many, "tool_calls must be at most 100"),
        ([pb.ToolCall(name="n" * 256)], "tool_calls[0].name"),
        ([_big_call(1), _big_call(257)], "tool_calls[1].result must be at most 256 KiB"),
        ([_big_call(257, "arguments")], "tool_calls[0].arguments"),
        ([_big_call(257, "error")], "tool_calls[0].error"),
        ([_big_call(200), _big_call(200), _big_call(200)], "at most 512 KiB"),
    ]
    for calls, mentions in rejected:
        refused = alice.append(conversation.id, "Done.", role="assistant", tool_calls=calls)
        await expect(grpc.StatusCode.INVALID_ARGUMENT, refused, mentions)
    assert stored_messages(service, alice.user_id) == []
    assert await alice.get(conversation.id) == conversation

    hundred = [pb.ToolCall(name="list_tasks", result=json_value([])) for _ in range(100)]
    assert (await alice.append(conversation.id, "ok", role="assistant", tool_calls=hundred)).created
    biggest = [_big_call(250), _big_call(250)]
    assert (await alice.append(conversation.id, "ok", role="assistant", tool_calls=biggest)).created


async def test_replies_stay_within_the_gateways_buffer(stub: conversation_pb2_grpc.ConversationServiceStub) -> None:
    # Envoy's transcoder answers 500 for a reply over 1 MiB: pages stop at 512 KiB (at least one message).
    alice = new_user(stub, "alice")
    conversation = await alice.create("Big results")
    for number in range(1, 6):
        await alice.append(conversation.id, f"big {number}", role="assistant", tool_calls=[_big_call(200)])
    small = await alice.append(conversation.id, "small", history_limit=100)
    assert [message.content for message in small.history] == ["big 4", "big 5"]  # the newest that fit

    seen: list[str] = []
    token = ""
    while True:
        page = await alice.ListMessages(
            pb.ListMessagesRequest(conversation_id=conversation.id, page_size=100, page_token=token)
        )
        assert page.ByteSize() < 600 * 1024 and len(page.messages) == 2
        seen += [message.content for message in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["big 1", "big 2", "big 3", "big 4", "big 5", "small"]

    recent = await alice.GetRecentMessages(pb.GetRecentMessagesRequest(conversation_id=conversation.id, limit=100))
    assert [message.content for message in recent.messages] == ["big 4", "big 5", "small"]
    history: list[str] = []
    token = ""
    while True:
        page = await alice.ListHistory(pb.ListHistoryRequest(page_token=token))
        assert page.ByteSize() < 600 * 1024
        history += [message.content for message in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert history == seen[::-1]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_round_1_database_is_migrated_and_keeps_its_messages(
    backend: str,
    database_url_factory: Callable[[str, str], str],
    base_env: dict[str, str],
    log_dir: Any,
) -> None:
    url = database_url_factory(backend, "conversations_round1")
    _round_1_database(url)
    address = f"127.0.0.1:{free_port()}"
    env = {**base_env, "CONVERSATION_DATABASE_URL": url, "CONVERSATION_SERVICE_ADDR": address}
    process = ServiceProcess("conversation_service", env, address, log_dir).start()  # migrates to head
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            alice = As(conversation_pb2_grpc.ConversationServiceStub(channel), "alice")
            messages = [*(await alice.all_messages(1)), *(await alice.all_messages(2))]
            assert [(m.conversation_id, m.id, m.content, dict(m.metadata)) for m in messages] == [
                (1, 1, "add milk", {}),
                (1, 2, "Added.", {}),
                (2, 1, "add milk", {}),
            ]
            assert dict((await alice.get(1)).metadata) == {}
            # The same key in two conversations (the old per-conversation scope): the first keeps it.
            found = await alice.GetMessageByRequestId(pb.GetMessageByRequestIdRequest(request_id="K:user"))
            assert (found.conversation_id, found.id) == (1, 1)
            retry = await alice.append(2, "add milk", request_id="K:user")
            assert not retry.created and retry.message.conversation_id == 1
            history = await alice.ListHistory(pb.ListHistoryRequest())
            assert [(m.conversation_id, m.id) for m in history.messages] == [(2, 1), (1, 2), (1, 1)]
    finally:
        process.stop()


def _round_1_database(url: str) -> None:
    """A database at revision 0001 with alice's rows, one request id in two conversations."""
    config = Config()
    config.set_main_option("script_location", str(ROOT / "conversation_service" / "migrations"))
    config.attributes["database_url"] = sync_url(url)
    command.upgrade(config, "0001")
    start = datetime(2026, 11, 1, tzinfo=UTC)
    rows = [(1, 1, "user", "add milk", "K:user", 0), (1, 2, "assistant", "Added.", "K:assistant", 1)]
    rows.append((2, 1, "user", "add milk", "K:user", 2))
    engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            for conversation_id in (1, 2):
                conn.execute(
                    sa.text(
                        "INSERT INTO conversations (user_id, id, title, last_message_id, created_at, updated_at) "
                        "VALUES ('alice', :id, 'old', 2, :at, :at)"
                    ),
                    {"id": conversation_id, "at": start},
                )
            conn.execute(sa.text("INSERT INTO conversation_counters (user_id, last_id) VALUES ('alice', 2)"))
            for conversation_id, message_id, role, content, request_id, seconds in rows:
                conn.execute(
                    sa.text(
                        "INSERT INTO messages (user_id, conversation_id, id, role, content, tool_calls, request_id, "
                        "created_at) VALUES ('alice', :c, :m, :role, :content, '[]', :request_id, :at)"
                    ),
                    {
                        "c": conversation_id,
                        "m": message_id,
                        "role": role,
                        "content": content,
                        "request_id": request_id,
                        "at": start + timedelta(seconds=seconds),
                    },
                )
    finally:
        engine.dispose()


# Last in the module: it restarts the shared service process.
async def test_restart_loses_nothing(service: Service, stub: conversation_pb2_grpc.ConversationServiceStub) -> None:
    alice = new_user(stub, "alice")
    chat = await alice.create("Before restart")
    await alice.create("Second")
    await alice.append(chat.id, "remember me", request_id="r1")
    await alice.append(chat.id, "I will", role="assistant", tool_calls=_sample_tool_calls())
    first_page = await alice.ListConversations(pb.ListConversationsRequest(page_size=1))
    before = (await alice.get(chat.id), await alice.list_ids(), await alice.all_messages(chat.id))

    await asyncio.to_thread(service.process.restart)

    async with grpc.aio.insecure_channel(service.address) as channel:
        again = As(conversation_pb2_grpc.ConversationServiceStub(channel), alice.user_id)
        assert (await again.get(chat.id), await again.list_ids(), await again.all_messages(chat.id)) == before
        # A page token from before the restart still works.
        second_page = await again.ListConversations(
            pb.ListConversationsRequest(page_size=1, page_token=first_page.next_page_token)
        )
        assert [conversation.id for conversation in second_page.conversations] == [2]
        retry = await again.append(chat.id, "remember me", request_id="r1")
        assert not retry.created and retry.message == before[2][0]
        assert (await again.append(chat.id, "after restart")).message.id == 3
        assert (await again.create()).id == 3
