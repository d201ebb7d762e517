"""Prometheus metrics: the gRPC server metrics, the product's counters, the /metrics server.

Every service serves the default registry (these metrics plus prometheus-client's process,
platform and GC collectors) as Prometheus text on its own port (`serve_http`: TASK_METRICS_PORT,
CONVERSATION_METRICS_PORT, AGENT_METRICS_PORT; 0 = off), bound to METRICS_BIND_HOST (default:
GRPC_BIND_HOST), never routed through the public gateway.

gRPC server metrics carry the names the gRPC ecosystem uses (go-grpc-prometheus and
py-grpc-prometheus), so existing dashboards and alerts work unchanged:
  grpc_server_started_total{grpc_type, grpc_service, grpc_method}
  grpc_server_handled_total{grpc_type, grpc_service, grpc_method, grpc_code}   (code: "OK", "NOT_FOUND", ...)
  grpc_server_handling_seconds{grpc_type, grpc_service, grpc_method}            (histogram)
The one server interceptor (common/interceptor.py) records them through `method_metrics`, with
every call's final status, those it refuses included; health checks and reflection are not counted.

The product's own, for the agent and the rate limiter to record through the helpers below:
  todo_chat_turns_total{outcome}        chat_turn(outcome)
  todo_tool_calls_total{tool, outcome}  tool_call(tool, outcome)
  todo_model_requests_total{outcome}    with model_request() as request: ...
  todo_model_request_seconds            (histogram, the same block)
  todo_model_tokens_total{kind}         request.tokens(prompt, completion)
  todo_rate_limited_total{bucket}       rate_limited(bucket)
and the database pools (`watch_pool`, read at scrape time, never per request):
  todo_db_pool_connections_in_use{database}, todo_db_pool_overflow{database}, todo_db_pool_size{database}

Cost: label children are built once per label set and cached, so recording is a dict lookup
and a lock-protected add (a few microseconds a call).
"""

from __future__ import annotations

import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
import prometheus_client
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from common.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# A `_created` timestamp beside every counter and histogram doubles the scrape for nothing we use.
prometheus_client.disable_created_metrics()

# Prometheus' default buckets (what go-grpc-prometheus uses), extended for chat turns and model
# requests, which take seconds to a minute or two.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MODEL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# Bounds on label values that come from outside (a model can call a tool by any name).
MAX_LABEL_VALUES = 64
OTHER = "other"

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code.", (*GRPC_LABELS, "grpc_code")
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status, on the server.",
    GRPC_LABELS,
    buckets=LATENCY_BUCKETS,
)

CHAT_TURNS = Counter("todo_chat_turns_total", "Chat turns, by outcome.", ("outcome",))
TOOL_CALLS = Counter(
    "todo_tool_calls_total", "Tool calls the agent ran or refused, by tool and outcome.", ("tool", "outcome")
)
MODEL_REQUESTS = Counter(
    "todo_model_requests_total", "Requests to the model (each retry counts), by outcome.", ("outcome",)
)
MODEL_SECONDS = Histogram(
    "todo_model_request_seconds", "Duration of one model request, to its last streamed chunk.", buckets=MODEL_BUCKETS
)
MODEL_TOKENS = Counter("todo_model_tokens_total", "Tokens the model reported using, by kind.", ("kind",))
RATE_LIMITED = Counter("todo_rate_limited_total", "Calls refused by a per-user rate limit, by bucket.", ("bucket",))

# Which port each service serves its metrics on (Settings fields).
METRICS_PORT_FIELDS = {
    "task_service": "task_metrics_port",
    "conversation_service": "conversation_metrics_port",
    "agent_service": "agent_metrics_port",
}


# --- The gRPC server metrics -----------------------------------------------------------------


class MethodMetrics:
    """One method's label children, built once (labels() per call would cost more than the rest)."""

    __slots__ = ("handled", "labels", "seconds", "started")

    def __init__(self, grpc_type: str, method: str) -> None:
        service, _, name = method.lstrip("/").partition("/")
        self.labels = (grpc_type, service, name)
        self.started = GRPC_STARTED.labels(*self.labels)
        self.seconds = GRPC_SECONDS.labels(*self.labels)
        self.handled: dict[grpc.StatusCode, Any] = {}

    def done(self, code: grpc.StatusCode, seconds: float) -> None:
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = GRPC_HANDLED.labels(*self.labels, code.name)
        child.inc()
        self.seconds.observe(seconds)


