"""Property-based fuzzing of the REST API with schemathesis, against /openapi.json through Envoy.

The whole stack runs as real processes (services on PostgreSQL, Envoy in front). schemathesis
reads the OpenAPI document the gateway serves and generates requests for every operation, both
valid ones (positive) and ones that break the document (negative: wrong types, out-of-range
values, missing fields, odd headers). All of them are sent as user A, with A's valid token and
A in the path (a fixed path parameter), so they get past authentication and reach the services.

Guarantees proven here, for every generated request:
- no 5xx: nothing a client can send makes the stack fail;
- the response conforms to the document: a documented status code, the documented content
  type, and a body that matches the documented schema (errors are google.rpc.Status JSON;
  a chat stream is a sequence of `data:` events, each one ChatEvent);
- user B's data (tasks, conversations, messages, seeded before) is byte-identical afterwards;
- requests with A's token and B's path never succeed (a second, smaller run).

FUZZ_MAX_EXAMPLES (default 25) sets the examples per operation and mode; the chat operations
(each call writes messages and runs the model) get FUZZ_CHAT_EXAMPLES (default 3). A full run:
FUZZ_MAX_EXAMPLES=150 FUZZ_CHAT_EXAMPLES=20 .venv/bin/pytest tests/test_fuzz.py (a few thousand cases).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.gateway_fixtures import NO_RATE_LIMITS, Gateway, collect, start_gateway

USER_A = "fuzz-alice"
USER_B = "fuzz-bob"
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "25"))
CHAT_EXAMPLES = int(os.environ.get("FUZZ_CHAT_EXAMPLES", "3"))
CROSS_TENANT_EXAMPLES = max(5, MAX_EXAMPLES // 3)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CHAT_EVENT_KINDS = {"delta", "tool_call", "done", "error"}
EXPECTED_OPERATIONS = {
    "CreateTask",
    "ListTasks",
    "GetTask",
    "UpdateTask",
    "UpdateTaskPatch",
    "SetTaskCompleted",
    "DeleteTask",
    "ListConversations",
    "GetConversation",
    "ListMessages",
    "DeleteConversation",
    "StartConversation",
    "UpdateConversation",
    "RecordMessage",
    "ListHistory",
    "Chat",
    "ChatStream",
    "GetSettings",
    "UpdateSettings",
    "ListActivity",
    "Undo",
}
# Rate limits would answer a fuzzer's burst of writes with 429; they have their own tests.


@dataclass
class Finding:
    operation: str
    mode: str
    problem: str
    request: str
    status: int | None = None
    body: str = ""

    def __str__(self) -> str:
        return f"{self.operation} [{self.mode}] -> {self.status}: {self.problem}\n  {self.request}\n  {self.body[:300]}"


@dataclass
class FuzzRun:
    operation_ids: set[str] = field(default_factory=set)
    # Operations with nothing to vary but the fixed {user_id} (GET /settings): one case is all.
    fixed_labels: set[str] = field(default_factory=set)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: list[Finding] = field(default_factory=list)
    nonconforming: list[Finding] = field(default_factory=list)
    cross_tenant_accepted: list[Finding] = field(default_factory=list)
    b_before: dict[str, Any] = field(default_factory=dict)
    b_after: dict[str, Any] = field(default_factory=dict)

    def cases(self, operation: str) -> int:
        return sum(count for (label, _), count in self.statuses.items() if label == operation)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str]
) -> Iterator[Gateway]:
    with start_gateway(tmp_path_factory, database_url_factory, "postgres", extra_env=NO_RATE_LIMITS) as started:
        yield started


@pytest.fixture(scope="module")
def fuzz_run(gateway: Gateway) -> FuzzRun:
    """Seed B, fuzz every operation as A (positive and negative), then as A against B's path."""
    seed_user(gateway, USER_B)
    seed_user(gateway, USER_A)  # so that A's ids 1..3 exist and updates/deletes can succeed
    schema = schemathesis.openapi.from_url(f"{gateway.base_url}/openapi.json")
    run = FuzzRun(b_before=snapshot(gateway, USER_B))
    with requests.Session() as session:
        fuzzer = Fuzzer(gateway, session, run)
        for result in schema.get_all_operations():
            operation = result.ok()
            run.operation_ids.add(operation.definition.raw.get("operationId", ""))
            if not breakable_inputs(operation):
                run.fixed_labels |= {operation.label, f"{operation.label} (B path)"}
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzzer.fuzz(operation, mode, path_user=USER_A)
            if "{user_id}" in operation.path:
                fuzzer.fuzz(operation, GenerationMode.POSITIVE, path_user=USER_B)
    run.b_after = snapshot(gateway, USER_B)
    by_status = Counter[int]()
    for (_, status), count in run.statuses.items():
        by_status[status] += count
    print(f"\nfuzz: {sum(by_status.values())} cases, by status {dict(sorted(by_status.items()))}")
    return run


