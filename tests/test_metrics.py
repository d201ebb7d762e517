"""Prometheus metrics (common/metrics.py), proven on real scrapes after real traffic.

In process: the one server interceptor, as the bootstrap installs it, records the final status
of calls that return, abort in the handler, are refused for their token, and stream, and records
nothing with the metrics port off; the product's helpers and the pool collector.
End to end (the whole stack behind Envoy, the built-in model): task_service's /metrics moves
by exactly the REST calls made (3 creates OK, one 404 as NOT_FOUND, one 401 as
UNAUTHENTICATED), a chat turn shows on every service's gRPC metrics and in the agent's own
(turns, tools, model requests), the public gateway serves no /metrics, and Envoy's admin
serves /stats/prometheus. The deployment files: deploy/prometheus.yml scrapes every service
on its default port, and every metric deploy/grafana-dashboard.json queries exists.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from common import metrics, tracing
from common.errors import NotFound
from common.server import build_server, records_metrics
from common.settings import Settings
from tests.gateway_fixtures import Gateway, start_gateway
from tests.support import ROOT, SECRET, auth_metadata, free_port

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
TIMEOUT = 30

# The Envoy statistics the dashboard reads (Envoy's Prometheus names, as its admin serves them);
# test_envoy_serves_prometheus_stats_on_its_admin_port checks each against a real Envoy.
ENVOY_METRICS = {
    "envoy_http_downstream_rq_xx",
    "envoy_http_downstream_rq_time_bucket",
    "envoy_cluster_upstream_rq_timeout",
    "envoy_cluster_upstream_cx_connect_fail",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    """Prometheus text as {(name, labels): value}, names exactly as exposed (prometheus-client's
    own parser would add `_total` to Envoy's counters, which have no such suffix)."""
    samples: Samples = {}
    for line in text.splitlines():
        found = SAMPLE_LINE.match(line)
        if found:
            name, labels, number = found.groups()
            samples[(name, frozenset(LABEL.findall(labels or "")))] = float(number)
    return samples


def scrape(port: int, path: str = "/metrics") -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT) as response:
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(
        found for (sample, sample_labels), found in samples.items() if sample == name and wanted <= sample_labels
    )


def registry_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- The interceptor, in process ---------------------------------------------------------------


async def _ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok"


async def _missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise NotFound("no such thing")  # mapped by the auth interceptor, which then aborts


