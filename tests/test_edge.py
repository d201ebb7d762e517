"""The gateway as an edge proxy: what the public port refuses, cuts off and never discloses.

Issue 20 (an attack on the running stack), one group of tests per finding:
1. Only RPCs with a `google.api.http` annotation are reachable through the gateway, as REST and
   as native gRPC; every other RPC (CreateConversation, AppendMessage, ...) is 404 at the edge
   (UNIMPLEMENTED, gRPC's 404, for gRPC clients). Enumerated from build/todo.pb.
2. A query parameter naming a path field (`?user_id=`, `?taskId=`, percent-encoded too) is 400:
   the transcoder would let it override the path's value.
3. Slow clients are cut off (header, request and idle timeouts), connections are capped, the
   32 KiB connection buffers still carry 1 MiB bodies and large responses, headers with
   underscores are refused, paths are normalized, internal headers are stripped.
4. Query strings (a token someone put there) never reach Envoy's access log.
5. docker compose publishes the gateway on 127.0.0.1 unless told otherwise.
6. /openapi.json names the configured PUBLIC_BASE_URL as its server.

The real stack (SQLite) runs behind real Envoy; the slow-client tests use an Envoy of their own
with short limits (they never reach an upstream), rendered by the same `envoy_config.render`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from common.settings import Settings
from gateway import envoy_config
from scripts.stack import EnvoyComponent
from tests.gateway_fixtures import NO_RATE_LIMITS, ROOT, Gateway, Reply, free_ports_env, start_gateway
from tests.support import auth_metadata, free_port
from todo.v1 import agent_pb2, agent_pb2_grpc, task_pb2, task_pb2_grpc

KIB = 1024
MIB = 1024 * KIB
ERROR_KEYS = {"code", "message", "details"}
EMPTY_GRPC_FRAME = b"\x00\x00\x00\x00\x00"  # an uncompressed, empty message: every request type parses it
PATH_VARIABLE = re.compile(r"\{([a-z0-9_.]+)(?:=[^}]*)?\}")


# --- the RPCs, from the descriptor set Envoy transcodes with ---------------------------------------


@dataclass(frozen=True)
class Rpc:
    service: str  # "todo.v1.TaskService"
    name: str  # "CreateTask"
    streaming: bool  # server streaming
    bindings: tuple[tuple[str, str, str], ...]  # (HTTP method, path template, body); empty: not public
    path_fields: tuple[tuple[str, str], ...]  # (field name, json_name) of the template variables

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def public(self) -> bool:
        return bool(self.bindings)

    def __str__(self) -> str:
        return f"{self.service.rsplit('.', 1)[1]}.{self.name}"


def _bindings(rule: object) -> Iterator[tuple[str, str, str]]:
    pattern = rule.WhichOneof("pattern")  # type: ignore[attr-defined]
    if pattern and pattern != "custom":
        yield pattern.upper(), getattr(rule, pattern), rule.body  # type: ignore[attr-defined]
    for extra in rule.additional_bindings:  # type: ignore[attr-defined]
        yield from _bindings(extra)


def load_rpcs() -> list[Rpc]:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "build" / "todo.pb").read_bytes())
    messages = {
        f".{file.package}.{message.name}": message for file in descriptor_set.file for message in file.message_type
    }
    rpcs = []
    for file in descriptor_set.file:
        if file.package != "todo.v1":
            continue
        for service in file.service:
            for method in service.method:
                bindings: tuple[tuple[str, str, str], ...] = ()
                if method.options.HasExtension(annotations_pb2.http):
                    bindings = tuple(_bindings(method.options.Extensions[annotations_pb2.http]))
                json_names = {field.name: field.json_name for field in messages[method.input_type].field}
                variables = {name for _, template, _ in bindings for name in PATH_VARIABLE.findall(template)}
                fields = tuple((name, json_names[name]) for name in sorted(variables))
                rpc = Rpc(f"{file.package}.{service.name}", method.name, method.server_streaming, bindings, fields)
                rpcs.append(rpc)
    return rpcs


RPCS = load_rpcs()
PUBLIC_RPCS = [rpc for rpc in RPCS if rpc.public]
INTERNAL_RPCS = [rpc for rpc in RPCS if not rpc.public]


def fill(template: str, user: str, other_id: str = "1") -> str:
    """A REST path from a template: the user for {user_id}, `other_id` for every other variable."""
    return PATH_VARIABLE.sub(lambda match: user if match.group(1) == "user_id" else other_id, template)


def new_user() -> str:
    return f"edge-{uuid.uuid4().hex[:8]}"


def assert_error(reply: Reply, status: int, *, naming: str | None = None) -> dict:
    assert reply.status == status, reply
    assert reply.headers.get_content_type() == "application/json", reply.headers
    body = reply.json()
    assert set(body) == ERROR_KEYS and isinstance(body["code"], int) and body["code"] != 0, body
    if naming is not None:
        assert naming in body["message"], body
    return dict(body)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str]
) -> Iterator[Gateway]:
    # No rate limits: one test writes 100 tasks, and refusals must come from the edge, not a budget.
    with start_gateway(tmp_path_factory, database_url_factory, "sqlite", extra_env=NO_RATE_LIMITS) as running:
        yield running


def grpc_target(gateway: Gateway) -> str:
    return gateway.base_url.removeprefix("http://")


def create_task(gateway: Gateway, user: str, title: str, **fields: object) -> dict:
    reply = gateway.call("POST", f"/api/{user}/tasks", user=user, body={"title": title, **fields})
    assert reply.status == 200, reply
    return dict(reply.json())


def task_titles(gateway: Gateway, user: str) -> list[str]:
    reply = gateway.call("GET", f"/api/{user}/tasks?page_size=100", user=user)
    assert reply.status == 200, reply
    return [task["title"] for task in reply.json()["tasks"]]


# Short limits for the slow-client tests, on an Envoy of their own (no upstream is ever reached).
SLOW_HEADERS_TIMEOUT = 1.0
SLOW_REQUEST_TIMEOUT = 2.0
SLOW_IDLE_TIMEOUT = 2.0
SLOW_MAX_CONNECTIONS = 20


@pytest.fixture(scope="module")
def slow_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of an Envoy rendered with short edge timeouts and a small connection cap."""
    work_dir = tmp_path_factory.mktemp("slow-edge")
    env = free_ports_env()
    settings = Settings.load(env)
    limits = envoy_config.EdgeLimits(
        request_headers_timeout=f"{SLOW_HEADERS_TIMEOUT}s",
        request_timeout=f"{SLOW_REQUEST_TIMEOUT}s",
        idle_timeout=f"{SLOW_IDLE_TIMEOUT}s",
        max_connections=SLOW_MAX_CONNECTIONS,
    )
    config = envoy_config.render(settings, "native", ready_services=(), edge=limits)
    config_path = envoy_config.write(config, work_dir / "envoy.yaml")
    envoy = EnvoyComponent(config_path, settings.gateway_port, {**os.environ, **env}, work_dir / "logs", echo=False)
    envoy.start(timeout=60)
    try:
        yield settings.gateway_port
    finally:
        envoy.stop()


