"""OpenTelemetry tracing: one trace per request, across every hop. Off unless configured.

With OTEL_EXPORTER_OTLP_ENDPOINT set, `configure()` installs the SDK's tracer provider for the
service (`service.name` = the service's name) and batches spans to that OTLP/gRPC endpoint.
Trace context travels as W3C `traceparent`: read from incoming gRPC metadata by the server
span (`server_span`, opened by common/metrics.py's interceptor so that each call is wrapped
once), written into outgoing gRPC metadata (`inject_metadata`, used by common/clients.py) and
into HTTP headers (`inject_headers`, for the model request).

Without the setting nothing is installed and this module imports no OpenTelemetry package:
every helper checks one module global and returns (no span, empty headers, a shared no-op
context manager), so tracing that is off costs nothing per request.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
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
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    _otel = _Otel()
    endpoint = settings.otel_exporter_otlp_endpoint
    # An http:// endpoint is a plaintext collector (the usual sidecar); https:// uses TLS.
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    # TRACING_SAMPLE_PERCENT of traces get the services' spans. The decision is the trace id's
    # (TraceIdRatioBased, not the parent's flag: Envoy marks every request sampled), so every
    # service decides the same for one trace: a trace has all its hops or only the gateway's.
    # An unsampled span records nothing and costs a few microseconds.
    ratio = min(max(settings.tracing_sample_percent, 0.0), 100.0) / 100
    _provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=TraceIdRatioBased(ratio))
    _provider.add_span_processor(BatchSpanProcessor(exporter))
    _otel.trace.set_tracer_provider(_provider)
    _tracer = _provider.get_tracer("todo")
    log.info("tracing on", extra={"otlp_endpoint": endpoint})
    return True


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


def server_span(method: str, metadata: Sequence[tuple[str, Any]] | None) -> ServerSpan | None:
    """Start the span of an incoming call to `method` ("/pkg.Service/Method"), continuing the
    trace of the caller's `traceparent` if it sent one. None when tracing is off."""
    if _tracer is None:
        return None
    parent = _parent(metadata)
    # The name is "package.Service/Method" (OpenTelemetry's RPC convention); rpc.service and
    # rpc.method attributes would repeat it at a cost per span, so only rpc.system is set.
    span = _tracer.start_span(
        method.lstrip("/"), context=parent, kind=_otel.trace.SpanKind.SERVER, attributes={"rpc.system": "grpc"}
    )
    token = _otel.context.attach(_otel.trace.set_span_in_context(span, parent))
    return ServerSpan(span, token)


def _parent(metadata: Sequence[tuple[str, Any]] | None) -> Any:
    """The caller's trace context (an empty context: a new trace). Only W3C trace context's two
    headers are read; the rest of the metadata (the token) is not."""
    headers = {key: value for key, value in metadata or () if key in ("traceparent", "tracestate")}
    return _otel.propagator.extract(carrier=headers)


def span(name: str, attributes: dict[str, Any] | None = None, *, kind: str = "client") -> Any:
    """A context manager: a child span of the current one, current inside the block. It yields
    the span (None when tracing is off); an exception escaping the block marks it failed.

        with tracing.span("chat model", {"gen_ai.request.model": model}) as span:
            ...
    """
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(name, kind=_otel.kinds[kind], attributes=attributes)


def inject_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) of the current span, for an outgoing HTTP request; {} when off."""
    headers: dict[str, str] = {}
    if _tracer is not None:
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
    span_context = _otel.trace.get_current_span().get_span_context()
    return _otel.trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""