async def _aborts(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now")
    return b""


async def _sets_code(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    context.set_code(grpc.StatusCode.ALREADY_EXISTS)
    return b""


async def _streams(request: bytes, context: grpc.aio.ServicerContext) -> Any:
    for piece in (b"a", b"b", b"c"):
        yield piece


async def _streams_then_fails(request: bytes, context: grpc.aio.ServicerContext) -> Any:
    yield b"a"
    raise NotFound("gone half-way")


TEST_SERVICE = "test.v1.Probe"
TEST_HANDLERS = {
    "Ok": grpc.unary_unary_rpc_method_handler(_ok),
    "Missing": grpc.unary_unary_rpc_method_handler(_missing),
    "Aborts": grpc.unary_unary_rpc_method_handler(_aborts),
    "SetsCode": grpc.unary_unary_rpc_method_handler(_sets_code),
    "Streams": grpc.unary_stream_rpc_method_handler(_streams),
    "StreamsThenFails": grpc.unary_stream_rpc_method_handler(_streams_then_fails),
}


def handled(method: str, code: str, grpc_type: str = "unary") -> float:
    labels = {"grpc_type": grpc_type, "grpc_service": TEST_SERVICE, "grpc_method": method, "grpc_code": code}
    return registry_value("grpc_server_handled_total", **labels)


def test_a_metrics_port_of_0_turns_the_rpc_metrics_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # A metrics port of 0 is "off": no /metrics server and no recording on the request path,
    # whether or not the service traces.
    off = Settings.load({"BETTER_AUTH_SECRET": SECRET, "TASK_METRICS_PORT": "0"})
    default = Settings.load({"BETTER_AUTH_SECRET": SECRET})
    assert not records_metrics("task_service", off)
    assert records_metrics("task_service", default)
    monkeypatch.setattr(tracing, "enabled", lambda: True)
    assert not records_metrics("task_service", off)


async def test_the_interceptor_records_every_calls_final_status() -> None:
    # The bootstrap's own server (metrics outermost, then auth), with a probe service on it.
    server = build_server(Settings.load({"BETTER_AUTH_SECRET": SECRET, "RATE_LIMIT_REDIS_URL": ""}))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(TEST_SERVICE, TEST_HANDLERS)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    expected = [
        ("Ok", "OK", "unary"),
        ("Missing", "NOT_FOUND", "unary"),
        ("Aborts", "FAILED_PRECONDITION", "unary"),
        ("SetsCode", "ALREADY_EXISTS", "unary"),
        ("Ok", "UNAUTHENTICATED", "unary"),  # refused by the auth interceptor: no token
        ("Streams", "OK", "server_stream"),
        ("StreamsThenFails", "NOT_FOUND", "server_stream"),
    ]
    before = {row: handled(row[0], row[1], row[2]) for row in expected}
    started_before = registry_value(
        "grpc_server_started_total", grpc_type="unary", grpc_service=TEST_SERVICE, grpc_method="Ok"
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            metadata = auth_metadata("metrics-user")
            for method in ("Ok", "Missing", "Aborts", "SetsCode"):
                with pytest.raises(grpc.aio.AioRpcError) if method != "Ok" else contextlib.nullcontext():
                    await channel.unary_unary(f"/{TEST_SERVICE}/{method}")(b"", metadata=metadata, timeout=TIMEOUT)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(f"/{TEST_SERVICE}/Ok")(b"", timeout=TIMEOUT)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            pieces = [piece async for piece in channel.unary_stream(f"/{TEST_SERVICE}/Streams")(b"", metadata=metadata)]
            assert pieces == [b"a", b"b", b"c"]
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in channel.unary_stream(f"/{TEST_SERVICE}/StreamsThenFails")(b"", metadata=metadata):
                    pass
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(0)
    for row in expected:
        assert handled(row[0], row[1], row[2]) - before[row] == 1, row
    started = registry_value(
        "grpc_server_started_total", grpc_type="unary", grpc_service=TEST_SERVICE, grpc_method="Ok"
    )
    assert started - started_before == 2  # the allowed call and the refused one
    count = registry_value(
        "grpc_server_handling_seconds_count",
        grpc_type="server_stream",
        grpc_service=TEST_SERVICE,
        grpc_method="Streams",
    )
    assert count >= 1


async def test_with_the_metrics_port_off_and_for_health_checks_nothing_is_recorded() -> None:
    server = build_server(Settings.load({"BETTER_AUTH_SECRET": SECRET, "RATE_LIMIT_REDIS_URL": ""}), False)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(TEST_SERVICE, TEST_HANDLERS)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    health_labels = {"grpc_type": "unary", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
    before = handled("Ok", "OK"), registry_value("grpc_server_started_total", **health_labels)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = await channel.unary_unary(f"/{TEST_SERVICE}/Ok")(
                b"", metadata=auth_metadata("quiet"), timeout=TIMEOUT
            )
            assert answer == b"ok"
            check = health_pb2_grpc.HealthStub(channel).Check
            status = await check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)
    assert (handled("Ok", "OK"), registry_value("grpc_server_started_total", **health_labels)) == before


# --- The product's helpers, in process ---------------------------------------------------------


def test_chat_turn_tool_call_and_rate_limit_helpers_count_by_label() -> None:
    before = registry_value("todo_chat_turns_total", outcome="deadline_exceeded")
    metrics.chat_turn(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert registry_value("todo_chat_turns_total", outcome="deadline_exceeded") - before == 1

    before = registry_value("todo_tool_calls_total", tool="add_task", outcome="error")
    metrics.tool_call("add_task", "error")
    metrics.tool_call("add_task", "error")
    assert registry_value("todo_tool_calls_total", tool="add_task", outcome="error") - before == 2

    before = registry_value("todo_rate_limited_total", bucket="writes")
    metrics.rate_limited("writes")
    assert registry_value("todo_rate_limited_total", bucket="writes") - before == 1


def test_label_values_from_outside_are_bounded() -> None:
    children = metrics._Children(metrics.TOOL_CALLS)
    for index in range(metrics.MAX_LABEL_VALUES + 20):
        children.get(f"invented_{index}", "error").inc()
    assert len(children._children) == metrics.MAX_LABEL_VALUES + 1  # the cap, plus "other"
    assert registry_value("todo_tool_calls_total", tool=metrics.OTHER, outcome=metrics.OTHER) >= 20


def test_model_request_times_counts_and_classifies_outcomes() -> None:
    class APITimeoutError(Exception):  # named like openai's
        pass

    outcomes = ("ok", "timeout", "error", "rejected")
    before = {outcome: registry_value("todo_model_requests_total", outcome=outcome) for outcome in outcomes}
    seconds_before = registry_value("todo_model_request_seconds_count")
    tokens_before = registry_value("todo_model_tokens_total", kind="prompt")
    with metrics.model_request() as request:
        request.tokens(120, 7)
    with pytest.raises(APITimeoutError), metrics.model_request():
        raise APITimeoutError
    with pytest.raises(ValueError), metrics.model_request():
        raise ValueError
    with pytest.raises(ValueError), metrics.model_request() as request:
        request.outcome = "rejected"
        raise ValueError
    for outcome in outcomes:
        assert registry_value("todo_model_requests_total", outcome=outcome) - before[outcome] == 1, outcome
    assert registry_value("todo_model_request_seconds_count") - seconds_before == 4
    assert registry_value("todo_model_tokens_total", kind="prompt") - tokens_before == 120


async def test_pool_gauges_are_read_from_the_pool_at_scrape_time(tmp_path: Path) -> None:
    from common.db import create_engine

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'gauges.db'}")
    metrics.watch_pool(engine)
    assert registry_value("todo_db_pool_connections_in_use", database="gauges") == 0
    async with engine.connect():
        assert registry_value("todo_db_pool_connections_in_use", database="gauges") == 1
    assert registry_value("todo_db_pool_connections_in_use", database="gauges") == 0
    assert registry_value("todo_db_pool_overflow", database="gauges") == 0
    assert registry_value("todo_db_pool_size", database="gauges") > 0
    await engine.dispose()


def test_serve_http_binds_the_configured_host_and_port_zero_is_off() -> None:
    settings = Settings.load({"TASK_METRICS_PORT": "0"})
    assert metrics.serve_http("task_service", settings) is None
    port = free_port()
    server = metrics.serve_http("task_service", Settings.load({"TASK_METRICS_PORT": str(port)}))
    assert server is not None and server.address == f"127.0.0.1:{port}"
    try:
        assert "process_cpu_seconds_total" in {name for name, _ in scrape(port)}
        with pytest.raises(SystemExit, match="cannot serve metrics"):
            metrics.serve_http("task_service", Settings.load({"TASK_METRICS_PORT": str(port)}))
    finally:
        server.stop()
    again = metrics.serve_http("task_service", Settings.load({"TASK_METRICS_PORT": str(port)}))
    assert again is not None, "stop() frees the port"
    again.stop()


def _context_switches(thread: threading.Thread) -> int:
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)


def test_an_idle_metrics_server_does_not_wake_up() -> None:
    """prometheus-client's own server polls twice a second; ours sleeps until a scrape comes."""
    server = metrics.serve_http("task_service", Settings.load({"TASK_METRICS_PORT": str(free_port())}))
    assert server is not None
    try:
        thread = server.thread
        time.sleep(0.1)
        before = _context_switches(thread)
        time.sleep(1.2)
        assert _context_switches(thread) == before
    finally:
        server.stop()


# --- End to end: real scrapes after real traffic through Envoy ---------------------------------


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str]
) -> Iterator[Gateway]:
    with start_gateway(tmp_path_factory, database_url_factory, "sqlite") as gateway:
        yield gateway


