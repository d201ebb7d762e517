"""Tracing (common/tracing.py): one trace per request across every hop, seen by a real OTLP receiver.

The receiver is an OTLP/gRPC TraceService built from opentelemetry-proto's messages, in this
process. The whole stack runs behind Envoy with OTEL_EXPORTER_OTLP_ENDPOINT pointing at it and
a scripted Chat Completions server as the model (real HTTP, so the `traceparent` the model
request carries can be checked). A chat turn must then be one trace: the gateway's span
(Envoy), the agent's Chat span, its model request, and the spans of conversation_service and
task_service, each the child of the hop that called it; every log line of the request carries
the trace id. Without the setting, the tracing SDK is not even loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from common import clients, tracing
from common.auth import Caller
from common.server import build_server
from common.settings import Settings
from tests import chat_server
from tests.chat_server import ChatServer
from tests.gateway_fixtures import Gateway, start_gateway
from tests.support import ROOT, SECRET, auth_metadata

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
WAIT_SECONDS = 20  # the services export every 100 ms here, Envoy every second


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    span: trace_pb2.Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    def attribute(self, key: str) -> Any:
        for attribute in self.span.attributes:
            if attribute.key == key:
                value = attribute.value
                return getattr(value, value.WhichOneof("value"))
        return None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                received += [ReceivedSpan(service, span) for span in scope_spans.spans]
        with self._lock:
            self._spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self._spans if trace_id is None or span.trace_id == trace_id]

    def wait(self, trace_id: str, ready: Callable[[list[ReceivedSpan]], bool]) -> list[ReceivedSpan]:
        """The trace's spans once `ready(spans)` holds (or whatever arrived by the deadline)."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            spans = self.spans(trace_id)
            if ready(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector, port
    server.stop(0)


@pytest.fixture(scope="module")
def model() -> Iterator[ChatServer]:
    server = ChatServer().start()
    yield server
    server.stop()


@contextlib.contextmanager
def traced_stack(
    tmp_path_factory: pytest.TempPathFactory,
    database_url_factory: Callable[[str, str], str],
    receiver: tuple[Receiver, int],
    model: ChatServer,
    sample_percent: str,
) -> Iterator[Gateway]:
    """The whole stack exporting to `receiver`, with the scripted model, at `sample_percent`."""
    extra_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds between the services' exports
        "TRACING_SAMPLE_PERCENT": sample_percent,
        "LLM_BASE_URL": model.base_url,
        "LLM_API_KEY": "test",
    }
    with start_gateway(tmp_path_factory, database_url_factory, "sqlite", extra_env=extra_env) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    database_url_factory: Callable[[str, str], str],
    receiver: tuple[Receiver, int],
    model: ChatServer,
) -> Iterator[Gateway]:
    """Every request traced: the tests follow one turn's trace."""
    with traced_stack(tmp_path_factory, database_url_factory, receiver, model, "100") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def unsampled_stack(
    tmp_path_factory: pytest.TempPathFactory,
    database_url_factory: Callable[[str, str], str],
    receiver: tuple[Receiver, int],
    model: ChatServer,
) -> Iterator[Gateway]:
    """The same stack sampling 0 % of requests: only a client's own sampled trace is traced."""
    with traced_stack(tmp_path_factory, database_url_factory, receiver, model, "0") as gateway:
        yield gateway


def chat_turn(gateway: Gateway, model: ChatServer, key: str, headers: dict[str, str]) -> None:
    """One chat turn whose model asks for add_task, then answers."""
    model.script(
        key,
        chat_server.tool_calls(chat_server.call("add_task", {"title": f"traced {key}"})),
        chat_server.text("Added it."),
    )
    reply = gateway.call(
        "POST", f"/api/{key}/chat", user=key, body={"message": f"add a traced task [[{key}]]"}, headers=headers
    )
    assert reply.status == 200, reply


