"""Fixtures shared by every suite: databases on both backends, the services as processes.

PostgreSQL is required: when it cannot be reached, the tests that use it fail (they never
skip), so CI cannot go green without having run them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chat_server import ChatServer
from tests.support import (
    SECRET,
    ServiceProcess,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    running,
)

BACKENDS = ["sqlite", "postgres"]

# Services started by tests serve no metrics unless the test gives them a port (free_ports_env
# does, for whole stacks): the defaults (9101-9103) would collide between stacks running at once.
for _metrics_port in ("TASK_METRICS_PORT", "CONVERSATION_METRICS_PORT", "AGENT_METRICS_PORT"):
    os.environ.setdefault(_metrics_port, "0")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="module")
def database_url_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, str], str]]:
    """make(backend, name) -> a fresh database URL; PostgreSQL databases are dropped afterwards."""
    created: list[str] = []

    def make(backend: str, name: str) -> str:
        if backend == "sqlite":
            return f"sqlite+aiosqlite:///{tmp_path_factory.mktemp(name) / (name + '.db')}"
        url = create_postgres_database(f"todo_test_{name}")
        created.append(url)
        return url

    yield make
    for url in created:
        drop_postgres_database(url)


@pytest.fixture(scope="module")
def base_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment every service process gets: the shared secret and a private state folder."""
    return {
        "BETTER_AUTH_SECRET": SECRET,
        "STATE_DIR": str(tmp_path_factory.mktemp("state")),
        "GRPC_SHUTDOWN_GRACE_SECONDS": "5",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="module", params=BACKENDS)
def task_service(
    request: pytest.FixtureRequest,
    database_url_factory: Callable[[str, str], str],
    base_env: dict[str, str],
    log_dir: Path,
) -> Iterator[ServiceProcess]:
    """A real task_service process on a loopback port, once per backend for the module."""
    address = f"127.0.0.1:{free_port()}"
    env = {**base_env, "TASK_SERVICE_ADDR": address, "TASK_DATABASE_URL": database_url_factory(request.param, "tasks")}
    with running("task_service", env, address, log_dir) as service:
        yield service


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatServer]:
    """The scripted Chat Completions server (tests/chat_server.py), one per test module."""
    server = ChatServer().start()
    yield server
    server.stop()