# --- 1. only annotated RPCs are public ---------------------------------------------------------


def test_the_descriptor_has_public_and_internal_rpcs() -> None:
    """The enumeration below is meaningful: both kinds exist (AppendMessage is internal, CreateTask public)."""
    names = {str(rpc): rpc.public for rpc in RPCS}
    assert names["TaskService.CreateTask"] is True
    assert names["ConversationService.AppendMessage"] is False
    assert {"ConversationService.CreateConversation", "ConversationService.GetMessageByRequestId"} <= {
        str(rpc) for rpc in INTERNAL_RPCS
    }


def _grpc_call_without_token(gateway: Gateway, path: str, streaming: bool) -> grpc.RpcError:
    with grpc.insecure_channel(grpc_target(gateway)) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            if streaming:
                list(channel.unary_stream(path)(b"", timeout=10))
            else:
                channel.unary_unary(path)(b"", timeout=10)
    return refused.value


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_over_grpc_exactly_the_annotated_rpcs_reach_a_service(gateway: Gateway, rpc: Rpc) -> None:
    """Annotated: the service's own interceptor answers (UNAUTHENTICATED without a token).
    Not annotated: the gateway answers UNIMPLEMENTED (HTTP 404 in gRPC terms), no service is called."""
    error = _grpc_call_without_token(gateway, rpc.path, rpc.streaming)
    expected = grpc.StatusCode.UNAUTHENTICATED if rpc.public else grpc.StatusCode.UNIMPLEMENTED
    assert error.code() == expected, (rpc.path, error.code(), error.details())


