"""The one server interceptor: authenticates every call, names the caller, maps errors, logs.

For each RPC (health and reflection excepted) it reads `authorization` from the metadata,
verifies the bearer token, spends the caller's rate-limit budget for the method
(common/ratelimit.py), and runs the handler with the `Caller` and request id in context
variables. Handlers raise `common.errors.ServiceError`s; this is the single place that turns
them (and database outages) into gRPC statuses. Every call leaves one access-log line; refusals
of identity, permission and budget also leave an `audit` record with their exact reason.
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

from common import audit, auth, logs, ratelimit
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
AUDITED_REFUSALS: dict[type[ServiceError], str] = {
    Unauthenticated: "auth_refused",
    PermissionDenied: "permission_denied",
    ResourceExhausted: "rate_limited",
}


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, verifier: auth.TokenVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        headers = read_headers(handler_call_details.invocation_metadata or ())
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
        return _wrap(handler, method, caller, request_id)


def read_headers(metadata: Any) -> dict[str, list[str]]:
    """Every value of each of READ_HEADERS in the call's metadata."""
    values: dict[str, list[str]] = {}
    for key, value in metadata:
        if key in READ_HEADERS:
            values.setdefault(key, []).append(value.decode("latin-1") if isinstance(value, bytes) else value)
    return values


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


def _wrap(
    handler: grpc.RpcMethodHandler, method: str, caller: auth.Caller | ServiceError, request_id: str
) -> grpc.RpcMethodHandler:
    """The same handler, run as `caller` (or refused with its auth error), with errors mapped."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, method, caller, request_id),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, method, caller, request_id),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    raise NotImplementedError(f"{method}: client-streaming RPCs are not used by this project")


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
    """Sets the caller and request id for the duration of one call, and logs its outcome."""

    def __init__(self, method: str, caller: auth.Caller | ServiceError, request_id: str, context: Any) -> None:
        self.method, self.caller, self.request_id, self.context = method, caller, request_id, context

    async def __aenter__(self) -> None:
        self.started = time.perf_counter()
        self.tokens = (logs.request_id_var.set(self.request_id),)
        if isinstance(self.caller, ServiceError):
            await self._abort(self.caller)
            return
        self.caller_token = auth.set_caller(self.caller)

    async def __aexit__(self, exc_type: type | None, error: BaseException | None, tb: Any) -> bool:
        if not isinstance(self.caller, ServiceError):
            auth.reset_caller(self.caller_token)
        try:
            if isinstance(error, asyncio.CancelledError):
                # The client went away (or its deadline passed): nothing to answer, nothing broken.
                self._log(grpc.StatusCode.CANCELLED)
                return False
            if error is not None and not _is_abort(error):
                self._audit(error)
                mapped = status_for(error)
                if mapped is None:
                    log.error("unhandled error in %s", self.method, exc_info=(exc_type, error, tb))  # type: ignore[arg-type]
                    mapped = (grpc.StatusCode.INTERNAL, "internal error")
                self._log(mapped[0])
                retry_after = getattr(error, "retry_after_seconds", None)
                if retry_after:  # a refusal that says when to come back (agent admission)
                    self.context.set_trailing_metadata((("retry-after", str(retry_after)),))
                await self.context.abort(mapped[0], mapped[1])
            self._log(self.context.code() or grpc.StatusCode.OK)
            return False
        finally:
            logs.request_id_var.reset(self.tokens[0])

    async def _abort(self, error: ServiceError) -> None:
        self._log(error.code)
        self._audit(error)
        if isinstance(error, Unauthenticated):
            self.context.set_trailing_metadata((("www-authenticate", 'Bearer error="invalid_token"'),))
        elif getattr(error, "retry_after_seconds", None):  # the verifier's upstream (Better Auth) is down
            self.context.set_trailing_metadata((("retry-after", str(error.retry_after_seconds)),))  # type: ignore[attr-defined]
        logs.request_id_var.reset(self.tokens[0])
        await self.context.abort(error.code, error.message)

    def _audit(self, error: BaseException) -> None:
        if not isinstance(error, ServiceError):
            return
        event = next((name for kind, name in AUDITED_REFUSALS.items() if isinstance(error, kind)), None)
        if event is not None:
            user = self.caller.user_id if isinstance(self.caller, auth.Caller) else None
            audit.record(event, surface="grpc", method=self.method, user=user, reason=error.reason)

    def _log(self, code: grpc.StatusCode | int) -> None:
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        user = self.caller.user_id if isinstance(self.caller, auth.Caller) else None
        elapsed_ms = round((time.perf_counter() - self.started) * 1000, 2)
        log.info("rpc", extra={"method": self.method, "code": name, "ms": elapsed_ms, "user": user})


def _is_abort(error: BaseException) -> bool:
    # context.abort() raises this; the status is already set.
    return type(error).__name__ == "AbortError"


def _unary(behavior: Callable[..., Any], method: str, caller: auth.Caller | ServiceError, request_id: str) -> Any:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _CallScope(method, caller, request_id, context):
            _refuse_undecodable(request)
            await ratelimit.charge(method, context)
            return await behavior(request, context)

    return handle


def _streaming(behavior: Callable[..., Any], method: str, caller: auth.Caller | ServiceError, request_id: str) -> Any:
    if not inspect.isasyncgenfunction(behavior):
        return _unary(behavior, method, caller, request_id)  # a handler that writes via context.write

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _CallScope(method, caller, request_id, context):
            _refuse_undecodable(request)
            await ratelimit.charge(method, context)
            async for response in behavior(request, context):
                yield response

    return handle
