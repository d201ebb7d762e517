"""Per-user rate limits: the algorithm, the Redis store, and real task_service processes.

Guarantees proven here:
- a user past the writes budget gets RESOURCE_EXHAUSTED with `retry-after` seconds, on every
  write RPC, while other users and that user's reads are unaffected;
- chat turns (Chat and ChatStream together) have their own per-user budget;
- reads (get/list of tasks, conversations, messages) have theirs, on both services;
- with RATE_LIMIT_REDIS_URL, two replicas draw from one budget per user;
- Redis down: requests go through (fail open) with a warning logged;
- through the gateway, a refusal is HTTP 429 with a `Retry-After` header.
Redis (127.0.0.1:6379) is required like PostgreSQL: these tests fail when it is unreachable.
Every key they write carries a per-run prefix and is deleted afterwards.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from common.ratelimit import METHOD_BUCKETS, LocalStore, RateLimiter, RedisStore
from scripts.stack import Stack
from tests.gateway_fixtures import free_ports_env
from tests.support import ServiceProcess, auth_metadata, free_port, token
from todo.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    conversation_pb2,
    conversation_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
LIMIT = 5


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix for this test alone; its keys are deleted afterwards (nothing else is touched)."""
    prefix = f"todo-test:{uuid.uuid4().hex}:"
    yield prefix
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# --- the algorithm ---------------------------------------------------------------------------


async def test_local_budget_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(LocalStore(clock), {"writes": LIMIT})
    assert [await limiter.check("writes", "alice") for _ in range(LIMIT)] == [0.0] * LIMIT
    wait = await limiter.check("writes", "alice")
    assert wait == pytest.approx(60 / LIMIT)  # one unit comes back every 12 s
    assert await limiter.check("writes", "bob") == 0.0  # budgets are per user
    assert await limiter.check("chat", "alice") == 0.0  # and per bucket (no chat limit configured here)
    clock.now += wait
    assert await limiter.check("writes", "alice") == 0.0
    assert await limiter.check("writes", "alice") > 0  # only one unit came back


async def test_zero_means_no_limit() -> None:
    limiter = RateLimiter(LocalStore(FakeClock()), {"writes": 0})
    assert all([await limiter.check("writes", "alice") == 0.0 for _ in range(1000)])


async def test_redis_budget_is_atomic_and_per_key(redis_prefix: str) -> None:
    store = RedisStore(REDIS_URL, redis_prefix)
    try:
        results = [await store.acquire("writes:alice", LIMIT, 60.0) for _ in range(LIMIT + 2)]
        assert results[:LIMIT] == [0.0] * LIMIT
        assert all(10.0 < wait <= 12.0 for wait in results[LIMIT:]), results
        assert await store.acquire("writes:bob", LIMIT, 60.0) == 0.0
    finally:
        await store.close()


async def test_redis_down_fails_open_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    nothing_listens = f"redis://127.0.0.1:{free_port()}/0"
    store = RedisStore(nothing_listens, "unused:")
    caplog.set_level(logging.WARNING, logger="ratelimit")
    try:
        assert [await store.acquire("writes:alice", 1, 60.0) for _ in range(3)] == [0.0] * 3
    finally:
        await store.close()
    assert any("fail open" in record.getMessage() for record in caplog.records)


# --- real task_service processes -------------------------------------------------------------


def _limited_env(base_env: dict[str, str], database_url: str, address: str, **extra: str) -> dict[str, str]:
    return {
        **base_env,
        "TASK_DATABASE_URL": database_url,
        "TASK_SERVICE_ADDR": address,
        "RATE_LIMIT_WRITES_PER_MINUTE": str(LIMIT),
        **extra,
    }