@pytest.mark.parametrize(
    "path",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/todo.v1.TaskService/NoSuchMethod",
        "/todo.v1.NoSuchService/CreateTask",
    ],
)
def test_over_grpc_anything_else_is_unimplemented(gateway: Gateway, path: str) -> None:
    assert _grpc_call_without_token(gateway, path, streaming=False).code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("rpc", INTERNAL_RPCS, ids=str)
@pytest.mark.parametrize(
    "content_type",
    ["application/grpc", "application/grpc+proto", "Application/GRPC", "application/grpc-web", "application/json"],
)
def test_over_http_an_internal_rpc_is_404_and_runs_nothing(gateway: Gateway, rpc: Rpc, content_type: str) -> None:
    """A POST to the gRPC path, with a valid token, as gRPC over HTTP/1.1, gRPC-web or JSON.

    Envoy answers gRPC requests (application/grpc*) the gRPC way: HTTP 200 with grpc-status 12
    (UNIMPLEMENTED, gRPC's 404); the others get the JSON 404."""
    user = new_user()
    grpc_style = content_type.lower().startswith("application/grpc")
    reply = gateway.call(
        "POST",
        rpc.path,
        user=user,
        raw=EMPTY_GRPC_FRAME if grpc_style else b"{}",
        headers={"Content-Type": content_type, "TE": "trailers"},
    )
    if content_type in ("application/grpc", "application/grpc+proto"):
        assert reply.status == 200 and reply.headers.get("grpc-status") == "12", (reply, dict(reply.headers))
    else:
        assert_error(reply, 404)
    # CreateConversation, had it run, would have made the user a conversation.
    conversations = gateway.call("GET", f"/api/{user}/conversations", user=user)
    assert conversations.status == 200 and conversations.json()["conversations"] == [], conversations


@pytest.mark.parametrize(
    ("rpc", "binding"), [(rpc, binding) for rpc in PUBLIC_RPCS for binding in rpc.bindings], ids=str
)
def test_every_rest_binding_reaches_its_service(gateway: Gateway, rpc: Rpc, binding: tuple[str, str, str]) -> None:
    """Each REST route of the annotations reaches the service: 401 without a token, never 404 or 503."""
    method, template, body = binding
    reply = gateway.call(method, fill(template, "alice"), body={} if body else None)
    assert_error(reply, 401)
    assert reply.headers["www-authenticate"].startswith("Bearer"), reply.headers


# --- 2. query parameters never override path values ---------------------------------------------


PATH_FIELD_CASES = [
    (rpc, binding, spelling)
    for rpc in PUBLIC_RPCS
    for binding in rpc.bindings
    for field, json_name in rpc.path_fields
    if f"{{{field}" in binding[1]
    for spelling in dict.fromkeys((field, json_name))
]


def test_path_fields_come_from_the_descriptor() -> None:
    spellings = {spelling for _, _, spelling in PATH_FIELD_CASES}
    assert {"user_id", "userId", "task_id", "taskId", "conversation_id", "conversationId"} <= spellings


@pytest.mark.parametrize(
    ("rpc", "binding", "spelling"),
    PATH_FIELD_CASES,
    ids=[f"{rpc}-{binding[0]}-{spelling}" for rpc, binding, spelling in PATH_FIELD_CASES],
)
def test_a_path_field_in_the_query_is_400_naming_it(
    gateway: Gateway, rpc: Rpc, binding: tuple[str, str, str], spelling: str
) -> None:
    method, template, body = binding
    user = new_user()
    value = "someone-else" if spelling in ("user_id", "userId") else "2"
    reply = gateway.call(method, f"{fill(template, user)}?{spelling}={value}", user=user, body={} if body else None)
    assert_error(reply, 400, naming=spelling)


