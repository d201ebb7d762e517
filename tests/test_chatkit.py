"""POST /chatkit through real Envoy: the ChatKit protocol driven with the openai-chatkit SDK's own
request and event types (the web component itself loads from OpenAI's CDN, so the protocol is
what we can test), against the real services and the built-in model.

Covers: a thread created with a message (streamed deltas, the tool call as a workflow item, the
`tasks_changed` client effect, the title from the first message), continuing it, listing threads
and items (both orders, paginated), each message stored exactly once (seen over REST), the task
made through ChatKit visible over REST, Idempotency-Key, renaming and deleting a thread, tenant
isolation, malformed and unsupported requests (400), missing or bad tokens (401).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from chatkit.types import (
    AssistantMessageContentPartTextDelta,
    AssistantMessageItem,
    AttachmentCreateParams,
    AttachmentsCreateReq,
    ClientEffectEvent,
    ErrorEvent,
    InferenceOptions,
    ItemsListParams,
    ItemsListReq,
    Page,
    StreamOptionsEvent,
    Thread,
    ThreadAddUserMessageParams,
    ThreadCreatedEvent,
    ThreadCreateParams,
    ThreadDeleteParams,
    ThreadGetByIdParams,
    ThreadItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemUpdatedEvent,
    ThreadListParams,
    ThreadsAddUserMessageReq,
    ThreadsCreateReq,
    ThreadsDeleteReq,
    ThreadsGetByIdReq,
    ThreadsListReq,
    ThreadStreamEvent,
    ThreadsUpdateReq,
    ThreadUpdatedEvent,
    ThreadUpdateParams,
    UserMessageInput,
    UserMessageItem,
    UserMessageTextContent,
    WorkflowItem,
)
from pydantic import BaseModel, TypeAdapter

from tests.gateway_fixtures import Gateway, Reply, collect, start_gateway

EVENTS = TypeAdapter[ThreadStreamEvent](ThreadStreamEvent)
ITEM_PAGE = TypeAdapter[Page[ThreadItem]](Page[ThreadItem])
THREAD_PAGE = TypeAdapter[Page[Thread]](Page[Thread])


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str]
) -> Iterator[Gateway]:
    with start_gateway(tmp_path_factory, database_url_factory, "sqlite", ["task", "conversation", "agent"]) as gw:
        yield gw


def new_user() -> str:
    return f"ck-{uuid.uuid4().hex[:8]}"


def user_input(text: str) -> UserMessageInput:
    return UserMessageInput(
        content=[UserMessageTextContent(text=text)], attachments=[], inference_options=InferenceOptions()
    )


def send(
    gateway: Gateway, user: str | None, request: BaseModel | bytes, headers: dict[str, str] | None = None
) -> Reply:
    raw = request if isinstance(request, bytes) else request.model_dump_json(by_alias=True).encode()
    return gateway.call("POST", "/chatkit", user=user, raw=raw, headers=headers, timeout=60)


def events_of(reply: Reply) -> list[Any]:
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/event-stream")
    lines = reply.body.decode().splitlines()
    return [EVENTS.validate_json(line[len("data: ") :]) for line in lines if line.startswith("data: ")]


def of_type(events: list[Any], kind: type) -> list[Any]:
    return [event for event in events if isinstance(event, kind)]


def done_items(events: list[Any], kind: type) -> list[Any]:
    return [event.item for event in of_type(events, ThreadItemDoneEvent) if isinstance(event.item, kind)]


def create_thread(gateway: Gateway, user: str, text: str, headers: dict[str, str] | None = None) -> list[Any]:
    return events_of(send(gateway, user, ThreadsCreateReq(params=ThreadCreateParams(input=user_input(text))), headers))


def add_message(gateway: Gateway, user: str, thread_id: str, text: str) -> list[Any]:
    request = ThreadsAddUserMessageReq(params=ThreadAddUserMessageParams(thread_id=thread_id, input=user_input(text)))
    return events_of(send(gateway, user, request))


def list_items(gateway: Gateway, user: str, thread_id: str, order: str, limit: int, after: str | None = None) -> Reply:
    request = ItemsListReq(params=ItemsListParams(thread_id=thread_id, order=order, limit=limit, after=after))  # type: ignore[arg-type]
    return send(gateway, user, request)


def all_items(gateway: Gateway, user: str, thread_id: str, order: str, limit: int) -> list[ThreadItem]:
    items: list[ThreadItem] = []
    after = None
    for _ in range(50):
        reply = list_items(gateway, user, thread_id, order, limit, after)
        assert reply.status == 200, reply
        page = ITEM_PAGE.validate_json(reply.body)
        assert len(page.data) <= limit
        items.extend(page.data)
        if not page.has_more:
            return items
        after = page.after
    raise AssertionError("pagination did not end")


def rest_messages(gateway: Gateway, user: str, conversation_id: int) -> list[dict[str, Any]]:
    return collect(gateway, user, f"/api/{user}/conversations/{conversation_id}/messages", "messages")


def test_a_new_thread_streams_the_turn_and_stores_each_message_once(gateway: Gateway) -> None:
    user = new_user()
    events = create_thread(gateway, user, "add a task to buy groceries")

    created = of_type(events, ThreadCreatedEvent)
    assert [event.thread.id for event in created] == ["thr_1"]  # the conversation's own number
    assert isinstance(events[0], ThreadCreatedEvent)
    assert of_type(events, StreamOptionsEvent)
    assert [item.content[0].text for item in done_items(events, UserMessageItem)] == ["add a task to buy groceries"]

    # The tool call is a workflow item with one task per call, before the streamed answer.
    workflows = done_items(events, WorkflowItem)
    assert len(workflows) == 1 and len(workflows[0].workflow.tasks) == 1
    assert "add_task" in (workflows[0].workflow.tasks[0].content or "")
    answers = done_items(events, AssistantMessageItem)
    assert len(answers) == 1
    deltas = [
        event.update.delta
        for event in of_type(events, ThreadItemUpdatedEvent)
        if isinstance(event.update, AssistantMessageContentPartTextDelta)
    ]
    assert deltas and "".join(deltas) == answers[0].content[0].text
    added = [event.item.id for event in of_type(events, ThreadItemAddedEvent)]
    assert answers[0].id in added and workflows[0].id in added

    # A page refreshes its task list on this effect; the title comes from the first message.
    assert [(event.name, event.data) for event in of_type(events, ClientEffectEvent)] == [
        ("tasks_changed", {"tools": ["add_task"]})
    ]
    titles = [event.thread.title for event in of_type(events, ThreadUpdatedEvent)]
    assert titles and titles[-1] and "groceries" in titles[-1].lower()
    assert not of_type(events, ErrorEvent)

    # Over REST: the task, the conversation with that title, and two messages, each stored once.
    tasks = gateway.call("GET", f"/api/{user}/tasks", user=user).json()["tasks"]
    assert [task["title"].lower() for task in tasks] == ["buy groceries"]
    conversation = gateway.call("GET", f"/api/{user}/conversations/1", user=user).json()
    assert conversation["title"] == titles[-1]
    messages = rest_messages(gateway, user, 1)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "add a task to buy groceries"),
        ("assistant", answers[0].content[0].text),
    ]
    assert [call["name"] for call in messages[1]["tool_calls"]] == ["add_task"]


def test_a_thread_continues_and_lists_its_items_in_both_orders(gateway: Gateway) -> None:
    user = new_user()
    create_thread(gateway, user, "add a task to call mom")
    later = add_message(gateway, user, "thr_1", "what's pending?")
    assert not of_type(later, ThreadCreatedEvent) and not of_type(later, ErrorEvent)
    assert not of_type(later, ClientEffectEvent)  # listing changes nothing
    assert "call mom" in done_items(later, AssistantMessageItem)[0].content[0].text.lower()
    add_message(gateway, user, "1", "add a task to water the plants")  # the bare number works too

    messages = rest_messages(gateway, user, 1)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3  # nothing stored twice
    expected: list[str] = []
    for message in messages:
        if message["tool_calls"]:
            expected.append(f"wf_{message['id']}")
        expected.append(f"msg_{message['id']}")

    for limit in (1, 2, 3, 20):
        ascending = all_items(gateway, user, "thr_1", "asc", limit)
        assert [item.id for item in ascending] == expected, limit
        descending = all_items(gateway, user, "thr_1", "desc", limit)
        assert [item.id for item in descending] == expected[::-1], limit
    user_items = [item for item in ascending if isinstance(item, UserMessageItem)]
    assert [item.content[0].text for item in user_items] == [m["content"] for m in messages if m["role"] == "user"]

    # The whole thread, and the user's threads (the SDK's Thread and Page types).
    reply = send(gateway, user, ThreadsGetByIdReq(params=ThreadGetByIdParams(thread_id="thr_1")))
    assert reply.status == 200, reply
    thread = Thread.model_validate_json(reply.body)
    assert thread.id == "thr_1" and "mom" in (thread.title or "").lower()
    assert [item.id for item in thread.items.data] == expected
    create_thread(gateway, user, "add a task to pay rent")
    listed = THREAD_PAGE.validate_json(send(gateway, user, ThreadsListReq(params=ThreadListParams())).body)
    assert [t.id for t in listed.data] == ["thr_2", "thr_1"] and not listed.has_more
    first = THREAD_PAGE.validate_json(send(gateway, user, ThreadsListReq(params=ThreadListParams(limit=1))).body)
    assert [t.id for t in first.data] == ["thr_2"] and first.has_more
    rest = THREAD_PAGE.validate_json(
        send(gateway, user, ThreadsListReq(params=ThreadListParams(limit=1, after=first.after))).body
    )
    assert [t.id for t in rest.data] == ["thr_1"] and not rest.has_more
    oldest = THREAD_PAGE.validate_json(
        send(gateway, user, ThreadsListReq(params=ThreadListParams(order="asc", limit=1))).body
    )
    assert [t.id for t in oldest.data] == ["thr_1"] and oldest.has_more and oldest.after == "thr_1"


def test_a_retried_create_with_the_same_key_runs_once(gateway: Gateway) -> None:
    user, key = new_user(), uuid.uuid4().hex
    first = create_thread(gateway, user, "add a task to renew passport", {"Idempotency-Key": key})
    again = create_thread(gateway, user, "add a task to renew passport", {"Idempotency-Key": key})
    assert of_type(first, ThreadCreatedEvent)[0].thread.id == of_type(again, ThreadCreatedEvent)[0].thread.id == "thr_1"
    assert (
        done_items(first, AssistantMessageItem)[0].content[0].text
        == done_items(again, AssistantMessageItem)[0].content[0].text
    )
    assert len(gateway.call("GET", f"/api/{user}/tasks", user=user).json()["tasks"]) == 1
    assert len(rest_messages(gateway, user, 1)) == 2


def test_threads_are_renamed_and_deleted_as_conversations(gateway: Gateway) -> None:
    user = new_user()
    create_thread(gateway, user, "hello")
    renamed = send(gateway, user, ThreadsUpdateReq(params=ThreadUpdateParams(thread_id="thr_1", title="Errands")))
    assert renamed.status == 200, renamed
    assert Thread.model_validate_json(renamed.body).title == "Errands"
    assert gateway.call("GET", f"/api/{user}/conversations/1", user=user).json()["title"] == "Errands"
    blank = send(gateway, user, ThreadsUpdateReq(params=ThreadUpdateParams(thread_id="thr_1", title="  ")))
    assert blank.status == 400, blank
    deleted = send(gateway, user, ThreadsDeleteReq(params=ThreadDeleteParams(thread_id="thr_1")))
    assert deleted.status == 200, deleted
    assert gateway.call("GET", f"/api/{user}/conversations/1", user=user).status == 404
    assert send(gateway, user, ThreadsGetByIdReq(params=ThreadGetByIdParams(thread_id="thr_1"))).status == 404


def test_another_users_thread_is_404_and_never_data(gateway: Gateway) -> None:
    alice, bob = new_user(), new_user()
    create_thread(gateway, alice, "add a task to see the dentist")
    requests: list[BaseModel] = [
        ThreadsGetByIdReq(params=ThreadGetByIdParams(thread_id="thr_1")),
        ItemsListReq(params=ItemsListParams(thread_id="thr_1")),
        ThreadsAddUserMessageReq(
            params=ThreadAddUserMessageParams(thread_id="thr_1", input=user_input("delete task 1"))
        ),
        ThreadsUpdateReq(params=ThreadUpdateParams(thread_id="thr_1", title="mine now")),
        ThreadsDeleteReq(params=ThreadDeleteParams(thread_id="thr_1")),
    ]
    for request in requests:
        reply = send(gateway, bob, request)
        assert reply.status == 404, (request.type, reply)  # type: ignore[attr-defined]
        assert b"dentist" not in reply.body
    listed = THREAD_PAGE.validate_json(send(gateway, bob, ThreadsListReq(params=ThreadListParams())).body)
    assert listed.data == []
    # Alice's thread, task and messages are untouched.
    assert [t["title"].lower() for t in gateway.call("GET", f"/api/{alice}/tasks", user=alice).json()["tasks"]] == [
        "see the dentist"
    ]
    assert len(rest_messages(gateway, alice, 1)) == 2
    assert gateway.call("GET", f"/api/{alice}/conversations/1", user=alice).json()["title"] != "mine now"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"type": "threads.nope", "params": {}}',
        b'{"type": "threads.create", "params": {}}',
        b'{"type": "threads.create", "params": {"input": {"content": "hi"}}}',
        b'{"type": "items.list", "params": {"thread_id": 5}}',
        b'{"type": "threads.list", "params": {"limit": "many"}}',
    ],
)
def test_malformed_requests_are_400(gateway: Gateway, body: bytes) -> None:
    reply = send(gateway, new_user(), body)
    assert reply.status == 400, reply
    assert reply.json()["code"] == 3 and reply.json()["message"]


def test_unsupported_requests_and_bad_cursors_are_400(gateway: Gateway) -> None:
    user = new_user()
    upload = AttachmentsCreateReq(params=AttachmentCreateParams(name="a.txt", size=3, mime_type="text/plain"))
    assert send(gateway, user, upload).status == 400
    with_attachment = ThreadsCreateReq(
        params=ThreadCreateParams(
            input=UserMessageInput(
                content=[UserMessageTextContent(text="hi")], attachments=["atc_1"], inference_options=InferenceOptions()
            )
        )
    )
    assert send(gateway, user, with_attachment).status == 400
    assert THREAD_PAGE.validate_json(send(gateway, user, ThreadsListReq(params=ThreadListParams())).body).data == []
    create_thread(gateway, user, "hello")
    assert list_items(gateway, user, "thr_1", "asc", 5, after="garbage").status == 400
    assert send(gateway, user, ThreadsListReq(params=ThreadListParams(after="garbage"))).status == 400
    assert send(gateway, user, ThreadsGetByIdReq(params=ThreadGetByIdParams(thread_id="thread-1"))).status == 404


def test_an_empty_or_too_long_message_is_400_and_stores_nothing(gateway: Gateway) -> None:
    user = new_user()
    for text in ("   ", "x" * 8001):
        assert send(gateway, user, ThreadsCreateReq(params=ThreadCreateParams(input=user_input(text)))).status == 400
    assert gateway.call("GET", f"/api/{user}/conversations", user=user).json()["conversations"] == []
    create_thread(gateway, user, "hello")
    request = ThreadsAddUserMessageReq(params=ThreadAddUserMessageParams(thread_id="thr_1", input=user_input("")))
    reply = send(gateway, user, request)
    assert reply.status == 400 and "empty" in reply.json()["message"], reply
    assert len(rest_messages(gateway, user, 1)) == 2


def test_a_failed_turn_is_an_error_event(gateway: Gateway) -> None:
    user, key = new_user(), uuid.uuid4().hex
    create_thread(gateway, user, "add a task to buy bread", {"Idempotency-Key": key})
    # The same key for another message is the client's mistake: the turn refuses it in the stream.
    request = ThreadsAddUserMessageReq(params=ThreadAddUserMessageParams(thread_id="thr_1", input=user_input("hi")))
    events = events_of(send(gateway, user, request, {"Idempotency-Key": key}))
    errors = of_type(events, ErrorEvent)
    assert len(errors) == 1 and "idempotency" in (errors[0].message or "").lower(), events
    assert not errors[0].allow_retry
    assert len(rest_messages(gateway, user, 1)) == 2


def test_no_token_is_401_and_a_bad_one_too(gateway: Gateway) -> None:
    request = ThreadsListReq(params=ThreadListParams())
    missing = send(gateway, None, request)
    assert missing.status == 401, missing
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["code"] == 16
    forged = gateway.call(
        "POST", "/chatkit", bearer=gateway.token("alice") + "x", raw=request.model_dump_json().encode()
    )
    assert forged.status == 401, forged
    twice = gateway.call(
        "POST",
        "/chatkit",
        raw=request.model_dump_json().encode(),
        headers={"Authorization": f"Bearer {gateway.token('alice')}, Bearer {gateway.token('bob')}"},
    )
    assert twice.status == 401, twice


def test_turns_spend_the_chat_rate_limit(gateway: Gateway) -> None:
    """RATE_LIMIT_CHAT_PER_MINUTE (30, bursts up to the minute's budget) holds for ChatKit turns too."""
    user = new_user()
    request = ThreadsCreateReq(params=ThreadCreateParams(input=user_input("hi")))
    allowed = 0
    for _ in range(40):
        reply = send(gateway, user, request)
        if reply.status == 429:
            break
        assert reply.status == 200, reply
        allowed += 1
    assert reply.status == 429 and allowed >= 30, (allowed, reply)
    assert int(reply.headers["retry-after"]) >= 1
    # Reads are not turns: listing threads still works.
    assert send(gateway, user, ThreadsListReq(params=ThreadListParams(limit=1))).status == 200