class Fuzzer:
    def __init__(self, gateway: Gateway, session: requests.Session, run: FuzzRun) -> None:
        self.gateway, self.session, self.run = gateway, session, run
        self.headers = {"Authorization": f"Bearer {gateway.token(USER_A)}"}

    def fuzz(self, operation: Any, mode: GenerationMode, path_user: str) -> None:
        cross_tenant = path_user != USER_A
        path_parameters = {"user_id": path_user} if "{user_id}" in operation.path else None
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters, headers=self.headers)
        examples = CHAT_EXAMPLES if "/chat" in operation.path else MAX_EXAMPLES
        if cross_tenant:
            examples = min(examples, CROSS_TENANT_EXAMPLES)

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: findings are recorded, not raised
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def send(case: Any) -> None:
            self.send(operation, mode, case, cross_tenant)

        try:
            send()
        except Unsatisfiable:
            # Only a request with nothing to break (no body, no parameter but the fixed user) has no negative case.
            assert mode == GenerationMode.NEGATIVE and not breakable_inputs(operation), operation.label

    def send(self, operation: Any, mode: GenerationMode, case: Any, cross_tenant: bool) -> None:
        label = f"{operation.label}{' (B path)' if cross_tenant else ''}"
        request = case.as_curl_command(headers=self.headers)
        try:
            response = case.call(base_url=self.gateway.base_url, session=self.session, timeout=120)
        except requests.RequestException as error:
            self.run.server_errors.append(Finding(label, mode.value, f"no response: {error!r}", request))
            return
        status = response.status_code
        self.run.statuses[(label, status)] += 1
        finding = Finding(label, mode.value, "", request, status, response.text_lossy)
        if status >= 500:
            self.run.server_errors.append(finding)
        if cross_tenant and status < 400:
            self.run.cross_tenant_accepted.append(finding)
        problem = conformance_problem(case, response)
        if problem:
            finding.problem = problem
            self.run.nonconforming.append(finding)


def breakable_inputs(operation: Any) -> list[str]:
    """The inputs of an operation a negative case could get wrong (the user_id path is fixed)."""
    raw = operation.definition.raw
    inputs = [parameter["name"] for parameter in raw.get("parameters", []) if parameter["name"] != "user_id"]
    return inputs + (["body"] if "requestBody" in raw else [])


def conformance_problem(case: Any, response: Any) -> str:
    """Why `response` does not match the document, or "" when it does."""
    content_type = response.headers.get("content-type") or [""]  # schemathesis: name -> list of values
    if content_type[0].startswith("text/event-stream"):
        return chat_stream_problem(response.status_code, response.text)
    try:
        case.validate_response(response, checks=CHECKS)
    except BaseException as failures:  # schemathesis raises a FailureGroup (a BaseExceptionGroup)
        if isinstance(failures, (KeyboardInterrupt, SystemExit)):
            raise
        return str(failures)[:2000]
    return ""


def chat_stream_problem(status: int, text: str) -> str:
    """A 200 chat stream is `data: <ChatEvent JSON>` events, each with exactly one member,
    ending with `done` (or `error`). The document describes each event's data as ChatEvent."""
    if status != 200:
        return f"an event stream with status {status}"
    events = [block for block in text.split("\n\n") if block.strip()]
    if not events:
        return "an empty event stream"
    kinds = []
    for block in events:
        if not block.startswith("data: "):
            return f"not a data event: {block[:100]!r}"
        try:
            event = json.loads(block.removeprefix("data: "))
        except ValueError:
            return f"event data is not JSON: {block[:100]!r}"
        if not isinstance(event, dict) or len(event) != 1 or not set(event) <= CHAT_EVENT_KINDS:
            return f"not a ChatEvent: {block[:100]!r}"
        kinds.append(next(iter(event)))
    if kinds[-1] not in ("done", "error") or kinds.count("done") + kinds.count("error") != 1:
        return f"the stream does not end with exactly one done/error event: {kinds}"
    return ""


