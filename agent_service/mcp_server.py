"""The tools (agent_service/tools/) over MCP streamable HTTP at /mcp, for any MCP client.

Built on the SDK's low-level `Server` so the schemas clients see are exactly tools.py's (the
one definition shared with the chat agent), plus an optional `user_id` argument that the
hackathon contract lists (it must name the caller). Each call runs `tools.execute` as the
caller of the bearer token, which goes on to task_service, which verifies it again.

Transport: stateless, JSON responses. No session lives in this process, so any replica can
answer any request and a restart loses nothing; the tools never need server-to-client
messages, so no SSE stream is kept open (which also keeps proxies simple).

Results: an object tool result is the structuredContent as it is; list_tasks' list is wrapped
as `{"tasks": [...]}` because structuredContent must be an object. The text content is the
same JSON, for clients that read only text.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import grpc
import mcp_types as types
import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.authentication import AuthenticationBackend
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from agent_service import tools
from agent_service.agent import Agent
from agent_service.mcp_auth import (
    CHATKIT_PATH,
    MCP_PATH,
    SubjectTokenVerifier,
    auth_error_response,
    auth_settings,
    caller_of,
)
from common import audit
from common.auth import TokenVerifier
from common.logs import request_id_var
from common.settings import Settings
from todo.v1 import conversation_pb2_grpc, task_pb2_grpc

log = logging.getLogger("agent_service.mcp")

SERVER_NAME = "todo-tasks"
SERVER_VERSION = "1.0.0"
LIST_RESULT_KEY = "tasks"  # list_tasks' structuredContent: {"tasks": [...]}
TOOL_TIMEOUT_SECONDS = 30.0  # one tool call (list_tasks reads up to 5 pages)
# The gateway's cap on public requests; the agent's port (reachable without the gateway) keeps
# it too. Past it: 413, after reading at most this much (Content-Length is checked first).
MAX_HTTP_BODY_BYTES = 1024 * 1024
INSTRUCTIONS = (
    "Manage the authenticated user's todo list: add, list, complete, reopen, update and delete tasks "
    "(with due dates in the user's own words, priorities and tags), undo the last change, set the "
    "user's timezone, and read the user's conversations (create_task_from_message turns a message "
    "into a task). Task ids are the user's own task numbers as shown by list_tasks."
)
USER_ID_PROPERTY = {
    "type": "string",
    "description": "Optional. The authenticated user's id; tools only ever act on the caller's own tasks.",
}
# What a client is told when task_service itself fails (details stay in our logs).
RPC_FAILURES = {
    grpc.StatusCode.UNAVAILABLE: "the service is unavailable right now; try again shortly",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the service did not answer in time; try again",
    grpc.StatusCode.UNAUTHENTICATED: "the service refused the token (expired?); sign in again",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "too many requests; slow down and try again",
}


def mcp_input_schema(tool: tools.Tool) -> dict[str, Any]:
    """tools.py's argument schema plus the optional `user_id` of the hackathon contract."""
    schema = copy.deepcopy(tool.input_schema)
    schema["properties"]["user_id"] = dict(USER_ID_PROPERTY)
    return schema


def mcp_output_schema(tool: tools.Tool) -> dict[str, Any]:
    """tools.py's result schema; a list result is wrapped in an object (structuredContent is one)."""
    if tool.output_schema.get("type") == "object":
        return copy.deepcopy(tool.output_schema)
    return {
        "type": "object",
        "properties": {LIST_RESULT_KEY: copy.deepcopy(tool.output_schema)},
        "required": [LIST_RESULT_KEY],
        "additionalProperties": False,
    }


def structured(result: Any) -> dict[str, Any]:
    return result if isinstance(result, dict) else {LIST_RESULT_KEY: result}


def mcp_tools() -> list[types.Tool]:
    return [
        types.Tool(
            name=tool.name,
            description=tool.description,
            input_schema=mcp_input_schema(tool),
            output_schema=mcp_output_schema(tool),
            annotations=types.ToolAnnotations(**tool.annotations),
        )
        for tool in tools.for_surface("mcp")
    ]


def error_result(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


def success_result(result: Any) -> types.CallToolResult:
    content = structured(result)
    text = json.dumps(content, ensure_ascii=False)
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], structured_content=content)


