"""Fault tests with real processes: the database restarting, the service being stopped.

Guarantees proven here:
- PostgreSQL restarted under a steady write load: every acknowledged create is in the database
  afterwards, ids are never handed out twice, the clients see only UNAVAILABLE (HTTP 503) during
  the outage, and task_service reconnects by itself;
- SIGTERM under load: health turns NOT_SERVING, calls already running finish OK, new calls get
  UNAVAILABLE, and no acknowledged write is lost;
- task_service killed during a chat turn: the turn answers 503 (UNAVAILABLE), the user's
  message is kept, and once task_service is back the next turn works;
- a model endpoint failing every other request: retries make turns succeed, or fail clearly
  with 503, and no tool call is ever run twice.
The database faults run against a private PostgreSQL cluster (tests/pg_cluster.py), never the
shared one; the chat faults run the whole stack (services + Envoy) with a scripted model.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.clients import CHANNEL_OPTIONS
from scripts.stack import Stack
from tests.chat_server import ChatServer, call, delayed, error, text, tool_calls
from tests.gateway_fixtures import free_ports_env
from tests.pg_cluster import PgCluster, private_cluster
from tests.support import ServiceProcess, auth_metadata, free_port, token
from todo.v1 import conversation_pb2, conversation_pb2_grpc, task_pb2, task_pb2_grpc

MAX_RECONNECT_BACKOFF_MS = dict(CHANNEL_OPTIONS)["grpc.max_reconnect_backoff_ms"]
WRITERS = 4
RECONNECT_WAIT_SECONDS = MAX_RECONNECT_BACKOFF_MS / 1000 * 1.2 + 0.3  # backoff + gRPC's 20 % jitter + slack


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with private_cluster() as started:
        yield started


@dataclass
class LoadResult:
    acknowledged: list[int] = field(default_factory=list)  # ids of creates answered OK
    errors: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)
    acknowledged_at: list[float] = field(default_factory=list)  # monotonic time of each OK


async def write_load(stub: task_pb2_grpc.TaskServiceStub, user: str, stop: asyncio.Event, result: LoadResult) -> None:
    """Create tasks for `user` one after another until `stop`, recording every outcome."""
    metadata = auth_metadata(user)
    while not stop.is_set():
        try:
            reply = await stub.CreateTask(task_pb2.CreateTaskRequest(title="load"), metadata=metadata, timeout=15)
        except grpc.aio.AioRpcError as error:
            result.errors.append((error.code(), error.details() or ""))
            await asyncio.sleep(0.05)  # a client backing off; keeps the outage from becoming a busy loop
            continue
        result.acknowledged.append(reply.id)
        result.acknowledged_at.append(time.monotonic())


def stored_task_ids(cluster: PgCluster, database: str, user: str) -> list[int]:
    with psycopg.connect(cluster.admin_url(database), connect_timeout=10) as conn:
        rows = conn.execute("SELECT id FROM tasks WHERE user_id = %s ORDER BY id", (user,)).fetchall()
    return [row[0] for row in rows]


def task_service_on(
    cluster: PgCluster, database: str, base_env: dict[str, str], log_dir: Path, **extra: str
) -> ServiceProcess:
    address = f"127.0.0.1:{free_port()}"
    env = {
        **base_env,
        "TASK_DATABASE_URL": cluster.url(database),
        "TASK_SERVICE_ADDR": address,
        "RATE_LIMIT_WRITES_PER_MINUTE": "0",  # the load is far above any sane per-user limit
        "RATE_LIMIT_READS_PER_MINUTE": "0",
        **extra,
    }
    return ServiceProcess("task_service", env, address, log_dir)


def assert_no_acknowledged_write_lost(result: LoadResult, stored: list[int]) -> None:
    assert len(result.acknowledged) == len(set(result.acknowledged)), "an id was handed out twice"
    lost = sorted(set(result.acknowledged) - set(stored))
    assert not lost, f"acknowledged creates missing from the database: {lost[:20]}"
    assert len(stored) == len(set(stored))


def assert_only_unavailable(result: LoadResult) -> None:
    codes = {code for code, _ in result.errors}
    assert codes <= {grpc.StatusCode.UNAVAILABLE}, f"errors other than UNAVAILABLE: {result.errors[:5]}"
    assert not any("Traceback" in details for _, details in result.errors)


def assert_refused_or_racing_the_goaway(result: LoadResult, writers: int) -> None:
    """UNAVAILABLE, except for at most one call per writer that raced the server's GOAWAY: sent on
    the old connection after the server stopped taking calls but before the client read GOAWAY,
    grpc core holds it unhandled and cancels it when shutdown completes (CANCELLED, or
    DEADLINE_EXCEEDED if the client's deadline comes first). No handler ran for it, so nothing was
    written; a CI run under load showed each. (Answering those with UNAVAILABLE needs a drain
    window in common/server.py before server.stop: not built yet.)"""
    racing = [(code, details) for code, details in result.errors if code != grpc.StatusCode.UNAVAILABLE]
    assert {code for code, _ in racing} <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}, racing
    assert len(racing) <= writers, f"more calls raced the GOAWAY than there are writers: {racing}"
    assert not any("Traceback" in details for _, details in result.errors)


async def test_postgres_restart_under_write_load_loses_no_acknowledged_write(
    cluster: PgCluster, base_env: dict[str, str], log_dir: Path
) -> None:
    database = cluster.create_database("faults_restart")
    service = task_service_on(cluster, database, base_env, log_dir).start()
    user = f"load-{uuid.uuid4().hex[:6]}"
    result, stop = LoadResult(), asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            writers = [asyncio.create_task(write_load(stub, user, stop, result)) for _ in range(WRITERS)]
            await asyncio.sleep(1.5)
            before_restart = len(result.acknowledged)
            # Down for 2 s: long enough that the writers certainly hit the outage.
            await asyncio.to_thread(cluster.restart, 2.0, "fast")
            restarted_at = time.monotonic()
            await _until(lambda: sum(at > restarted_at for at in result.acknowledged_at) >= 20, within=30)
            stop.set()
            await asyncio.gather(*writers)
        assert service.alive(), "task_service died instead of riding out the outage"
    finally:
        stop.set()
        service.stop()

    stored = stored_task_ids(cluster, database, user)
    print(f"restart: {len(result.acknowledged)} acknowledged, {len(result.errors)} refused, {len(stored)} stored")
    assert before_restart > 0, "no write succeeded before the restart"
    assert result.errors, "the load never saw the outage, so the test proved nothing"
    assert_only_unavailable(result)
    assert_no_acknowledged_write_lost(result, stored)


async def _until(condition: Callable[[], bool], within: float, poll: float = 0.1) -> None:
    for _ in range(int(within / poll)):
        if condition():
            return
        await asyncio.sleep(poll)
    raise TimeoutError(f"condition not met within {within}s")


async def test_sigterm_finishes_in_flight_calls_and_refuses_new_ones(
    cluster: PgCluster, base_env: dict[str, str], log_dir: Path
) -> None:
    database = cluster.create_database("faults_sigterm")
    service = task_service_on(cluster, database, base_env, log_dir, GRPC_SHUTDOWN_GRACE_SECONDS="20").start()
    steady, slow = f"steady-{uuid.uuid4().hex[:6]}", f"slow-{uuid.uuid4().hex[:6]}"
    result, stop = LoadResult(), asyncio.Event()
    lock = psycopg.connect(cluster.admin_url(database), connect_timeout=10)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            first = await stub.CreateTask(task_pb2.CreateTaskRequest(title="first"), metadata=auth_metadata(slow))
            # Hold slow's id counter: its next creates block inside the service, in flight.
            lock.execute("SELECT last_id FROM task_counters WHERE user_id = %s FOR UPDATE", (slow,))
            in_flight = [asyncio.ensure_future(_create(stub, slow, f"in flight {n}")) for n in range(3)]
            writers = [asyncio.create_task(write_load(stub, steady, stop, result)) for _ in range(2)]
            await asyncio.to_thread(_wait_for_blocked_queries, cluster, database, 3)

            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # an open Watch is itself an in-flight call the server would wait for

            # NOT_SERVING is announced just before the server stops taking calls: wait until a
            # new connection is refused, then try a call on the connection still open.
            await asyncio.to_thread(_wait_refusing, service.address)
            # A user not behind the lock, so a wrongly accepted call would return at once, not hang.
            latecomer = f"late-{uuid.uuid4().hex[:6]}"
            new_call_code = await _code_of_new_create(stub, latecomer)
            async with grpc.aio.insecure_channel(service.address) as fresh_channel:
                fresh_call_code = await _code_of_new_create(task_pb2_grpc.TaskServiceStub(fresh_channel), latecomer)
            assert not any(call.done() for call in in_flight), "the in-flight creates did not wait for the lock"

            lock.commit()  # release: the in-flight creates may now finish, inside the grace period
            finished = await asyncio.gather(*in_flight, return_exceptions=True)
            stop.set()
            await asyncio.gather(*writers)
        exit_code = await asyncio.to_thread(service.process.wait, 30)
    finally:
        stop.set()
        lock.close()
        service.stop()

    assert new_call_code == grpc.StatusCode.UNAVAILABLE
    assert fresh_call_code == grpc.StatusCode.UNAVAILABLE
    assert all(isinstance(reply, task_pb2.Task) for reply in finished), f"in-flight calls failed: {finished}"
    assert sorted(reply.id for reply in finished) == [first.id + 1, first.id + 2, first.id + 3]
    assert exit_code == 0, service.log_tail()
    assert_refused_or_racing_the_goaway(result, writers=2)
    assert result.acknowledged, "the steady load never got going"
    assert_no_acknowledged_write_lost(result, stored_task_ids(cluster, database, steady))
    assert stored_task_ids(cluster, database, slow) == [first.id, first.id + 1, first.id + 2, first.id + 3]


async def test_sigterm_to_conversation_service_finishes_in_flight_appends(
    cluster: PgCluster, base_env: dict[str, str], log_dir: Path
) -> None:
    """The same drain on conversation_service: appends held in flight by a row lock finish
    after SIGTERM, a new call is UNAVAILABLE, the process exits 0, every append is stored."""
    database = cluster.create_database("faults_conv_sigterm")
    address = f"127.0.0.1:{free_port()}"
    env = {
        **base_env,
        "CONVERSATION_DATABASE_URL": cluster.url(database),
        "CONVERSATION_SERVICE_ADDR": address,
        "GRPC_SHUTDOWN_GRACE_SECONDS": "20",
    }
    service = ServiceProcess("conversation_service", env, address, log_dir).start()
    user = f"conv-{uuid.uuid4().hex[:6]}"
    metadata = auth_metadata(user)
    lock = psycopg.connect(cluster.admin_url(database), connect_timeout=10)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = conversation_pb2_grpc.ConversationServiceStub(channel)
            held = await stub.CreateConversation(conversation_pb2.CreateConversationRequest(), metadata=metadata)
            # Hold the conversation's row: appends to it block inside the service, in flight.
            lock.execute("SELECT id FROM conversations WHERE user_id = %s AND id = %s FOR UPDATE", (user, held.id))
            in_flight = [
                asyncio.ensure_future(
                    stub.AppendMessage(
                        conversation_pb2.AppendMessageRequest(conversation_id=held.id, role="user", content=f"m{n}"),
                        metadata=metadata,
                        timeout=30,
                    )
                )
                for n in range(3)
            ]
            await asyncio.to_thread(_wait_for_blocked_queries, cluster, database, 3)
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(_wait_refusing, address)
            try:
                await stub.CreateConversation(
                    conversation_pb2.CreateConversationRequest(), metadata=metadata, timeout=10
                )
                late_code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                late_code = error.code()
            assert not any(call.done() for call in in_flight), "the in-flight appends did not wait for the lock"
            lock.commit()  # release: the appends may now finish, inside the grace period
            finished = await asyncio.gather(*in_flight, return_exceptions=True)
        exit_code = await asyncio.to_thread(service.process.wait, 30)
    finally:
        lock.close()
        service.stop()

    assert late_code == grpc.StatusCode.UNAVAILABLE
    assert all(isinstance(reply, conversation_pb2.AppendMessageResponse) for reply in finished), finished
    assert sorted(reply.message.id for reply in finished) == [1, 2, 3]
    assert exit_code == 0, service.log_tail()
    with psycopg.connect(cluster.admin_url(database), connect_timeout=10) as conn:
        stored = conn.execute("SELECT id FROM messages WHERE user_id = %s ORDER BY id", (user,)).fetchall()
    assert [row[0] for row in stored] == [1, 2, 3]


def _wait_refusing(address: str, within: float = 10) -> None:
    """Until a health check on a new connection fails: the server no longer accepts calls."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with grpc.insecure_channel(address) as probe:
            try:
                health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    return
        time.sleep(0.05)
    raise TimeoutError(f"{address} still accepts calls {within}s after SIGTERM")


def _wait_for_blocked_queries(cluster: PgCluster, database: str, count: int, timeout: float = 20) -> None:
    """Until `count` queries on `database` wait for a lock (the creates are then surely in flight)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(cluster.admin_url(database), autocommit=True, connect_timeout=10) as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (database,)
            ).fetchone()
            if waiting and waiting[0] >= count:
                return
            time.sleep(0.05)
    raise TimeoutError(f"fewer than {count} queries blocked on the lock after {timeout}s")


async def _create(stub: task_pb2_grpc.TaskServiceStub, user: str, title: str) -> task_pb2.Task:
    return await stub.CreateTask(task_pb2.CreateTaskRequest(title=title), metadata=auth_metadata(user), timeout=30)


async def _code_of_new_create(stub: task_pb2_grpc.TaskServiceStub, user: str) -> grpc.StatusCode:
    try:
        await stub.CreateTask(task_pb2.CreateTaskRequest(title="too late"), metadata=auth_metadata(user), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# --- chat turns while an upstream fails (the whole stack behind Envoy) -----------------------


@pytest.fixture(scope="module")
def chat_model() -> Iterator[ChatServer]:
    server = ChatServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def chat_stack(
    chat_model: ChatServer, base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("chat-faults")
    env = {
        **base_env,
        **free_ports_env(),
        "TASK_DATABASE_URL": f"sqlite+aiosqlite:///{work / 'tasks.db'}",
        "CONVERSATION_DATABASE_URL": f"sqlite+aiosqlite:///{work / 'conversations.db'}",
        "LLM_BASE_URL": chat_model.base_url,
        "LLM_API_KEY": "test-key",
        "LLM_MAX_RETRIES": "1",  # one retry: enough when every other model request fails
        "LLM_TIMEOUT_SECONDS": "15",
    }
    stack = Stack(env, work_dir=work, services=["task", "conversation", "agent"]).start()
    try:
        yield stack
    finally:
        stack.stop()


def rest(
    stack: Stack, method: str, path: str, user: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """One REST call through the gateway as `user`: (HTTP status, JSON body)."""
    request = urllib.request.Request(
        f"{stack.base_url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token(user)}", "Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def task_titles(stack: Stack, user: str) -> list[str]:
    status, body = rest(stack, "GET", f"/api/{user}/tasks", user)
    assert status == 200, body
    return [task["title"] for task in body["tasks"]]


def added(chat_reply: dict[str, Any]) -> list[str]:
    """Titles of the add_task calls the reply acknowledges."""
    return [
        call["result"]["title"]
        for call in chat_reply.get("tool_calls", [])
        if call["name"] == "add_task" and call.get("result", {}).get("status") == "created"
    ]


async def test_task_service_killed_during_a_turn_answers_503_and_keeps_the_message(
    chat_stack: Stack, chat_model: ChatServer
) -> None:
    user, key = f"hank-{uuid.uuid4().hex[:6]}", f"kill-{uuid.uuid4().hex[:6]}"
    message = f"[[{key}]] add buy milk"
    # The model thinks for 2 s, then asks for add_task: by then task_service is gone.
    chat_model.script(key, delayed(2.0, tool_calls(call("add_task", {"title": "buy milk"}))), then=text("Added."))
    turn = asyncio.ensure_future(
        asyncio.to_thread(rest, chat_stack, "POST", f"/api/{user}/chat", user, {"message": message})
    )
    await _until(lambda: len(chat_model.received(key)) >= 1, within=30)
    task_service = chat_stack.component("task")
    await asyncio.to_thread(task_service.kill)
    status, body = await turn

    assert status == 503, body
    assert body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "task service" in body["message"]
    status, listed = rest(chat_stack, "GET", f"/api/{user}/conversations", user)
    assert status == 200, listed
    [conversation] = listed["conversations"]
    status, history = rest(chat_stack, "GET", f"/api/{user}/conversations/{conversation['id']}/messages", user)
    assert status == 200, history
    assert [(m["role"], m["content"]) for m in history["messages"]] == [("user", message)]

    # Started from this (the main) thread: Stack's children get SIGTERM when the thread that
    # started them ends (PR_SET_PDEATHSIG), and asyncio.to_thread's worker ends with the test.
    task_service.start()
    # The agent's channel retries the connection at least every second (common/clients.py);
    # a turn sent within that second may still find it disconnected.
    await asyncio.sleep(RECONNECT_WAIT_SECONDS)
    again = f"kill-again-{uuid.uuid4().hex[:6]}"
    chat_model.script(again, tool_calls(call("add_task", {"title": "buy milk"})), then=text("Added buy milk."))
    status, reply = rest(
        chat_stack,
        "POST",
        f"/api/{user}/chat",
        user,
        {"conversation_id": conversation["id"], "message": f"[[{again}]] try again please"},
    )
    assert status == 200, reply
    assert added(reply) == ["buy milk"]
    assert task_titles(chat_stack, user) == ["buy milk"]


def test_a_flaky_model_is_retried_and_no_tool_runs_twice(chat_stack: Stack, chat_model: ChatServer) -> None:
    user = f"ivy-{uuid.uuid4().hex[:6]}"
    flaky = error(500)
    keys = {name: f"{name}-{uuid.uuid4().hex[:6]}" for name in ("recovers", "gives-up", "fails-after-tool")}
    # Every other model request fails; one retry (LLM_MAX_RETRIES=1) gets past each failure.
    chat_model.script(
        keys["recovers"], flaky, tool_calls(call("add_task", {"title": "A"})), flaky, text("Added A."), then=flaky
    )
    # Two failures in a row: the retry fails too, and the turn says so (503).
    chat_model.script(keys["gives-up"], flaky, flaky, then=flaky)
    # The tool ran, then the model failed for good: the turn fails, the task exists once.
    chat_model.script(keys["fails-after-tool"], tool_calls(call("add_task", {"title": "C"})), flaky, flaky, then=flaky)

    answers = {
        name: rest(chat_stack, "POST", f"/api/{user}/chat", user, {"message": f"[[{key}]] please"})
        for name, key in keys.items()
    }

    status, recovered = answers["recovers"]
    assert status == 200, recovered
    assert added(recovered) == ["A"]
    assert len(chat_model.received(keys["recovers"])) == 4  # two steps, each failed once and retried once
    for name in ("gives-up", "fails-after-tool"):
        status, failed = answers[name]
        assert status == 503, failed
        assert failed["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "model" in failed["message"]
    assert len(chat_model.received(keys["gives-up"])) == 2
    # Each add_task ran exactly once: no retry of a model request re-ran a tool.
    assert sorted(task_titles(chat_stack, user)) == ["A", "C"]


async def test_sigterm_to_the_agent_lets_a_running_turn_finish(chat_stack: Stack, chat_model: ChatServer) -> None:
    """SIGTERM while a chat turn waits on the model: the turn still completes inside the grace
    period (its tool runs once, its answer arrives), the agent exits cleanly, and a turn sent
    after it went away is refused with 503 until it is back."""
    user, key = f"ivy-{uuid.uuid4().hex[:6]}", f"term-{uuid.uuid4().hex[:6]}"
    chat_model.script(key, delayed(1.5, tool_calls(call("add_task", {"title": "buy bread"}))), then=text("Added."))
    turn = asyncio.ensure_future(
        asyncio.to_thread(rest, chat_stack, "POST", f"/api/{user}/chat", user, {"message": f"[[{key}]] add bread"})
    )
    await _until(lambda: len(chat_model.received(key)) >= 1, within=30)
    agent = chat_stack.component("agent")
    assert agent.process is not None
    agent.process.send_signal(signal.SIGTERM)
    status, body = await turn
    exit_code = await asyncio.to_thread(agent.process.wait, 30)
    late_status, late_body = await asyncio.to_thread(
        rest, chat_stack, "POST", f"/api/{user}/chat", user, {"message": "add butter"}
    )
    agent.start()  # from the main thread: children die with the thread that started them (tests/README.md)

    assert status == 200, body
    assert added(body) == ["buy bread"]
    assert exit_code == 0, agent.log_tail()
    assert late_status == 503, late_body
    assert task_titles(chat_stack, user) == ["buy bread"]