def metrics_of(gateway: Gateway, service: str) -> Samples:
    return scrape(int(gateway.env[f"{service.upper()}_METRICS_PORT"]))


def test_task_metrics_move_by_exactly_the_rest_calls_made(stack: Gateway) -> None:
    task = {"grpc_service": "todo.v1.TaskService", "grpc_type": "unary"}
    before = metrics_of(stack, "task")
    for title in ("milk", "bread", "eggs"):
        assert stack.call("POST", "/api/counted/tasks", user="counted", body={"title": title}).status == 200
    assert stack.call("GET", "/api/counted/tasks/999", user="counted").status == 404
    assert stack.call("POST", "/api/counted/tasks", body={"title": "no token"}).status == 401
    after = metrics_of(stack, "task")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **task, **labels) - value(before, name, **task, **labels)

    assert moved("grpc_server_handled_total", grpc_method="CreateTask", grpc_code="OK") == 3
    assert moved("grpc_server_handled_total", grpc_method="CreateTask", grpc_code="UNAUTHENTICATED") == 1
    assert moved("grpc_server_handled_total", grpc_method="GetTask", grpc_code="NOT_FOUND") == 1
    assert moved("grpc_server_started_total", grpc_method="CreateTask") == 4
    assert moved("grpc_server_handling_seconds_count", grpc_method="CreateTask") == 4
    assert moved("grpc_server_handling_seconds_bucket", grpc_method="CreateTask", le="+Inf") == 4
    assert moved("grpc_server_handling_seconds_sum", grpc_method="CreateTask") > 0


