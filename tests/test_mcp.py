"""The MCP server (agent_service/mcp_server.py) with the official MCP client over real HTTP.

Real processes: task_service and agent_service (which serves MCP at /mcp next to its gRPC
port), then the same behind Envoy (scripts/stack.py), where the tasks an MCP client made
are the ones REST shows. Each test uses its own user ids, so the tests do not depend on
one another's tasks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult

from agent_service import tools as tool_definitions
from agent_service.mcp_server import host_allowed, transport_security
from common.settings import Settings
from tests.gateway_fixtures import Gateway, start_gateway
from tests.support import ServiceProcess, auth_metadata, free_port, token
from todo.v1 import task_pb2, task_pb2_grpc

METADATA_PATH = "/.well-known/oauth-protected-resource/mcp"
TASK_TOOLS_REQUIRED = {
    "add_task": ["title"],
    "list_tasks": [],
    "complete_task": [],
    "delete_task": [],
    "update_task": ["task_id"],
    "reopen_task": ["task_id"],
    "undo_last_change": [],
    "set_timezone": ["timezone"],
}
# What every task tool's result echoes besides task_id, status and title (a task with none set).
UNPLANNED = {"due_date": "", "due_time": "", "priority": "none", "tags": []}
LISTED_KEYS = {"id", "title", "description", "completed", "created_at", *UNPLANNED}
MCP_TOOLS = {tool.name: tool for tool in tool_definitions.for_surface("mcp")}
JSON_RPC_LIST_TOOLS = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
MCP_POST_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@dataclass
class McpHost:
    base_url: str  # the agent's HTTP server (MCP at /mcp)
    task_addr: str
    task_service: ServiceProcess


def user(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx2.get(url, timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


@pytest.fixture(scope="module")
def host(base_env: dict[str, str], database_url_factory: Callable[[str, str], str], log_dir: Path) -> Iterator[McpHost]:
    """task_service + agent_service as processes; MCP at the agent's AGENT_HTTP_PORT."""
    http_port = free_port()
    env = {
        **base_env,
        "TASK_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "CONVERSATION_SERVICE_ADDR": f"127.0.0.1:{free_port()}",  # not needed by MCP; nothing listens
        "AGENT_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "AGENT_HTTP_PORT": str(http_port),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{http_port}",
        "TASK_DATABASE_URL": database_url_factory("sqlite", "mcp_tasks"),
        "LLM_BASE_URL": "",
    }
    processes = [
        ServiceProcess("task_service", env, env["TASK_SERVICE_ADDR"], log_dir),
        ServiceProcess("agent_service", env, env["AGENT_SERVICE_ADDR"], log_dir),
    ]
    try:
        with ThreadPoolExecutor(len(processes)) as pool:  # start together: most of the time is imports
            for future in [pool.submit(process.start, 120) for process in processes]:
                future.result()
        base_url = f"http://127.0.0.1:{http_port}"
        wait_http(base_url + METADATA_PATH)
        yield McpHost(base_url=base_url, task_addr=env["TASK_SERVICE_ADDR"], task_service=processes[0])
    finally:
        for process in processes:
            process.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str]
) -> Iterator[Gateway]:
    with start_gateway(tmp_path_factory, database_url_factory, "sqlite", services=["task", "agent"]) as gw:
        yield gw


@asynccontextmanager
async def mcp_session(url: str, bearer: str, modern: bool = False) -> AsyncIterator[ClientSession]:
    """An initialized session of the official client, sending `Authorization: Bearer <bearer>`."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {bearer}"}, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        # modern: the 2026-07-28 per-request envelope (server/discover); else the initialize handshake.
        await (session.discover() if modern else session.initialize())
        yield session


def structured(result: CallToolResult) -> Any:
    """The structured result, after checking the text content carries the same JSON."""
    assert not result.is_error, result
    assert json.loads(result.content[0].text) == result.structured_content  # type: ignore[union-attr]
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    assert result.is_error, result
    assert result.structured_content is None
    return result.content[0].text  # type: ignore[union-attr]


async def tasks_via_grpc(task_addr: str, user_id: str) -> list[task_pb2.Task]:
    """The user's tasks as task_service itself reports them to that user."""
    async with grpc.aio.insecure_channel(task_addr) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        reply = await stub.ListTasks(
            task_pb2.ListTasksRequest(status="all", page_size=100), metadata=auth_metadata(user_id), timeout=10
        )
    return list(reply.tasks)


