"""The chat routes through real Envoy, with the scripted model: how a turn's outcomes and the
model's failures look to a REST client (statuses, JSON bodies, server-sent events).

The agent's behaviour itself is tested over gRPC in test_agent.py; the happy paths with the
built-in model are in test_gateway.py.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import chat_server as model
from tests.chat_server import ChatServer
from tests.gateway_fixtures import Gateway, Reply, start_gateway
from tests.test_agent import task_result

LLM_TIMEOUT_SECONDS = 2
MAX_STEPS = 3


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str], chat: ChatServer
) -> Iterator[Gateway]:
    extra_env = {
        "LLM_BASE_URL": chat.base_url,
        "LLM_API_KEY": "test-key",
        "LLM_TIMEOUT_SECONDS": str(LLM_TIMEOUT_SECONDS),
        "LLM_MAX_RETRIES": "1",
        "AGENT_MAX_STEPS": str(MAX_STEPS),
    }
    with start_gateway(
        tmp_path_factory, database_url_factory, "sqlite", ["task", "conversation", "agent"], extra_env
    ) as started:
        yield started


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def events_of(reply: Reply) -> list[dict[str, Any]]:
    lines = reply.body.decode().splitlines()
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]


def chat_once(gateway: Gateway, user: str, message: str, stream: bool = False) -> Reply:
    path = f"/api/{user}/chat/stream" if stream else f"/api/{user}/chat"
    return gateway.call("POST", path, user=user, body={"message": message}, timeout=60)


def test_a_turn_as_json(gateway: Gateway, chat: ChatServer) -> None:
    user, key = new_user(), uuid.uuid4().hex
    chat.script(
        key, model.tool_calls(model.call("add_task", {"title": "Buy milk"})), model.text("Added task 1: Buy milk.")
    )

    reply = chat_once(gateway, user, f"add milk [[{key}]]")

    assert reply.status == 200, reply
    assert reply.json() == {
        "conversation_id": 1,
        "response": "Added task 1: Buy milk.",
        "tool_calls": [
            {
                "name": "add_task",
                "arguments": {"title": "Buy milk"},
                "result": task_result(1, "created", "Buy milk"),
            }
        ],
        "message_id": 2,
    }
    # message_id names the stored assistant message
    stored = gateway.call("GET", f"/api/{user}/conversations/1/messages", user=user).json()["messages"]
    assert [(m["id"], m["role"]) for m in stored] == [(1, "user"), (2, "assistant")]


def test_model_unavailable_is_503(gateway: Gateway, chat: ChatServer) -> None:
    user, key = new_user(), uuid.uuid4().hex
    chat.script(key, then=model.error(500, {"retry-after-ms": "10"}))

    reply = chat_once(gateway, user, f"hi [[{key}]]")

    assert reply.status == 503, reply
    assert reply.json() == {"code": 14, "message": "the model is unavailable; try again later", "details": []}


def test_model_hanging_is_504_within_the_bound(gateway: Gateway, chat: ChatServer) -> None:
    user, key = new_user(), uuid.uuid4().hex
    chat.script(key, then=model.hang(30))

    started = time.monotonic()
    reply = chat_once(gateway, user, f"hi [[{key}]]")

    assert reply.status == 504, reply
    assert reply.json()["code"] == 4
    assert f"did not answer within {LLM_TIMEOUT_SECONDS} s" in reply.json()["message"]
    assert time.monotonic() - started < LLM_TIMEOUT_SECONDS * MAX_STEPS + 5


def test_stream_is_events_and_a_failure_is_its_last_event(gateway: Gateway, chat: ChatServer) -> None:
    user, key = new_user(), uuid.uuid4().hex
    chat.script(key, model.text("Hello there, friend."), model.stall("Thinking", 30))

    good = chat_once(gateway, user, f"hi [[{key}]]", stream=True)
    failed = chat_once(gateway, user, f"and now? [[{key}]]", stream=True)

    assert good.status == 200 and good.headers["content-type"].startswith("text/event-stream")
    good_events = events_of(good)
    assert "".join(event["delta"] for event in good_events[:-1]) == "Hello there, friend."
    assert good_events[-1]["done"]["response"] == "Hello there, friend."
    # The HTTP status was sent with the first delta: the failure arrives inside the stream.
    assert failed.status == 200, failed
    failed_events = events_of(failed)
    assert "".join(event["delta"] for event in failed_events[:-1]) == "Thinking"
    assert set(failed_events[-1]) == {"error"}
    assert failed_events[-1]["error"]["code"] == 4