def traceparent() -> tuple[str, str, str]:
    """A client's own trace context: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def one(spans: list[ReceivedSpan], service: str, name: str, kind: int = SERVER) -> ReceivedSpan:
    found = [span for span in spans if span.service == service and span.name == name and span.span.kind == kind]
    assert len(found) == 1, (service, name, [(span.service, span.name) for span in spans])
    return found[0]


def hops_of_a_turn(spans: list[ReceivedSpan]) -> bool:
    names = {(span.service, span.name) for span in spans}
    return {
        ("agent_service", "todo.v1.AgentService/Chat"),
        ("task_service", "todo.v1.TaskService/CreateTask"),
    } <= names and sum(span.name == "todo.v1.ConversationService/AppendMessage" for span in spans) == 2


def test_a_chat_turn_is_one_trace_through_the_agent_conversation_and_task_services(
    stack: Gateway, model: ChatServer, receiver: tuple[Receiver, int]
) -> None:
    header, trace_id, client_span = traceparent()
    chat_turn(stack, model, "traced1", {"traceparent": header})

    def ready(spans: list[ReceivedSpan]) -> bool:  # and the agent's parent, if not the client's, is in
        ids = {span.span_id for span in spans}
        agents = [span for span in spans if span.name == "todo.v1.AgentService/Chat"]
        return hops_of_a_turn(spans) and all(span.parent_id in {client_span, *ids} for span in agents)

    spans = receiver[0].wait(trace_id, ready)

    agent = one(spans, "agent_service", "todo.v1.AgentService/Chat")
    gateway_spans = {span.span_id for span in spans if span.service == "gateway"}
    # The client's span, or the gateway's once Envoy traces (it continues the client's trace).
    assert agent.parent_id in {client_span, *gateway_spans}
    assert agent.attribute("rpc.system") == "grpc"
    assert agent.attribute("rpc.grpc.status_code") == 0
    task = one(spans, "task_service", "todo.v1.TaskService/CreateTask")
    assert task.parent_id == agent.span_id
    appends = [span for span in spans if span.name == "todo.v1.ConversationService/AppendMessage"]
    assert {span.service for span in appends} == {"conversation_service"}
    assert {span.parent_id for span in appends} == {agent.span_id}
    # The request's first conversation_service call creates its conversation, in the same trace.
    assert one(spans, "conversation_service", "todo.v1.ConversationService/CreateConversation").parent_id == (
        agent.span_id
    )


def test_the_model_request_is_a_span_and_carries_traceparent_to_the_model(
    stack: Gateway, model: ChatServer, receiver: tuple[Receiver, int]
) -> None:
    """Needs agent_service/llm.py to wrap its request in tracing.span and send
    tracing.inject_headers() (OPERATIONS.md)."""
    header, trace_id, _ = traceparent()
    chat_turn(stack, model, "traced2", {"traceparent": header})

    def ready(spans: list[ReceivedSpan]) -> bool:
        return hops_of_a_turn(spans) and sum(span.span.kind == CLIENT for span in spans) >= 2

    spans = receiver[0].wait(trace_id, ready)
    agent = one(spans, "agent_service", "todo.v1.AgentService/Chat")
    model_spans = [span for span in spans if span.service == "agent_service" and span.span.kind == CLIENT]
    assert len(model_spans) == 2, [(span.service, span.name, span.span.kind) for span in spans]  # two model steps
    for span in model_spans:
        assert span.parent_id == agent.span_id
        assert span.attribute("gen_ai.operation.name") == "chat"
        assert span.name.startswith("chat")
    # What the model server received: each request continues the trace from its own span.
    sent = [received.headers.get("traceparent", "") for received in model.received("traced2")]
    assert sorted(sent) == sorted(f"00-{trace_id}-{span.span_id}-01" for span in model_spans)


def test_envoy_starts_the_trace_and_its_span_is_the_parent_of_the_agents(
    stack: Gateway, model: ChatServer, receiver: tuple[Receiver, int]
) -> None:
    """Needs gateway/envoy_config.py to turn on Envoy's OpenTelemetry tracer (OPERATIONS.md)."""
    request_id = f"trace-{secrets.token_hex(8)}"
    chat_turn(stack, model, "traced3", {"x-request-id": request_id})
    trace_id = trace_id_logged(stack, "agent", request_id)
    assert trace_id, "the agent's log lines of the request carry no trace_id"

    def ready(spans: list[ReceivedSpan]) -> bool:
        return hops_of_a_turn(spans) and any(span.service == "gateway" for span in spans)

    spans = receiver[0].wait(trace_id, ready)
    gateway_spans = [span for span in spans if span.service == "gateway"]
    assert len(gateway_spans) == 1, [(span.service, span.name) for span in spans]
    edge = gateway_spans[0]
    assert edge.parent_id == "", "the gateway's span starts the trace"
    assert edge.span.kind == SERVER
    assert one(spans, "agent_service", "todo.v1.AgentService/Chat").parent_id == edge.span_id


