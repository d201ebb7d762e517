"""A chat turn's limits and what a failing model server leaves behind (issues 13 and 20).

Real agent, task and conversation services as processes; the model is the scripted Chat
Completions server over real HTTP (tests/chat_server.py), which refuses `"content": null`
the way llama.cpp's server does.

- Tool budget: at most AGENT_MAX_TOOL_CALLS_PER_STEP calls of one step and
  AGENT_MAX_TOOL_CALLS_PER_TURN per turn run; the rest are tool errors; after the user's write
  budget answers RESOURCE_EXHAUSTED, no further write is attempted in that turn.
- Interop: a tool-calling turn works against a server that rejects null content; a request the
  server calls invalid (400/422, or a 500 saying so) is not retried and is logged once with its
  status and body; a turn whose model fails after a tool ran stores the tool calls and names
  them in the error.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from tests import chat_server as model
from tests.chat_server import ChatServer
from tests.support import ServiceProcess, free_port
from tests.test_agent import ask, new_key, new_user, only_conversation, rpc_error, stored_messages, user_tasks
from todo.v1 import agent_pb2_grpc, conversation_pb2_grpc, task_pb2_grpc

PER_STEP = 20
PER_TURN = 50
WRITES_PER_MINUTE = 60
FRUGAL_WRITES_PER_MINUTE = 6


class Limited:
    """The stack of this module: small budgets so that the tests can reach them."""

    def __init__(self, agent: agent_pb2_grpc.AgentServiceStub, tasks: Any, conversations: Any, log: Path) -> None:
        self.agent, self.tasks, self.conversations, self.agent_log = agent, tasks, conversations, log


@contextmanager
def limited_stack(base_env: dict[str, str], state: Path, chat: ChatServer, writes_per_minute: int) -> Iterator[Limited]:
    env = {
        **base_env,
        "TASK_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "CONVERSATION_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "TASK_DATABASE_URL": f"sqlite+aiosqlite:///{state / 'tasks.db'}",
        "CONVERSATION_DATABASE_URL": f"sqlite+aiosqlite:///{state / 'conversations.db'}",
        "RATE_LIMIT_WRITES_PER_MINUTE": str(writes_per_minute),
    }
    agent_env = {
        **env,
        "AGENT_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "AGENT_HTTP_PORT": str(free_port()),
        "LLM_BASE_URL": chat.base_url,
        "LLM_MODEL": "scripted-model",
        "LLM_API_KEY": "test-key",
        "LLM_MAX_RETRIES": "2",
        "AGENT_MAX_STEPS": "5",
        "AGENT_MAX_TOOL_CALLS_PER_STEP": str(PER_STEP),
        "AGENT_MAX_TOOL_CALLS_PER_TURN": str(PER_TURN),
    }
    processes = [
        ServiceProcess("task_service", env, env["TASK_SERVICE_ADDR"], state),
        ServiceProcess("conversation_service", env, env["CONVERSATION_SERVICE_ADDR"], state),
        ServiceProcess("agent_service", agent_env, agent_env["AGENT_SERVICE_ADDR"], state),
    ]
    for process in processes:
        process.start(120)
    channels = [grpc.insecure_channel(process.address) for process in processes]
    yield Limited(
        agent_pb2_grpc.AgentServiceStub(channels[2]),
        task_pb2_grpc.TaskServiceStub(channels[0]),
        conversation_pb2_grpc.ConversationServiceStub(channels[1]),
        processes[2].log_path,
    )
    for opened in channels:
        opened.close()
    for process in processes:
        process.stop()


@pytest.fixture(scope="module")
def limited(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, chat: ChatServer) -> Iterator[Limited]:
    with limited_stack(base_env, tmp_path_factory.mktemp("limits"), chat, WRITES_PER_MINUTE) as stack:
        yield stack


@pytest.fixture(scope="module")
def frugal(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, chat: ChatServer) -> Iterator[Limited]:
    """A write budget that refills slowly (one write every 10 s), so a test can spend it exactly."""
    with limited_stack(base_env, tmp_path_factory.mktemp("frugal"), chat, FRUGAL_WRITES_PER_MINUTE) as stack:
        yield stack


def adds(count: int, prefix: str, one_event: bool = False) -> dict[str, Any]:
    calls = (model.call("add_task", {"title": f"{prefix} {n}"}) for n in range(count))
    return model.tool_calls(*calls, one_event=one_event)


def errors(reply: Any) -> list[str]:
    return [call.error for call in reply.tool_calls if call.HasField("error")]


def log_records(path: Path, message: str) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("msg") == message:
            records.append(record)
    return records


# --- the tool budget ---------------------------------------------------------------------


def test_one_step_runs_at_most_the_per_step_budget(limited: Limited, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(key, adds(PER_STEP + 7, "item"), model.text("Added what I could."))

    reply = ask(limited.agent, user, f"add lots [[{key}]]")

    assert len(reply.tool_calls) == PER_STEP + 7
    refused = errors(reply)
    assert len(refused) == 7 and all(f"at most {PER_STEP} tool calls per step" in error for error in refused)
    assert len(user_tasks(limited, user)) == PER_STEP
    # The model is told what ran and that the rest did not (one refusal, naming how many more),
    # so it can explain; its next request does not carry all the calls it asked for.
    second = chat.received(key)[1].messages
    tool_messages = [m for m in second if m["role"] == "tool"]
    assert len(tool_messages) == PER_STEP + 1
    assert "not run" in tool_messages[-1]["content"] and "6 more calls of this step" in tool_messages[-1]["content"]
    echoed = next(m for m in second if m["role"] == "assistant" and m.get("tool_calls"))
    assert len(echoed["tool_calls"]) == PER_STEP + 1


@pytest.mark.parametrize("one_event", [False, True], ids=["call-by-call", "all-in-one-event"])
def test_a_step_asking_for_a_thousand_calls_is_answered_and_stored_within_bounds(
    limited: Limited, chat: ChatServer, one_event: bool
) -> None:
    """The attack of issue 20: the turn is answered (not a 5xx, not a broken connection); the
    model's answer is read only up to the calls that can run and the refusals worth recording
    (also when the server sends all thousand in one event); what is stored keeps within
    conversation_service's 100 tool calls; the text says the rest were not carried out, and the
    refusals are audited in one record, not one each."""
    user, key = new_user(), new_key()
    chat.script(key, adds(1000, "x", one_event), model.text("Some of them."))

    reply = ask(limited.agent, user, f"add a thousand [[{key}]]")

    assert len(user_tasks(limited, user)) == PER_STEP
    assert len(reply.tool_calls) == 40  # 20 ran, 20 refusals recorded; the rest were not read
    assert json_format.MessageToDict(reply.tool_calls[-1].arguments) == {"title": "x 39"}
    assert reply.response.startswith("Some of them.")
    assert "More requested actions were not carried out: too many at once." in reply.response
    stored = stored_messages(limited, user, reply.conversation_id)
    assert [m.role for m in stored] == ["user", "assistant"] and len(stored[1].tool_calls) == 40
    # The model hears of its 20 runs and one refusal that speaks for the rest.
    tool_messages = [m for m in chat.received(key)[1].messages if m["role"] == "tool"]
    assert len(tool_messages) == PER_STEP + 1
    assert "19 more calls of this step were not run either, nor any after them" in tool_messages[-1]["content"]
    refusals = [
        record
        for record in log_records(limited.agent_log, "tool_call")
        if record.get("user") == user and record.get("outcome") == "refused"
    ]
    assert [(r["tool"], r["reason"], r["calls"]) for r in refusals] == [("add_task", "tool_budget", 20)]


def test_a_turn_runs_at_most_the_per_turn_budget(limited: Limited, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(key, adds(PER_STEP, "a"), adds(PER_STEP, "b"), adds(PER_STEP, "c"), model.text("Done."))

    reply = ask(limited.agent, user, f"add them all [[{key}]]")

    assert len(reply.tool_calls) == 3 * PER_STEP
    assert len(errors(reply)) == 3 * PER_STEP - PER_TURN
    assert all(f"at most {PER_TURN} tool calls per turn" in error for error in errors(reply))
    assert len(user_tasks(limited, user)) == PER_TURN


def test_after_the_write_budget_is_spent_no_further_write_is_attempted(frugal: Limited, chat: ChatServer) -> None:
    user, key, spend = new_user(), new_key(), new_key()
    # A budget of 6 writes refilling one every 10 s: spend 3, leaving 3 (and what trickles back).
    chat.script(spend, adds(3, "spend"), model.text("ok"))
    started = time.monotonic()
    ask(frugal.agent, user, f"spend [[{spend}]]")
    chat.script(key, adds(PER_STEP, "late"), adds(5, "later"), model.text("Some failed."))

    reply = ask(frugal.agent, user, f"add more [[{key}]]")

    refilled = int((time.monotonic() - started) // 10) + 1
    refused = errors(reply)
    created = [call for call in reply.tool_calls if not call.HasField("error")]
    assert 3 <= len(created) <= 3 + refilled
    # The first refusals (at most the calls already in flight, AGENT_TOOL_CONCURRENCY = 4) are the
    # service's; every later write was not attempted, and says so.
    not_attempted = [error for error in refused if error.startswith("not run: the user's write budget is spent")]
    rate_limited = [error for error in refused if error not in not_attempted and "rate limit" in error.lower()]
    assert 1 <= len(rate_limited) <= 4
    # At most 20 refusals are stored one by one; the answer counts the rest.
    more = re.search(r"\((\d+) more requested actions were not carried out", reply.response)
    uncounted = int(more.group(1)) if more else 0
    assert len(created) + len(rate_limited) + len(not_attempted) + uncounted == PER_STEP + 5
    assert reply.response.startswith("Some failed.")


# --- interop: what real model servers do ---------------------------------------------------


def test_tool_turn_works_with_a_server_that_rejects_null_content(limited: Limited, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(key, model.tool_calls(model.call("add_task", {"title": "Buy milk"})), model.text("Added."))

    reply = ask(limited.agent, user, f"add buy milk [[{key}]]")

    assert reply.response == "Added."
    assert [task.title for task in user_tasks(limited, user)] == ["Buy milk"]
    second = chat.received(key)[1].messages
    assistant = next(m for m in second if m["role"] == "assistant" and m.get("tool_calls"))
    assert assistant["content"] == ""
    # and the next turn, whose history holds that tool call, works too
    key2 = new_key()
    chat.script(key2, model.text("You have one task."))
    conversation_id = only_conversation(limited, user)
    assert ask(limited.agent, user, f"what now [[{key2}]]", conversation_id=conversation_id).response


@pytest.mark.parametrize(
    ("status", "message"),
    [(400, "bad request"), (422, "unprocessable"), (500, "Input should be a valid string")],
)
def test_a_request_the_server_calls_invalid_is_not_retried_and_is_logged(
    limited: Limited, chat: ChatServer, status: int, message: str
) -> None:
    user, key = new_user(), new_key()
    chat.script(key, then=model.error(status, message=message))

    error = rpc_error(lambda: ask(limited.agent, user, f"hi [[{key}]]"))

    assert error.code() == grpc.StatusCode.INTERNAL
    assert f"HTTP {status}" in error.details()
    assert len(chat.received(key)) == 1
    logged = [r for r in log_records(limited.agent_log, "model request failed") if message in r.get("body", "")]
    assert len(logged) == 1
    assert logged[0]["status"] == status and logged[0]["model"] == "scripted-model"
    assert "hi [[" not in json.dumps(logged[0])  # no message contents in the log


def test_a_server_error_is_retried_and_each_failure_logged(limited: Limited, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(key, model.error(503, {"retry-after-ms": "10"}, message="overloaded"), model.text("Hello!"))

    assert ask(limited.agent, user, f"hi [[{key}]]").response == "Hello!"
    assert len(chat.received(key)) == 2
    logged = [r for r in log_records(limited.agent_log, "model request failed") if "overloaded" in r.get("body", "")]
    assert [r["status"] for r in logged] == [503]


def test_a_turn_whose_model_fails_after_a_tool_ran_keeps_the_tool_calls(limited: Limited, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    message = f"add buy bread [[{key}]]"
    chat.script(
        key,
        model.tool_calls(model.call("add_task", {"title": "Buy bread"})),
        then=model.error(500, {"retry-after-ms": "10"}, message="backend crashed"),
    )

    error = rpc_error(lambda: ask(limited.agent, user, message, key=key))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "some actions were carried out" in error.details()
    assert "created task 1: Buy bread" in error.details()
    conversation_id = only_conversation(limited, user)
    stored = stored_messages(limited, user, conversation_id)
    assert [m.role for m in stored] == ["user", "assistant"]
    assert [call.name for call in stored[1].tool_calls] == ["add_task"]
    assert "did not finish" in stored[1].content
    # A retry with the same key replays what happened: the tool does not run twice.
    replayed = ask(limited.agent, user, message, key=key)
    assert [call.name for call in replayed.tool_calls] == ["add_task"]
    assert [task.title for task in user_tasks(limited, user)] == ["Buy bread"]


# --- idempotency keys are the user's -----------------------------------------------------


def test_a_key_retried_with_another_conversation_replays_the_first_answer(limited: Limited, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(key, model.tool_calls(model.call("add_task", {"title": "Pay rent"})), model.text("Added."))
    message = f"add pay rent [[{key}]]"
    first = ask(limited.agent, user, message, key=key)
    other_key = new_key()
    chat.script(other_key, model.text("Hi."))
    other = ask(limited.agent, user, f"hello [[{other_key}]]")
    assert other.conversation_id != first.conversation_id

    again = ask(limited.agent, user, message, key=key, conversation_id=other.conversation_id)
    without = ask(limited.agent, user, message, key=key)

    for replayed in (again, without):
        assert replayed.conversation_id == first.conversation_id
        assert replayed.message_id == first.message_id
        assert [call.name for call in replayed.tool_calls] == ["add_task"]
    assert [task.title for task in user_tasks(limited, user)] == ["Pay rent"]
    assert len(chat.received(key)) == 2  # the model ran for the first attempt only
    assert [m.role for m in stored_messages(limited, user, other.conversation_id)] == ["user", "assistant"]


# --- planning through a real model's tool call --------------------------------------------


def test_a_model_passing_a_due_phrase_gets_the_absolute_date_back(limited: Limited, chat: ChatServer) -> None:
    """The model passes the user's words (`due="next friday"`), never a date it worked out; the
    tool result it reads back (and the user sees) names the day task_service understood."""
    user, key = new_user(), new_key()
    before = coming_friday()
    chat.script(
        key, model.tool_calls(model.call("add_task", {"title": "Pay rent", "due": "next friday"})), model.text("Added.")
    )

    reply = ask(limited.agent, user, f"pay rent by next friday [[{key}]]")

    result = json_format.MessageToDict(reply.tool_calls[0].result)
    assert result["due_date"] in {before, coming_friday()}  # the day may turn during the call
    assert result["title"] == "Pay rent" and result["status"] == "created"
    told = [m for m in chat.received(key)[1].messages if m["role"] == "tool"]
    assert json.loads(told[0]["content"])["due_date"] == result["due_date"]
    system = chat.received(key)[0].messages[0]["content"]
    assert "in the user's timezone (UTC); today is 20" in system  # the model is told the user's date


def coming_friday() -> str:
    today = datetime.now(UTC).date()
    return (today + timedelta(days=(4 - today.weekday()) % 7 or 7)).isoformat()