@pytest.fixture(scope="module")
def limited_task_service(database_url_factory, base_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    address = f"127.0.0.1:{free_port()}"
    env = _limited_env(base_env, database_url_factory("sqlite", "ratelimit"), address)
    service = ServiceProcess("task_service", env, address, log_dir).start()
    try:
        yield address
    finally:
        service.stop()


async def _create(stub: task_pb2_grpc.TaskServiceStub, user: str, title: str = "t") -> task_pb2.Task:
    return await stub.CreateTask(task_pb2.CreateTaskRequest(title=title), metadata=auth_metadata(user), timeout=10)


def _retry_after(error: grpc.aio.AioRpcError) -> int:
    values = [value for key, value in error.trailing_metadata() or () if key == "retry-after"]
    assert values, f"no retry-after in trailing metadata: {error.trailing_metadata()}"
    return int(values[0])


async def test_sixth_write_is_refused_with_retry_after_and_other_users_are_unaffected(
    limited_task_service: str,
) -> None:
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    async with grpc.aio.insecure_channel(limited_task_service) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        for n in range(LIMIT):
            await _create(stub, alice, f"task {n}")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _create(stub, alice, "one too many")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit" in (refused.value.details() or "")
        assert 1 <= _retry_after(refused.value) <= 60 / LIMIT + 1

        assert (await _create(stub, bob, "bob's")).id == 1  # bob has his own budget

        # Reads are not limited: alice can still list and get, many times.
        for _ in range(3 * LIMIT):
            listed = await stub.ListTasks(task_pb2.ListTasksRequest(), metadata=auth_metadata(alice), timeout=10)
            assert [task.title for task in listed.tasks] == [f"task {n}" for n in range(LIMIT)]
            got = await stub.GetTask(task_pb2.GetTaskRequest(task_id=1), metadata=auth_metadata(alice), timeout=10)
            assert got.title == "task 0"


async def test_every_write_rpc_spends_and_respects_the_budget(limited_task_service: str) -> None:
    carol = f"carol-{uuid.uuid4().hex[:6]}"
    metadata = auth_metadata(carol)
    async with grpc.aio.insecure_channel(limited_task_service) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        # Five writes, one of each kind (plus a second create) spend the whole budget...
        await _create(stub, carol, "a")
        await _create(stub, carol, "b")
        await stub.UpdateTask(task_pb2.UpdateTaskRequest(task_id=1, title="a2"), metadata=metadata, timeout=10)
        await stub.SetTaskCompleted(task_pb2.SetTaskCompletedRequest(task_id=1), metadata=metadata, timeout=10)
        await stub.DeleteTask(task_pb2.DeleteTaskRequest(task_id=2), metadata=metadata, timeout=10)
        # ...so each kind of write is now refused, and none of them changed anything.
        refused_calls = [
            stub.CreateTask(task_pb2.CreateTaskRequest(title="c"), metadata=metadata, timeout=10),
            stub.UpdateTask(task_pb2.UpdateTaskRequest(task_id=1, title="x"), metadata=metadata, timeout=10),
            stub.SetTaskCompleted(
                task_pb2.SetTaskCompletedRequest(task_id=1, completed=False), metadata=metadata, timeout=10
            ),
            stub.DeleteTask(task_pb2.DeleteTaskRequest(task_id=1), metadata=metadata, timeout=10),
        ]
        for call in refused_calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _retry_after(refused.value) >= 1
        listed = await stub.ListTasks(task_pb2.ListTasksRequest(), metadata=metadata, timeout=10)
        assert [(task.id, task.title, task.completed) for task in listed.tasks] == [(1, "a2", True)]


async def test_replicas_share_one_budget_through_redis(
    database_url_factory, base_env: dict[str, str], log_dir: Path, redis_prefix: str
) -> None:
    database_url = database_url_factory("postgres", "ratelimit_shared")
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    extra = {"RATE_LIMIT_REDIS_URL": REDIS_URL, "RATE_LIMIT_KEY_PREFIX": redis_prefix}
    replicas = [
        ServiceProcess("task_service", _limited_env(base_env, database_url, address, **extra), address, log_dir)
        for address in addresses
    ]
    dave = f"dave-{uuid.uuid4().hex[:6]}"
    try:
        for replica in replicas:
            replica.start()
        async with grpc.aio.insecure_channel(addresses[0]) as first, grpc.aio.insecure_channel(addresses[1]) as second:
            stub_1, stub_2 = task_pb2_grpc.TaskServiceStub(first), task_pb2_grpc.TaskServiceStub(second)
            ids = [(await _create(stub_1, dave)).id for _ in range(3)]
            ids += [(await _create(stub_2, dave)).id for _ in range(2)]
            assert ids == [1, 2, 3, 4, 5]  # one database behind both replicas
            # Replica 2 has served only two of dave's writes, yet the budget (5) is spent.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _create(stub_2, dave)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _retry_after(refused.value) >= 1
            with pytest.raises(grpc.aio.AioRpcError) as refused_too:
                await _create(stub_1, dave)
            assert refused_too.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await _create(stub_2, f"erin-{uuid.uuid4().hex[:6]}")).id == 1
        client = aioredis.from_url(REDIS_URL)
        try:
            assert [key async for key in client.scan_iter(match=redis_prefix + "*")], "no budget was kept in Redis"
        finally:
            await client.aclose()
    finally:
        for replica in replicas:
            replica.stop()


