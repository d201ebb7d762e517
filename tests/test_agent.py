"""AgentService end to end: the real agent, task and conversation services as processes, and a
real HTTP Chat Completions server (tests/chat_server.py) scripted per test.

Each test puts a `[[key]]` marker in its user messages; the scripted model answers that key's
replies and records what it received, so the tests check both sides: what the user gets back
and what the model was sent.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from agent_service import tools
from agent_service.prompt import SYSTEM_PROMPT
from tests import chat_server as model
from tests.chat_server import ChatServer
from tests.support import ServiceProcess, auth_metadata, free_port
from todo.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    conversation_pb2,
    conversation_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

TIMEOUT = 60  # generous: the machine is shared
QUICK_TIMEOUT_SECONDS = 1
QUICK_MAX_STEPS = 3


@dataclass
class Stack:
    """The services and a client for each. `agent` is the normal agent; the sqlite stack also has
    `quick` (1 s model timeout, 3 steps), `builtin` (no LLM_BASE_URL: the built-in model) and
    `orphan` (its task_service address has nothing listening)."""

    agent: agent_pb2_grpc.AgentServiceStub
    tasks: task_pb2_grpc.TaskServiceStub
    conversations: conversation_pb2_grpc.ConversationServiceStub
    quick: agent_pb2_grpc.AgentServiceStub | None = None
    builtin: agent_pb2_grpc.AgentServiceStub | None = None
    orphan: agent_pb2_grpc.AgentServiceStub | None = None


def _agent_env(env: dict[str, str], chat: ChatServer, **overrides: str) -> dict[str, str]:
    return {
        **env,
        "AGENT_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "AGENT_HTTP_PORT": str(free_port()),
        "LLM_BASE_URL": chat.base_url,
        "LLM_MODEL": "scripted-model",
        "LLM_API_KEY": "test-key",
        "LLM_TIMEOUT_SECONDS": "20",
        "AGENT_MAX_STEPS": "4",
        "LLM_MAX_RETRIES": "2",
        **overrides,
    }


@pytest.fixture(scope="module")
def stack_factory(
    base_env: dict[str, str],
    database_url_factory: Callable[[str, str], str],
    log_dir: Path,
    chat: ChatServer,
) -> Iterator[Callable[[str, bool], Stack]]:
    """make(backend, with_extra_agents) -> a running stack; everything stops at the module's end."""
    started: list[ServiceProcess] = []
    channels: list[grpc.Channel] = []

    def make(backend: str, with_extra_agents: bool) -> Stack:
        env = {
            **base_env,
            "TASK_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
            "CONVERSATION_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
            "TASK_DATABASE_URL": database_url_factory(backend, "agent_tasks"),
            "CONVERSATION_DATABASE_URL": database_url_factory(backend, "agent_conversations"),
        }
        agents = {"agent": _agent_env(env, chat)}
        if with_extra_agents:
            agents["quick"] = _agent_env(
                env,
                chat,
                LLM_TIMEOUT_SECONDS=str(QUICK_TIMEOUT_SECONDS),
                AGENT_MAX_STEPS=str(QUICK_MAX_STEPS),
                LLM_MAX_RETRIES="1",
            )
            agents["builtin"] = _agent_env(env, chat, LLM_BASE_URL="")
            agents["orphan"] = _agent_env(env, chat, TASK_SERVICE_ADDR=f"127.0.0.1:{free_port()}")
        processes = [
            ServiceProcess("task_service", env, env["TASK_SERVICE_ADDR"], log_dir),
            ServiceProcess("conversation_service", env, env["CONVERSATION_SERVICE_ADDR"], log_dir),
            *(
                ServiceProcess("agent_service", agent, agent["AGENT_SERVICE_ADDR"], log_dir)
                for agent in agents.values()
            ),
        ]
        started.extend(processes)
        with ThreadPoolExecutor(len(processes)) as pool:  # start together: most of the time is imports
            for future in [pool.submit(process.start, 120) for process in processes]:
                future.result()

        def open_channel(address: str) -> grpc.Channel:
            opened = grpc.insecure_channel(address)
            channels.append(opened)
            return opened

        stubs = {
            name: agent_pb2_grpc.AgentServiceStub(open_channel(agent["AGENT_SERVICE_ADDR"]))
            for name, agent in agents.items()
        }
        return Stack(
            tasks=task_pb2_grpc.TaskServiceStub(open_channel(env["TASK_SERVICE_ADDR"])),
            conversations=conversation_pb2_grpc.ConversationServiceStub(open_channel(env["CONVERSATION_SERVICE_ADDR"])),
            **stubs,
        )

    try:
        yield make
    finally:
        for opened in channels:
            opened.close()
        with ThreadPoolExecutor(max(1, len(started))) as pool:
            list(pool.map(lambda process: process.stop(), started))


