"""The stack under test, its databases, the model server and the load generator, as processes.

`open_stack(...)` runs the project's own `scripts/stack.py` Stack (every service that exists +
Envoy) on free ports, with fresh databases, pointed at the benchmark's model server.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.stack import Stack
from tests.support import SECRET, create_postgres_database, drop_postgres_database, free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PR_SET_PDEATHSIG = 1


@dataclass
class StackHandle:
    gateway_url: str
    secret: str
    kind: str  # how it was started, for the report
    services: list[str]
    task_database_url: str
    conversation_database_url: str
    log_dir: Path
    task_addr: str
    conversation_addr: str

    @property
    def has_chat(self) -> bool:
        return "agent_service" in self.services


def database_urls(backend: str, workdir: Path) -> tuple[str, str]:
    if backend == "sqlite":
        return (f"sqlite+aiosqlite:///{workdir / 'tasks.db'}", f"sqlite+aiosqlite:///{workdir / 'conversations.db'}")
    return create_postgres_database("todo_bench_tasks"), create_postgres_database("todo_bench_conv")


def service_env(task_url: str, conversation_url: str, model_url: str, workdir: Path) -> dict[str, str]:
    """Settings for a benchmark run: the project's defaults except where a benchmark needs otherwise."""
    return {
        "BETTER_AUTH_SECRET": SECRET,
        "STATE_DIR": str(workdir / "state"),
        "TASK_DATABASE_URL": task_url,
        "CONVERSATION_DATABASE_URL": conversation_url,
        "LLM_BASE_URL": model_url,
        "LLM_API_KEY": "bench",
        "LLM_MODEL": "bench",
        # The default level (INFO: one access line per RPC) is part of the cost we measure.
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "INFO"),
        "GRPC_SHUTDOWN_GRACE_SECONDS": "2",
        # The per-user limits stay in the path (we measure their cost) but never refuse a benchmark call.
        "RATE_LIMIT_WRITES_PER_MINUTE": "1000000000",
        "RATE_LIMIT_CHAT_PER_MINUTE": "1000000000",
        "RATE_LIMIT_READS_PER_MINUTE": "1000000000",
        # Envoy's per-route timeout (120 s) bounds a chat turn; our own limit is generous
        # so that a slow turn shows up as latency, not as an error we made up.
        "LLM_TIMEOUT_SECONDS": "120",
    }


@contextlib.contextmanager
def open_stack(backend: str, model_url: str, workdir: Path, replicas: int = 1) -> Iterator[StackHandle]:
    """scripts/stack.py's Stack on free ports, with fresh databases of `backend`; `replicas`
    processes of each service (replica k on each port + (k - 1) * 100)."""
    workdir.mkdir(parents=True, exist_ok=True)
    task_url, conversation_url = database_urls(backend, workdir)
    gateway_port = free_port()
    env = {
        **service_env(task_url, conversation_url, model_url, workdir),
        "TASK_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "CONVERSATION_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "AGENT_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "AGENT_HTTP_PORT": str(free_port()),
        "TASK_METRICS_PORT": str(free_port()),
        "CONVERSATION_METRICS_PORT": str(free_port()),
        "AGENT_METRICS_PORT": str(free_port()),
        "ENVOY_ADMIN_PORT": str(free_port()),
        "GATEWAY_PORT": str(gateway_port),
    }
    stack = Stack(env, work_dir=workdir, replicas=replicas)
    each = f", {replicas} replicas each" if replicas > 1 else ""
    try:
        stack.start()
        yield StackHandle(
            gateway_url=stack.base_url,
            secret=env["BETTER_AUTH_SECRET"],
            kind="scripts/stack.py Stack ("
            + ", ".join(f"{name}_service" for name in stack.services)
            + f"{each} + envoy)",
            services=[f"{name}_service" for name in stack.services],
            task_database_url=task_url,
            conversation_database_url=conversation_url,
            log_dir=workdir / "logs",
            task_addr=stack.settings.task_service_addr,
            conversation_addr=stack.settings.conversation_service_addr,
        )
    finally:
        stack.stop()
        for url in (task_url, conversation_url):
            if url.startswith("postgresql"):
                with contextlib.suppress(Exception):
                    drop_postgres_database(url)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the benchmark process dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ModelServer:
    """bench/model_server.py as a separate process."""

    def __init__(self, log_dir: Path) -> None:
        self.log_path = log_dir / "model_server.log"
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> ModelServer:
        self.process = subprocess.Popen(
            [PYTHON, "-m", "bench.model_server", "--port", "0"],
            cwd=ROOT,
            preexec_fn=_die_with_parent,  # never outlive a killed benchmark
            stdout=subprocess.PIPE,
            stderr=self.log_path.open("ab"),
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"model server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def set_delay(self, seconds: float) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/bench/delay",
            data=json.dumps({"seconds": seconds}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5):
            pass

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def run_loadgen(job: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one job in a fresh load-generator process; its JSON result."""
    completed = subprocess.run(
        [PYTHON, "-m", "bench.loadgen"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
        preexec_fn=_die_with_parent,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"loadgen failed ({completed.returncode}): {completed.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="todo-bench-"))