async def test_service_keeps_serving_writes_when_redis_is_down(
    database_url_factory, base_env: dict[str, str], log_dir: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    nothing_listens = f"redis://127.0.0.1:{free_port()}/0"
    env = _limited_env(base_env, database_url_factory("sqlite", "ratelimit_open"), address)
    env["RATE_LIMIT_REDIS_URL"] = nothing_listens
    service = ServiceProcess("task_service", env, address, log_dir).start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            frank = f"frank-{uuid.uuid4().hex[:6]}"
            ids = [(await _create(stub, frank)).id for _ in range(LIMIT + 3)]
            assert ids == list(range(1, LIMIT + 4))  # past the limit, yet served: fail open
    finally:
        service.stop()
    assert "fail open" in service.log_path.read_text()


# --- through the gateway (Envoy) -------------------------------------------------------------


def test_gateway_answers_429_with_a_retry_after_header(base_env: dict[str, str], tmp_path: Path) -> None:
    env = {
        **base_env,
        **free_ports_env(),
        "TASK_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'tasks.db'}",
        "RATE_LIMIT_WRITES_PER_MINUTE": "2",
    }
    stack = Stack(env, work_dir=tmp_path, services=["task"]).start()
    user = f"gina-{uuid.uuid4().hex[:6]}"
    try:
        answers = [_post_task(stack.base_url, user, f"t{n}") for n in range(3)]
    finally:
        stack.stop()
    assert [status for status, _, _ in answers] == [200, 200, 429]
    _, headers, body = answers[2]
    assert 1 <= int(headers["retry-after"]) <= 31
    assert body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "rate limit" in body["message"]


def _post_task(base_url: str, user: str, title: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        f"{base_url}/api/{user}/tasks",
        data=json.dumps({"title": title}).encode(),
        headers={"Authorization": f"Bearer {token(user)}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, json.loads(error.read())


# --- the chat bucket (agent_service) ---------------------------------------------------------


async def test_chat_turns_are_limited_per_user_and_stream_too(
    limited_task_service: str, database_url_factory, base_env: dict[str, str], log_dir: Path
) -> None:
    conversation_address, agent_address = (f"127.0.0.1:{free_port()}" for _ in range(2))
    env = {
        **base_env,
        "TASK_SERVICE_ADDR": limited_task_service,
        "CONVERSATION_SERVICE_ADDR": conversation_address,
        "CONVERSATION_DATABASE_URL": database_url_factory("sqlite", "ratelimit_chat"),
        "AGENT_SERVICE_ADDR": agent_address,
        "AGENT_HTTP_PORT": str(free_port()),
        "LLM_BASE_URL": "",  # the built-in model
        "RATE_LIMIT_CHAT_PER_MINUTE": "2",
    }
    services = [
        ServiceProcess("conversation_service", env, conversation_address, log_dir),
        ServiceProcess("agent_service", env, agent_address, log_dir),
    ]
    hugo, iris = f"hugo-{uuid.uuid4().hex[:6]}", f"iris-{uuid.uuid4().hex[:6]}"
    try:
        for service in services:
            service.start()
        async with grpc.aio.insecure_channel(agent_address) as channel:
            agent = agent_pb2_grpc.AgentServiceStub(channel)
            for n in range(2):
                reply = await agent.Chat(
                    agent_pb2.ChatRequest(message=f"hello {n}"), metadata=auth_metadata(hugo), timeout=30
                )
                assert reply.response
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await agent.Chat(agent_pb2.ChatRequest(message="hello again"), metadata=auth_metadata(hugo), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert 1 <= _retry_after(refused.value) <= 31
            # The stream shares the budget and is refused as a status before any event.
            stream = agent.ChatStream(agent_pb2.ChatRequest(message="hello"), metadata=auth_metadata(hugo), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as refused_stream:
                async for _event in stream:
                    pass
            assert refused_stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _retry_after(refused_stream.value) >= 1
            assert (
                await agent.Chat(agent_pb2.ChatRequest(message="hello"), metadata=auth_metadata(iris), timeout=30)
            ).response
    finally:
        for service in services:
            service.stop()


# --- the reads bucket (task_service and conversation_service) ----------------------------------

READ_LIMIT = 3
CHAT_TURN_STEPS = {"GetRecentMessages", "GetMessageByRequestId"}  # counted as chat, not as reads


def test_every_get_and_list_rpc_spends_the_reads_budget() -> None:
    """The table in common/ratelimit.py is the one place: a new Get*/List* RPC must be listed."""
    for module in (task_pb2, conversation_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                if method.name.startswith(("Get", "List")) and method.name not in CHAT_TURN_STEPS:
                    assert METHOD_BUCKETS.get(path) == "reads", path
    for write in ("CreateTask", "UpdateTask", "SetTaskCompleted", "DeleteTask"):
        assert METHOD_BUCKETS[f"/todo.v1.TaskService/{write}"] == "writes"


def _audit_records(service: ServiceProcess, event: str) -> list[dict[str, Any]]:
    records = []
    for line in service.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"audit"' in line:
            record = json.loads(line)
            if record.get("logger") == "audit" and record.get("event") == event:
                records.append(record)
    return records


async def test_reads_past_their_budget_are_refused_with_retry_after(
    database_url_factory, base_env: dict[str, str], log_dir: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = _limited_env(
        base_env,
        database_url_factory("sqlite", "ratelimit_reads"),
        address,
        RATE_LIMIT_READS_PER_MINUTE=str(READ_LIMIT),
    )
    service = ServiceProcess("task_service", env, address, log_dir).start()
    jane, kim = f"jane-{uuid.uuid4().hex[:6]}", f"kim-{uuid.uuid4().hex[:6]}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            await _create(stub, jane, "first")
            list_request, get_request = task_pb2.ListTasksRequest(), task_pb2.GetTaskRequest(task_id=1)
            await stub.ListTasks(list_request, metadata=auth_metadata(jane), timeout=10)
            await stub.GetTask(get_request, metadata=auth_metadata(jane), timeout=10)
            await stub.ListTasks(list_request, metadata=auth_metadata(jane), timeout=10)
            for method, request in ((stub.GetTask, get_request), (stub.ListTasks, list_request)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await method(request, metadata=auth_metadata(jane), timeout=10)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "rate limit exceeded for reads" in (refused.value.details() or "")
                assert 1 <= _retry_after(refused.value) <= 60 / READ_LIMIT + 1
            # Writes have their own budget, and kim his own reads.
            assert (await _create(stub, jane, "second")).id == 2
            listed = await stub.ListTasks(list_request, metadata=auth_metadata(kim), timeout=10)
            assert list(listed.tasks) == []
    finally:
        service.stop()
    refusals = _audit_records(service, "rate_limited")
    assert [(r["user"], r["method"]) for r in refusals] == [
        (jane, "/todo.v1.TaskService/GetTask"),
        (jane, "/todo.v1.TaskService/ListTasks"),
    ], refusals
    assert all(r["surface"] == "grpc" and "reads" in r["reason"] for r in refusals)


async def test_conversation_reads_spend_the_reads_budget(
    database_url_factory, base_env: dict[str, str], log_dir: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {
        **base_env,
        "CONVERSATION_SERVICE_ADDR": address,
        "CONVERSATION_DATABASE_URL": database_url_factory("sqlite", "ratelimit_conversation_reads"),
        "RATE_LIMIT_READS_PER_MINUTE": "2",
    }
    service = ServiceProcess("conversation_service", env, address, log_dir).start()
    lena = f"lena-{uuid.uuid4().hex[:6]}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = conversation_pb2_grpc.ConversationServiceStub(channel)
            metadata = auth_metadata(lena)
            created = await stub.CreateConversation(
                conversation_pb2.CreateConversationRequest(title="plans"), metadata=metadata, timeout=10
            )
            get_request = conversation_pb2.GetConversationRequest(conversation_id=created.id)
            await stub.ListConversations(conversation_pb2.ListConversationsRequest(), metadata=metadata, timeout=10)
            await stub.GetConversation(get_request, metadata=metadata, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListConversations(conversation_pb2.ListConversationsRequest(), metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _retry_after(refused.value) >= 1
    finally:
        service.stop()