@pytest.fixture(scope="module")
def stack(stack_factory: Callable[[str, bool], Stack]) -> Stack:
    return stack_factory("sqlite", True)


@pytest.fixture(scope="module")
def pg_stack(stack_factory: Callable[[str, bool], Stack]) -> Stack:
    return stack_factory("postgres", False)


@pytest.fixture(params=["sqlite", "postgres"])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """For the core scenarios, run on both database backends."""
    name = "stack" if request.param == "sqlite" else "pg_stack"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def task_result(task_id: int, status: str, title: str, **planning: Any) -> dict[str, Any]:
    """A task tool's result: the task and what was resolved (no due date, no priority, no tags by default)."""
    return {
        "task_id": task_id,
        "status": status,
        "title": title,
        "due_date": "",
        "due_time": "",
        "priority": "none",
        "tags": [],
        **planning,
    }


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def new_key() -> str:
    return uuid.uuid4().hex[:12]


def ask(
    agent: agent_pb2_grpc.AgentServiceStub,
    user: str,
    message: str,
    conversation_id: int | None = None,
    key: str = "",
    key_field: str = "",
    path_user: str | None = None,
) -> agent_pb2.ChatResponse:
    metadata = auth_metadata(user) + ((("idempotency-key", key),) if key else ())
    request = agent_pb2.ChatRequest(
        user_id=user if path_user is None else path_user,
        message=message,
        conversation_id=conversation_id,
        idempotency_key=key_field,
    )
    return agent.Chat(request, metadata=metadata, timeout=TIMEOUT)  # type: ignore[no-any-return]


def ask_stream(
    agent: agent_pb2_grpc.AgentServiceStub, user: str, message: str, path_user: str | None = None
) -> list[agent_pb2.ChatEvent]:
    request = agent_pb2.ChatRequest(user_id=user if path_user is None else path_user, message=message)
    return list(agent.ChatStream(request, metadata=auth_metadata(user), timeout=TIMEOUT))


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def as_dict(call: conversation_pb2.ToolCall) -> dict[str, Any]:
    """A ToolCall as JSON, whole numbers as ints."""
    data = json_format.MessageToDict(call, preserving_proto_field_name=True)
    return json.loads(
        json.dumps(data), parse_float=lambda text: int(float(text)) if float(text).is_integer() else float(text)
    )


