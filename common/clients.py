"""gRPC channels to our own services, and the metadata that carries the caller along."""

from __future__ import annotations

import json

import grpc

from common.auth import Caller

# A call that finds the service unreachable (restarting, or the channel still in reconnect
# backoff) is retried for about two seconds before UNAVAILABLE reaches the caller. Only
# UNAVAILABLE is retried: the request did not get a result, so repeating it is safe.
RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{}],
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
    """Metadata that makes a downstream call act as `caller` (and keeps the request id)."""
    metadata = [("authorization", f"Bearer {caller.token}")]
    if caller.request_id:
        metadata.append(("x-request-id", caller.request_id))
    return tuple(metadata)