def test_a_clients_unsampled_trace_stays_unsampled_in_every_hop(
    stack: Gateway, model: ChatServer, receiver: tuple[Receiver, int]
) -> None:
    """Even at 100 %, a `traceparent` flagged 00 is the caller's decision: Envoy and every service
    follow it (each service samples by its parent's flag, not again by itself)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    request_id = f"declined-{secrets.token_hex(8)}"
    chat_turn(stack, model, "declined", {"traceparent": f"00-{trace_id}-{span_id}-00", "x-request-id": request_id})
    assert trace_id_logged(stack, "conversation", request_id) == trace_id
    time.sleep(1.5)  # past every hop's export interval
    assert receiver[0].spans(trace_id) == []


def test_sampling_is_decided_once_at_the_gateway_and_every_hop_follows_it(
    unsampled_stack: Gateway, model: ChatServer, receiver: tuple[Receiver, int]
) -> None:
    """At 0 %, Envoy traces nothing of its own and tells the services so in `traceparent`: no hop
    sends a span (a trace is all hops or none), yet the log lines still carry the trace id. A
    client's own sampled trace is followed through every hop."""
    request_id = f"unsampled-{secrets.token_hex(8)}"
    chat_turn(unsampled_stack, model, "unsampled1", {"x-request-id": request_id})
    trace_id = trace_id_logged(unsampled_stack, "agent", request_id)
    assert trace_id, "an unsampled request's log lines still carry its trace id"
    assert trace_id_logged(unsampled_stack, "task", request_id) == trace_id

    header, sampled_trace_id, _ = traceparent()
    chat_turn(unsampled_stack, model, "unsampled2", {"traceparent": header})
    sampled = receiver[0].wait(
        sampled_trace_id, lambda spans: hops_of_a_turn(spans) and any(span.service == "gateway" for span in spans)
    )
    assert hops_of_a_turn(sampled), [(span.service, span.name) for span in sampled]
    assert any(span.service == "gateway" for span in sampled)
    # Everything the first turn's hops would have sent was due well before the second's arrived
    # (services every 100 ms, Envoy every second), so its absence now is not a matter of time.
    time.sleep(1.5)
    assert [(span.service, span.name) for span in receiver[0].spans(trace_id)] == []


def test_every_log_line_of_a_traced_request_carries_its_trace_id(
    stack: Gateway, model: ChatServer, receiver: tuple[Receiver, int]
) -> None:
    header, trace_id, _ = traceparent()
    request_id = f"logged-{secrets.token_hex(8)}"
    chat_turn(stack, model, "traced4", {"traceparent": header, "x-request-id": request_id})
    for component in ("agent", "task", "conversation"):
        lines = log_lines(stack, component, request_id)
        assert lines, component
        assert {line.get("trace_id") for line in lines} == {trace_id}, (component, lines)


def test_a_refused_call_is_traced_with_its_status_and_probes_are_not_traced(
    stack: Gateway, receiver: tuple[Receiver, int]
) -> None:
    header, trace_id, _ = traceparent()
    reply = stack.call("GET", "/api/lost/tasks/404", user="lost", headers={"traceparent": header})
    assert reply.status == 404
    spans = receiver[0].wait(trace_id, lambda spans: any(span.service == "task_service" for span in spans))
    task = one(spans, "task_service", "todo.v1.TaskService/GetTask")
    assert task.attribute("rpc.grpc.status_code") == grpc.StatusCode.NOT_FOUND.value[0]
    # NOT_FOUND is the caller's mistake, not a failure of the service (OpenTelemetry's RPC conventions).
    assert task.span.status.code != trace_pb2.Status.STATUS_CODE_ERROR
    # Envoy health-checks every service each second; none of that is traced.
    assert not [span for span in receiver[0].spans() if span.name.startswith("grpc.health")]


async def _answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return tracing.current_trace_id().encode()


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> Any:
    yield tracing.current_trace_id().encode()
    await asyncio.sleep(0)
    yield dict(clients.caller_metadata(Caller(user_id="u", token="t")))["traceparent"].encode()


@contextlib.asynccontextmanager
async def traced_server(
    receiver: tuple[Receiver, int], service: str, name: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> AsyncIterator[grpc.aio.Channel]:
    """In this process: tracing on as `service` (every trace sampled, exported to `receiver`), our
    server bootstrap serving `handlers` as gRPC service `name`, and a channel to it."""
    assert tracing.configure(
        service,
        Settings.load(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver[1]}", "TRACING_SAMPLE_PERCENT": "100"}
        ),
    )
    server = build_server(Settings.load({"BETTER_AUTH_SECRET": SECRET}))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(name, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)
        tracing.shutdown()  # exports what is buffered, and turns tracing off again for this process


