"""Fixtures shared by every suite: databases on both backends, the services as processes.

PostgreSQL is required: when it cannot be reached, the tests that use it fail (they never
skip), so CI cannot go green without having run them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import SECRET, create_postgres_database, drop_postgres_database, free_port

BACKENDS = ["sqlite", "postgres"]


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
