"""The runtime every service shares, proven on a real task_service process per backend:
health and reflection without a token, SIGTERM (NOT_SERVING first, then a clean exit),
a restart against the same database, and the README documenting every setting.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from common import db
from common.settings import documented_settings
from tests.support import ROOT, ServiceProcess, auth_metadata
from todo.v1 import task_pb2, task_pb2_grpc

TIMEOUT = 30
TASK_SERVICE = "todo.v1.TaskService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def channel(task_service: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(task_service.address) as opened:
        yield opened


def test_health_answers_serving_without_a_token(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service_name in ("", TASK_SERVICE):  # "" is the whole server: what probes ask by default
        reply = health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=TIMEOUT)
        assert reply.status == SERVING
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="todo.v1.NoSuchService"), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_task_service_without_a_token(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {TASK_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services

    # What grpcurl does: build the service's descriptors (with their imports) from reflection alone.
    pool = descriptor_pool.DescriptorPool(database)
    task_service = pool.FindServiceByName(TASK_SERVICE)
    assert {method.name for method in task_service.methods} == {
        "CreateTask",
        "GetTask",
        "ListTasks",
        "UpdateTask",
        "SetTaskCompleted",
        "DeleteTask",
        "GetSettings",
        "UpdateSettings",
        "ListActivity",
        "Undo",
    }
    create = task_service.methods_by_name["CreateTask"]
    assert create.input_type.full_name == "todo.v1.CreateTaskRequest"
    assert "title" in create.input_type.fields_by_name


def test_reflection_answers_an_unknown_symbol_with_an_error_response(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="todo.v1.Nope")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_reflection_v1_is_unimplemented_not_unauthenticated(channel: grpc.Channel) -> None:
    # grpcurl asks grpc.reflection.v1 first and falls back to v1alpha on UNIMPLEMENTED:
    # an auth error there would break that fallback.
    call = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter([b""]), timeout=TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_task_rpcs_need_a_token_but_probes_do_not(channel: grpc.Channel) -> None:
    stub = task_pb2_grpc.TaskServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListTasks(task_pb2.ListTasksRequest(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ListTasks(task_pb2.ListTasksRequest(), metadata=auth_metadata("probe-user"), timeout=TIMEOUT)


async def test_sigterm_goes_not_serving_then_exits_zero_and_a_restart_keeps_tasks(
    task_service: ServiceProcess,
) -> None:
    metadata = auth_metadata("restart-user")
    async with grpc.aio.insecure_channel(task_service.address) as aio_channel:
        tasks = task_pb2_grpc.TaskServiceStub(aio_channel)
        for title in ("survives", "deleted before the restart"):
            await tasks.CreateTask(task_pb2.CreateTaskRequest(title=title), metadata=metadata, timeout=TIMEOUT)
        await tasks.SetTaskCompleted(task_pb2.SetTaskCompletedRequest(task_id=1), metadata=metadata, timeout=TIMEOUT)
        await tasks.DeleteTask(task_pb2.DeleteTaskRequest(task_id=2), metadata=metadata, timeout=TIMEOUT)
        before = await tasks.GetTask(task_pb2.GetTaskRequest(task_id=1), metadata=metadata, timeout=TIMEOUT)

        # Watch health across the signal: the service must say NOT_SERVING before it goes away.
        watch = health_pb2_grpc.HealthStub(aio_channel).Watch(health_pb2.HealthCheckRequest(service=TASK_SERVICE))
        assert (await asyncio.wait_for(watch.read(), TIMEOUT)).status == SERVING
        assert task_service.process is not None
        task_service.process.send_signal(signal.SIGTERM)
        assert (await asyncio.wait_for(watch.read(), TIMEOUT)).status == NOT_SERVING
        watch.cancel()

    try:
        exit_code = await asyncio.to_thread(task_service.process.wait, TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"task_service did not exit within {TIMEOUT}s of SIGTERM:\n{task_service.log_tail()}")
    assert exit_code == 0, task_service.log_tail()
    assert '"msg": "stopped"' in task_service.log_tail()

    task_service.start()
    async with grpc.aio.insecure_channel(task_service.address) as aio_channel:
        tasks = task_pb2_grpc.TaskServiceStub(aio_channel)
        after = await tasks.GetTask(task_pb2.GetTaskRequest(task_id=1), metadata=metadata, timeout=TIMEOUT)
        assert after == before
        # The counter survived too: the deleted task's number is still not handed out again.
        created = await tasks.CreateTask(task_pb2.CreateTaskRequest(title="new"), metadata=metadata, timeout=TIMEOUT)
        assert created.id == 3


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name, _default, _doc in documented_settings() if not re.search(rf"\b{name}\b", readme)]
    assert not missing, f"settings missing from README.md: {', '.join(missing)}"


@pytest.mark.parametrize("service", ["task_service", "conversation_service", "agent_service"])
def test_a_serving_process_does_not_import_what_it_may_never_need(service: str) -> None:
    """Memory (issue 19): alembic and mako run in the migration child (common/migrate.py),
    redis-py only with RATE_LIMIT_REDIS_URL, the ChatKit SDK (and openai-agents under it) when
    the first /chatkit request comes (agent_service/mcp_server.py's LazyChatKit)."""
    unwanted = ("alembic", "mako", "redis", "chatkit", "agents")
    code = f"import sys, common.server, {service}.server; print(sorted(m for m in {unwanted!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def test_an_in_memory_sqlite_database_is_refused_by_the_migration_child() -> None:
    with pytest.raises(db.MigrationError, match="in-memory SQLite"):
        await db.migrate(ROOT / "task_service" / "migrations", "sqlite+aiosqlite:///:memory:")