# Keyed by (grpc_type, method): the methods a server registered, so it stays small.
_methods: dict[tuple[str, str], MethodMetrics] = {}


def method_metrics(grpc_type: str, method: str) -> MethodMetrics:
    """The recorder of `method` ("/pkg.Service/Method"), whose grpc_type is "unary" or "server_stream"."""
    key = (grpc_type, method)
    recorder = _methods.get(key)
    if recorder is None:
        recorder = _methods[key] = MethodMetrics(grpc_type, method)
    return recorder


# --- The product's metrics -------------------------------------------------------------------


class _Children:
    """Cached label children of one metric, at most MAX_LABEL_VALUES of them (then OTHER)."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def get(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            if len(self._children) >= MAX_LABEL_VALUES:
                labels = tuple(OTHER for _ in labels)
                child = self._children.get(labels)
            if child is None:
                child = self._children[labels] = self._metric.labels(*labels)
        return child


_chat_turns = _Children(CHAT_TURNS)
_tool_calls = _Children(TOOL_CALLS)
_model_requests = _Children(MODEL_REQUESTS)
_model_tokens = _Children(MODEL_TOKENS)
_rate_limited = _Children(RATE_LIMITED)


def chat_turn(outcome: str | grpc.StatusCode) -> None:
    """Count one chat turn: "ok", "replayed" (answered from an Idempotency-Key), or the failing
    status (a grpc.StatusCode, recorded as its lower-case name, e.g. "deadline_exceeded")."""
    if isinstance(outcome, grpc.StatusCode):
        outcome = outcome.name.lower()
    _chat_turns.get(outcome).inc()


def tool_call(tool: str, outcome: str, calls: int = 1) -> None:
    """Count one tool call: outcome "ok", "error" (the tool refused the call: bad arguments, no
    such task...), "refused" (not run: the turn's budget) or "failed" (a service failed under it).
    Pass a known tool's name; unknown names the model invents should be passed as "unknown"."""
    _tool_calls.get(tool, outcome).inc(calls)


def rate_limited(bucket: str) -> None:
    """Count one call refused by the per-user limit of `bucket` ("writes", "reads", "chat")."""
    _rate_limited.get(bucket).inc()


# What a model request's failure is, by the exception's class name (openai's, without importing
# openai here); anything else is "error".
MODEL_ERROR_OUTCOMES = {
    "APITimeoutError": "timeout",
    "TimeoutError": "timeout",
    "APIConnectionError": "unavailable",
    "RateLimitError": "rate_limited",
    "CancelledError": "cancelled",
}


class ModelRequest:
    """One model request being measured; set `outcome` to override the automatic one."""

    __slots__ = ("outcome",)

    def __init__(self) -> None:
        self.outcome: str | None = None

    def tokens(self, prompt: int | None, completion: int | None) -> None:
        """The usage the model reported (either may be None when it did not say)."""
        if prompt:
            _model_tokens.get("prompt").inc(prompt)
        if completion:
            _model_tokens.get("completion").inc(completion)


@contextmanager
def model_request() -> Iterator[ModelRequest]:
    """Time and count one model request: outcome "ok" when the block ends normally, else from the
    exception (timeout, unavailable, rate_limited, cancelled, error) unless the block set one.

        with metrics.model_request() as request:
            reply = await ...
            request.tokens(usage.prompt_tokens, usage.completion_tokens)
    """
    request = ModelRequest()
    started = time.perf_counter()
    try:
        yield request
    except BaseException as error:
        request.outcome = request.outcome or MODEL_ERROR_OUTCOMES.get(type(error).__name__, "error")
        raise
    finally:
        MODEL_SECONDS.observe(time.perf_counter() - started)
        _model_requests.get(request.outcome or "ok").inc()


# --- Database pools --------------------------------------------------------------------------


class PoolCollector(Collector):
    """Connection pool gauges of every watched engine, read when Prometheus scrapes."""

    def __init__(self) -> None:
        self._engines: weakref.WeakSet[Any] = weakref.WeakSet()  # sync engines; gone when disposed of

    def watch(self, engine: AsyncEngine) -> None:
        self._engines.add(engine.sync_engine)

    def collect(self) -> Iterable[Metric]:
        in_use = GaugeMetricFamily(
            "todo_db_pool_connections_in_use", "Database connections checked out of the pool.", labels=["database"]
        )
        overflow = GaugeMetricFamily(
            "todo_db_pool_overflow",
            "Connections open beyond the pool's size (up to its max_overflow).",
            labels=["database"],
        )
        size = GaugeMetricFamily("todo_db_pool_size", "The pool's configured size.", labels=["database"])
        totals: dict[str, list[int]] = {}
        for engine in list(self._engines):
            pool = engine.pool
            if not hasattr(pool, "checkedout"):  # NullPool, StaticPool: nothing pooled to report
                continue
            sums = totals.setdefault(_database_label(engine.url.database), [0, 0, 0])
            sums[0] += pool.checkedout()
            # SQLAlchemy counts overflow from -pool_size (negative while the pool is not full).
            sums[1] += max(0, pool.overflow())
            sums[2] += pool.size()
        for database, (checked_out, over, pool_size) in totals.items():
            in_use.add_metric([database], checked_out)
            overflow.add_metric([database], over)
            size.add_metric([database], pool_size)
        return [in_use, overflow, size]


def _database_label(database: str | None) -> str:
    """ "tasks" for both postgresql://.../tasks and sqlite:///.state/tasks.db."""
    return Path(database).stem if database else "memory"


POOLS = PoolCollector()
REGISTRY.register(POOLS)


def watch_pool(engine: AsyncEngine) -> None:
    """Report `engine`'s pool in the todo_db_pool_* gauges for as long as the engine exists."""
    POOLS.watch(engine)


# --- The /metrics endpoint -------------------------------------------------------------------


class MetricsServer:
    """One service's /metrics: prometheus-client's WSGI app on a thread of its own.

    prometheus_client.start_http_server runs serve_forever with its 0.5 s poll, so an idle
    service woke twice a second to look for a shutdown request (about 0.12 ms of CPU a second
    per process, measured in the bench's tracing phase). This one blocks in select until a
    scrape arrives; `stop` wakes it by shutting the listening socket down, which keeps the
    socket readable until the loop has seen the shutdown request."""

    def __init__(self, host: str, port: int) -> None:
        family, bind_host = _address_family(host, port)
        server_class = type("MetricsWSGIServer", (ThreadingWSGIServer,), {"address_family": family})
        app = prometheus_client.make_wsgi_app(REGISTRY)
        self._server: ThreadingWSGIServer = make_server(bind_host, port, app, server_class, handler_class=_QuietHandler)
        self.address = f"{host}:{port}"
        self.thread = threading.Thread(target=self._server.serve_forever, args=(None,), daemon=True, name="metrics")
        self.thread.start()

    def stop(self) -> None:
        stopper = threading.Thread(target=self._server.shutdown, daemon=True)
        stopper.start()
        self._server.socket.shutdown(socket.SHUT_RDWR)
        stopper.join()
        self._server.server_close()


class _QuietHandler(WSGIRequestHandler):
    """No access line on stderr for every scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _address_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """AF_INET6 for an IPv6 bind host, as http.server picks it."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, str(sockaddr[0])


def metrics_port(service: str, settings: Settings) -> int:
    field = METRICS_PORT_FIELDS.get(service)
    return int(getattr(settings, field)) if field else 0


def serve_http(service: str, settings: Settings) -> MetricsServer | None:
    """Serve the registry at http://<METRICS_BIND_HOST>:<the service's port>/metrics; None when
    the port is 0. A port already taken stops the service, as a taken gRPC port does."""
    port = metrics_port(service, settings)
    if port <= 0:
        return None
    host = settings.metrics_bind_host or settings.grpc_bind_host
    try:
        return MetricsServer(host, port)
    except OSError as error:
        raise SystemExit(f"{service}: cannot serve metrics on {host}:{port}: {error}") from error
