"""The one server interceptor: authenticates every call, names the caller, maps errors, logs,
counts and traces.

For each RPC (health and reflection excepted) it reads `authorization` from the metadata,
verifies the bearer token, spends the caller's rate-limit budget for the method
(common/ratelimit.py), and runs the handler with the `Caller` and request id in context
variables. Handlers raise `common.errors.ServiceError`s; this is the single place that turns
them (and database outages) into gRPC statuses. Every call leaves one access-log line; refusals
of identity, permission and budget also leave an `audit` record with their exact reason.

The same scope that times the call for its log line records its RPC metrics (common/metrics.py,
when the service serves them) and is its trace span (common/tracing.py, when tracing is on), with
the final status: one wrapper per call for all of it (a second grpc.aio interceptor cost more than
what it recorded, bench/NOTES.md). Health checks and reflection are none of this: not
authenticated, logged, counted or traced (Envoy health-checks every service each second).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from common import audit, auth, logs, metrics, ratelimit, tracing
from common.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    status_for,
)

log = logging.getLogger("rpc")

# Calls that need no token: probes and introspection.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# The metadata our services read (the agent reads idempotency-key); each is checked here.
READ_HEADERS = ("authorization", "x-request-id", "idempotency-key")
# W3C trace context, read in the same pass for the call's span; never checked (an invalid one
# starts a new trace, as the W3C recommendation says).
TRACE_HEADERS = ("traceparent", "tracestate")
AUDITED_REFUSALS: dict[type[ServiceError], str] = {
    Unauthenticated: "auth_refused",
    PermissionDenied: "permission_denied",
    ResourceExhausted: "rate_limited",
}


class CallInterceptor(grpc.aio.ServerInterceptor):
    """See the module's docstring; `record_metrics` is off when the service serves no metrics."""

    def __init__(self, verifier: auth.TokenVerifier, record_metrics: bool = True) -> None:
        self._verifier = verifier
        self._record_metrics = record_metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        headers, trace_headers = read_headers(handler_call_details.invocation_metadata or ())
        request_id = _first(headers, "x-request-id")
        if not request_id or not _printable_ascii(request_id):
            request_id = uuid.uuid4().hex  # a bad one is refused below, under a fresh id
        try:
            check_headers(headers)
            token = auth.bearer_token(_first(headers, "authorization"))
            user_id = await self._verifier.verify(token)
            caller: auth.Caller | ServiceError = auth.Caller(user_id=user_id, token=token, request_id=request_id)
        except ServiceError as error:
            caller = error
        call = _Call(method, caller, request_id, trace_headers)
        return _wrap(handler, call, self._record_metrics)


def read_headers(metadata: Any) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Every value of each of READ_HEADERS in the call's metadata, and the first of each of
    TRACE_HEADERS."""
    values: dict[str, list[str]] = {}
    trace: dict[str, str] = {}
    for key, value in metadata:
        if key in READ_HEADERS:
            values.setdefault(key, []).append(value.decode("latin-1") if isinstance(value, bytes) else value)
        elif key in TRACE_HEADERS and isinstance(value, str) and value:
            trace.setdefault(key, value)
    return values, trace


def check_headers(headers: dict[str, list[str]]) -> None:
    """Refuse what we cannot read unambiguously.

    Only printable ASCII is accepted: grpc decodes a value that is not UTF-8 as latin-1 (after
    logging a traceback, which common.logs silences), so what arrives as text can no longer be
    told apart from real text. Several `authorization` values would let a proxy and this service
    disagree about who is calling."""
    for key, found in headers.items():
        if not all(_printable_ascii(value) for value in found):
            raise InvalidArgument(f"the {key} header must be printable ASCII")
    if len(headers.get("authorization", ())) > 1:
        raise Unauthenticated("send one authorization header")


def _first(headers: dict[str, list[str]], key: str) -> str | None:
    values = headers.get(key)
    return values[0] if values else None


def _printable_ascii(value: str) -> bool:
    return all(" " <= char <= "~" for char in value)


class _Call:
    """What the interceptor learnt of one call before its handler runs."""

    __slots__ = ("caller", "method", "request_id", "trace_headers")

    def __init__(
        self, method: str, caller: auth.Caller | ServiceError, request_id: str, trace_headers: dict[str, str]
    ) -> None:
        self.method, self.caller, self.request_id, self.trace_headers = method, caller, request_id, trace_headers


def _wrap(handler: grpc.RpcMethodHandler, call: _Call, record_metrics: bool) -> grpc.RpcMethodHandler:
    """The same handler, run as the caller (or refused with its auth error), with errors mapped."""
    if handler.unary_unary:
        recorder = metrics.method_metrics("unary", call.method) if record_metrics else None
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, call, recorder),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        recorder = metrics.method_metrics("server_stream", call.method) if record_metrics else None
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, call, recorder),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    raise NotImplementedError(f"{call.method}: client-streaming RPCs are not used by this project")


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message (e.g. a string field that is
    not UTF-8, as Envoy's transcoder passes on from a path like /api/%FF/tasks)."""


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The handler's deserializer, but a malformed request becomes `_Undecodable` rather than
    grpc's own UNKNOWN status (a 500 through the gateway): the call then fails as INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _Undecodable()

    return deserialize


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("the request is not valid: every text field must be UTF-8")


