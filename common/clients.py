"""gRPC channels to our own services, and the metadata that carries the caller along."""

from __future__ import annotations

import json

import grpc

from common import tracing
from common.auth import Caller

# A call that finds the service unreachable (restarting, or the channel still in reconnect
# backoff) is retried for about two seconds before UNAVAILABLE reaches the caller. Only calls
# that are safe to repeat: an UNAVAILABLE can also come after the service did the work and died
# before answering, and a retried CreateTask then adds the task twice (tests/test_replicas.py saw
# it). So reads and the writes whose repetition changes nothing; every other call fails at once
# with UNAVAILABLE, which the turn reports and an Idempotency-Key retry replays safely.
# (gRPC still retries transparently a call that never left the client.)
IDEMPOTENT_METHODS = {
    "todo.v1.TaskService": [
        "GetTask", "ListTasks", "GetSettings", "ListActivity", "SetTaskCompleted", "UpdateTask", "UpdateSettings",
    ],
    "todo.v1.ConversationService": [
        "GetConversation", "ListConversations", "GetMessage", "GetMessageByRequestId", "GetRecentMessages",
        "ListMessages", "ListHistory",
    ],
}  # fmt: skip
RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": service, "method": method}
                for service, methods in IDEMPOTENT_METHODS.items()
                for method in methods
            ],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)),
    # Reconnect to a restarted service within about a second. gRPC's default backoff grows to
    # 120 s, so after a few seconds of outage calls kept failing fast long after it was back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Replies such as a conversation's recent history can exceed gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


def channel(address: str) -> grpc.aio.Channel:
    """A channel to one of our services. Create it inside the running event loop."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def caller_metadata(caller: Caller) -> tuple[tuple[str, str], ...]:
    """Metadata that makes a downstream call act as `caller` (and keeps the request id, and the
    trace: the current span's `traceparent` when tracing is on)."""
    metadata = [("authorization", f"Bearer {caller.token}")]
    if caller.request_id:
        metadata.append(("x-request-id", caller.request_id))
    return (*metadata, *tracing.inject_metadata())
