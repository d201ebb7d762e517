"""The stateless claim: a conversation goes on after every service restarted.

Through Envoy with the built-in model on PostgreSQL. No process keeps conversation state: after
task_service, conversation_service and agent_service all restart, the next turn still
understands references to what was said before ("the second one", "it"), because every turn is
rebuilt from what conversation_service stored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from scripts.stack import http_status
from tests.gateway_fixtures import Gateway, start_gateway


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str]
) -> Iterator[Gateway]:
    with start_gateway(tmp_path_factory, database_url_factory, "postgres") as gateway:
        yield gateway


def chat(gateway: Gateway, user: str, message: str, conversation_id: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    reply = gateway.call("POST", f"/api/{user}/chat", user=user, body=body, timeout=60)
    assert reply.status == 200, reply
    return dict(reply.json())


def tasks(gateway: Gateway, user: str) -> list[tuple[str, bool]]:
    reply = gateway.call("GET", f"/api/{user}/tasks", user=user)
    assert reply.status == 200, reply
    return [(task["title"], task["completed"]) for task in reply.json()["tasks"]]


def restart_every_service(gateway: Gateway) -> None:
    for name in ("task", "conversation", "agent"):
        gateway.stack.component(name).restart()
    deadline = time.monotonic() + 30
    while http_status(gateway.base_url + "/readyz") != 200:
        assert time.monotonic() < deadline, "the gateway never saw every service SERVING again"
        time.sleep(0.2)


def test_a_conversation_resumes_after_every_service_restarts(gateway: Gateway) -> None:
    user = f"stateless-{uuid.uuid4().hex[:8]}"
    first = chat(gateway, user, "add buy milk")
    conversation_id = first["conversation_id"]
    chat(gateway, user, "also add walk the dog", conversation_id)
    shown = chat(gateway, user, "show my tasks", conversation_id)
    assert "Buy milk" in shown["response"] and "Walk the dog" in shown["response"]

    restart_every_service(gateway)

    # "the second one" can only be resolved from the list shown before the restart.
    chat(gateway, user, "mark the second one as done", conversation_id)
    assert tasks(gateway, user) == [("Buy milk", False), ("Walk the dog", True)]
    # "it" is the task acted on last, also from the stored history.
    chat(gateway, user, "delete it", conversation_id)
    assert tasks(gateway, user) == [("Buy milk", False)]

    history = gateway.call("GET", f"/api/{user}/conversations/{conversation_id}/messages", user=user)
    assert history.status == 200, history
    roles = [message["role"] for message in history.json()["messages"]]
    assert roles == ["user", "assistant"] * 5


def test_a_new_conversation_after_the_restart_does_not_inherit_context(gateway: Gateway) -> None:
    user = f"fresh-{uuid.uuid4().hex[:8]}"
    first = chat(gateway, user, "add call the plumber")
    restart_every_service(gateway)
    fresh = chat(gateway, user, "delete it")  # a new conversation: "it" refers to nothing here
    assert fresh["conversation_id"] != first["conversation_id"]
    assert tasks(gateway, user) == [("Call the plumber", False)]
