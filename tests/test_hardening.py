"""Hardening of the shared runtime: the audit log, and header values we cannot read.

- `common.audit.record` logs one structured record under the logger "audit" and refuses fields
  that would carry credentials or what users wrote;
- a header value our services read (authorization, x-request-id, idempotency-key) that is not
  printable ASCII (e.g. bytes that are not UTF-8) is a clean 400 naming the header, through the
  real gateway, with one log line for the call and no traceback: today grpc itself logs two
  tracebacks quoting the raw bytes, then the turn runs with a mangled key.
"""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common import audit
from tests.gateway_fixtures import Gateway, start_gateway
from tests.support import token

# --- the audit record ------------------------------------------------------------------------


def test_an_audit_record_is_structured_and_logged_under_audit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="audit")
    audit.record("auth_refused", surface="grpc", method="/todo.v1.TaskService/ListTasks", user=None, reason="x" * 500)
    [entry] = [record for record in caplog.records if record.name == "audit"]
    assert entry.getMessage() == "auth_refused"
    fields = vars(entry)
    assert fields["event"] == "auth_refused" and fields["surface"] == "grpc"
    assert fields["method"] == "/todo.v1.TaskService/ListTasks" and fields["user"] is None
    assert fields["reason"] == "x" * audit.MAX_FIELD_CHARS  # bounded: reasons may quote attacker input


@pytest.mark.parametrize("field", ["token", "secret", "authorization", "message", "content", "arguments"])
def test_an_audit_record_never_carries_credentials_or_user_text(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        audit.record("tool_call", user="alice", **{field: "sensitive"})


# --- header values that are not printable ASCII, through the gateway ---------------------------


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str]
) -> Iterator[Gateway]:
    with start_gateway(tmp_path_factory, database_url_factory, "sqlite") as started:
        yield started


def send(
    gateway: Gateway, method: str, path: str, headers: dict[str, str | bytes], body: bytes = b""
) -> tuple[int, dict[str, Any], str]:
    """One request with raw header bytes (urllib would refuse them): status, JSON body, request id."""
    address = gateway.base_url.removeprefix("http://")
    connection = http.client.HTTPConnection(*address.rsplit(":", 1), timeout=60)
    connection.putrequest(method, path)
    for name, value in {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}.items():
        connection.putheader(name, value)
    connection.endheaders(body)
    reply = connection.getresponse()
    return reply.status, json.loads(reply.read() or b"{}"), reply.getheader("x-request-id", "")


def log_lines(gateway: Gateway, component: str, request_id: str) -> list[str]:
    log_path = Path(gateway.stack.component(component).log_path)
    return [line for line in log_path.read_text(errors="replace").splitlines() if request_id in line]


def test_a_non_utf8_idempotency_key_is_400_with_one_log_line(gateway: Gateway) -> None:
    chat = json.dumps({"message": "add a task to buy milk"}).encode()
    alice = {"Authorization": f"Bearer {token('alice')}"}
    status, body, request_id = send(gateway, "POST", "/api/alice/chat", {**alice, "Idempotency-Key": b"\xff\xfe"}, chat)
    assert status == 400, (status, body)
    assert "idempotency-key" in body["message"], body
    lines = log_lines(gateway, "agent", request_id)
    assert len(lines) == 1 and '"INVALID_ARGUMENT"' in lines[0], lines
    agent_log = Path(gateway.stack.component("agent").log_path).read_text(errors="replace")
    assert "Traceback" not in agent_log and "Invalid encoding" not in agent_log
    # Nothing ran: no task was added.
    status, listed, _ = send(gateway, "GET", "/api/alice/tasks", alice)
    assert status == 200 and listed["tasks"] == [], listed
    # A plain ASCII key works as before.
    status, body, _ = send(gateway, "POST", "/api/alice/chat", {**alice, "Idempotency-Key": "key-1"}, chat)
    assert status == 200, body


def test_an_authorization_header_with_bad_bytes_is_400_and_never_logged(gateway: Gateway) -> None:
    bob = token("bob")
    status, body, request_id = send(
        gateway, "GET", "/api/bob/tasks", {"Authorization": f"Bearer {bob}".encode() + b"\xff"}
    )
    assert status == 400, (status, body)
    assert "authorization" in body["message"], body
    assert len(log_lines(gateway, "task", request_id)) == 1
    task_log = Path(gateway.stack.component("task").log_path).read_text(errors="replace")
    assert bob.split(".")[2] not in task_log, "the token reached the log"
    assert "Traceback" not in task_log
