"""OpenTelemetry tracing: one trace per request, across every hop. Off unless configured.

With OTEL_EXPORTER_OTLP_ENDPOINT set, `configure()` installs the SDK's tracer provider for the
service (`service.name` = the service's name) and batches spans to that OTLP/gRPC endpoint.
Trace context travels as W3C `traceparent`: read from incoming gRPC metadata by the server
interceptor (common/interceptor.py), which opens the call's span (`server_span`), written into outgoing gRPC metadata (`inject_metadata`, used by common/clients.py) and
into HTTP headers (`inject_headers`, for the model request).

Sampling is decided once per trace, by Envoy (TRACING_SAMPLE_PERCENT, or the client's own
`traceparent` flag); a service records a span only for a sampled trace and passes an unsampled
one on as it came, at the cost of reading one header.

Without the setting nothing is installed and this module imports no OpenTelemetry package:
every helper checks one module global and returns (no span, empty headers, a shared no-op
context manager), so tracing that is off costs nothing per request.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc

from common.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("tracing")

# gRPC codes that mean the server failed (OpenTelemetry's semantic conventions for RPC servers);
# the others (NOT_FOUND, INVALID_ARGUMENT, ...) are the caller's mistakes, not errors of the span.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_otel: Any = None  # the OpenTelemetry API pieces the helpers use, loaded by configure()
_NOTHING = contextlib.nullcontext()

# A caller's trace that is not sampled (its `traceparent` flag is 00) is not recorded by anyone
# downstream, so a service does not build spans for it: it passes the caller's `traceparent`
# (and `tracestate`) on unchanged, as W3C trace context allows a hop that records nothing, and
# logs its trace id. This holds those headers while such a call is handled.
_passed_on: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("unsampled_trace", default=None)
# version-trace_id-parent_id-flags (W3C trace context; later versions may append fields).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


class _Otel:
    """The OpenTelemetry modules, imported only when tracing is on (never on a service without it)."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.context, self.trace = context, trace
        self.propagator = TraceContextTextMapPropagator()
        self.kinds = {"client": trace.SpanKind.CLIENT, "internal": trace.SpanKind.INTERNAL}


def configure(service: str, settings: Settings) -> bool:
    """Install tracing for `service` if an OTLP endpoint is configured; whether it is on."""
    global _tracer, _provider, _otel
    if not settings.otel_exporter_otlp_endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    _otel = _Otel()
    endpoint = settings.otel_exporter_otlp_endpoint
    # An http:// endpoint is a plaintext collector (the usual sidecar); https:// uses TLS.
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    # One decision per trace, made where it starts: Envoy samples TRACING_SAMPLE_PERCENT of requests
    # and says so in the `traceparent` it sends upstream (flag 01 or 00), and every service follows
    # that flag (ParentBased), so a trace has all its hops or none. A call that arrives without a
    # trace (straight to a service's port) is sampled by its trace id at the same percent.
    # A call of an unsampled trace gets no span at all (`server_span` passes its context on).
    sampler = ParentBased(root=TraceIdRatioBased(sample_percent(settings) / 100))
    _provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=sampler)
    _provider.add_span_processor(BatchSpanProcessor(exporter))
    _otel.trace.set_tracer_provider(_provider)
    _tracer = _provider.get_tracer("todo")
    log.info("tracing on", extra={"otlp_endpoint": endpoint})
    return True


def sample_percent(settings: Settings) -> float:
    """TRACING_SAMPLE_PERCENT within 0..100 (Envoy's sampler and the services' use the same)."""
    return min(max(settings.tracing_sample_percent, 0.0), 100.0)


def shutdown() -> None:
    """Export what is still buffered (at service stop), then turn tracing off."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


class ServerSpan:
    """The span of one incoming RPC, current while its handler runs; `finish` ends it."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, token: object) -> None:
        self.span, self.token = span, token

    def finish(self, code: grpc.StatusCode) -> None:
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in SERVER_ERROR_CODES:
            self.span.set_status(_otel.trace.Status(_otel.trace.StatusCode.ERROR, code.name))
        try:
            _otel.context.detach(self.token)
        finally:
            self.span.end()


class PassedOnTrace:
    """An incoming call of an unsampled trace: no span, its trace context current until `finish`."""

    __slots__ = ("token",)

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.token = _passed_on.set(dict(headers))

    def finish(self, code: grpc.StatusCode) -> None:
        _passed_on.reset(self.token)


def server_span(method: str, headers: Mapping[str, str]) -> ServerSpan | PassedOnTrace | None:
    """Start the span of an incoming call to `method` ("/pkg.Service/Method"), continuing the
    trace of the caller's `traceparent` if it sent one (`headers`: its `traceparent` and
    `tracestate`; a caller's unsampled trace is only passed on: no span). None when tracing is off."""
    if _tracer is None:
        return None
    if _unsampled(headers.get("traceparent", "")):
        return PassedOnTrace(headers)
    parent = _otel.propagator.extract(carrier=headers)
    # The name is "package.Service/Method" (OpenTelemetry's RPC convention); rpc.service and
    # rpc.method attributes would repeat it at a cost per span, so only rpc.system is set.
    span = _tracer.start_span(
        method.lstrip("/"), context=parent, kind=_otel.trace.SpanKind.SERVER, attributes={"rpc.system": "grpc"}
    )
    token = _otel.context.attach(_otel.trace.set_span_in_context(span, parent))
    return ServerSpan(span, token)


def _unsampled(traceparent: str) -> bool:
    """A valid `traceparent` whose sampled flag is off (anything else goes to the SDK, which
    starts a new trace for an invalid one)."""
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None or match[1] == "ff" or (match[1] == "00" and match[5]):
        return False
    if match[2] == "0" * 32 or match[3] == "0" * 16:
        return False
    return not int(match[4], 16) & 1


def span(name: str, attributes: dict[str, Any] | None = None, *, kind: str = "client") -> Any:
    """A context manager: a child span of the current one, current inside the block. It yields
    the span (None when tracing is off); an exception escaping the block marks it failed.

        with tracing.span("chat model", {"gen_ai.request.model": model}) as span:
            ...
    """
    if _tracer is None or _passed_on.get() is not None:
        return _NOTHING
    return _tracer.start_as_current_span(name, kind=_otel.kinds[kind], attributes=attributes)


def inject_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) of the current span, for an outgoing HTTP request; {} when off."""
    if _tracer is None:
        return {}
    passed_on = _passed_on.get()
    if passed_on is not None:
        return dict(passed_on)
    headers: dict[str, str] = {}
    _otel.propagator.inject(headers)
    return headers


def inject_metadata() -> tuple[tuple[str, str], ...]:
    """The same as gRPC metadata pairs; () when off or when no span is current."""
    if _tracer is None:
        return ()
    return tuple(inject_headers().items())


def current_trace_id() -> str:
    """The current span's trace id (32 hex digits), or "" (tracing off, or no span)."""
    if _tracer is None:
        return ""
    passed_on = _passed_on.get()
    if passed_on is not None:
        return passed_on["traceparent"][3:35]
    span_context = _otel.trace.get_current_span().get_span_context()
    return _otel.trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""
