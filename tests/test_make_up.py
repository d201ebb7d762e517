"""`make up` as a user runs it: the whole stack natively, stopped with Ctrl-C, started again.

The exact command runs from the repository root in its own process group (like a terminal's
foreground job); Ctrl-C is SIGINT to that group. Ports and STATE_DIR are private to the test.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts.stack import http_status
from tests.gateway_fixtures import Gateway, free_ports_env
from tests.support import ROOT, token

START_TIMEOUT = 240  # `make up` may first (re)install the venv when pyproject.toml changed


def make_up_env(state_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MAKE", "MFLAGS"))}
    env.pop("BETTER_AUTH_SECRET", None)  # make up must create and keep one
    for name in ("TASK_DATABASE_URL", "CONVERSATION_DATABASE_URL", "LLM_BASE_URL"):
        env.pop(name, None)
    env |= {
        "STATE_DIR": str(state_dir),
        **free_ports_env(),
        "GRPC_SHUTDOWN_GRACE_SECONDS": "5",
        "MODE": "native",
    }
    return env


class MakeUp:
    """One `make up` run: its process group, output file and gateway URL."""

    def __init__(self, env: dict[str, str], output: Path) -> None:
        self.env, self.output = env, output
        self.base_url = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
        with output.open("ab") as sink:
            self.process = subprocess.Popen(
                ["make", "up"], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"make up exited:\n{self.tail()}"
            # Ready as a user sees it: the banner is out (Envoy may answer /readyz a moment before
            # up.py's own readiness poll returns and prints it).
            if "Ctrl-C stops everything." in self.output.read_text(errors="replace"):
                assert http_status(self.base_url + "/readyz") == 200, self.tail()
                return
            time.sleep(0.5)
        raise AssertionError(f"/readyz not 200 after {START_TIMEOUT}s:\n{self.tail()}")

    def ctrl_c(self) -> int:
        """Ctrl-C; make itself then dies by the same SIGINT once up.py has stopped everything."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"make up did not stop on SIGINT:\n{self.tail()}") from None

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])


def processes_with(marker: str) -> list[str]:
    """Processes whose environment holds `marker` (every child of that make up has it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name}: {command}")
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_make_up_runs_stops_cleanly_and_keeps_its_state(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    env = make_up_env(state_dir)
    marker = f"STATE_DIR={state_dir}\0"
    first = MakeUp(env, tmp_path / "first.log")
    try:
        first.wait_ready()
        secret_file = state_dir / "auth_secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        gateway = Gateway(stack=None, base_url=first.base_url, env=env)  # type: ignore[arg-type]
        alice = token("alice", secret=secret)
        reply = gateway.call("POST", "/api/alice/tasks", bearer=alice, body={"title": "Survive a restart"})
        assert reply.status == 200, reply
        assert gateway.call("GET", "/healthz").status == 200
        assert gateway.call("GET", "/openapi.json").status == 200
    finally:
        exit_code = first.ctrl_c()
    output = first.output.read_text(errors="replace")
    assert exit_code in (0, -signal.SIGINT), first.tail()
    for expected in ("make token USER=alice", "curl", "task_service ", "conversation_service", "envoy ", "\nstopped\n"):
        assert expected in output, expected
    assert processes_with(marker) == [], "orphans after Ctrl-C"
    assert http_status(first.base_url + "/healthz") is None

    second = MakeUp(env, tmp_path / "second.log")
    try:
        second.wait_ready()
        assert (state_dir / "auth_secret").read_text().strip() == secret
        gateway = Gateway(stack=None, base_url=second.base_url, env=env)  # type: ignore[arg-type]
        reply = gateway.call("GET", "/api/alice/tasks", bearer=token("alice", secret=secret))
        assert reply.status == 200, reply
        assert [task["title"] for task in reply.json()["tasks"]] == ["Survive a restart"]
    finally:
        assert second.ctrl_c() in (0, -signal.SIGINT), second.tail()
    assert processes_with(marker) == []


@pytest.mark.slow
def test_a_killed_launcher_leaves_no_orphans(tmp_path: Path) -> None:
    """SIGKILL gives up.py no chance to clean up: its children must still go (parent-death signal)."""
    env = make_up_env(tmp_path / "state")
    marker = f"STATE_DIR={tmp_path / 'state'}\0"
    with (tmp_path / "up.log").open("ab") as sink:
        launcher = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "python"), "-m", "scripts.up", "--mode", "native"],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while http_status(base_url + "/readyz") != 200:
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.5)
        assert len(processes_with(marker)) >= 4  # the launcher, the services, envoy
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 60
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with(marker) == []


@pytest.mark.slow
def test_state_is_private_to_its_owner(tmp_path: Path) -> None:
    """Folders 0700, files 0600: the secret, the SQLite files and the logs, also ones left looser."""
    state_dir = tmp_path / "state"
    (state_dir / "logs").mkdir(parents=True)
    state_dir.chmod(0o755)
    (state_dir / "logs").chmod(0o755)
    left_by_an_old_run = state_dir / "logs" / "old.log"
    left_by_an_old_run.write_text("an old line\n")
    left_by_an_old_run.chmod(0o644)
    env = make_up_env(state_dir)
    run = MakeUp(env, tmp_path / "up.log")
    try:
        run.wait_ready()
        gateway = Gateway(stack=None, base_url=run.base_url, env=env)  # type: ignore[arg-type]
        secret = (state_dir / "auth_secret").read_text().strip()
        reply = gateway.call("POST", "/api/alice/tasks", bearer=token("alice", secret=secret), body={"title": "x"})
        assert reply.status == 200, reply
        modes = {
            str(path.relative_to(state_dir)): stat.S_IMODE(path.stat().st_mode)
            for path in [state_dir, *state_dir.rglob("*")]
        }
    finally:
        run.ctrl_c()
    for expected in ("auth_secret", "tasks.db", "conversations.db", "logs/task_service.log", "logs/old.log"):
        assert expected in modes, (expected, sorted(modes))
    loose = {
        name: oct(mode) for name, mode in modes.items() if mode != (0o700 if (state_dir / name).is_dir() else 0o600)
    }
    assert loose == {}, loose


class _Ready(BaseHTTPRequestHandler):
    """What another instance's gateway answers: 200 to everything, /readyz included."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_make_up_refuses_ports_already_in_use(tmp_path: Path) -> None:
    env = make_up_env(tmp_path / "state")
    marker = f"STATE_DIR={tmp_path / 'state'}\0"
    gateway_port, agent_http_port = int(env["GATEWAY_PORT"]), int(env["AGENT_HTTP_PORT"])
    other_gateway = ThreadingHTTPServer(("127.0.0.1", gateway_port), _Ready)
    threading.Thread(target=other_gateway.serve_forever, daemon=True).start()
    other_agent = socket.create_server(("127.0.0.1", agent_http_port))
    try:
        started = time.monotonic()
        run = subprocess.run(
            ["make", "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=START_TIMEOUT, check=False
        )
        elapsed = time.monotonic() - started
    finally:
        other_gateway.shutdown()
        other_gateway.server_close()
        other_agent.close()
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert f"port {gateway_port} is in use (GATEWAY_PORT)" in output, output
    assert f"port {agent_http_port} is in use (AGENT_HTTP_PORT)" in output, output
    assert "Todo API:" not in output, "the ready banner was printed"
    assert "starting" not in output and "| " not in output, "something was started"
    assert processes_with(marker) == []
    assert elapsed < START_TIMEOUT
