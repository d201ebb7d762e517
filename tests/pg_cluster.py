"""A private PostgreSQL cluster for fault tests: stopped and restarted at will.

The machine's shared PostgreSQL (127.0.0.1:5432) serves every other suite and must never be
restarted by a test; this cluster lives in a temporary folder, listens on a free loopback port
and a socket in that folder, and is thrown away afterwards. PostgreSQL refuses to run as root,
so when the tests run as root its programs run as the `postgres` user (runuser).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from tests.support import free_port

SERVICE_USER = "postgres"


def postgres_bin_dir() -> Path:
    """The newest installed server's bin folder (Debian layout), or PG_BIN_DIR."""
    if os.environ.get("PG_BIN_DIR"):
        return Path(os.environ["PG_BIN_DIR"])
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(path.split("/")[4]))
    if not candidates:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (set PG_BIN_DIR)")
    return Path(candidates[-1]).parent


class PgCluster:
    """initdb + pg_ctl on a temporary data folder; `url(db)` gives SQLAlchemy URLs to it."""

    def __init__(self) -> None:
        self.bin_dir = postgres_bin_dir()
        # Under /tmp (not pytest's 0700 tmp folders) so the postgres user can reach it.
        self.root = Path(tempfile.mkdtemp(prefix="todo-pg-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, SERVICE_USER, SERVICE_USER)

    def _run(self, program: str, *args: str, timeout: float = 60) -> None:
        command = [str(self.bin_dir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVICE_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def init(self) -> PgCluster:
        self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres", "-N", "-E", "UTF8")
        return self

    def start(self) -> None:
        options = f"-k {self.root} -c listen_addresses=127.0.0.1 -p {self.port}"
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (disconnect clients, checkpoint) or `immediate` (crash-like)."""
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-D", str(self.data_dir), "-m", mode)

    def restart(self, down_seconds: float = 0.0, mode: str = "fast") -> None:
        """Stop, stay down for `down_seconds` (clients see refused connections), start again."""
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy (psycopg) URL of `database` on this cluster."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str) -> str:
        """A fresh database; returns its name."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def destroy(self) -> None:
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def private_cluster() -> Iterator[PgCluster]:
    """A started private cluster, destroyed on exit."""
    cluster = PgCluster()
    try:
        cluster.init().start()
        yield cluster
    finally:
        cluster.destroy()