async def test_server_spans_of_unary_and_streaming_calls_continue_the_callers_trace(
    receiver: tuple[Receiver, int],
) -> None:
    """In process: the interceptor's span is current in the handler (streams too), so what the
    handler logs and calls downstream carries the caller's trace."""
    handlers = {
        "Answer": grpc.unary_unary_rpc_method_handler(_answer),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    header, trace_id, client_span = traceparent()
    metadata = (*auth_metadata("traced-user"), ("traceparent", header))
    async with traced_server(receiver, "probe_service", "test.v1.Traced", handlers) as channel:
        answer = await channel.unary_unary("/test.v1.Traced/Answer")(b"", metadata=metadata, timeout=30)
        pieces = [piece async for piece in channel.unary_stream("/test.v1.Traced/Stream")(b"", metadata=metadata)]
    assert answer.decode() == trace_id
    assert pieces[0].decode() == trace_id
    spans = receiver[0].wait(trace_id, lambda spans: len(spans) >= 2)
    stream = one(spans, "probe_service", "test.v1.Traced/Stream")
    assert one(spans, "probe_service", "test.v1.Traced/Answer").parent_id == client_span
    assert stream.parent_id == client_span
    # Downstream metadata names the stream's own span as the parent.
    assert pieces[1].decode() == f"00-{trace_id}-{stream.span_id}-01"


async def _downstream(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """What this handler would send downstream (its trace id and trace headers), as JSON."""
    sent = dict(clients.caller_metadata(Caller(user_id="u", token="t")))
    trace = {key: sent.get(key) for key in ("traceparent", "tracestate")}
    return json.dumps({"trace_id": tracing.current_trace_id(), **trace}).encode()


async def test_an_unsampled_trace_is_passed_on_unchanged_without_spans(receiver: tuple[Receiver, int]) -> None:
    """A caller's `traceparent` flagged 00: the handler logs its trace id and calls downstream with
    the same `traceparent` and `tracestate`, and no span is built or sent."""
    handlers = {"Downstream": grpc.unary_unary_rpc_method_handler(_downstream)}
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    header = f"00-{trace_id}-{span_id}-00"
    metadata = (*auth_metadata("passing-user"), ("traceparent", header), ("tracestate", "vendor=1"))
    async with traced_server(receiver, "passing_service", "test.v1.Passing", handlers) as channel:
        answer = await channel.unary_unary("/test.v1.Passing/Downstream")(b"", metadata=metadata, timeout=30)
        assert tracing.current_trace_id() == ""  # nothing of the call leaks into the caller's context
    assert json.loads(answer) == {"trace_id": trace_id, "traceparent": header, "tracestate": "vendor=1"}
    assert [span for span in receiver[0].spans() if span.service == "passing_service"] == []


def test_without_an_endpoint_tracing_loads_no_sdk_and_adds_no_metadata() -> None:
    script = """
import sys
from common import tracing
assert not [name for name in sys.modules if name.startswith("opentelemetry")]
from common import clients, logs, server
from common.auth import Caller
from common.settings import Settings
assert tracing.configure("task_service", Settings.load({})) is False
assert tracing.server_span("/todo.v1.TaskService/GetTask", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None
assert tracing.inject_headers() == {} and tracing.current_trace_id() == ""
assert clients.caller_metadata(Caller(user_id="u", token="t", request_id="r")) == (
    ("authorization", "Bearer t"), ("x-request-id", "r"))
# (redis imports parts of OpenTelemetry's API and metrics SDK when they are installed; the
# tracing SDK and the exporter are ours to load, and only with an endpoint.)
loaded = [name for name in sys.modules if name.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter"))]
assert not loaded, loaded
from opentelemetry import trace
assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
"""
    env = {key: value for key, value in os.environ.items() if key != "OTEL_EXPORTER_OTLP_ENDPOINT"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def log_lines(gateway: Gateway, component: str, request_id: str) -> list[dict[str, Any]]:
    """The JSON log lines of `component` for one request id (polled: logs are written as they come)."""
    path = gateway.stack.component(component).log_path
    deadline = time.monotonic() + 5
    while True:
        found = []
        for line in path.read_text(errors="replace").splitlines():
            if request_id in line and line.startswith("{"):
                entry = json.loads(line)
                if entry.get("request_id") == request_id:
                    found.append(entry)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def trace_id_logged(gateway: Gateway, component: str, request_id: str) -> str:
    ids = {line.get("trace_id", "") for line in log_lines(gateway, component, request_id)}
    assert len(ids) == 1, ids
    return ids.pop()
