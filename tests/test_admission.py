"""Admission control for chat turns (issue 19's overload, issue 20's one user taking everything).

Real services and Envoy; the model is the scripted Chat Completions server over real HTTP, told
to take its time so that turns stay in progress while the test sends more. The stack admits
two turns at a time (AGENT_MAX_TURNS_IN_PROGRESS) and one per user (AGENT_MAX_TURNS_PER_USER):

- a user's second turn in parallel is 429 with Retry-After, and nothing of it is stored;
- with every slot taken, Envoy refuses the next turn itself: 503, Retry-After, the JSON error
  shape; the agent, asked directly over gRPC, refuses too (UNAVAILABLE, retry-after);
- slots come back: after the slow turns answer, and after a turn that failed before it started
  or was answered from its Idempotency-Key.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from tests import chat_server as model
from tests.chat_server import ChatServer
from tests.gateway_fixtures import NO_RATE_LIMITS, Gateway, Reply, start_gateway
from tests.support import auth_metadata
from todo.v1 import agent_pb2, agent_pb2_grpc

SLOW_SECONDS = 3.0  # the scripted model's time for a held turn: long enough to send more beside it


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str], chat: ChatServer
) -> Iterator[Gateway]:
    extra_env = {
        **NO_RATE_LIMITS,
        "LLM_BASE_URL": chat.base_url,
        "LLM_API_KEY": "test-key",
        "LLM_MAX_RETRIES": "0",
        "AGENT_MAX_TURNS_IN_PROGRESS": "2",
        "AGENT_MAX_TURNS_PER_USER": "1",
        "AGENT_ADMISSION_WAIT_SECONDS": "0.05",
    }
    with start_gateway(tmp_path_factory, database_url_factory, "sqlite", extra_env=extra_env) as started:
        yield started


def new_user() -> str:
    return f"adm-{uuid.uuid4().hex[:8]}"


def chat_turn(gateway: Gateway, user: str, message: str, **body: Any) -> Reply:
    return gateway.call("POST", f"/api/{user}/chat", user=user, body={"message": message, **body}, timeout=60)


class Held:
    """A turn kept in progress by a slow model, sent from a thread; `.reply` once it answered."""

    def __init__(self, gateway: Gateway, chat: ChatServer, user: str) -> None:
        self.key = uuid.uuid4().hex[:12]
        chat.script(self.key, model.delayed(SLOW_SECONDS, model.text("Done slowly.")))
        self.reply: Reply | None = None
        self._thread = threading.Thread(target=self._send, args=(gateway, user), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not chat.received(self.key):  # the turn has reached the model: it holds its slot
            assert time.monotonic() < deadline, "the held turn never reached the model"
            time.sleep(0.02)

    def _send(self, gateway: Gateway, user: str) -> None:
        self.reply = chat_turn(gateway, user, f"take your time [[{self.key}]]")

    def answered(self) -> Reply:
        self._thread.join(60)
        assert self.reply is not None
        return self.reply


def quick_turn(chat: ChatServer, gateway: Gateway, user: str) -> Reply:
    key = uuid.uuid4().hex[:12]
    chat.script(key, model.text("Hello."))
    return chat_turn(gateway, user, f"hi [[{key}]]")


def conversations_of(gateway: Gateway, user: str) -> list[Any]:
    reply = gateway.call("GET", f"/api/{user}/conversations", user=user)
    assert reply.status == 200, reply
    return list(reply.json()["conversations"])


def test_a_users_second_turn_in_parallel_is_429_with_retry_after(gateway: Gateway, chat: ChatServer) -> None:
    user = new_user()
    held = Held(gateway, chat, user)

    refused = chat_turn(gateway, user, "and another thing")

    assert refused.status == 429, refused
    assert refused.headers["Retry-After"] == "1"
    assert "at a time" in refused.json()["message"]
    assert held.answered().status == 200
    # Only the held turn's conversation exists: the refused one stored nothing.
    assert len(conversations_of(gateway, user)) == 1
    assert quick_turn(chat, gateway, user).status == 200  # the slot came back


def test_with_every_slot_taken_the_gateway_answers_503_with_retry_after(gateway: Gateway, chat: ChatServer) -> None:
    first, second, late = new_user(), new_user(), new_user()
    held = [Held(gateway, chat, first), Held(gateway, chat, second)]

    refused = chat_turn(gateway, late, "anyone there?")

    assert refused.status == 503, refused
    assert refused.headers["Retry-After"] == "1"
    assert refused.json() == {
        "code": 14,
        "message": "the service is busy right now; try again in a moment",
        "details": [],
    }
    assert conversations_of(gateway, late) == []
    assert [turn.answered().status for turn in held] == [200, 200]
    assert quick_turn(chat, gateway, late).status == 200


def test_the_agent_itself_refuses_when_its_slots_are_taken(gateway: Gateway, chat: ChatServer) -> None:
    """Behind Envoy's bound, the agent's own: a caller reaching it directly (or through another
    path) is refused at once with UNAVAILABLE and a retry-after."""
    held = [Held(gateway, chat, new_user()), Held(gateway, chat, new_user())]
    direct = new_user()
    with grpc.insecure_channel(gateway.env["AGENT_SERVICE_ADDR"]) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        request = agent_pb2.ChatRequest(user_id=direct, message="hello?")
        with pytest.raises(grpc.RpcError) as raised:
            stub.Chat(request, metadata=auth_metadata(direct), timeout=30)
    error = raised.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert ("retry-after", "1") in tuple(error.trailing_metadata())  # type: ignore[attr-defined]
    assert [turn.answered().status for turn in held] == [200, 200]


def test_a_turn_that_fails_before_it_starts_gives_its_slot_back(gateway: Gateway, chat: ChatServer) -> None:
    user = new_user()
    for _ in range(3):  # one slot per user: a leaked slot would make the next turn a 429
        missing = chat_turn(gateway, user, "hello", conversation_id=999)
        assert missing.status == 404, missing
    assert quick_turn(chat, gateway, user).status == 200


def test_a_replayed_answer_gives_its_slot_back(gateway: Gateway, chat: ChatServer) -> None:
    user, key = new_user(), uuid.uuid4().hex[:12]
    chat.script(key, model.text("Once."))
    headers = {"Idempotency-Key": key}
    body = {"message": f"only once [[{key}]]"}
    for _ in range(3):
        reply = gateway.call("POST", f"/api/{user}/chat", user=user, body=body, headers=headers, timeout=60)
        assert reply.status == 200, reply
        assert reply.json()["response"] == "Once."
    assert len(chat.received(key)) == 1  # answered from the key, the model asked once
    assert quick_turn(chat, gateway, user).status == 200