def seed_user(gateway: Gateway, user: str) -> None:
    for index in range(3):
        body = {"title": f"{user} task {index}", "description": f"seeded {index}"}
        created = gateway.call("POST", f"/api/{user}/tasks", user=user, body=body)
        assert created.status == 200, created
    completed = gateway.call("PATCH", f"/api/{user}/tasks/2/complete", user=user, body={"completed": True})
    assert completed.status == 200, completed
    chat = gateway.call("POST", f"/api/{user}/chat", user=user, body={"message": "add a task to buy milk"}, timeout=60)
    assert chat.status == 200, chat
    # A client's own conversation, with metadata and a recorded message (so updates and records can succeed).
    started = gateway.call(
        "POST", f"/api/{user}/conversations", user=user, body={"title": "notes", "metadata": {"k": 1}}
    )
    assert started.status == 200, started
    recorded = gateway.call(
        "POST",
        f"/api/{user}/conversations/{started.json()['id']}/messages",
        user=user,
        body={"role": "assistant", "content": "written by the client", "metadata": {"source": "app"}},
    )
    assert recorded.status == 200, recorded


def snapshot(gateway: Gateway, user: str) -> dict[str, Any]:
    """The raw JSON of every task, conversation and message of `user` (all pages), and the history."""
    conversations = collect(gateway, user, f"/api/{user}/conversations", "conversations")
    return {
        "tasks": collect(gateway, user, f"/api/{user}/tasks?status=all", "tasks"),
        "activity": collect(gateway, user, f"/api/{user}/activity", "events"),
        "settings": gateway.call("GET", f"/api/{user}/settings", user=user).json(),
        "conversations": conversations,
        "history": collect(gateway, user, f"/api/{user}/history", "messages"),
        "messages": {
            item["id"]: collect(gateway, user, f"/api/{user}/conversations/{item['id']}/messages", "messages")
            for item in conversations
        },
    }


def report(findings: list[Finding], limit: int = 10) -> str:
    shown = "\n".join(str(finding) for finding in findings[:limit])
    return f"{len(findings)} finding(s):\n{shown}"


def test_the_document_has_every_rest_operation(fuzz_run: FuzzRun) -> None:
    assert fuzz_run.operation_ids >= EXPECTED_OPERATIONS


def test_every_operation_was_exercised_past_authentication(fuzz_run: FuzzRun) -> None:
    """Guards the fuzzer itself: every operation got its cases, and they reached the services."""
    labels = {label for label, _ in fuzz_run.statuses if label.split(" ")[1].startswith("/api/")}
    assert len(labels) >= 2 * len(EXPECTED_OPERATIONS) - 1, labels  # each also with B's path
    for label in labels:
        expected = 2 if "/chat" in label or "B path" in label else min(MAX_EXAMPLES, 10)
        if label in fuzz_run.fixed_labels:
            expected = 1
        assert fuzz_run.cases(label) >= expected, (label, fuzz_run.cases(label))
    assert not [key for key in fuzz_run.statuses if key[1] == 401], fuzz_run.statuses
    successes = {label for (label, status) in fuzz_run.statuses if status == 200}
    for must_succeed in ("POST /api/{user_id}/tasks", "GET /api/{user_id}/tasks", "POST /api/{user_id}/chat"):
        assert must_succeed in successes, fuzz_run.statuses


def test_no_request_makes_the_stack_fail(fuzz_run: FuzzRun) -> None:
    assert not fuzz_run.server_errors, report(fuzz_run.server_errors)


def test_every_response_matches_the_document(fuzz_run: FuzzRun) -> None:
    assert not fuzz_run.nonconforming, report(fuzz_run.nonconforming)


def test_as_user_a_nothing_succeeds_on_user_bs_path(fuzz_run: FuzzRun) -> None:
    assert any("B path" in label for label, _ in fuzz_run.statuses)
    assert not fuzz_run.cross_tenant_accepted, report(fuzz_run.cross_tenant_accepted)


def test_user_bs_data_is_untouched(fuzz_run: FuzzRun) -> None:
    assert fuzz_run.b_before["tasks"] and fuzz_run.b_before["messages"]
    assert fuzz_run.b_after == fuzz_run.b_before