@pytest.mark.parametrize(
    "query",
    ["user_id=BOB", "userId=BOB", "user%5Fid=BOB", "%75ser_id=BOB", "user_id", "status=all&user_id=BOB"],
)
def test_another_users_tasks_cannot_be_read_through_the_query(gateway: Gateway, query: str) -> None:
    """GET /api/alice/tasks?user_id=bob with bob's token used to list bob's tasks."""
    alice, bob = new_user(), new_user()
    create_task(gateway, alice, "alice's")
    create_task(gateway, bob, "bob's")
    reply = gateway.call("GET", f"/api/{alice}/tasks?{query.replace('BOB', bob)}", user=bob)
    assert_error(reply, 400, naming="query parameter")
    assert b"bob's" not in reply.body


@pytest.mark.parametrize("query", ["task_id=2", "taskId=2", "task%5Fid=2", "task_id=1&task_id=2"])
def test_a_delete_cannot_be_redirected_through_the_query(gateway: Gateway, query: str) -> None:
    """DELETE /api/u/tasks/1?task_id=2 used to delete task 2."""
    user = new_user()
    create_task(gateway, user, "one")
    create_task(gateway, user, "two")
    assert_error(gateway.call("DELETE", f"/api/{user}/tasks/1?{query}", user=user), 400, naming="query parameter")
    assert task_titles(gateway, user) == ["one", "two"]


def test_ordinary_query_parameters_still_work(gateway: Gateway) -> None:
    user = new_user()
    create_task(gateway, user, "open")
    reply = gateway.call("GET", f"/api/{user}/tasks?status=pending&page_size=10", user=user)
    assert reply.status == 200 and [task["title"] for task in reply.json()["tasks"]] == ["open"], reply


# --- 3. slow clients, limits and what responses carry --------------------------------------------


DRIP_SECONDS = 0.2


def _closed(sock: socket.socket, drip: bytes) -> bool:
    """Whether the peer closed `sock` (a reply such as 408 may come first); else send `drip`."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        pass
    except OSError:
        return True
    if drip:
        try:
            sock.send(drip)
        except BlockingIOError:
            pass
        except OSError:
            return True
    return False


def seconds_until_closed(port: int, count: int, first: bytes, drip: bytes, limit: float) -> list[float]:
    """Open `count` connections, send `first` on each, then `drip` every 0.2 s; when did Envoy close each?"""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    start = time.monotonic()
    closed_at: dict[int, float] = {}
    try:
        for sock in sockets:
            sock.sendall(first)
            sock.setblocking(False)
        while len(closed_at) < count and time.monotonic() - start < limit:
            for index, sock in enumerate(sockets):
                if index not in closed_at and _closed(sock, drip):
                    closed_at[index] = time.monotonic() - start
            time.sleep(DRIP_SECONDS)
    finally:
        for sock in sockets:
            sock.close()
    return [closed_at.get(index, math.inf) for index in range(count)]


def test_trickled_headers_are_cut_off_at_the_header_timeout(slow_edge: int) -> None:
    """Slowloris: 15 connections each sending one header line every 0.2 s, never finishing."""
    times = seconds_until_closed(slow_edge, 15, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-A: b\r\n", limit=10)
    assert all(SLOW_HEADERS_TIMEOUT * 0.7 <= t <= SLOW_HEADERS_TIMEOUT + 2.5 for t in times), times


def test_a_trickled_body_is_cut_off_at_the_request_timeout(slow_edge: int) -> None:
    headers = (
        b"POST /api/u/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    )
    times = seconds_until_closed(slow_edge, 15, headers + b'{"title": "', b"x", limit=12)
    assert all(SLOW_REQUEST_TIMEOUT * 0.7 <= t <= SLOW_REQUEST_TIMEOUT + 2.5 for t in times), times


def test_a_silent_connection_is_closed_at_the_idle_timeout(slow_edge: int) -> None:
    times = seconds_until_closed(slow_edge, 15, b"", b"", limit=12)
    assert all(SLOW_IDLE_TIMEOUT * 0.7 <= t <= SLOW_IDLE_TIMEOUT + 2.5 for t in times), times


def test_connections_beyond_the_cap_are_refused(slow_edge: int) -> None:
    """The overload manager's global cap: past it, new connections are closed at once."""
    times = seconds_until_closed(slow_edge, SLOW_MAX_CONNECTIONS + 10, b"", b"", limit=1.0)
    still_open = sum(1 for t in times if math.isinf(t))
    assert 0 < still_open <= SLOW_MAX_CONNECTIONS, times


