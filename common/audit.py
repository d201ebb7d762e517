"""Security-relevant events as structured log records under the logger name "audit".

    audit.record("auth_refused", surface="grpc", method="/todo.v1.TaskService/ListTasks", reason="...")

One record per event: the event name (auth_refused, permission_denied, rate_limited, tool_call,
...) and fields such as user, surface (grpc, mcp, rest), method and reason. The exact reason of a
refusal goes here and never to the client, who gets a generic message. Audit records must never
hold credentials or what users wrote, so fields with those names are refused outright: a misuse
fails the first test that reaches it instead of leaking in production.
"""

from __future__ import annotations

import logging

log = logging.getLogger("audit")

FORBIDDEN_FIELDS = frozenset(
    {"token", "secret", "password", "authorization", "message", "content", "text", "title", "description", "arguments"}
)
MAX_FIELD_CHARS = 200  # reasons can quote attacker-chosen values (an `alg`, a `kid`, a user id)


def record(event: str, **fields: object) -> None:
    """Log one audit event with its fields (strings longer than MAX_FIELD_CHARS are cut)."""
    forbidden = FORBIDDEN_FIELDS.intersection(fields)
    if forbidden:
        raise ValueError(f"audit records never carry {sorted(forbidden)}")
    extra = {name: _bounded(value) for name, value in fields.items()}
    log.info(event, extra={"event": event, **extra})


def _bounded(value: object) -> object:
    return value[:MAX_FIELD_CHARS] if isinstance(value, str) else value