# --- tools and schemas -------------------------------------------------------------------


async def test_tools_are_listed_with_the_schemas_of_tools_py(host: McpHost) -> None:
    async with mcp_session(host.base_url + "/mcp", token(user("schema"))) as session:
        listed = {tool.name: tool for tool in (await session.list_tools()).tools}

    assert sorted(listed) == sorted(MCP_TOOLS)
    required = {name: tool.input_schema["required"] for name, tool in listed.items() if name in TASK_TOOLS_REQUIRED}
    # complete_task and delete_task take task_id or task_ids: neither is required by the schema.
    assert required == TASK_TOOLS_REQUIRED
    for name, tool in listed.items():
        definition = MCP_TOOLS[name]
        assert tool.description == definition.description
        # Exactly tools.py's schema, plus the optional user_id the hackathon contract lists.
        properties = dict(tool.input_schema["properties"])
        assert properties.pop("user_id")["type"] == "string"
        assert {**tool.input_schema, "properties": properties} == definition.input_schema
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"
    for name in ("add_task", "complete_task", "delete_task", "update_task"):
        assert listed[name].output_schema == MCP_TOOLS[name].output_schema
    list_output = listed["list_tasks"].output_schema
    assert list_output is not None
    assert list_output["required"] == ["tasks"]
    assert list_output["properties"]["tasks"] == MCP_TOOLS["list_tasks"].output_schema
    assert listed["list_tasks"].annotations is not None and listed["list_tasks"].annotations.read_only_hint


async def test_every_tool_returns_the_api_shapes(host: McpHost) -> None:
    async with mcp_session(host.base_url + "/mcp", token(user("shapes"))) as session:
        added = structured(await session.call_tool("add_task", {"title": "  Buy milk ", "description": "2 l"}))
        assert added == {"task_id": 1, "status": "created", "title": "Buy milk", **UNPLANNED}
        second = structured(await session.call_tool("add_task", {"title": "Call mom"}))
        assert second == {"task_id": 2, "status": "created", "title": "Call mom", **UNPLANNED}

        listed = structured(await session.call_tool("list_tasks", {}))["tasks"]
        assert [set(task) for task in listed] == [LISTED_KEYS] * 2
        assert [(t["id"], t["title"], t["description"], t["completed"]) for t in listed] == [
            (1, "Buy milk", "2 l", False),
            (2, "Call mom", "", False),
        ]
        assert listed[0]["created_at"].endswith("Z")

        updated = structured(await session.call_tool("update_task", {"task_id": 2, "title": "Call mum"}))
        assert updated == {"task_id": 2, "status": "updated", "title": "Call mum", **UNPLANNED}
        completed = structured(await session.call_tool("complete_task", {"task_id": 1}))
        assert completed == {"task_id": 1, "status": "completed", "title": "Buy milk", **UNPLANNED}

        done = structured(await session.call_tool("list_tasks", {"status": "completed"}))["tasks"]
        pending = structured(await session.call_tool("list_tasks", {"status": "pending"}))["tasks"]
        assert [(t["id"], t["completed"]) for t in done] == [(1, True)]
        assert [(t["id"], t["title"]) for t in pending] == [(2, "Call mum")]

        deleted = structured(await session.call_tool("delete_task", {"task_id": 2}))
        assert deleted == {"task_id": 2, "status": "deleted", "title": "Call mum", **UNPLANNED}
        remaining = structured(await session.call_tool("list_tasks", {"status": "all"}))["tasks"]
        assert [t["id"] for t in remaining] == [1]