def test_the_default_edge_settings_follow_the_edge_guide() -> None:
    """Envoy's "Configuring Envoy as an edge proxy" values in what `make up` and compose run."""
    for target in ("native", "docker"):
        config = envoy_config.render(Settings.load({}), target)  # type: ignore[arg-type]
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert listener["per_connection_buffer_limit_bytes"] == 32 * KIB
        assert manager["request_headers_timeout"] == "10s"
        assert manager["stream_idle_timeout"] == "300s"
        assert manager["request_timeout"] == "30s"
        assert manager["common_http_protocol_options"] == {
            "idle_timeout": "30s",
            "headers_with_underscores_action": "REJECT_REQUEST",
        }
        assert manager["http2_protocol_options"] == {
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 64 * KIB,
            "initial_connection_window_size": MIB,
        }
        assert manager["use_remote_address"] is True
        assert manager["normalize_path"] is True and manager["merge_slashes"] is True
        for cluster in config["static_resources"]["clusters"]:
            assert cluster["per_connection_buffer_limit_bytes"] == 32 * KIB, cluster["name"]
        [monitor] = config["overload_manager"]["resource_monitors"]
        assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
        assert monitor["typed_config"]["max_active_downstream_connections"] == 10000


def _padded_task_body(size: int) -> bytes:
    """A valid create-task body of exactly `size` bytes (JSON whitespace as padding)."""
    head, tail = b'{"title": "padded to size"', b"}"
    return head + b" " * (size - len(head) - len(tail)) + tail


def test_a_one_mebibyte_body_still_passes_the_32_kib_buffers(gateway: Gateway) -> None:
    user = new_user()
    reply = gateway.call("POST", f"/api/{user}/tasks", user=user, raw=_padded_task_body(MIB))
    assert reply.status == 200 and reply.json()["title"] == "padded to size", reply
    assert_error(gateway.call("POST", f"/api/{user}/tasks", user=user, raw=_padded_task_body(MIB + 1)), 413)
    assert task_titles(gateway, user) == ["padded to size"]


