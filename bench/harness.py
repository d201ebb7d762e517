"""The stack under test, its databases, the model server and the load generator, as processes.

`open_stack(...)` runs the project's own `scripts/stack.py` Stack (every service that exists +
Envoy) on free ports, with fresh databases, pointed at the benchmark's model server;
`open_stacks(...)` starts several side by side. `OtlpReceiver` is bench/otlp_receiver.py, the
collector the tracing phase points OTEL_EXPORTER_OTLP_ENDPOINT at.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.stack import Stack, die_with_parent
from tests.support import SECRET, create_postgres_database, drop_postgres_database, free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


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
    pids: list[int] = field(default_factory=list)  # every process of the stack (services, Envoy)

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


# The ports a stack listens on (replica 1; scripts/stack.py shifts the others).
PORT_SETTINGS = (
    "TASK_SERVICE_ADDR",
    "CONVERSATION_SERVICE_ADDR",
    "AGENT_SERVICE_ADDR",
    "AGENT_HTTP_PORT",
    "TASK_METRICS_PORT",
    "CONVERSATION_METRICS_PORT",
    "AGENT_METRICS_PORT",
    "ENVOY_ADMIN_PORT",
    "GATEWAY_PORT",
)


def port_settings(ports: Sequence[int]) -> dict[str, str]:
    return {
        name: f"127.0.0.1:{port}" if name.endswith("_ADDR") else str(port)
        for name, port in zip(PORT_SETTINGS, ports, strict=True)
    }


def reserve_ports(count: int) -> list[int]:
    """`count` distinct free ports: all held open until all are chosen, so none repeats (stacks
    started side by side would otherwise be handed each other's not-yet-bound ports)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


@contextlib.contextmanager
def open_stack(
    backend: str,
    model_url: str,
    workdir: Path,
    replicas: int = 1,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[StackHandle]:
    """scripts/stack.py's Stack on free ports, with fresh databases of `backend`; `replicas`
    processes of each service (replica k on each port + (k - 1) * 100); `extra_env` on top of
    the benchmark's settings (e.g. metrics ports of 0, an OTLP endpoint, or ports chosen by
    `reserve_ports`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    task_url, conversation_url = database_urls(backend, workdir)
    env = {
        **service_env(task_url, conversation_url, model_url, workdir),
        **port_settings([free_port() for _ in PORT_SETTINGS]),
        **(extra_env or {}),
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
            pids=stack.pids(),
        )
    finally:
        stack.stop()
        for url in (task_url, conversation_url):
            if url.startswith("postgresql"):
                with contextlib.suppress(Exception):
                    drop_postgres_database(url)


@contextlib.contextmanager
def open_stacks(
    backend: str, model_url: str, stacks: Sequence[tuple[Path, Mapping[str, str]]]
) -> Iterator[list[StackHandle]]:
    """Several stacks (each: its folder and extra settings), started side by side on distinct
    ports; all stopped when the block ends (or when one of them fails to start)."""
    ports = reserve_ports(len(PORT_SETTINGS) * len(stacks))
    managers = [
        open_stack(
            backend,
            model_url,
            workdir,
            extra_env={**port_settings(ports[n * len(PORT_SETTINGS) : (n + 1) * len(PORT_SETTINGS)]), **env},
        )
        for n, (workdir, env) in enumerate(stacks)
    ]
    # The pool's threads must outlive the stacks: a child's death signal (setpriv --pdeathsig)
    # fires when the *thread* that started it ends, which would stop a stack as soon as its
    # starter returned.
    with ThreadPoolExecutor(len(managers)) as pool, contextlib.ExitStack() as started:
        entering = [pool.submit(manager.__enter__) for manager in managers]
        handles, failure = [], None
        for manager, future in zip(managers, entering, strict=True):
            try:
                handles.append(future.result())
                started.push(manager.__exit__)
            except BaseException as error:  # the others still get stopped, then this is raised
                failure = failure or error
        if failure is not None:
            raise failure
        yield handles


class ModelServer:
    """bench/model_server.py as a separate process."""

    def __init__(self, log_dir: Path) -> None:
        self.log_path = log_dir / "model_server.log"
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> ModelServer:
        self.process = subprocess.Popen(
            die_with_parent([PYTHON, "-m", "bench.model_server", "--port", "0"]),  # never outlive a killed benchmark
            cwd=ROOT,
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


class OtlpReceiver:
    """bench/otlp_receiver.py as a separate process: an OTLP/gRPC collector that only counts."""

    def __init__(self, log_dir: Path) -> None:
        self.log_path = log_dir / "otlp_receiver.log"
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> OtlpReceiver:
        self.process = subprocess.Popen(
            die_with_parent([PYTHON, "-m", "bench.otlp_receiver", "--port", "0"]),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log_path.open("ab"),
            text=True,
        )
        line = self._line()
        if not line.startswith("PORT "):
            raise RuntimeError(f"OTLP receiver did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def counts(self) -> dict[str, dict[str, int]]:
        """What it received so far: exports, spans and server spans per service.name."""
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR1)
        counts: dict[str, dict[str, int]] = json.loads(self._line())
        return counts

    def stop(self) -> dict[str, dict[str, int]]:
        """Stop it; its final counts."""
        if self.process is None or self.process.poll() is not None:
            return {}
        self.process.terminate()
        counts: dict[str, dict[str, int]] = json.loads(self._line() or "{}")
        self.process.wait(10)
        return counts

    def _line(self, timeout: float = 30) -> str:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"OTLP receiver did not answer within {timeout}s (log: {self.log_path})")
        return self.process.stdout.readline()


def envoy_outcomes(log_path: Path, path_prefix: str, expected: int, wait_seconds: float = 5.0) -> dict[str, Any]:
    """The gateway's own account of the requests whose path starts with `path_prefix`, from
    Envoy's JSON access log: how many per "status flags" (flag UO: refused by the upstream
    cluster's circuit breaker) and over how long Envoy took them up (its START_TIME). Waits up to
    `wait_seconds` for Envoy to flush `expected` lines."""
    deadline = time.monotonic() + wait_seconds
    while True:
        rows = []
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        for line in text.splitlines():
            start = line.find("{")
            if start < 0 or path_prefix not in line:
                continue
            with contextlib.suppress(ValueError, KeyError):
                entry = json.loads(line[start:])
                if str(entry.get("path", "")).startswith(path_prefix):
                    rows.append(entry)
        if len(rows) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    outcomes = Counter(f"{entry.get('status')} {entry.get('flags')}" for entry in rows)
    # Refusals timed by the gateway: from the request's arrival (Envoy's START_TIME) to its answer.
    refusal_ms = [float(entry["ms"]) for entry in rows if entry.get("status") in (429, 503) and "ms" in entry]
    starts = []
    for entry in rows:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            starts.append(dt.datetime.fromisoformat(str(entry["ts"]).replace("Z", "+00:00")).timestamp())
    return {
        "logged": len(rows),
        "outcomes": dict(outcomes.most_common()),
        "take_up_spread_ms": (max(starts) - min(starts)) * 1000 if starts else 0.0,
        "refusal_ms": refusal_ms,
    }


def run_loadgen(job: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one job in a fresh load-generator process; its JSON result."""
    completed = subprocess.run(
        die_with_parent([PYTHON, "-m", "bench.loadgen"]),
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"loadgen failed ({completed.returncode}): {completed.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="todo-bench-"))