async def test_the_modern_protocol_era_works_too(host: McpHost) -> None:
    async with mcp_session(host.base_url + "/mcp", token(user("modern")), modern=True) as session:
        assert sorted(tool.name for tool in (await session.list_tools()).tools) == sorted(MCP_TOOLS)
        added = structured(await session.call_tool("add_task", {"title": "Modern"}))
        assert added == {"task_id": 1, "status": "created", "title": "Modern", **UNPLANNED}
        assert [t["title"] for t in structured(await session.call_tool("list_tasks", {}))["tasks"]] == ["Modern"]


async def test_mistakes_are_error_results_and_the_session_goes_on(host: McpHost) -> None:
    caller = user("mistakes")
    async with mcp_session(host.base_url + "/mcp", token(caller)) as session:
        assert "not found" in error_text(await session.call_tool("complete_task", {"task_id": 42}))
        assert "task_id" in error_text(await session.call_tool("delete_task", {"task_id": "abc"}))
        assert "title" in error_text(await session.call_tool("add_task", {}))
        assert "title" in error_text(await session.call_tool("add_task", {"title": "x" * 300}))
        assert "colour" in error_text(await session.call_tool("add_task", {"title": "t", "colour": "red"}))
        assert "status" in error_text(await session.call_tool("list_tasks", {"status": "someday"}))
        assert "title or description" in error_text(await session.call_tool("update_task", {"task_id": 1}))
        assert "unknown tool" in error_text(await session.call_tool("drop_tables", {}))
        # Still usable, and none of the refused calls wrote anything.
        assert structured(await session.call_tool("list_tasks", {})) == {"tasks": []}
        assert structured(await session.call_tool("add_task", {"title": "ok", "user_id": caller}))["task_id"] == 1
    assert [task.title for task in await tasks_via_grpc(host.task_addr, caller)] == ["ok"]


# --- tenant isolation ---------------------------------------------------------------------


async def test_user_b_can_neither_see_nor_change_user_a_tasks(host: McpHost) -> None:
    alice, bob = user("alice"), user("bob")
    url = host.base_url + "/mcp"
    async with mcp_session(url, token(alice)) as as_alice:
        for title in ("A one", "A two"):
            await as_alice.call_tool("add_task", {"title": title})
    before = await tasks_via_grpc(host.task_addr, alice)
    assert [(t.id, t.title, t.completed) for t in before] == [(1, "A one", False), (2, "A two", False)]

    async with mcp_session(url, token(bob)) as as_bob:
        assert structured(await as_bob.call_tool("list_tasks", {})) == {"tasks": []}
        for name, arguments in [
            ("complete_task", {"task_id": 1}),
            ("update_task", {"task_id": 1, "title": "hijacked"}),
            ("delete_task", {"task_id": 2}),
        ]:
            assert "not found" in error_text(await as_bob.call_tool(name, arguments))
        # Naming A as user_id is refused outright, whatever the tool.
        for name, arguments in [
            ("list_tasks", {}),
            ("add_task", {"title": "planted"}),
            ("complete_task", {"task_id": 1}),
            ("update_task", {"task_id": 1, "title": "hijacked"}),
            ("delete_task", {"task_id": 2}),
        ]:
            refusal = error_text(await as_bob.call_tool(name, {**arguments, "user_id": alice}))
            assert "user_id must be the authenticated user" in refusal
            assert "A one" not in refusal and "A two" not in refusal

    after = await tasks_via_grpc(host.task_addr, alice)
    assert [(t.id, t.title, t.description, t.completed) for t in after] == [
        (t.id, t.title, t.description, t.completed) for t in before
    ]
    assert await tasks_via_grpc(host.task_addr, bob) == []


# --- auth and transport security ----------------------------------------------------------