def test_services_serve_process_and_pool_metrics(stack: Gateway) -> None:
    for service in ("task", "conversation", "agent"):
        samples = metrics_of(stack, service)
        assert value(samples, "process_cpu_seconds_total") > 0, service
        assert value(samples, "process_resident_memory_bytes") > 0, service
    for service in ("task", "conversation"):  # the services with a database (label: its file or name)
        pools = [labels for name, labels in metrics_of(stack, service) if name == "todo_db_pool_connections_in_use"]
        assert len(pools) == 1 and dict(pools[0])["database"] == service, pools
        assert value(metrics_of(stack, service), "todo_db_pool_size") > 0, service


def test_the_public_gateway_serves_no_metrics(stack: Gateway) -> None:
    for path in ("/metrics", "/stats/prometheus", "/stats", "/server_info"):
        assert stack.call("GET", path).status == 404, path
    # The metrics ports listen on loopback only (GRPC_BIND_HOST's default), not on the gateway's port.
    assert stack.env["TASK_METRICS_PORT"] != stack.env["GATEWAY_PORT"]


def test_a_chat_turn_shows_in_every_services_grpc_metrics(stack: Gateway) -> None:
    services = ("agent", "conversation", "task")
    before = {service: metrics_of(stack, service) for service in services}
    reply = stack.call("POST", "/api/chatty/chat", user="chatty", body={"message": "add a task to buy bread"})
    assert reply.status == 200, reply
    after = {service: metrics_of(stack, service) for service in services}

    def moved(service: str, method: str, code: str = "OK") -> float:
        labels = {"grpc_method": method, "grpc_code": code}
        return value(after[service], "grpc_server_handled_total", **labels) - value(
            before[service], "grpc_server_handled_total", **labels
        )

    assert moved("agent", "Chat") == 1
    assert moved("task", "CreateTask") == 1
    assert moved("conversation", "AppendMessage") == 2  # the user's message, then the answer