def parsed(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with their JSON texts (tool arguments, tool results) parsed: key order is not meaningful."""
    result = []
    for message in messages:
        message = dict(message)
        if message["role"] == "tool":
            message["content"] = json.loads(message["content"])
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        result.append(message)
    return result


def user_tasks(stack: Stack, user: str) -> list[task_pb2.Task]:
    reply = stack.tasks.ListTasks(
        task_pb2.ListTasksRequest(status="all"), metadata=auth_metadata(user), timeout=TIMEOUT
    )
    return list(reply.tasks)


def stored_messages(stack: Stack, user: str, conversation_id: int) -> list[conversation_pb2.Message]:
    reply = stack.conversations.ListMessages(
        conversation_pb2.ListMessagesRequest(conversation_id=conversation_id),
        metadata=auth_metadata(user),
        timeout=TIMEOUT,
    )
    return list(reply.messages)


def only_conversation(stack: Stack, user: str) -> int:
    reply = stack.conversations.ListConversations(
        conversation_pb2.ListConversationsRequest(), metadata=auth_metadata(user), timeout=TIMEOUT
    )
    assert len(reply.conversations) == 1
    return int(reply.conversations[0].id)


def add_task_directly(stack: Stack, user: str, title: str) -> task_pb2.Task:
    return stack.tasks.CreateTask(  # type: ignore[no-any-return]
        task_pb2.CreateTaskRequest(title=title), metadata=auth_metadata(user), timeout=TIMEOUT
    )


# --- the core scenarios, on SQLite and PostgreSQL ---------------------------------------------


def test_add_task_turn_stores_the_conversation(any_stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(
        key,
        model.tool_calls(model.call("add_task", {"title": "Buy groceries"}, "call_abc")),
        model.text("Added task 1: Buy groceries."),
    )
    message = f"Add a task to buy groceries [[{key}]]"

    reply = ask(any_stack.agent, user, message)

    assert reply.response == "Added task 1: Buy groceries."
    assert [as_dict(call) for call in reply.tool_calls] == [
        {
            "name": "add_task",
            "arguments": {"title": "Buy groceries"},
            "result": task_result(1, "created", "Buy groceries"),
        }
    ]
    assert [(task.id, task.title, task.completed) for task in user_tasks(any_stack, user)] == [
        (1, "Buy groceries", False)
    ]
    stored = stored_messages(any_stack, user, reply.conversation_id)
    assert [(m.role, m.content) for m in stored] == [("user", message), ("assistant", reply.response)]
    assert list(stored[1].tool_calls) == list(reply.tool_calls)

    first, second = chat.received(key)
    assert first.body["stream"] is True and first.body["model"] == "scripted-model"
    assert first.headers["authorization"] == "Bearer test-key"
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert first.messages[0]["content"].startswith(SYSTEM_PROMPT)
    assert "in the user's timezone (UTC); today is " in first.messages[0]["content"]
    assert first.messages[1]["content"] == message
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in first.body["tools"]}
    assert set(schemas) == {tool.name for tool in tools.for_surface("chat")}
    assert {"add_task", "list_tasks", "complete_task", "delete_task", "update_task"} <= set(schemas)
    assert all("user_id" not in schema["properties"] for schema in schemas.values())
    # The second step sees its own tool call and the tool's result.
    assert second.messages[2]["tool_calls"][0]["id"] == "call_abc"
    assert json.loads(second.messages[2]["tool_calls"][0]["function"]["arguments"]) == {"title": "Buy groceries"}
    assert second.messages[3]["role"] == "tool" and second.messages[3]["tool_call_id"] == "call_abc"
    assert json.loads(second.messages[3]["content"]) == task_result(1, "created", "Buy groceries")


def test_retried_turn_runs_its_tools_once(any_stack: Stack, chat: ChatServer) -> None:
    user, key, idempotency = new_user(), new_key(), f"idem-{uuid.uuid4().hex}"
    chat.script(
        key, model.tool_calls(model.call("add_task", {"title": "Pay bills"})), model.text("Added task 1: Pay bills.")
    )
    message = f"I need to remember to pay bills [[{key}]]"

    first = ask(any_stack.agent, user, message, key=idempotency)
    again = ask(any_stack.agent, user, message, key=idempotency)
    by_field = ask(any_stack.agent, user, message, key_field=idempotency)

    assert again == first and by_field == first
    assert len(chat.received(key)) == 2  # the model ran for the first attempt only
    assert [task.title for task in user_tasks(any_stack, user)] == ["Pay bills"]
    assert len(stored_messages(any_stack, user, first.conversation_id)) == 2
    # Reusing the key for another message is refused, not answered with the old turn.
    error = rpc_error(lambda: ask(any_stack.agent, user, f"something else [[{key}]]", key=idempotency))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Keys belong to a user: another user's identical key runs its own turn.
    other, other_key = new_user(), new_key()
    chat.script(other_key, model.text("Hello!"))
    assert ask(any_stack.agent, other, f"hi [[{other_key}]]", key=idempotency).response == "Hello!"


def test_conversation_continues_with_its_history(any_stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(
        key,
        model.tool_calls(model.call("add_task", {"title": "Call mom"})),
        model.text("Added task 1: Call mom."),
        model.tool_calls(model.call("delete_task", {"task_id": 1})),
        model.text("Deleted task 1: Call mom."),
    )
    first = ask(any_stack.agent, user, f"add call mom [[{key}]]")
    second = ask(any_stack.agent, user, f"delete it [[{key}]]", conversation_id=first.conversation_id)

    assert second.conversation_id == first.conversation_id
    assert second.response == "Deleted task 1: Call mom."
    assert user_tasks(any_stack, user) == []
    third_request = chat.received(key)[2]
    assert parsed(third_request.messages[1:]) == [
        {"role": "user", "content": f"add call mom [[{key}]]"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_2_0",
                    "type": "function",
                    "function": {"name": "add_task", "arguments": {"title": "Call mom"}},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_2_0",
            "content": task_result(1, "created", "Call mom"),
        },
        {"role": "assistant", "content": "Added task 1: Call mom."},
        {"role": "user", "content": f"delete it [[{key}]]"},
    ]
    assert len(stored_messages(any_stack, user, first.conversation_id)) == 4


def test_tools_never_cross_users(any_stack: Stack, chat: ChatServer) -> None:
    alice, bob, key = new_user(), new_user(), new_key()
    secret = add_task_directly(any_stack, alice, "Alice's secret plan")
    chat.script(
        key,
        model.tool_calls(
            model.call("add_task", {"title": "Planted", "user_id": alice}),
            model.call("complete_task", {"task_id": secret.id, "user_id": alice}),
            model.call("complete_task", {"task_id": secret.id}),
            model.call("delete_task", {"task_id": secret.id}),
            model.call("update_task", {"task_id": secret.id, "title": "Hacked"}),
            model.call("list_tasks", {"status": "all"}),
        ),
        # A separate step: run concurrently with the calls above, Bob's own task 1 would be their target.
        model.tool_calls(model.call("add_task", {"title": "Bob's own", "user_id": bob})),
        model.text("Done."),
    )

    reply = ask(any_stack.agent, bob, f"do things to alice's tasks [[{key}]]")

    outcomes = [as_dict(call) for call in reply.tool_calls]
    assert "user_id must be the authenticated user" in outcomes[0]["error"]
    assert "user_id must be the authenticated user" in outcomes[1]["error"]
    assert all("not found" in outcome["error"] for outcome in outcomes[2:5])
    assert outcomes[5]["result"] == []
    assert outcomes[6]["result"] == task_result(1, "created", "Bob's own")
    # Alice's task is untouched, and nothing of hers reached Bob's reply or Bob's model.
    (after,) = user_tasks(any_stack, alice)
    assert (after.title, after.completed) == ("Alice's secret plan", False)
    assert [task.title for task in user_tasks(any_stack, bob)] == ["Bob's own"]
    assert "secret" not in str(reply)
    assert all("secret" not in json.dumps(received.body) for received in chat.received(key))


def test_whatever_the_model_sends_the_turn_is_stored(any_stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(
        key,
        model.tool_calls(
            model.call("", {"title": "x"}),
            model.call("n" * 300, {}),
            model.call("add_task", {"title": "nul\u0000inside", "description": "\u0000"}),
            model.call("add_task", "[1, 2]"),
        ),
        model.text("Done\u0000, mostly."),
    )

    reply = ask(any_stack.agent, user, f"odd things [[{key}]]")

    assert reply.response == "Done, mostly."
    names = [call.name for call in reply.tool_calls]
    assert names == ["(no name)", "n" * 255, "add_task", "add_task"]
    assert all(call.HasField("error") for call in reply.tool_calls)
    assert user_tasks(any_stack, user) == []
    stored = stored_messages(any_stack, user, reply.conversation_id)
    assert [m.content for m in stored] == [f"odd things [[{key}]]", "Done, mostly."]
    assert list(stored[1].tool_calls) == list(reply.tool_calls)


# --- the rest, on SQLite ----------------------------------------------------------------------


def test_chunks_of_odd_shapes_are_read_for_what_they_hold(stack: Stack, chat: ChatServer) -> None:
    """Chunks are read as the JSON the server sent: a field of the wrong type is skipped, never
    a 5xx, and what is well formed around it still counts."""
    user, key = new_user(), new_key()
    odd_call = {"index": "first", "id": 7, "type": None, "function": {"name": ["add_task"], "arguments": None}}
    chat.script(
        key,
        model.events(
            [1, 2],
            "42",
            {"choices": "none"},
            {"choices": [None, {"delta": None}, {"delta": {"content": 5}}, {"delta": {"content": "Let me"}}]},
            {"choices": [{"delta": {"content": " see.", "tool_calls": [None, 3, odd_call]}}]},
            {"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": True}},
        ),
        model.text("Done."),
    )

    reply = ask(stack.agent, user, f"odd chunks [[{key}]]")

    assert reply.response == "Let me see.\n\nDone."
    assert [call.name for call in reply.tool_calls] == ["(no name)"] and reply.tool_calls[0].HasField("error")
    assert user_tasks(stack, user) == []
    assistant = [m for m in chat.received(key)[1].messages if m["role"] == "assistant"]
    assert assistant[-1]["content"] == "Let me see."


def test_parallel_tool_calls_in_one_step(stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(
        key,
        model.tool_calls(
            model.call("add_task", {"title": "Eggs"}, "call_eggs"),
            model.call("add_task", {"title": "Milk"}, "call_milk"),
        ),
        model.text("Added Eggs and Milk."),
    )

    reply = ask(stack.agent, user, f"add eggs and milk [[{key}]]")

    assert [call.name for call in reply.tool_calls] == ["add_task", "add_task"]
    results = [as_dict(call)["result"] for call in reply.tool_calls]
    assert [result["title"] for result in results] == ["Eggs", "Milk"]
    assert sorted(result["task_id"] for result in results) == [1, 2]
    assert sorted(task.title for task in user_tasks(stack, user)) == ["Eggs", "Milk"]
    second = chat.received(key)[1]
    tool_messages = {m["tool_call_id"]: json.loads(m["content"]) for m in second.messages if m["role"] == "tool"}
    assert {call_id: result["title"] for call_id, result in tool_messages.items()} == {
        "call_eggs": "Eggs",
        "call_milk": "Milk",
    }


def test_invalid_json_arguments_are_a_tool_error(stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(
        key,
        model.tool_calls(model.call("add_task", '{"title": "Milk"', "call_bad")),
        model.text("Sorry, I could not add that."),
    )

    reply = ask(stack.agent, user, f"add milk [[{key}]]")

    assert reply.response == "Sorry, I could not add that."
    (call,) = reply.tool_calls
    assert call.name == "add_task" and "not valid JSON" in call.error and not call.HasField("result")
    assert user_tasks(stack, user) == []
    tool_message = chat.received(key)[1].messages[-1]
    assert tool_message["tool_call_id"] == "call_bad"
    assert "not valid JSON" in json.loads(tool_message["content"])["error"]
    stored = stored_messages(stack, user, reply.conversation_id)
    assert stored[1].tool_calls[0].error == call.error


def test_unknown_tool_is_a_tool_error(stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(key, model.tool_calls(model.call("launch_rockets", {"count": 3})), model.text("I can't do that."))

    reply = ask(stack.agent, user, f"launch [[{key}]]")

    assert reply.response == "I can't do that."
    assert "unknown tool 'launch_rockets'" in reply.tool_calls[0].error
    assert as_dict(reply.tool_calls[0])["arguments"] == {"count": 3}


def test_rate_limited_twice_then_answers(stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    busy = model.error(429, {"retry-after-ms": "10"})
    chat.script(key, busy, busy, model.text("Hello!"))

    reply = ask(stack.agent, user, f"hi [[{key}]]")

    assert reply.response == "Hello!"
    assert len(chat.received(key)) == 3  # the first try and LLM_MAX_RETRIES=2 retries


def test_persistent_500_is_unavailable_and_keeps_the_message(stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(key, then=model.error(500, {"retry-after-ms": "10"}))
    message = f"hello [[{key}]]"

    error = rpc_error(lambda: ask(stack.agent, user, message))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "the model is unavailable; try again later"
    assert len(chat.received(key)) == 3  # the first try and LLM_MAX_RETRIES=2 retries
    conversation_id = only_conversation(stack, user)
    assert [(m.role, m.content) for m in stored_messages(stack, user, conversation_id)] == [("user", message)]


def test_model_hanging_beyond_the_timeout_is_deadline_exceeded(stack: Stack, chat: ChatServer) -> None:
    assert stack.quick is not None
    user, key = new_user(), new_key()
    chat.script(key, then=model.hang(10))
    message = f"hello [[{key}]]"

    started = time.monotonic()
    error = rpc_error(lambda: ask(stack.quick, user, message))  # type: ignore[arg-type]
    elapsed = time.monotonic() - started

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "the model did not answer within 1 s" in error.details()
    assert len(chat.received(key)) == 2  # LLM_MAX_RETRIES=1
    # Two 1 s attempts and one short backoff: well inside the turn's bound (steps x timeout).
    assert elapsed < QUICK_TIMEOUT_SECONDS * QUICK_MAX_STEPS + 2
    conversation_id = only_conversation(stack, user)
    assert [m.content for m in stored_messages(stack, user, conversation_id)] == [message]


def test_step_bound_ends_with_a_polite_answer(stack: Stack, chat: ChatServer) -> None:
    assert stack.quick is not None
    user, key = new_user(), new_key()
    chat.script(key, then=model.tool_calls(model.call("list_tasks", {})))

    reply = ask(stack.quick, user, f"loop forever [[{key}]]")

    assert len(chat.received(key)) == QUICK_MAX_STEPS
    assert [call.name for call in reply.tool_calls] == ["list_tasks"] * QUICK_MAX_STEPS
    assert reply.response.startswith(f"Sorry, I couldn't finish this request within {QUICK_MAX_STEPS} steps")
    assert "listed 0 task(s)" in reply.response
    assert stored_messages(stack, user, reply.conversation_id)[-1].content == reply.response


def test_retry_while_the_first_attempt_runs_waits_for_its_answer(stack: Stack, chat: ChatServer) -> None:
    user, key, idempotency = new_user(), new_key(), new_key()
    chat.script(
        key, model.delayed(2, model.tool_calls(model.call("add_task", {"title": "Slow one"}))), model.text("Added.")
    )
    message = f"add slow one [[{key}]]"

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, stack.agent, user, message, None, idempotency)
        deadline = time.monotonic() + TIMEOUT
        while not chat.received(key):  # the model was asked: the user's message is stored
            assert time.monotonic() < deadline
            time.sleep(0.05)
        retry = pool.submit(ask, stack.agent, user, message, None, idempotency)
        assert retry.result() == first.result()

    assert len(chat.received(key)) == 2
    assert [task.title for task in user_tasks(stack, user)] == ["Slow one"]


def test_stream_yields_deltas_tool_calls_and_done(stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(
        key,
        model.tool_calls(model.call("add_task", {"title": "Buy milk"})),
        model.text("Added task 1: Buy milk. Anything else?"),
    )

    events = ask_stream(stack.agent, user, f"add milk [[{key}]]")

    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "tool_call" and kinds[-1] == "done"
    assert kinds.count("delta") > 1  # the text arrives in pieces as the model streams it
    assert "error" not in kinds
    deltas = "".join(event.delta for event in events if event.WhichOneof("event") == "delta")
    done = events[-1].done
    assert deltas == done.response == "Added task 1: Buy milk. Anything else?"
    assert as_dict(events[0].tool_call)["result"] == task_result(1, "created", "Buy milk")
    assert list(done.tool_calls) == [events[0].tool_call]
    assert [m.role for m in stored_messages(stack, user, done.conversation_id)] == ["user", "assistant"]


def test_stream_reports_model_failure_as_its_last_event(stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(key, then=model.error(503, {"retry-after-ms": "10"}))

    events = ask_stream(stack.agent, user, f"hi [[{key}]]")

    assert [event.WhichOneof("event") for event in events] == ["error"]
    assert events[-1].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert events[-1].error.message == "the model is unavailable; try again later"
    assert [m.role for m in stored_messages(stack, user, only_conversation(stack, user))] == ["user"]


def test_stream_stalling_mid_answer_ends_with_an_error_event(stack: Stack, chat: ChatServer) -> None:
    assert stack.quick is not None
    user, key = new_user(), new_key()
    chat.script(key, model.stall("Let me think", 10))

    events = ask_stream(stack.quick, user, f"hi [[{key}]]")

    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[-1] == "error" and "done" not in kinds
    assert "".join(event.delta for event in events[:-1]) == "Let me think"
    assert events[-1].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


def test_model_without_text_gets_a_written_answer(stack: Stack, chat: ChatServer) -> None:
    user, key = new_user(), new_key()
    chat.script(key, model.tool_calls(model.call("add_task", {"title": "Tea"})), model.text(""))

    reply = ask(stack.agent, user, f"add tea [[{key}]]")

    assert reply.response == "Done: created task 1: Tea."


def test_path_user_must_be_the_caller(stack: Stack, chat: ChatServer) -> None:
    alice, key = new_user(), new_key()
    chat.script(key, then=model.text("should not run"))
    message = f"hi [[{key}]]"

    assert rpc_error(lambda: ask(stack.agent, alice, message, path_user="bob")).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert rpc_error(lambda: ask_stream(stack.agent, alice, message, path_user="bob")).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert chat.received(key) == []


def test_another_users_conversation_is_not_found(stack: Stack, chat: ChatServer) -> None:
    alice, bob, key = new_user(), new_user(), new_key()
    chat.script(key, model.text("Hi Alice."), then=model.text("should not run"))
    alices = ask(stack.agent, alice, f"hi [[{key}]]")

    error = rpc_error(lambda: ask(stack.agent, bob, f"hi [[{key}]]", conversation_id=alices.conversation_id))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert len(chat.received(key)) == 1
    assert len(stored_messages(stack, alice, alices.conversation_id)) == 2


@pytest.mark.parametrize(
    ("message", "field"),
    [("", "message"), ("   ", "message"), ("x" * 8001, "message"), ("nul\x00", "message")],
)
def test_bad_messages_are_invalid_argument(stack: Stack, message: str, field: str) -> None:
    error = rpc_error(lambda: ask(stack.agent, new_user(), message))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()


def test_bad_idempotency_key_is_invalid_argument(stack: Stack) -> None:
    error = rpc_error(lambda: ask(stack.agent, new_user(), "hi", key="k" * 201))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "idempotency_key" in error.details()
    error = rpc_error(lambda: ask(stack.agent, new_user(), "hi", key="one", key_field="two"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_missing_token_is_unauthenticated(stack: Stack) -> None:
    error = rpc_error(lambda: stack.agent.Chat(agent_pb2.ChatRequest(message="hi"), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_task_service_down_fails_the_turn_with_unavailable(stack: Stack, chat: ChatServer) -> None:
    assert stack.orphan is not None
    user, key = new_user(), new_key()
    chat.script(key, then=model.tool_calls(model.call("list_tasks", {})))
    message = f"show my tasks [[{key}]]"

    error = rpc_error(lambda: ask(stack.orphan, user, message))  # type: ignore[arg-type]
    events = ask_stream(stack.orphan, user, message + " again")  # type: ignore[arg-type]

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "the task service is unavailable; try again"
    assert [event.WhichOneof("event") for event in events] == ["error"]
    assert events[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    conversation_ids = stack.conversations.ListConversations(
        conversation_pb2.ListConversationsRequest(), metadata=auth_metadata(user), timeout=TIMEOUT
    ).conversations
    stored = [m.content for c in conversation_ids for m in stored_messages(stack, user, c.id)]
    assert sorted(stored) == sorted([message, message + " again"])


def test_builtin_model_serves_through_the_same_code_path(stack: Stack) -> None:
    assert stack.builtin is not None
    user = new_user()

    added = ask(stack.builtin, user, "Add a task to buy groceries")
    listed = ask(stack.builtin, user, "Show me all my tasks", conversation_id=added.conversation_id)

    assert [as_dict(call)["result"] for call in added.tool_calls] == [task_result(1, "created", "Buy groceries")]
    assert "Buy groceries" in added.response
    assert [call.name for call in listed.tool_calls] == ["list_tasks"]
    assert "Buy groceries" in listed.response
    assert [task.title for task in user_tasks(stack, user)] == ["Buy groceries"]


def test_retry_after_a_failed_turn_is_aborted_without_rerunning(stack: Stack, chat: ChatServer) -> None:
    user, key, idempotency = new_user(), new_key(), new_key()
    chat.script(key, then=model.error(500, {"retry-after-ms": "10"}))
    message = f"add bread [[{key}]]"

    first = rpc_error(lambda: ask(stack.agent, user, message, key=idempotency))
    started = time.monotonic()
    retry = rpc_error(lambda: ask(stack.agent, user, message, key=idempotency))

    assert first.code() == grpc.StatusCode.UNAVAILABLE
    assert retry.code() == grpc.StatusCode.ABORTED
    assert "failed (the model is unavailable" in retry.details() and "new key" in retry.details()
    assert time.monotonic() - started < 10  # told at once, not after waiting for an answer
    assert len(chat.received(key)) == 3  # the retry did not ask the model again
    chat.script(key, model.text("Added."))
    assert ask(stack.agent, user, message, key=new_key()).response == "Added."


def test_a_model_trickling_forever_is_cut_at_the_turn_bound(stack: Stack, chat: ChatServer) -> None:
    assert stack.quick is not None
    user, key = new_user(), new_key()
    turn_bound = QUICK_TIMEOUT_SECONDS * QUICK_MAX_STEPS
    chat.script(key, then=model.trickle("la ", every=0.1, seconds=30))

    started = time.monotonic()
    events = ask_stream(stack.quick, user, f"sing [[{key}]]")  # type: ignore[arg-type]
    elapsed = time.monotonic() - started

    assert events[0].delta == "la " and events[-1].WhichOneof("event") == "error"
    assert events[-1].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert events[-1].error.message == f"the turn did not finish within {turn_bound} s"
    assert turn_bound <= elapsed < turn_bound + 5
    assert [m.role for m in stored_messages(stack, user, only_conversation(stack, user))] == ["user"]
