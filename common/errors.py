"""Errors a handler raises to answer with a gRPC status, and how other failures map to one.

Service code raises these instead of touching the gRPC context; the interceptor turns them
into `context.abort(...)`. Anything unexpected becomes INTERNAL with no details, so no stack
trace ever reaches a client.
"""

from __future__ import annotations

import grpc
from sqlalchemy import exc as sa_exc

# A status message travels as the grpc-message trailer: one far longer than this would break
# the HTTP/2 connection it shares with other calls (Envoy resets it as a protocol error).
MAX_MESSAGE_CHARS = 2000


class ServiceError(Exception):
    """`message` is what the client reads; `reason`, when given, is the exact cause for our logs only."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, reason: str = "") -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(message)
        self.message = message
        self.reason = reason or message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status for an expected failure, or None for a bug (INTERNAL, logged with its trace)."""
    if isinstance(error, ServiceError):
        return error.code, error.message
    if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError, ConnectionError, TimeoutError)):
        return grpc.StatusCode.UNAVAILABLE, "the database is unavailable; try again"
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return grpc.StatusCode.UNAVAILABLE, "the database connection was lost; try again"
    if isinstance(error, grpc.aio.AioRpcError) and error.code() in _PASSED_THROUGH:
        # An upstream service's answer (e.g. task_service NOT_FOUND seen by the agent).
        return error.code(), error.details() or error.code().name
    return None


_PASSED_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