class _CallScope:
    """One call from start to status: the caller and request id set, its span current (tracing
    on), then one access-log line, the RPC metrics and the span's end with the final status."""

    def __init__(self, call: _Call, recorder: metrics.MethodMetrics | None, context: Any) -> None:
        self.call, self.recorder, self.context = call, recorder, context

    async def __aenter__(self) -> None:
        self.started = time.perf_counter()
        self.request_id_token = logs.request_id_var.set(self.call.request_id)
        if self.recorder is not None:
            self.recorder.started.inc()
        self.span = tracing.server_span(self.call.method, self.call.trace_headers)
        if isinstance(self.call.caller, ServiceError):
            await self._abort(self.call.caller)
            return
        self.caller_token = auth.set_caller(self.call.caller)

    async def __aexit__(self, exc_type: type | None, error: BaseException | None, tb: Any) -> bool:
        if not isinstance(self.call.caller, ServiceError):
            auth.reset_caller(self.caller_token)
        try:
            if isinstance(error, asyncio.CancelledError | GeneratorExit):
                # The client went away (or its deadline passed): nothing to answer, nothing broken.
                self._done(grpc.StatusCode.CANCELLED)
                return False
            if error is not None and not _is_abort(error):
                self._audit(error)
                mapped = status_for(error)
                if mapped is None:
                    log.error("unhandled error in %s", self.call.method, exc_info=(exc_type, error, tb))  # type: ignore[arg-type]
                    mapped = (grpc.StatusCode.INTERNAL, "internal error")
                self._done(mapped[0])
                retry_after = getattr(error, "retry_after_seconds", None)
                if retry_after:  # a refusal that says when to come back (agent admission)
                    self.context.set_trailing_metadata((("retry-after", str(retry_after)),))
                await self.context.abort(mapped[0], mapped[1])
            self._done(self.context.code() or grpc.StatusCode.OK)
            return False
        finally:
            logs.request_id_var.reset(self.request_id_token)

    async def _abort(self, error: ServiceError) -> None:
        self._done(error.code)
        self._audit(error)
        if isinstance(error, Unauthenticated):
            self.context.set_trailing_metadata((("www-authenticate", 'Bearer error="invalid_token"'),))
        elif getattr(error, "retry_after_seconds", None):  # the verifier's upstream (Better Auth) is down
            self.context.set_trailing_metadata((("retry-after", str(error.retry_after_seconds)),))  # type: ignore[attr-defined]
        logs.request_id_var.reset(self.request_id_token)
        await self.context.abort(error.code, error.message)

    def _audit(self, error: BaseException) -> None:
        if not isinstance(error, ServiceError):
            return
        event = next((name for kind, name in AUDITED_REFUSALS.items() if isinstance(error, kind)), None)
        if event is not None:
            user = self.call.caller.user_id if isinstance(self.call.caller, auth.Caller) else None
            audit.record(event, surface="grpc", method=self.call.method, user=user, reason=error.reason)

    def _done(self, code: grpc.StatusCode) -> None:
        """The call's status is known: log it (inside the span, so the line has the trace id),
        count it, end the span."""
        seconds = time.perf_counter() - self.started
        user = self.call.caller.user_id if isinstance(self.call.caller, auth.Caller) else None
        extra = {"method": self.call.method, "code": code.name, "ms": round(seconds * 1000, 2), "user": user}
        log.info("rpc", extra=extra)
        if self.recorder is not None:
            self.recorder.done(code, seconds)
        if self.span is not None:
            self.span.finish(code)


def _is_abort(error: BaseException) -> bool:
    # context.abort() raises this; the status is already set.
    return type(error).__name__ == "AbortError"


def _unary(behavior: Callable[..., Any], call: _Call, recorder: metrics.MethodMetrics | None) -> Any:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _CallScope(call, recorder, context):
            _refuse_undecodable(request)
            await ratelimit.charge(call.method, context)
            return await behavior(request, context)

    return handle


def _streaming(behavior: Callable[..., Any], call: _Call, recorder: metrics.MethodMetrics | None) -> Any:
    if not inspect.isasyncgenfunction(behavior):
        return _unary(behavior, call, recorder)  # a handler that writes via context.write

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _CallScope(call, recorder, context):
            _refuse_undecodable(request)
            await ratelimit.charge(call.method, context)
            async for response in behavior(request, context):
                yield response

    return handle