def build_server(task_channel: grpc.aio.Channel, conversation_channel: grpc.aio.Channel) -> Server[Any]:
    """The MCP server: list the tools, run a call as the token's user."""
    listed = mcp_tools()
    stub = task_pb2_grpc.TaskServiceStub(task_channel)
    conversations = conversation_pb2_grpc.ConversationServiceStub(conversation_channel)

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        caller = caller_of(ctx)
        request_id = request_id_var.set(caller.request_id)  # our log lines carry Envoy's x-request-id
        started = time.monotonic()
        try:
            result = await run_tool(
                params.name,
                params.arguments or {},
                tools.ToolContext(caller, stub, conversations=conversations, source="mcp"),
            )
            log.info(
                "mcp tool call",
                extra={
                    "tool": params.name,
                    "user_id": caller.user_id,
                    "is_error": result.is_error,
                    "duration_ms": round((time.monotonic() - started) * 1000, 1),
                },
            )
            return result
        finally:
            request_id_var.reset(request_id)

    return Server(
        SERVER_NAME,
        version=SERVER_VERSION,
        instructions=INSTRUCTIONS,
        get_tool_input_schema=lambda name: next((t.input_schema for t in listed if t.name == name), None),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def run_tool(name: str, arguments: dict[str, Any], context: tools.ToolContext) -> types.CallToolResult:
    """One tool call; every failure becomes an error result (isError) with a clear message."""
    try:
        async with asyncio.timeout(TOOL_TIMEOUT_SECONDS):
            return success_result(await tools.execute(name, arguments, context))
    except tools.ToolError as error:
        return error_result(str(error))
    except grpc.aio.AioRpcError as error:
        log.warning("mcp tool failed", extra={"tool": name, "code": error.code().name, "details": error.details()})
        return error_result(RPC_FAILURES.get(error.code(), f"the service failed ({error.code().name})"))
    except TimeoutError:
        log.warning("mcp tool timed out", extra={"tool": name})
        return error_result(f"{name} did not finish within {TOOL_TIMEOUT_SECONDS:.0f} s; try again")


def split_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection: only the Host headers in MCP_ALLOWED_HOSTS reach the tools.

    `*` alone turns the check off (only for deployments where a proxy already pins Host).
    Browser Origins are allowed for the same hosts (http and https) and for the CORS origins.
    AllowedHosts enforces these lists exactly; the SDK, given them too, checks them again.
    """
    hosts = split_list(settings.mcp_allowed_hosts)
    if hosts == ["*"]:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    origins = [f"{scheme}://{host}" for host in hosts for scheme in ("http", "https")]
    origins += split_list(settings.cors_allowed_origins)
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


_PORT = re.compile(r"[0-9]{1,5}")


def host_allowed(value: str, patterns: list[str]) -> bool:
    """`value` (a Host or an Origin) equals a pattern, or matches `name:*` as `name:<digits>`.

    The SDK reads `name:*` as a prefix, so `localhost:1@evil.com` would pass it."""
    for pattern in patterns:
        if pattern.endswith(":*"):
            base = pattern[:-1]  # "localhost:"
            if value.startswith(base) and _PORT.fullmatch(value[len(base) :]):
                return True
        elif value == pattern:
            return True
    return False


class AllowedHosts:
    """421 for a Host outside MCP_ALLOWED_HOSTS, 403 for a browser Origin outside the allowed
    origins, on every path, before auth or the body are looked at."""

    def __init__(self, app: ASGIApp, security: TransportSecuritySettings) -> None:
        self.app, self.security = app, security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        header, value, status = refusal
        audit.record(
            "host_refused", surface="mcp", method=f"{scope['method']} {scope['path']}", reason=f"{header} {value!r}"
        )
        await PlainTextResponse(f"Invalid {header} header", status)(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[str, str, int] | None:
        if not self.security.enable_dns_rebinding_protection:
            return None
        headers = Headers(scope=scope)
        host, origin = headers.get("host", ""), headers.get("origin")
        if not host_allowed(host, self.security.allowed_hosts):
            return "Host", host, 421
        if origin is not None and not host_allowed(origin, self.security.allowed_origins):
            return "Origin", origin, 403
        return None


class NoStandaloneStream:
    """GET /mcp -> 405: stateless, a server-to-client stream would carry nothing, forever.

    The spec lets a server answer the GET with 405; without this an idle SSE connection stays
    open per client (and holds up graceful shutdown).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == MCP_PATH:
            refusal = PlainTextResponse("use POST: this MCP server is stateless", 405, headers={"Allow": "POST"})
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def with_auth_error_handler(middleware: Middleware) -> Middleware:
    if middleware.cls is not AuthenticationMiddleware:
        return middleware
    backend = cast(AuthenticationBackend, middleware.kwargs["backend"])
    return Middleware(AuthenticationMiddleware, backend=backend, on_error=auth_error_response)


def create_app(
    settings: Settings,
    task_channel: grpc.aio.Channel,
    conversation_channel: grpc.aio.Channel,
    agent: Agent | None = None,
) -> Starlette:
    """The ASGI app: POST /mcp (bearer auth) and GET /.well-known/oauth-protected-resource/mcp;
    with an `agent`, also POST /chatkit (agent_service/chatkit_server.py, the same bearer auth).

    Its lifespan runs the SDK's session manager: serve it as the root app (as serve_http
    does), or run `app.router.lifespan_context` when mounting it elsewhere.
    """
    server = build_server(task_channel, conversation_channel)
    security = transport_security(settings)
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        json_response=True,
        transport_security=security,
        # /mcp is the one route that reads a body; the SDK's limit applies after auth, so an
        # unauthenticated caller cannot make us buffer anything.
        max_request_body_size=MAX_HTTP_BODY_BYTES,
        auth=auth_settings(settings),
        token_verifier=SubjectTokenVerifier(TokenVerifier(settings)),
    )
    # A JWKS outage is not a bad token: answer 503 (retry) instead of Starlette's default 400.
    app.user_middleware = [with_auth_error_handler(mw) for mw in app.user_middleware]
    app.user_middleware.insert(0, Middleware(NoStandaloneStream))
    app.user_middleware.insert(0, Middleware(AllowedHosts, security=security))
    if agent is not None:
        # ChatKit beside MCP: behind the same host check and bearer middleware (scope["user"]).
        app.router.routes.append(Route(CHATKIT_PATH, LazyChatKit(agent, conversation_channel), methods=["POST"]))
    return app


