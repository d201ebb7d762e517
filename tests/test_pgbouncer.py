"""The services through a real PgBouncer in transaction pooling mode, as Neon's pooled endpoints are.

PgBouncer (Debian's `pgbouncer` package, 1.18: it tracks no prepared statements) runs as a child
of the test on a free port, in front of the machine's PostgreSQL, with `default_pool_size = 2`, so
every client connection of the services shares two server connections per database: consecutive
transactions of one client land on different server sessions. Session state (psycopg's automatic
prepared statements, a `SET`, an advisory lock) does not survive that; here each would fail a
request with `DuplicatePreparedStatement` or `InvalidSqlStatementName` (a 500).

The services' URLs point at PgBouncer over TLS (`sslmode=require`, PgBouncer serving a
self-signed certificate made here), their migrations (which hold a session-level advisory lock)
use `*_DATABASE_MIGRATION_URL`, a direct connection. On that stack run the REST suite of
test_gateway.py (tasks, conversations, chat with the built-in model, errors, /readyz) and a burst
of chat turns from several users at once.

Before the fix in common/db.py (`prepare_threshold=None`), test_chat_turns_through_the_pooler
failed with HTTP 500 on the first turn after psycopg's 5th execution of a statement on a
connection (the agent's log: DuplicatePreparedStatement: prepared statement "_pg3_0" already
exists).
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from common import db
from scripts.stack import Stack
from tests import test_gateway as rest_suite
from tests.gateway_fixtures import Gateway, gateway_env
from tests.support import (
    POSTGRES_ADMIN_URL,
    ServiceProcess,
    create_postgres_database,
    drop_postgres_database,
    free_port,
)
from tests.test_tls import self_signed

POOL_SIZE = 2  # server connections per database and user: far fewer than the services' clients
SERVICE_USER = "postgres"  # PgBouncer refuses to run as root; as root it drops to this user (-u)


class PgBouncer:
    """`pgbouncer <ini>` in transaction pooling mode on a free loopback port, TLS offered to clients."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        # Under /tmp (not pytest's 0700 folders): as root, PgBouncer runs as SERVICE_USER and reads from here.
        self.root = Path(tempfile.mkdtemp(prefix="todo-pgbouncer-"))
        self.port = free_port()
        self.log_path = self.root / "pgbouncer.log"
        cert, key = self_signed(self.root)
        (self.root / "userlist.txt").write_text(f'"{SERVICE_USER}" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={upstream_host} port={upstream_port}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {self.root / 'userlist.txt'}",
                    f"admin_users = {SERVICE_USER}",
                    "pool_mode = transaction",
                    f"default_pool_size = {POOL_SIZE}",
                    "max_client_conn = 1000",
                    "client_tls_sslmode = allow",
                    f"client_tls_cert_file = {cert}",
                    f"client_tls_key_file = {key}",
                    "",
                ]
            )
        )
        if os.geteuid() == 0:
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, SERVICE_USER, SERVICE_USER)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> PgBouncer:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        argv = [binary, *(["-u", SERVICE_USER] if os.geteuid() == 0 else []), str(self.root / "pgbouncer.ini")]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.admin_url(), autocommit=True, connect_timeout=2):
                    return self
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise TimeoutError(f"pgbouncer not accepting connections after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def admin_url(self) -> str:
        """PgBouncer's own console (SHOW POOLS, SHOW CLIENTS, ...)."""
        return f"postgresql://{SERVICE_USER}@127.0.0.1:{self.port}/pgbouncer?sslmode=disable"

    def pooled(self, direct_url: str, sslmode: str = "require") -> str:
        """`direct_url` (a database on the upstream server) as reached through this PgBouncer."""
        url = make_url(direct_url).set(host="127.0.0.1", port=self.port).update_query_dict({"sslmode": sslmode})
        return url.render_as_string(hide_password=False)

    def show(self, what: str) -> list[dict[str, Any]]:
        with psycopg.connect(self.admin_url(), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(f"SHOW {what}", prepare=False)
            names = [column.name for column in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="module")
def pgbouncer() -> Iterator[PgBouncer]:
    upstream = make_url(POSTGRES_ADMIN_URL)
    bouncer = PgBouncer(upstream.host or "127.0.0.1", upstream.port or 5432).start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture(scope="module")
def direct_urls(database_url_factory: Callable[[str, str], str]) -> dict[str, str]:
    return {name: database_url_factory("postgres", f"pgb_{name}") for name in ("task", "conversation")}


def pooled_env(pgbouncer: PgBouncer, direct_urls: dict[str, str]) -> dict[str, str]:
    """Service URLs on the pooler (TLS), migration URLs direct."""
    return {
        "TASK_DATABASE_URL": pgbouncer.pooled(direct_urls["task"]),
        "CONVERSATION_DATABASE_URL": pgbouncer.pooled(direct_urls["conversation"]),
        "TASK_DATABASE_MIGRATION_URL": direct_urls["task"],
        "CONVERSATION_DATABASE_MIGRATION_URL": direct_urls["conversation"],
    }


@pytest.fixture(scope="module")
def gateway(
    pgbouncer: PgBouncer, direct_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """The whole stack (built-in model) with its databases behind PgBouncer."""
    work_dir = tmp_path_factory.mktemp("gateway-pgbouncer")
    (work_dir / "state").mkdir()
    env = {**gateway_env({}, work_dir / "state"), **pooled_env(pgbouncer, direct_urls)}
    stack = Stack(env, work_dir=work_dir, services=["task", "conversation", "agent"]).start(timeout=120)
    try:
        yield Gateway(stack=stack, base_url=stack.base_url, env=env)
    finally:
        stack.stop()


# The REST suite of test_gateway.py, collected here again: on this module's `gateway` (the pooled stack).
for _name, _test in list(vars(rest_suite).items()):
    if _name.startswith("test_") and inspect.isfunction(_test) and "gateway" in inspect.signature(_test).parameters:
        globals()[_name] = _test


def new_user() -> str:
    return f"pool-{uuid.uuid4().hex[:8]}"


def chat(gateway: Gateway, user: str, message: str, conversation_id: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    reply = gateway.call("POST", f"/api/{user}/chat", user=user, body=body, timeout=60)
    assert reply.status == 200, reply
    return dict(reply.json())


def titles(gateway: Gateway, user: str, status: str = "all") -> list[str]:
    reply = gateway.call("GET", f"/api/{user}/tasks?status={status}", user=user)
    assert reply.status == 200, reply
    return [task["title"] for task in reply.json()["tasks"]]


def a_conversation(gateway: Gateway, user: str) -> list[str]:
    """Nine turns of one conversation with the built-in model; returns what is left pending."""
    first = chat(gateway, user, "add buy milk")
    conversation = first["conversation_id"]
    for message in ("add walk the dog", "add call mom", "add pay rent", "what's pending?"):
        chat(gateway, user, message, conversation)
    chat(gateway, user, "mark 1 done", conversation)
    chat(gateway, user, "delete task 2", conversation)
    listed = chat(gateway, user, "show my tasks", conversation)
    assert listed["tool_calls"][0]["name"] == "list_tasks", listed
    stream = gateway.call(
        "POST",
        f"/api/{user}/chat/stream",
        user=user,
        body={"message": "add water the plants", "conversation_id": conversation},
        timeout=60,
    )
    assert stream.status == 200 and b'"done"' in stream.body, stream
    messages = gateway.call("GET", f"/api/{user}/conversations/{conversation}/messages", user=user)
    assert messages.status == 200 and len(messages.json()["messages"]) == 18, messages
    return titles(gateway, user, "pending")


def test_chat_turns_through_the_pooler(gateway: Gateway) -> None:
    """Turns of several users at once, every one answered 200, the task state exactly as asked."""
    users = [new_user() for _ in range(6)]
    with ThreadPoolExecutor(len(users)) as pool:
        pending = list(pool.map(lambda user: a_conversation(gateway, user), users))
    for user, left in zip(users, pending, strict=True):
        assert left == ["Call mom", "Pay rent", "Water the plants"], (user, left)
        assert titles(gateway, user, "completed") == ["Buy milk"]


def test_service_connections_to_the_pooler_use_tls(gateway: Gateway, pgbouncer: PgBouncer) -> None:
    """`sslmode=require` in the URL reached libpq: PgBouncer saw TLS on every service connection."""
    chat(gateway, new_user(), "add check the tls")
    clients = [row for row in pgbouncer.show("CLIENTS") if row["database"] != "pgbouncer"]
    assert clients, "no service connection reached PgBouncer"
    assert all(row["tls"] for row in clients), clients


async def test_engine_prepares_nothing_on_the_server(pgbouncer: PgBouncer, direct_urls: dict[str, str]) -> None:
    """The services' engine, through the pooler: the same statement many times on one client
    connection, never prepared (psycopg would prepare it on its 6th run, on a server session that
    the next transaction may not get)."""

    engine = db.create_engine(pgbouncer.pooled(direct_urls["task"]), pool_size=1)
    prepared = []
    try:
        for _ in range(20):
            async with engine.begin() as conn:
                statement = text("SELECT count(*) FROM pg_prepared_statements")
                prepared.append((await conn.execute(statement)).scalar())
    finally:
        await engine.dispose()
    assert prepared == [0] * 20


def test_a_migration_url_with_sslmode_is_honoured(
    pgbouncer: PgBouncer, direct_urls: dict[str, str], base_env: dict[str, str], log_dir: Path
) -> None:
    """The migration URL is what migrations connect with, its `sslmode` included: `require`
    against the local server (no TLS) stops task_service before it serves, naming the reason."""
    address = f"127.0.0.1:{free_port()}"
    fresh = create_postgres_database("todo_test_pgb_sslmode")
    env = {
        **base_env,
        "TASK_SERVICE_ADDR": address,
        "TASK_DATABASE_URL": pgbouncer.pooled(fresh),
        "TASK_DATABASE_MIGRATION_URL": make_url(fresh).update_query_dict({"sslmode": "require"}).render_as_string(),
    }
    service = ServiceProcess("task_service", env, address, log_dir)
    try:
        with pytest.raises(RuntimeError, match="exited early"):
            service.start(timeout=30)
        assert "SSL" in service.log_tail(200), service.log_tail()
    finally:
        service.stop()
        drop_postgres_database(fresh)


def test_migration_url_is_read_per_service() -> None:
    environ = {"TASK_DATABASE_MIGRATION_URL": "postgresql+psycopg://direct/tasks"}
    pooled = "postgresql+psycopg://pooled/tasks"
    tasks = Path(db.__file__).resolve().parent.parent / "task_service" / "migrations"
    conversations = tasks.parent.parent / "conversation_service" / "migrations"
    assert db.migration_url(tasks, pooled, environ) == "postgresql+psycopg://direct/tasks"
    assert db.migration_url(conversations, pooled, environ) == pooled
    assert db.migration_url(tasks, pooled, {}) == pooled