async def test_no_token_is_401_with_the_resource_metadata_pointer(host: McpHost) -> None:
    async with httpx2.AsyncClient(timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": "Basic YTpi"}):
            reply = await http.post(
                host.base_url + "/mcp", json=JSON_RPC_LIST_TOOLS, headers={**MCP_POST_HEADERS, **headers}
            )
            assert reply.status_code == 401, reply.text
            challenge = reply.headers["www-authenticate"]
            assert challenge.startswith("Bearer ")
            assert f'resource_metadata="{host.base_url}{METADATA_PATH}"' in challenge
            assert "tools" not in reply.text

        metadata = await http.get(host.base_url + METADATA_PATH)
    assert metadata.status_code == 200
    document = metadata.json()
    assert document["resource"] == host.base_url + "/mcp"
    assert document["authorization_servers"] == [host.base_url]
    assert document["bearer_methods_supported"] == ["header"]


async def test_expired_or_foreign_tokens_are_refused(host: McpHost) -> None:
    expired = token(user("late"), ttl_seconds=-120)  # past the 30 s leeway
    foreign = token(user("forger"), secret="another-secret-" + "y" * 32)
    async with httpx2.AsyncClient(timeout=10) as http:
        for bearer in (expired, foreign):
            reply = await http.post(
                host.base_url + "/mcp",
                json=JSON_RPC_LIST_TOOLS,
                headers={**MCP_POST_HEADERS, "Authorization": f"Bearer {bearer}"},
            )
            assert reply.status_code == 401, reply.text
            assert "resource_metadata=" in reply.headers["www-authenticate"]
    # The official client gets an error, not a session (anyio wraps it in exception groups).
    with pytest.raises(ExceptionGroup) as refused:
        async with mcp_session(host.base_url + "/mcp", expired):
            pass
    assert refused.value.subgroup(MCPError) is not None, refused.value


async def test_host_header_outside_the_allow_list_is_refused(host: McpHost) -> None:
    bearer = token(user("host"))
    headers = {**MCP_POST_HEADERS, "Authorization": f"Bearer {bearer}"}
    port = host.base_url.rsplit(":", 1)[1]
    async with httpx2.AsyncClient(timeout=10) as http:
        for bad_host in (f"evil.example:{port}", "attacker.test", f"127.0.0.1.nip.io:{port}"):
            reply = await http.post(
                host.base_url + "/mcp", json=JSON_RPC_LIST_TOOLS, headers={**headers, "Host": bad_host}
            )
            assert reply.status_code == 421, (bad_host, reply.text)
        # The default allow-list: loopback names with any port.
        allowed = await http.post(
            host.base_url + "/mcp", json=JSON_RPC_LIST_TOOLS, headers={**headers, "Host": f"localhost:{port}"}
        )
        assert allowed.status_code == 200 and "add_task" in allowed.text
        # A browser page from another origin is refused too.
        cross_site = await http.post(
            host.base_url + "/mcp", json=JSON_RPC_LIST_TOOLS, headers={**headers, "Origin": "https://evil.example"}
        )
        assert cross_site.status_code == 403


async def test_get_opens_no_stream_on_the_stateless_server(host: McpHost) -> None:
    async with httpx2.AsyncClient(timeout=10) as http:
        reply = await http.get(
            host.base_url + "/mcp",
            headers={"Accept": "text/event-stream", "Authorization": f"Bearer {token(user('get'))}"},
        )
    assert reply.status_code == 405
    assert reply.headers["allow"] == "POST"


async def test_concurrent_sessions_each_act_as_their_own_user(host: McpHost) -> None:
    users = [user(f"many{index}") for index in range(6)]

    async def add_and_list(caller: str) -> list[str]:
        async with mcp_session(host.base_url + "/mcp", token(caller)) as session:
            await session.call_tool("add_task", {"title": f"task of {caller}"})
            return [t["title"] for t in structured(await session.call_tool("list_tasks", {}))["tasks"]]

    listed = await asyncio.gather(*(add_and_list(caller) for caller in users))
    assert listed == [[f"task of {caller}"] for caller in users]


async def test_task_service_down_is_an_error_result_then_service_resumes(host: McpHost) -> None:
    caller = user("outage")
    async with mcp_session(host.base_url + "/mcp", token(caller)) as session:
        structured(await session.call_tool("add_task", {"title": "before"}))
        host.task_service.stop()
        try:
            refusal = error_text(await session.call_tool("list_tasks", {}))
            assert "unavailable" in refusal and "Traceback" not in refusal
        finally:
            await asyncio.to_thread(host.task_service.start)
        # Same session, same agent process: it recovers without a restart.
        listed = structured(await session.call_tool("list_tasks", {}))["tasks"]
        assert [t["title"] for t in listed] == ["before"]


def test_allowed_hosts_setting_shapes_the_transport_security() -> None:
    containers = transport_security(Settings.load({"MCP_ALLOWED_HOSTS": "localhost:*, agent_service:*,gateway:*"}))
    assert containers.enable_dns_rebinding_protection
    assert containers.allowed_hosts == ["localhost:*", "agent_service:*", "gateway:*"]
    assert "http://gateway:*" in containers.allowed_origins
    assert "http://localhost:3000" in containers.allowed_origins  # CORS_ALLOWED_ORIGINS' default
    assert not transport_security(Settings.load({"MCP_ALLOWED_HOSTS": "*"})).enable_dns_rebinding_protection


# --- through Envoy ------------------------------------------------------------------------


async def test_mcp_through_the_gateway_shares_tasks_with_rest(gateway: Gateway) -> None:
    alice, bob = user("gw-alice"), user("gw-bob")
    async with mcp_session(gateway.base_url + "/mcp", token(alice)) as session:
        added = structured(await session.call_tool("add_task", {"title": "via MCP"}))
        assert added == {"task_id": 1, "status": "created", "title": "via MCP", **UNPLANNED}
        structured(await session.call_tool("complete_task", {"task_id": 1}))

    async with httpx2.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
        rest = await http.get(f"/api/{alice}/tasks", headers={"Authorization": f"Bearer {token(alice)}"})
        assert rest.status_code == 200, rest.text
        assert [(t["id"], t["title"], t["completed"]) for t in rest.json()["tasks"]] == [(1, "via MCP", True)]

        # A task made over REST is listed over MCP; bob sees none of alice's.
        made = await http.post(
            f"/api/{alice}/tasks", json={"title": "via REST"}, headers={"Authorization": f"Bearer {token(alice)}"}
        )
        assert made.status_code == 200, made.text
    async with mcp_session(gateway.base_url + "/mcp", token(alice)) as session:
        titles = [t["title"] for t in structured(await session.call_tool("list_tasks", {}))["tasks"]]
        assert titles == ["via MCP", "via REST"]
    async with mcp_session(gateway.base_url + "/mcp", token(bob)) as session:
        assert structured(await session.call_tool("list_tasks", {})) == {"tasks": []}
        assert "not found" in error_text(await session.call_tool("delete_task", {"task_id": 1}))


async def test_gateway_answers_401_with_its_own_metadata_url(gateway: Gateway) -> None:
    async with httpx2.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
        reply = await http.post("/mcp", json=JSON_RPC_LIST_TOOLS, headers=MCP_POST_HEADERS)
        assert reply.status_code == 401
        assert f'resource_metadata="{gateway.base_url}{METADATA_PATH}"' in reply.headers["www-authenticate"]
        metadata = await http.get(METADATA_PATH)
        assert metadata.status_code == 200
        assert metadata.json()["resource"] == gateway.base_url + "/mcp"


# --- the Host allow-list matches exactly; the body limit --------------------------------------


def test_a_port_wildcard_matches_digits_only() -> None:
    patterns = ["localhost:*", "[::1]:*", "todo.example.com"]
    for allowed in ("localhost:8001", "localhost:1", "[::1]:8080", "todo.example.com"):
        assert host_allowed(allowed, patterns), allowed
    for refused in (
        "localhost:1@evil.com",
        "localhost:8001.evil.com",
        "localhost:",
        "localhost:abc",
        "localhost:\uff18\uff10\uff10\uff11",  # fullwidth digits are not a port
        "localhost:123456",
        "localhost",
        "evil.localhost:80",
        "todo.example.com:443",
        "todo.example.com.evil",
    ):
        assert not host_allowed(refused, patterns), refused


async def test_a_host_that_only_starts_like_an_allowed_one_is_refused(host: McpHost) -> None:
    headers = {**MCP_POST_HEADERS, "Authorization": f"Bearer {token(user('prefix'))}"}
    async with httpx2.AsyncClient(timeout=10) as http:
        for bad_host in ("localhost:1@evil.com", "127.0.0.1:80.evil.com", "localhost:x"):
            reply = await http.post(
                host.base_url + "/mcp", json=JSON_RPC_LIST_TOOLS, headers={**headers, "Host": bad_host}
            )
            assert reply.status_code == 421, (bad_host, reply.status_code, reply.text)
        # Refused before auth: no token needed to be turned away, none learned.
        no_token = await http.post(
            host.base_url + "/mcp", json=JSON_RPC_LIST_TOOLS, headers={**MCP_POST_HEADERS, "Host": "evil.example"}
        )
        assert no_token.status_code == 421
        origin = await http.post(
            host.base_url + "/mcp",
            json=JSON_RPC_LIST_TOOLS,
            headers={**headers, "Origin": "http://localhost:1@evil.com"},
        )
        assert origin.status_code == 403


def _raw_post(base_url: str, head: dict[str, str], body_chunks: Iterator[bytes]) -> tuple[int, bytes]:
    """POST /mcp over a plain socket (to control Content-Length and chunking); the status and body."""
    import http.client

    address = base_url.removeprefix("http://")
    hostname, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(hostname, int(port), timeout=30)
    connection.putrequest("POST", "/mcp")
    for name, value in head.items():
        connection.putheader(name, value)
    connection.endheaders()
    try:
        for chunk in body_chunks:
            connection.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the body was all sent: the point of the test
    reply = connection.getresponse()
    return reply.status, reply.read()


def test_bodies_over_one_mib_are_413_without_being_read(host: McpHost) -> None:
    mib = 1024 * 1024
    head = {**MCP_POST_HEADERS, "Authorization": f"Bearer {token(user('big'))}"}
    # A declared length over the limit: refused from the headers, before any body byte.
    status, _ = _raw_post(host.base_url, {**head, "Content-Length": str(2 * mib)}, iter(()))
    assert status == 413

    # Chunked, so no length is declared: refused once 1 MiB has streamed in.
    def chunks(total: int) -> Iterator[bytes]:
        piece = b" " * 65536
        for _ in range(total // len(piece)):
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"0\r\n\r\n"

    status, _ = _raw_post(host.base_url, {**head, "Transfer-Encoding": "chunked"}, chunks(mib + 256 * 1024))
    assert status == 413
    # Just under the limit is read and parsed (whitespace around a JSON-RPC message is fine).
    message = json.dumps(JSON_RPC_LIST_TOOLS).encode()
    padded = message + b" " * (mib - len(message) - 16)
    status, body = _raw_post(host.base_url, {**head, "Content-Length": str(len(padded))}, iter([padded]))
    assert status == 200 and b"add_task" in body, (status, body[:200])


# --- planning: the new tools and arguments, annotations, the activity log ----------------------


async def test_planning_tools_and_annotations_over_mcp(host: McpHost) -> None:
    caller = user("planner")
    async with mcp_session(host.base_url + "/mcp", token(caller)) as session:
        listed = {tool.name: tool for tool in (await session.list_tools()).tools}
        for name in TASK_TOOLS_REQUIRED:
            hints = listed[name].annotations
            assert hints is not None and hints.title, name
            assert None not in (hints.read_only_hint, hints.destructive_hint, hints.idempotent_hint), name
        assert listed["list_tasks"].annotations.read_only_hint  # type: ignore[union-attr]
        assert listed["delete_task"].annotations.destructive_hint  # type: ignore[union-attr]
        assert not listed["add_task"].annotations.read_only_hint  # type: ignore[union-attr]
        assert set(listed["list_tasks"].input_schema["properties"]) >= {"status", "query", "due", "tag", "sort"}

        zone = structured(await session.call_tool("set_timezone", {"timezone": "Europe/Paris"}))
        assert zone == {"status": "updated", "timezone": "Europe/Paris"}
        added = structured(
            await session.call_tool(
                "add_task", {"title": "Report", "due": "2026-12-24 5pm", "priority": "high", "tags": ["Work"]}
            )
        )
        assert added == {
            "task_id": 1,
            "status": "created",
            "title": "Report",
            "due_date": "2026-12-24",
            "due_time": "17:00",
            "priority": "high",
            "tags": ["work"],
        }
        structured(await session.call_tool("add_task", {"title": "Groceries", "tags": ["home"]}))
        by_tag = structured(await session.call_tool("list_tasks", {"tag": "work", "sort": "due"}))["tasks"]
        assert [(t["id"], t["due_date"], t["due_time"]) for t in by_tag] == [(1, "2026-12-24", "17:00")]
        assert [t["id"] for t in structured(await session.call_tool("list_tasks", {"due": "none"}))["tasks"]] == [2]

        bulk = structured(await session.call_tool("complete_task", {"task_ids": [1, 2, 7]}))
        assert [entry.get("status", entry.get("error")) for entry in bulk["results"]] == [
            "completed",
            "completed",
            "task 7 not found",
        ]
        reopened = structured(await session.call_tool("reopen_task", {"task_id": 2}))
        assert (reopened["status"], reopened["title"]) == ("reopened", "Groceries")
        undone = structured(await session.call_tool("undo_last_change", {}))
        assert (undone["status"], undone["task_id"]) == ("completed", 2)  # the reopening, undone
        assert "timezone" in error_text(await session.call_tool("set_timezone", {"timezone": "Nowhere/Land"}))
        assert "due" in error_text(await session.call_tool("update_task", {"task_id": 1, "due": "someday maybe"}))
        assert "task_ids" in error_text(await session.call_tool("delete_task", {"task_ids": list(range(1, 60))}))
    tasks = await tasks_via_grpc(host.task_addr, caller)
    assert [(t.id, t.completed, t.due_date) for t in tasks] == [(1, True, "2026-12-24"), (2, True, "")]


async def test_mcp_changes_are_logged_as_mcp_and_undone_over_rest(gateway: Gateway) -> None:
    alice = user("activity")
    headers = {"Authorization": f"Bearer {token(alice)}"}
    async with mcp_session(gateway.base_url + "/mcp", token(alice)) as session:
        structured(await session.call_tool("add_task", {"title": "Via MCP"}))
        structured(await session.call_tool("update_task", {"task_id": 1, "priority": "low"}))
        structured(await session.call_tool("complete_task", {"task_id": 1}))
        structured(await session.call_tool("reopen_task", {"task_id": 1}))
        structured(await session.call_tool("delete_task", {"task_ids": [1]}))
    async with httpx2.AsyncClient(base_url=gateway.base_url, headers=headers, timeout=10) as http:
        events = (await http.get(f"/api/{alice}/activity")).json()["events"]
        assert [(e["action"], e["source"], e["task_id"]) for e in events] == [
            ("deleted", "mcp", 1),
            ("reopened", "mcp", 1),
            ("completed", "mcp", 1),
            ("updated", "mcp", 1),
            ("created", "mcp", 1),
        ]
        restored = await http.post(f"/api/{alice}/undo", json={})
        assert restored.status_code == 200, restored.text
        assert (restored.json()["action"], restored.json()["source"]) == ("restored", "rest")
        assert (await http.get(f"/api/{alice}/tasks/1")).json()["priority"] == "low"  # the same task, back
    async with mcp_session(gateway.base_url + "/mcp", token(alice)) as session:
        undone = structured(await session.call_tool("undo_last_change", {}))
        assert (undone["status"], undone["task_id"]) == ("completed", 1)
    async with httpx2.AsyncClient(base_url=gateway.base_url, headers=headers, timeout=10) as http:
        latest = (await http.get(f"/api/{alice}/activity?page_size=1")).json()["events"][0]
        assert (latest["action"], latest["source"]) == ("completed", "mcp")