class LazyChatKit:
    """POST /chatkit, with the ChatKit SDK imported when the first ChatKit request comes.

    chatkit.server imports the openai-agents SDK: about 48 MB of RSS (a third of the agent's)
    that a deployment serving only REST and MCP never needs. The first request imports it in a
    thread, so that the event loop keeps serving other requests meanwhile; it waits that once
    (about 0.4 s), every later request goes straight to agent_service/chatkit_server.py."""

    def __init__(self, agent: Agent, conversation_channel: grpc.aio.Channel) -> None:
        self._agent, self._conversation_channel = agent, conversation_channel
        self._app: ASGIApp | None = None
        self._loading = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._app or await self._load()
        await app(scope, receive, send)

    async def _load(self) -> ASGIApp:
        async with self._loading:  # one import, however many first requests arrive together
            if self._app is None:
                module = await asyncio.to_thread(importlib.import_module, "agent_service.chatkit_server")
                self._app = module.ChatKitApp(self._agent, self._conversation_channel)
                log.info("chatkit loaded")
            return self._app


class _PlainRecords(logging.Filter):
    """uvicorn adds an ANSI-coloured copy of some messages; our JSON lines don't want it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our process: the host process owns SIGTERM/SIGINT, not uvicorn."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen on host:port now, so a busy port is a clear OSError here, not a sys.exit in uvicorn."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_http(
    settings: Settings,
    task_channel: grpc.aio.Channel,
    conversation_channel: grpc.aio.Channel,
    stop: asyncio.Event,
    agent: Agent | None = None,
) -> None:
    """Serve the MCP app on AGENT_HTTP_HOST:AGENT_HTTP_PORT until `stop` is set, then drain and stop.

    In-flight requests get GRPC_SHUTDOWN_GRACE_SECONDS to finish.
    """
    config = uvicorn.Config(
        create_app(settings, task_channel, conversation_channel, agent),
        log_config=None,  # keep the process's JSON logging
        access_log=False,  # Envoy logs requests; we log one line per tool call
        lifespan="on",
        timeout_graceful_shutdown=max(1, round(settings.grpc_shutdown_grace_seconds)),
        server_header=False,
    )
    server = _EmbeddedServer(config)
    # The SDK logs "Terminating session: None" at INFO for every stateless request.
    logging.getLogger("mcp.server.streamable_http").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_PlainRecords())
    sock = bind_socket(settings.agent_http_host, settings.agent_http_port)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    stopping = asyncio.create_task(stop.wait())
    log.info("mcp listening", extra={"address": f"{settings.agent_http_host}:{settings.agent_http_port}"})
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopping.cancel()
        await serving  # re-raises if uvicorn failed on its own
    if not stop.is_set():
        raise RuntimeError("the MCP HTTP server stopped on its own")
    log.info("mcp stopped")
