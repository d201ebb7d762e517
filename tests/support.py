"""Helpers for tests that run the real services as processes on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.tokens import mint

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SECRET = "test-secret-" + "x" * 32
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def token(user_id: str, ttl_seconds: int = 3600, secret: str = SECRET, **claims: object) -> str:
    return mint(secret, user_id, ttl_seconds, **claims)


def auth_metadata(user_id: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token(user_id)}"),)


class ServiceProcess:
    """One of our services (`python -m <module>`) as a real process; restartable."""

    def __init__(self, module: str, env: dict[str, str], address: str, log_dir: Path) -> None:
        self.module, self.env, self.address = module, env, address
        self.log_path = log_dir / f"{module}-{address.rsplit(':', 1)[1]}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> ServiceProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LOG_FORMAT": "json", **self.env}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([PYTHON, "-m", self.module], cwd=ROOT, env=env, stdout=log, stderr=log)
        wait_serving(self.address, timeout, self)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> ServiceProcess:
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_serving(address: str, timeout: float, process: ServiceProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise RuntimeError(f"{process.module} exited early:\n{process.log_tail()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    tail = process.log_tail() if process else ""
    raise TimeoutError(f"{address} not SERVING after {timeout}s\n{tail}")


@contextmanager
def running(module: str, env: dict[str, str], address: str, log_dir: Path) -> Iterator[ServiceProcess]:
    service = ServiceProcess(module, env, address, log_dir).start()
    try:
        yield service
    finally:
        service.stop()


def create_postgres_database(prefix: str) -> str:
    """A fresh, empty PostgreSQL database; returns its SQLAlchemy (psycopg) URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def drop_postgres_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