def test_a_chat_turn_moves_the_agents_own_metrics(stack: Gateway) -> None:
    """Needs agent_service/agent.py and llm.py to call the helpers (OPERATIONS.md)."""
    before = metrics_of(stack, "agent")
    reply = stack.call("POST", "/api/agentic/chat", user="agentic", body={"message": "add a task to buy apples"})
    assert reply.status == 200, reply
    after = metrics_of(stack, "agent")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("todo_chat_turns_total", outcome="ok") == 1
    assert moved("todo_tool_calls_total", tool="add_task", outcome="ok") == 1
    requests = moved("todo_model_requests_total", outcome="ok")
    assert requests >= 2  # the step that calls add_task, then the one that answers
    assert moved("todo_model_request_seconds_count") == requests
    assert moved("todo_model_tokens_total", kind="prompt") > 0  # the built-in model reports usage


def test_envoy_serves_prometheus_stats_on_its_admin_port(stack: Gateway) -> None:
    """Needs gateway/envoy_config.py to render the admin (OPERATIONS.md)."""
    assert stack.call("GET", "/api/counted/tasks", user="counted").status == 200
    port = int(stack.env["ENVOY_ADMIN_PORT"])
    deadline = time.monotonic() + 15  # Envoy publishes histograms at its stats flush (5 s)
    while True:
        try:
            samples = scrape(port, "/stats/prometheus")
        except urllib.error.URLError as error:
            pytest.fail(f"no Envoy admin on 127.0.0.1:{port}: {error}")
        names = {name for name, _ in samples}
        if ENVOY_METRICS <= names or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ENVOY_METRICS <= names, ENVOY_METRICS - names
    assert value(samples, "envoy_http_downstream_rq_xx", envoy_http_conn_manager_prefix="gateway") > 0
    # Cluster names are whole (alt_stat_name), not cut at their dots.
    assert ("envoy_cluster_upstream_rq_timeout", frozenset({("envoy_cluster_name", "todo_v1_TaskService")})) in samples


# --- The deployment files ------------------------------------------------------------------------

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects: its identifiers once label matchers,
    ranges, grouping lists and strings are cut out, less functions and keywords."""
    bare = re.sub(r'"[^"]*"', "", expression)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    names = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?![a-zA-Z0-9_:]*\s*\()", bare)
    return {name for name in names if name not in PROMQL_KEYWORDS}


def registry_names() -> set[str]:
    """Every series name the services' registry can expose, labelled children or not yet."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_metric_the_dashboard_queries_exists() -> None:
    known = registry_names() | ENVOY_METRICS
    expressions = dashboard_expressions()
    assert len(expressions) >= 8
    for expression in expressions:
        used = metric_names(expression)
        assert used, f"no metric selector in {expression!r}"
        assert used <= known, f"{expression!r} uses unknown metrics {used - known}"


def test_the_dashboard_has_the_key_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for words in ("chat turns", "chat turn latency", "tool errors", "model latency", "5xx by route"):
        assert words in titles, words
    used = {name for expression in dashboard_expressions() for name in metric_names(expression)}
    assert {"todo_chat_turns_total", "todo_tool_calls_total", "todo_model_request_seconds_bucket"} <= used
    assert {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "envoy_http_downstream_rq_xx"} <= used


def test_prometheus_scrapes_every_service_and_envoy_on_their_default_ports() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    defaults = Settings()
    expected = {
        "task_service": (defaults.task_metrics_port, "/metrics"),
        "conversation_service": (defaults.conversation_metrics_port, "/metrics"),
        "agent_service": (defaults.agent_metrics_port, "/metrics"),
        "envoy": (defaults.envoy_admin_port, "/stats/prometheus"),
    }
    for job_name, (port, path) in expected.items():
        job = jobs[job_name]
        targets = [target for static in job["static_configs"] for target in static["targets"]]
        assert targets == [f"127.0.0.1:{port}"], job_name
        assert job.get("metrics_path", "/metrics") == path, job_name