def test_a_large_grpc_request_crosses_the_http2_windows(gateway: Gateway) -> None:
    """900 KiB through 64 KiB stream windows and 32 KiB buffers reaches the service (which refuses it)."""
    with grpc.insecure_channel(grpc_target(gateway)) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        request = task_pb2.CreateTaskRequest(user_id="alice", title="big", description="d" * (900 * KIB))
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateTask(request, metadata=auth_metadata("alice"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert "description" in (refused.value.details() or "")


def test_a_large_response_is_not_cut_by_the_buffers(gateway: Gateway) -> None:
    """100 tasks of 4,000 control characters: a 2.4 MB JSON page (each one prints as \\u0001)."""
    user = new_user()
    for index in range(100):
        create_task(gateway, user, f"task {index}", description="\u0001" * 4000)
    reply = gateway.call("GET", f"/api/{user}/tasks?page_size=100", user=user, timeout=60)
    assert reply.status == 200, reply
    assert len(reply.body) > 2_000_000
    tasks = reply.json()["tasks"]
    assert len(tasks) == 100 and all(task["description"] == "\u0001" * 4000 for task in tasks)


def test_a_header_name_with_an_underscore_is_400(gateway: Gateway) -> None:
    """Refused at the edge: services that treat '_' and '-' alike cannot be fooled (edge guide)."""
    user = new_user()
    reply = gateway.call("GET", f"/api/{user}/tasks", user=user, headers={"x_user_id": "someone-else"})
    assert_error(reply, 400, naming="underscore")


@pytest.mark.parametrize("path", ["//api//{user}///tasks", "/api/{user}/./tasks", "/api/someone-else/../{user}/tasks"])
def test_paths_are_normalized_before_routing(gateway: Gateway, path: str) -> None:
    user = new_user()
    create_task(gateway, user, "mine")
    reply = gateway.call("GET", path.format(user=user), user=user)
    assert reply.status == 200 and [task["title"] for task in reply.json()["tasks"]] == ["mine"], reply


def test_a_path_that_normalizes_elsewhere_is_routed_there(gateway: Gateway) -> None:
    """`/api/%2e%2e/tasks` is `/tasks` once normalized (RFC 3986: %2e is "."), which no route serves."""
    assert_error(gateway.call("GET", "/api/%2e%2e/tasks", user="alice"), 404)


def test_a_path_that_cannot_be_normalized_is_400(gateway: Gateway) -> None:
    user = new_user()
    assert_error(gateway.call("GET", f"/api/{user}%00/tasks", user=user), 400, naming="path_normalization_failed")


INTERNAL_RESPONSE_HEADERS = ("x-envoy-upstream-service-time", "grpc-status", "grpc-message", "grpc-accept-encoding")


def test_rest_responses_carry_no_internal_headers(gateway: Gateway) -> None:
    user = new_user()
    task = create_task(gateway, user, "headers")
    replies = {
        "created": gateway.call("POST", f"/api/{user}/tasks", user=user, body={"title": "another"}),
        "read": gateway.call("GET", f"/api/{user}/tasks/{task['id']}", user=user),
        "service 404": gateway.call("GET", f"/api/{user}/tasks/999", user=user),
        "service 400": gateway.call("POST", f"/api/{user}/tasks", user=user, body={"title": ""}),
        "401": gateway.call("GET", f"/api/{user}/tasks"),
        "stream": gateway.call("POST", f"/api/{user}/chat/stream", user=user, body={"message": "hi"}, timeout=60),
        "healthz": gateway.call("GET", "/healthz"),
        "envoy 404": gateway.call("GET", "/nope"),
        "mcp metadata": gateway.call("GET", "/.well-known/oauth-protected-resource/mcp"),
    }
    for name, reply in replies.items():
        for header in INTERNAL_RESPONSE_HEADERS:
            assert header not in reply.headers, (name, header, dict(reply.headers))
        assert reply.headers.get("server") == "todo-gateway", (name, dict(reply.headers))
    assert replies["service 404"].status == 404 and replies["401"].status == 401
    assert replies["stream"].status == 200 and b"data:" in replies["stream"].body


def test_a_client_cannot_set_the_surface_its_change_came_from(gateway: Gateway) -> None:
    """x-todo-source is the agent's, on its own calls; the edge removes a client's."""
    user = new_user()
    reply = gateway.call(
        "POST", f"/api/{user}/tasks", user=user, body={"title": "labelled"}, headers={"x-todo-source": "mcp"}
    )
    assert reply.status == 200, reply
    events = gateway.call("GET", f"/api/{user}/activity", user=user).json()["events"]
    assert [(event["action"], event["source"]) for event in events] == [("created", "rest")]


def test_a_rest_stream_over_http2_ends_without_grpc_trailers(gateway: Gateway) -> None:
    """On HTTP/2 the transcoder passes the stream's gRPC trailers on; REST clients must not get them.

    curl is the HTTP/2 client here (no h2 library is installed); `-v` prints trailers as `< name:`."""
    curl = shutil.which("curl")
    assert curl, "this test needs curl (with HTTP/2) on PATH"
    user = new_user()
    argv = [curl, "-sv", "--http2-prior-knowledge", "-H", f"Authorization: Bearer {gateway.token(user)}"]
    argv += ["-d", '{"message": "what is pending?"}', f"{gateway.base_url}/api/{user}/chat/stream"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "< HTTP/2 200" in result.stderr and '"done"' in result.stdout, result.stderr + result.stdout
    received = [line.lower() for line in result.stderr.splitlines() if line.startswith("< ")]
    assert not [line for line in received if line.startswith(("< grpc-", "< x-envoy-"))], received


def test_native_grpc_clients_still_get_statuses_and_trailers(gateway: Gateway) -> None:
    """grpc-status lives in headers (trailers-only errors) and trailers: gRPC responses keep both."""
    user = new_user()
    with grpc.insecure_channel(grpc_target(gateway)) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        created = tasks.CreateTask(task_pb2.CreateTaskRequest(title="over grpc"), metadata=auth_metadata(user))
        assert created.id == 1
        with pytest.raises(grpc.RpcError) as invalid:
            tasks.CreateTask(task_pb2.CreateTaskRequest(title=""), metadata=auth_metadata(user))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "title" in invalid.value.details()
        with pytest.raises(grpc.RpcError) as anonymous:
            tasks.ListTasks(task_pb2.ListTasksRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        trailers = dict(anonymous.value.trailing_metadata() or ())
        assert trailers.get("www-authenticate", "").startswith("Bearer"), trailers
        agent = agent_pb2_grpc.AgentServiceStub(channel)
        stream = agent.ChatStream(
            agent_pb2.ChatRequest(user_id=user, message="what is pending?"), metadata=auth_metadata(user), timeout=60
        )
        events = list(stream)
        assert events and events[-1].HasField("done"), events
        assert stream.code() == grpc.StatusCode.OK


# --- 4. the access log ---------------------------------------------------------------------------


def _access_log_line(gateway: Gateway, request_id: str, timeout: float = 30) -> dict:
    """Envoy's JSON access-log entry of `request_id` (stdout is flushed every few seconds)."""
    log = gateway.stack.component("envoy").log_path
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if request_id in line and line.startswith("{"):
                return dict(json.loads(line))
        time.sleep(0.5)
    raise AssertionError(f"no access-log line for {request_id} in {log}")


def test_query_strings_never_reach_the_access_log(gateway: Gateway) -> None:
    user = new_user()
    secret = f"secret-{uuid.uuid4().hex}"
    requests = [
        (f"/api/{user}/tasks?access_token={secret}", f"/api/{user}/tasks"),
        (f"/api/{user}/tasks?status=all&page_size=5&token={secret}", f"/api/{user}/tasks"),
        (f"/healthz?token={secret}", "/healthz"),
    ]
    request_ids = [f"edge-{uuid.uuid4().hex}" for _ in requests]
    for request_id, (path, _) in zip(request_ids, requests, strict=True):
        gateway.call("GET", path, user=user, headers={"X-Request-Id": request_id})
    for request_id, (_, logged_path) in zip(request_ids, requests, strict=True):
        assert _access_log_line(gateway, request_id)["path"] == logged_path
    assert secret not in gateway.stack.component("envoy").log_path.read_text(errors="replace")


# --- 5. docker compose publishes on loopback -----------------------------------------------------


def _interpolate(value: str, environ: dict[str, str]) -> str:
    """docker compose's `${NAME:-default}` (the only form our compose file uses in ports)."""
    return re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", lambda match: environ.get(match.group(1)) or match.group(2), value)


def test_compose_publishes_the_gateway_on_loopback_by_default() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    [ports] = compose["services"]["envoy"]["ports"]
    assert _interpolate(ports, {}) == "127.0.0.1:8080:8080"
    assert _interpolate(ports, {"GATEWAY_PUBLISH_ADDR": "0.0.0.0", "GATEWAY_PORT": "9090"}) == "0.0.0.0:9090:8080"
    assert "PUBLIC_BASE_URL" in compose["services"]["gateway-config"]["environment"]


# --- 6. the OpenAPI document names the configured server -----------------------------------------


def test_openapi_servers_url_is_the_public_base_url(gateway: Gateway) -> None:
    assert gateway.env["PUBLIC_BASE_URL"] != "http://127.0.0.1:8080"  # a free port, so the test means something
    reply = gateway.call("GET", "/openapi.json")
    assert reply.status == 200, reply
    assert reply.json()["servers"] == [{"url": gateway.env["PUBLIC_BASE_URL"]}]


def test_the_gateway_config_job_writes_openapi_for_the_public_base_url(tmp_path: Path) -> None:
    """What compose's gateway-config job runs: the document it leaves in the volume names PUBLIC_BASE_URL."""
    env = {"PATH": "/usr/bin:/bin", "PUBLIC_BASE_URL": "https://todo.example.com", "GATEWAY_PORT": "8080"}
    argv = [sys.executable, "-m", "gateway.envoy_config", "--target", "docker", "--out", str(tmp_path / "envoy.yaml")]
    result = subprocess.run(
        [*argv, "--copy-assets"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "openapi.json").read_text())
    assert document["servers"] == [{"url": "https://todo.example.com"}]


def test_openapi_is_served_inline_natively_with_a_free_port() -> None:
    """Natively the document is rendered into Envoy's config, so every port gets its own servers URL."""
    port = free_port()
    settings = Settings.load({"GATEWAY_PORT": str(port), "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}"})
    config = envoy_config.render(settings, "native")
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = {route["name"]: route for route in manager["route_config"]["virtual_hosts"][0]["routes"]}
    document = json.loads(routes["openapi"]["direct_response"]["body"]["inline_string"])
    assert document["servers"] == [{"url": f"http://127.0.0.1:{port}"}]
