"""The one source of Envoy's configuration, rendered for a native run or for containers.

`render(settings, target=...)` builds the bootstrap as a dict; `write(...)` dumps it as YAML.
Native: listens on 127.0.0.1:GATEWAY_PORT, upstreams from *_SERVICE_ADDR, files under build/.
Docker: listens on 0.0.0.0:8080 (GATEWAY_PORT), upstreams by service DNS name, files under
CONTAINER_CONFIG_DIR (a volume the `gateway-config` container fills). Both read the local
build/todo.pb: the routes and the query check below are generated from its annotations.

What the gateway does, in filter order:
1. CORS (policy on the virtual host; a catch-all route so preflights of any path match).
2. /readyz: the health_check filter answers 200 only while every required gRPC cluster has a
   healthy host by active gRPC health checks (1 s interval, one failure marks a host unhealthy).
   A cluster may have several hosts (replicas: `render(upstreams=...)`, or a DNS name with
   several addresses): requests go round robin to the healthy ones, a host whose connection
   fails is ejected at once (outlier detection), and a request that never reached a host
   (connect failure, refused stream, reset before the request was sent) is retried on another.
3. A 1 MiB request body limit (413).
4. Lua: a query parameter naming a path field (`?user_id=`, `?taskId=`, percent-encoded too) is
   400, since the transcoder would let it override the path; REST headers gRPC cannot carry as
   metadata are dropped. On the way back, REST responses lose gRPC's own `grpc-*` headers.
5. The gRPC-JSON transcoder over the descriptor set: REST -> gRPC path. Only RPCs with a
   `google.api.http` annotation have a route (exact gRPC path, for REST and native gRPC alike);
   any other gRPC path is 404 at the edge (UNIMPLEMENTED for gRPC clients), so internal RPCs
   (AppendMessage, CreateConversation, ...) never leave the private network. gRPC statuses
   become HTTP statuses with a JSON google.rpc.Status body. Unknown paths, query parameters and
   body/path collisions are 400/404.
6. The router: per-route timeouts; /mcp and /.well-known/ go to the agent's HTTP server.
Envoy's own replies (404, 413, 503, ...) get the same JSON error shape via local_reply_config.

Edge settings follow Envoy's "Configuring Envoy as an edge proxy" (EdgeLimits): header, request,
stream-idle and connection-idle timeouts, 32 KiB connection buffers, HTTP/2 stream limits,
headers with underscores refused, paths normalized, a global connection cap, a fixed `server`
header, no x-envoy-upstream-service-time. The access log records paths without query strings.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from google.protobuf import descriptor_pb2

from common import tracing
from common.settings import Settings
from gateway import openapi

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build"
CONTAINER_CONFIG_DIR = "/etc/envoy/todo"

Target = Literal["native", "docker"]

# gRPC service -> (cluster name, the Settings field with its address).
GRPC_UPSTREAMS = {
    "task": ("todo.v1.TaskService", "task_service_addr"),
    "conversation": ("todo.v1.ConversationService", "conversation_service_addr"),
    "agent": ("todo.v1.AgentService", "agent_service_addr"),
}
AGENT_HTTP_CLUSTER = "agent_http"
UNROUTED_CLUSTER = "unrouted"

MAX_REQUEST_BYTES = 1024 * 1024
INTERNAL_REQUEST_HEADERS = ["x-todo-source"]
# All request headers, in KiB: above it Envoy answers 431. Kept well under the services' gRPC
# metadata limit (16 KiB, common/server.py; the transcoder also copies the path into
# x-envoy-original-path), which gRPC would otherwise enforce as RESOURCE_EXHAUSTED, i.e. a 429.
MAX_REQUEST_HEADERS_KB = 8
# The gateway's Lua filter, for REST requests (native gRPC ones, content-type application/grpc
# or application/grpc+..., pass untouched both ways):
# - The transcoder fills request fields from query parameters too, after the path, so
#   `GET /api/alice/tasks?user_id=bob` would ask for bob's tasks and `DELETE .../tasks/1?task_id=2`
#   would delete task 2. A query parameter naming a path field (PATH_FIELDS, from the annotations,
#   both spellings the transcoder accepts) is refused with 400. Names are percent-decoded first,
#   as the transcoder decodes them (`user%5Fid` is user_id).
# - gRPC metadata keys are [0-9a-z_.-] and `-bin` values must be base64; grpc-core fails the whole
#   call (a 500) on any other header a REST client may legally send, and on a malformed
#   `grpc-timeout`. Such headers are dropped before the transcoder turns the request into a call.
# - Responses: the transcoder leaves gRPC's own headers (grpc-status, grpc-message,
#   grpc-accept-encoding) on the JSON reply, and on HTTP/2 a stream's trailers; they are
#   internal, so REST clients never see them.
#   gRPC responses keep them: for a gRPC client, grpc-status in the headers *is* the status
#   (a trailers-only error), which is why this is not done with response_headers_to_remove.
EDGE_LUA = """
local PATH_FIELDS = {path_fields}

local function is_grpc(content_type)
  return content_type == "application/grpc" or string.sub(content_type or "", 1, 17) == "application/grpc+"
end

local function unescape(text)
  return (string.gsub(text, "%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

local function path_field_in_query(path)
  local query = string.match(path or "", "%?(.*)$")
  if query == nil then
    return nil
  end
  for pair in string.gmatch(query, "[^&]+") do
    local name = unescape(string.match(pair, "^[^=]*"))
    if PATH_FIELDS[name] then
      return name
    end
  end
  return nil
end

local function drop_headers_grpc_cannot_carry(headers)
  local dropped = {}
  for key, _ in pairs(headers) do
    if string.sub(key, 1, 1) ~= ":" and (string.find(key, "^[0-9a-z_.%-]+$") == nil
        or string.sub(key, -4) == "-bin" or string.sub(key, 1, 5) == "grpc-") then
      dropped[#dropped + 1] = key
    end
  end
  for _, key in ipairs(dropped) do
    headers:remove(key)
  end
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  if is_grpc(headers:get("content-type")) then
    return
  end
  local field = path_field_in_query(headers:get(":path"))
  if field ~= nil then
    local reason = "query parameter " .. field .. " is not allowed: " .. field .. " is set by the path"
    request_handle:respond({[":status"] = "400"}, reason)
    return
  end
  drop_headers_grpc_cannot_carry(headers)
end

local function remove_grpc_keys(map)
  local internal = {}
  for key, _ in pairs(map) do
    if string.sub(key, 1, 5) == "grpc-" then
      internal[#internal + 1] = key
    end
  end
  for _, key in ipairs(internal) do
    map:remove(key)
  end
end

function envoy_on_response(response_handle)
  local headers = response_handle:headers()
  if is_grpc(headers:get("content-type")) then
    return
  end
  remove_grpc_keys(headers)
  if headers:get("content-length") ~= nil then
    return
  end
  -- A streamed reply (/chat/stream) ends with gRPC's trailers on HTTP/2: let the chunks pass
  -- (bodyChunks does not buffer), then clean the trailers too.
  for _ in response_handle:bodyChunks() do
  end
  local trailers = response_handle:trailers()
  if trailers ~= nil then
    remove_grpc_keys(trailers)
  end
end
"""
UPSTREAM_MAX_REQUESTS = 20000  # in flight per upstream cluster
MAX_DIRECT_RESPONSE_BYTES = 4 * 1024 * 1024  # /openapi.json
DEFAULT_TIMEOUT = "15s"
CHAT_TIMEOUT_MARGIN_SECONDS = 20  # beyond AGENT_TURN_TIMEOUT_SECONDS: the agent answers first, with its own error
STREAM_IDLE_TIMEOUT = "300s"
HEALTH_CHECK_INTERVAL = "1s"
# The edge guide's values. A connection buffers at most 32 KiB before flow control pushes back;
# the buffer filter and the transcoder raise their own stream's limit to MAX_REQUEST_BYTES.
CONNECTION_BUFFER_BYTES = 32 * 1024
HTTP2_LIMITS = {
    "max_concurrent_streams": 100,
    "initial_stream_window_size": 64 * 1024,
    "initial_connection_window_size": 1024 * 1024,
}
SERVER_NAME = "todo-gateway"  # every response's `server` header: no Envoy or upstream name disclosed
NOT_PUBLIC = "no public method at this path"


@dataclass(frozen=True)
class EdgeLimits:
    """How long and how many: what a slow or greedy client gets before Envoy cuts it off.

    The defaults are what `make up` and compose run; tests render smaller ones."""

    # All request headers within this from their first byte (slowloris).
    request_headers_timeout: str = "10s"
    # The whole request, headers and body, within this. Envoy disarms it once the request is in
    # (or the response starts), so it never cuts a long response: /chat/stream and /mcp are safe.
    request_timeout: str = "30s"
    # A stream with no bytes either way (routes for streams set their own, STREAM_IDLE_TIMEOUT).
    stream_idle_timeout: str = STREAM_IDLE_TIMEOUT
    # A connection with no request in flight, including one that never sends a byte.
    idle_timeout: str = "30s"
    # All downstream connections together (the overload manager); beyond it new ones are closed at once.
    max_connections: int = 10000


# Envoy's own replies as google.rpc.Status JSON: HTTP status -> gRPC code.
LOCAL_REPLY_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 405: 5, 408: 4, 409: 10, 413: 3, 429: 8}
LOCAL_REPLY_CODES |= {431: 3, 500: 13, 501: 12, 502: 14, 503: 14, 504: 4}

CORS_ALLOW_HEADERS = "authorization,content-type,idempotency-key,x-request-id"
CORS_EXPOSE_HEADERS = "x-request-id,www-authenticate,retry-after"


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(
    name: str,
    host: str,
    port: int,
    *,
    grpc: bool,
    more: Sequence[tuple[str, int]] = (),
    max_requests: int = UPSTREAM_MAX_REQUESTS,
) -> dict[str, Any]:
    """An upstream cluster of host:port and the `more` hosts (replicas of one service), with at
    most `max_requests` in flight (more are answered 503 at once: `_overflow_reply`)."""
    hosts = [(host, port), *more]
    lb_endpoints = [{"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}} for h, p in hosts]
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if all(_is_ip(h) for h, _ in hosts) else "STRICT_DNS",
        "connect_timeout": "2s",
        "dns_lookup_family": "V4_PREFERRED",
        "per_connection_buffer_limit_bytes": CONNECTION_BUFFER_BYTES,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]},
    }
    # Envoy's default circuit breakers allow 1,024 requests in flight per upstream and turn
    # the rest into 503s; our services queue and bound their own work, so admit far more
    # (EdgeLimits.max_connections still bounds what reaches Envoy).
    cluster["circuit_breakers"] = {
        "thresholds": [
            {
                "max_connections": UPSTREAM_MAX_REQUESTS,
                "max_pending_requests": max_requests,
                "max_requests": max_requests,
                "max_retries": 3,
            }
        ]
    }
    if grpc:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={
                    "http2_protocol_options": {
                        key: HTTP2_LIMITS[key]
                        for key in ("initial_stream_window_size", "initial_connection_window_size")
                    }
                },
            )
        }
        # Every second, whether or not traffic flows (no_traffic_interval), so /readyz turns
        # 503 within a couple of seconds of a service stopping and 200 again once it is back.
        cluster["health_checks"] = [
            {
                "timeout": "2s",
                "interval": HEALTH_CHECK_INTERVAL,
                "no_traffic_interval": HEALTH_CHECK_INTERVAL,
                "unhealthy_interval": HEALTH_CHECK_INTERVAL,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ]
    return cluster


# A host whose connection fails (refused, reset, timed out: a killed replica) leaves the rotation at
# once, for 5 s, and again for longer if it keeps failing; the active health checks bring it back.
# Only such local-origin failures count: a gRPC error status is the service's answer, not a sick host.
# Envoy's panic threshold keeps a single-host cluster in use even when it is ejected.
OUTLIER_DETECTION = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 1,
    "enforcing_consecutive_local_origin_failure": 100,
    "enforcing_consecutive_5xx": 0,
    "enforcing_consecutive_gateway_failure": 0,
    "enforcing_success_rate": 0,
    "enforcing_local_origin_success_rate": 0,
    "interval": "1s",
    "base_ejection_time": "5s",
    "max_ejection_percent": 50,
}
# Safe for every route, writes included: Envoy retries only requests no host has seen, on another host.
RETRY_POLICY = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": _typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
        }
    ],
    "host_selection_retry_max_attempts": 3,
}


def _clusters(settings: Settings, upstreams: Mapping[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """The upstream clusters; `upstreams` ("task", "conversation", "agent", "agent_http" -> host:port
    of each replica) replaces the single address of the settings."""
    upstreams = upstreams or {}

    def cluster(cluster_name: str, service: str, default: tuple[str, int], grpc: bool) -> dict[str, Any]:
        (host, port), *more = [_host_port(address) for address in upstreams.get(service, ())] or [default]
        limit = UPSTREAM_MAX_REQUESTS
        if service == "agent":
            # Chat turns beyond what the agent processes admit are refused here, in microseconds,
            # instead of by each agent (agent_service/admission.py, the second line).
            limit = max(1, settings.agent_max_turns_in_progress) * (1 + len(more))
        cluster = _cluster(cluster_name, host, port, grpc=grpc, more=more, max_requests=limit)
        return {**cluster, "outlier_detection": OUTLIER_DETECTION}

    clusters = [
        cluster(cluster_name, service, _host_port(getattr(settings, field_name)), grpc=True)
        for service, (cluster_name, field_name) in GRPC_UPSTREAMS.items()
    ]
    agent_host, _ = _host_port(settings.agent_service_addr)
    clusters.append(cluster(AGENT_HTTP_CLUSTER, AGENT_HTTP_CLUSTER, (agent_host, settings.agent_http_port), False))
    unrouted = {"name": UNROUTED_CLUSTER, "type": "STATIC", "connect_timeout": "1s"}
    clusters.append({**unrouted, "per_connection_buffer_limit_bytes": CONNECTION_BUFFER_BYTES})
    return clusters


def _no_transcoding() -> dict[str, Any]:
    return {
        "envoy.filters.http.grpc_json_transcoder": _typed("envoy.config.route.v3.FilterConfig", disabled=True),
    }


def _json_response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"status": status, "body": {"inline_string": json.dumps(body)}}


@dataclass(frozen=True)
class PublicMethod:
    """An RPC with a `google.api.http` annotation: the only kind the gateway routes."""

    service: str  # "todo.v1.TaskService", also its cluster's name
    name: str
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def public_methods(descriptor_set: descriptor_pb2.FileDescriptorSet) -> list[PublicMethod]:
    descriptors = openapi.Descriptors(descriptor_set)
    return [
        PublicMethod(service, method.name, method.server_streaming)
        for service, method, _ in descriptors.methods()
        if openapi.http_bindings(method)
    ]


def path_fields(descriptor_set: descriptor_pb2.FileDescriptorSet) -> list[str]:
    """Every `{variable}` of every binding, as the field name and as its json_name (user_id, userId).

    The gateway refuses these names in any query string. That is only right while no binding takes
    one of them as a genuine query parameter, so such a proto fails here, loudly, rather than
    every such request failing with a 400."""
    descriptors = openapi.Descriptors(descriptor_set)
    in_paths: set[str] = set()
    in_queries: dict[str, str] = {}
    for _, method, _ in descriptors.methods():
        request = {field.name: field for field in descriptors.message(method.input_type).field}
        for verb, template, body in openapi.http_bindings(method):
            variables = openapi.PATH_PARAM.findall(template)
            if any("." in variable for variable in variables):  # a nested field's json spelling needs more
                raise SystemExit(f"{method.name}: nested path variables are not supported: {template}")
            in_paths |= {spelling for name in variables for spelling in (name, request[name].json_name)}
            if not body:  # without a body, every other field is a query parameter
                for name, field in request.items():
                    if name not in variables:
                        in_queries |= {name: f"{verb} {template}", field.json_name: f"{verb} {template}"}
    clashes = [f"{name} (a query parameter of {in_queries[name]})" for name in sorted(in_paths & in_queries.keys())]
    if clashes:
        raise SystemExit(f"path fields that are also query parameters: {', '.join(clashes)}; rename one")
    return sorted(in_paths)


def _edge_lua(descriptor_set: descriptor_pb2.FileDescriptorSet) -> str:
    entries = ", ".join(f'["{name}"] = true' for name in path_fields(descriptor_set))
    return EDGE_LUA.replace("{path_fields}", "{" + entries + "}")


def _method_route(method: PublicMethod, chat_timeout: str) -> dict[str, Any]:
    route: dict[str, Any] = {"cluster": method.service, "timeout": DEFAULT_TIMEOUT}
    if method.server_streaming:  # /chat/stream: no overall timeout, only an idle one
        route |= {"timeout": "0s", "idle_timeout": STREAM_IDLE_TIMEOUT}
    elif method.service == GRPC_UPSTREAMS["agent"][0]:
        route["timeout"] = chat_timeout
    return {"name": method.path.removeprefix("/"), "match": {"path": method.path}, "route": route}


def _not_public(name: str, match: dict[str, Any]) -> dict[str, Any]:
    """A 404 at the edge (for gRPC clients Envoy turns it into UNIMPLEMENTED), transcoder off."""
    return {
        "name": name,
        "match": match,
        "direct_response": {"status": 404, "body": {"inline_string": NOT_PUBLIC}},
        "typed_per_filter_config": _no_transcoding(),
    }


# The chat page (gateway/page/: plain HTML, CSS and JavaScript, no build step), answered by Envoy
# itself. The files are inlined when the config is rendered, so the container config carries them
# too (Envoy's container only mounts the gateway-config volume); edit them, then restart the stack.
# Everything comes from this origin: a strict CSP, no external script, style, font or connection.
PAGE_DIR = Path(__file__).resolve().parent / "page"
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; script-src 'self'; "
    "style-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def page_routes() -> list[dict[str, Any]]:
    """`/`, `/app.js`, `/app.css`: exact paths, direct responses (within MAX_DIRECT_RESPONSE_BYTES)."""
    routes: list[dict[str, Any]] = []
    for path, (file_name, content_type) in PAGE_FILES.items():
        headers = {"content-type": content_type, **PAGE_HEADERS}
        body = {"inline_string": (PAGE_DIR / file_name).read_text(encoding="utf-8")}
        routes.append(
            {
                "name": f"page_{file_name.replace('.', '_')}",
                "match": {"path": path},
                "direct_response": {"status": 200, "body": body},
                "response_headers_to_add": [
                    {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                    for key, value in headers.items()
                ],
                "typed_per_filter_config": _no_transcoding(),
            }
        )
    return routes


def _routes(openapi_body: dict[str, Any], methods: Sequence[PublicMethod], chat_timeout: str) -> list[dict[str, Any]]:
    json_header = [
        {
            "header": {"key": "content-type", "value": "application/json"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]
    grpc_content = {"name": "content-type", "string_match": {"prefix": "application/grpc", "ignore_case": True}}
    return [
        {
            "name": "healthz",
            "match": {"path": "/healthz"},
            "direct_response": _json_response(200, {"status": "ok"}),
            "response_headers_to_add": json_header,
            "typed_per_filter_config": _no_transcoding(),
        },
        {
            "name": "openapi",
            "match": {"path": "/openapi.json"},
            "direct_response": {"status": 200, "body": openapi_body},
            "response_headers_to_add": json_header,
            "typed_per_filter_config": _no_transcoding(),
        },
        *page_routes(),  # GET /: the chat page
        # One exact route per annotated RPC. The transcoder turns REST into these gRPC paths;
        # native gRPC clients use them directly. Nothing else reaches a gRPC service.
        *(_method_route(method, chat_timeout) for method in methods),
        # MCP streamable HTTP: a long-lived response stream, so no route timeout.
        {
            "name": "mcp",
            "match": {"prefix": "/mcp"},
            "route": {"cluster": AGENT_HTTP_CLUSTER, "timeout": "0s", "idle_timeout": STREAM_IDLE_TIMEOUT},
            "typed_per_filter_config": _no_transcoding(),
        },
        # ChatKit's custom backend (agent_service/chatkit_server.py): plain HTTP, a turn streams
        # as server-sent events, so no route timeout either (the agent bounds its own turns).
        {
            "name": "chatkit",
            "match": {"path": "/chatkit"},
            "route": {"cluster": AGENT_HTTP_CLUSTER, "timeout": "0s", "idle_timeout": STREAM_IDLE_TIMEOUT},
            "typed_per_filter_config": _no_transcoding(),
        },
        {
            "name": "well_known",
            "match": {"prefix": "/.well-known/"},
            "route": {"cluster": AGENT_HTTP_CLUSTER, "timeout": DEFAULT_TIMEOUT},
            "typed_per_filter_config": _no_transcoding(),
        },
        # Any other gRPC (or gRPC-web) request: internal RPCs, health, reflection, unknown paths.
        _not_public("grpc_not_public", {"prefix": "/", "headers": [grpc_content]}),
        # Everything else. The CORS filter answers preflights only on a route with a route
        # entry, so the catch-all is one; REST requests never get here (the transcoder turns
        # them into gRPC paths above, or refuses unknown ones with 404), nor do preflights
        # (the CORS filter answers them), so its cluster has no endpoints.
        {"name": "unrouted", "match": {"prefix": "/"}, "route": {"cluster": UNROUTED_CLUSTER}},
    ]


def _chat_timeout(settings: Settings) -> str:
    return f"{int(settings.agent_turn_timeout_seconds) + CHAT_TIMEOUT_MARGIN_SECONDS}s"


def _cors_policy(settings: Settings) -> dict[str, Any]:
    origins = [origin.strip() for origin in settings.cors_allowed_origins.split(",") if origin.strip()]
    matchers = [{"safe_regex": {"regex": ".*"}} if origin == "*" else {"exact": origin} for origin in origins]
    return _typed(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        allow_origin_string_match=matchers,
        allow_methods="GET,POST,PUT,PATCH,DELETE,OPTIONS",
        allow_headers=CORS_ALLOW_HEADERS,
        expose_headers=CORS_EXPOSE_HEADERS,
        max_age="600",
        forward_not_matching_preflights=False,
    )


def _http_filters(descriptor_path: str, ready_clusters: Sequence[str], lua: str) -> list[dict[str, Any]]:
    return [
        {"name": "envoy.filters.http.cors", "typed_config": _typed("envoy.extensions.filters.http.cors.v3.Cors")},
        {
            "name": "envoy.filters.http.health_check",
            "typed_config": _typed(
                "envoy.extensions.filters.http.health_check.v3.HealthCheck",
                pass_through_mode=False,
                headers=[{"name": ":path", "string_match": {"exact": "/readyz"}}],
                # At least one healthy host (of up to 100): none is 0 %, below 1 % (Envoy truncates
                # the value to an integer, so nothing smaller would do).
                cluster_min_healthy_percentages={name: {"value": 1} for name in ready_clusters},
            ),
        },
        {
            "name": "envoy.filters.http.buffer",
            "typed_config": _typed(
                "envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=MAX_REQUEST_BYTES
            ),
        },
        {
            "name": "envoy.filters.http.lua",
            "typed_config": _typed(
                "envoy.extensions.filters.http.lua.v3.Lua",
                default_source_code={"inline_string": lua},
            ),
        },
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": _typed(
                "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                proto_descriptor=descriptor_path,
                services=[service for service, _ in GRPC_UPSTREAMS.values()],
                convert_grpc_status=True,
                print_options={
                    "add_whitespace": False,
                    "always_print_primitive_fields": True,
                    "always_print_enums_as_ints": False,
                    "preserve_proto_field_names": True,
                    "stream_sse_style_delimited": True,
                },
                request_validation_options={
                    "reject_unknown_method": True,
                    "reject_unknown_query_parameters": True,
                    "reject_binding_body_field_collisions": True,
                },
                max_request_body_size=MAX_REQUEST_BYTES,
            ),
        },
        {"name": "envoy.filters.http.router", "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")},
    ]


def _status_is(status: int) -> dict[str, Any]:
    comparison = {"op": "EQ", "value": {"default_value": status, "runtime_key": f"todo.local_reply.{status}"}}
    return {"status_code_filter": {"comparison": comparison}}


def _readyz_reply(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """The health_check filter's answer on /readyz, with a JSON body."""
    path_is_readyz = {"header_filter": {"header": {"name": ":path", "string_match": {"exact": "/readyz"}}}}
    return {
        "filter": {"and_filter": {"filters": [path_is_readyz, _status_is(status)]}},
        "body_format_override": {"json_format": body, "content_type": "application/json"},
    }


def _local_reply_config() -> dict[str, Any]:
    """Envoy's own replies as `{"code", "message", "details"}` (google.rpc.Status JSON)."""
    readyz = [
        _readyz_reply(200, {"status": "ready"}),
        _readyz_reply(503, {"code": 14, "message": "not ready: an upstream service is not serving", "details": []}),
    ]
    errors = [
        {
            "filter": _status_is(status),
            "body_format_override": {
                "json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%", "details": []},
                "content_type": "application/json",
            },
        }
        for status, code in LOCAL_REPLY_CODES.items()
    ]
    return {"mappers": [*readyz, _early_rejection(), _overflow_reply(), *errors]}


def _overflow_reply() -> dict[str, Any]:
    """A request refused by a cluster's circuit breaker (response flag UO: as many chat turns
    in flight as the agents admit): 503 with Retry-After, so clients back off and come back."""
    return {
        "filter": {"response_flag_filter": {"flags": ["UO"]}},
        "headers_to_add": [
            {"header": {"key": "retry-after", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ],
        "body_format_override": {
            "json_format": {
                "code": 14,
                "message": "the service is busy right now; try again in a moment",
                "details": [],
            },
            "content_type": "application/json",
        },
    }


def _early_rejection() -> dict[str, Any]:
    """A 400 from the connection manager itself (a path normalization cannot make canonical, such as
    `%00`; a header name with "_"): it comes before any filter, so without a request id, and with
    an empty or bare body. Its message names Envoy's reason instead."""
    no_request_id = {"header": {"name": "x-request-id", "present_match": True, "invert_match": True}}
    return {
        "filter": {"and_filter": {"filters": [_status_is(400), {"header_filter": no_request_id}]}},
        "body_format_override": {
            "json_format": {"code": 3, "message": "bad request (%RESPONSE_CODE_DETAILS%)", "details": []},
            "content_type": "application/json",
        },
    }


# %REQ_WITHOUT_QUERY(...)% is an extension: it has to be named in the log format.
REQ_WITHOUT_QUERY_FORMATTER = {
    "name": "envoy.formatter.req_without_query",
    "typed_config": _typed("envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"),
}


def _access_log() -> list[dict[str, Any]]:
    fields = {
        "ts": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        # The REST path, never its query string: a client may have put a token there.
        "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "status": "%RESPONSE_CODE%",
        "grpc_status": "%GRPC_STATUS%",
        "ms": "%DURATION%",
        "upstream": "%UPSTREAM_CLUSTER%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "flags": "%RESPONSE_FLAGS%",
    }
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": _typed(
                "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                log_format={"json_format": fields, "formatters": [REQ_WITHOUT_QUERY_FORMATTER]},
            ),
        }
    ]


def _openapi_body(
    settings: Settings, descriptor_set: descriptor_pb2.FileDescriptorSet, target: Target, openapi_path: str | None
) -> dict[str, Any]:
    """Natively the document is rendered in, for this config's PUBLIC_BASE_URL; in containers it is
    the volume's file, which the gateway-config job writes for the same settings (main below)."""
    if openapi_path is None and target == "native":
        return {"inline_string": openapi.document_text(descriptor_set, settings.public_base_url)}
    return {"filename": openapi_path or f"{CONTAINER_CONFIG_DIR}/openapi.json"}


def _connection_manager(
    settings: Settings,
    edge: EdgeLimits,
    descriptor_set: descriptor_pb2.FileDescriptorSet,
    descriptor_path: str,
    openapi_body: dict[str, Any],
    ready_clusters: list[str],
) -> dict[str, Any]:
    return _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="gateway",
        codec_type="AUTO",
        use_remote_address=True,
        # Route on the canonical path: `//api//u/./tasks` is `/api/u/tasks` (RFC 3986).
        normalize_path=True,
        merge_slashes=True,
        max_request_headers_kb=MAX_REQUEST_HEADERS_KB,
        request_headers_timeout=edge.request_headers_timeout,
        request_timeout=edge.request_timeout,
        stream_idle_timeout=edge.stream_idle_timeout,
        common_http_protocol_options={
            "idle_timeout": edge.idle_timeout,
            # Upstreams that treat "_" and "-" alike could be fooled by `x_user_id` next to `x-user-id`.
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        http2_protocol_options=dict(HTTP2_LIMITS),
        server_header_transformation="OVERWRITE",
        server_name=SERVER_NAME,
        generate_request_id=True,
        preserve_external_request_id=True,
        always_set_request_id_in_response=True,
        access_log=_access_log(),
        local_reply_config=_local_reply_config(),
        route_config={
            "name": "gateway",
            "max_direct_response_body_size_bytes": MAX_DIRECT_RESPONSE_BYTES,
            "response_headers_to_remove": ["x-envoy-upstream-service-time"],
            # Set by the agent on its own calls (the surface a change came from, for the activity
            # log); a client's own value would only mislabel its changes, but it is not theirs to set.
            "request_headers_to_remove": INTERNAL_REQUEST_HEADERS,
            "virtual_hosts": [
                {
                    "name": "api",
                    "domains": ["*"],
                    "routes": _routes(openapi_body, public_methods(descriptor_set), _chat_timeout(settings)),
                    "typed_per_filter_config": {"envoy.filters.http.cors": _cors_policy(settings)},
                    "retry_policy": RETRY_POLICY,
                }
            ],
        },
        http_filters=_http_filters(descriptor_path, ready_clusters, _edge_lua(descriptor_set)),
    )


def _downstream_tls(settings: Settings) -> dict[str, Any]:
    """With GATEWAY_TLS_CERT and GATEWAY_TLS_KEY: the listener's TLS (HTTP/2 or HTTP/1.1 by ALPN,
    TLS 1.2 at least). The listener then speaks only TLS: a plain HTTP request fails the handshake."""
    if not (settings.gateway_tls_cert or settings.gateway_tls_key):
        return {}
    if not (settings.gateway_tls_cert and settings.gateway_tls_key):
        raise SystemExit("set both GATEWAY_TLS_CERT and GATEWAY_TLS_KEY (PEM files), or neither")
    context = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "tls_certificates": [
            {
                "certificate_chain": {"filename": settings.gateway_tls_cert},
                "private_key": {"filename": settings.gateway_tls_key},
            }
        ],
        "alpn_protocols": ["h2", "http/1.1"],
    }
    return {
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _typed(
                "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", common_tls_context=context
            ),
        }
    }


def render(
    settings: Settings,
    target: Target = "native",
    *,
    descriptor_path: str | None = None,
    openapi_path: str | None = None,
    ready_services: Sequence[str] = ("task", "conversation", "agent"),
    edge: EdgeLimits | None = None,
    upstreams: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The Envoy bootstrap for `target`; /readyz requires the clusters of `ready_services`.
    `upstreams` lists the host:port of every replica of a service (see `_clusters`).

    `descriptor_path` and `openapi_path` are where Envoy finds the files; the routes themselves
    come from the local build/todo.pb either way."""
    edge = edge or EdgeLimits()
    descriptor_set = openapi.load_descriptor_set()
    files = BUILD_DIR if target == "native" else Path(CONTAINER_CONFIG_DIR)
    descriptor_path = descriptor_path or str(files / "todo.pb")
    openapi_body = _openapi_body(settings, descriptor_set, target, openapi_path)
    listen_host = "127.0.0.1" if target == "native" else "0.0.0.0"
    ready_clusters = [GRPC_UPSTREAMS[name][0] for name in ready_services]
    connection_manager = _connection_manager(
        settings, edge, descriptor_set, descriptor_path, openapi_body, ready_clusters
    )
    listener = {
        "name": "gateway",
        "address": {"socket_address": {"address": listen_host, "port_value": settings.gateway_port}},
        "per_connection_buffer_limit_bytes": CONNECTION_BUFFER_BYTES,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": connection_manager}
                ],
                **_downstream_tls(settings),
            }
        ],
    }
    config = {
        "static_resources": {"listeners": [listener], "clusters": _clusters(settings, upstreams)},
        "overload_manager": {
            "resource_monitors": [
                {
                    # Envoy 1.40 registers the DownstreamConnectionsConfig monitor under this name.
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _typed(
                        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        max_active_downstream_connections=edge.max_connections,
                    ),
                }
            ]
        },
    }
    return with_observability(config, settings, target)


OTEL_CLUSTER = "opentelemetry_collector"
ADMIN_CLUSTER = "envoy_admin"
# In containers Prometheus (another container) scrapes this listener, which serves only
# /stats/prometheus from the admin; the admin itself stays on the container's loopback, since
# its other endpoints can drain or stop Envoy.
CONTAINER_STATS_PORT = 9902
# Envoy's OpenTelemetry tracer sends its spans every 5 s by default (or per 5 spans); 1 s keeps a
# trace's gateway span close behind the services' (they batch for at most 5 s, usually far less).
OTEL_FLUSH_INTERVAL_MS = 1000


def with_observability(config: dict[str, Any], settings: Settings, target: Target) -> dict[str, Any]:
    """The rendered bootstrap plus the admin on 127.0.0.1:ENVOY_ADMIN_PORT (0: none) and, with
    OTEL_EXPORTER_OTLP_ENDPOINT set, tracing: Envoy starts (or continues, from the client's
    `traceparent`) each request's trace, exports its span over OTLP/gRPC, and sends `traceparent`
    upstream, so every service's span is a child of the gateway's."""
    static = config["static_resources"]
    for cluster in static["clusters"]:
        # Prometheus tags are cut from stat names at dots: `todo.v1.TaskService` would become
        # envoy_cluster_name="todo" and a metric named envoy_cluster_v1_TaskService_...
        if "." in cluster["name"]:
            cluster["alt_stat_name"] = cluster["name"].replace(".", "_")
    if settings.envoy_admin_port:
        admin_address = {"socket_address": {"address": "127.0.0.1", "port_value": settings.envoy_admin_port}}
        config["admin"] = {"address": admin_address}
        if target == "docker":
            static["listeners"].append(_stats_listener())
            static["clusters"].append(_cluster(ADMIN_CLUSTER, "127.0.0.1", settings.envoy_admin_port, grpc=False))
    if settings.otel_exporter_otlp_endpoint:
        static["clusters"].append(_otel_cluster(settings.otel_exporter_otlp_endpoint))
        manager = static["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        manager["tracing"] = {
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": _typed(
                    "envoy.config.trace.v3.OpenTelemetryConfig",
                    grpc_service={"envoy_grpc": {"cluster_name": OTEL_CLUSTER}, "timeout": "2s"},
                    service_name="gateway",
                    sampler=_sampler(settings),
                ),
            }
        }
        # The tracer's sampler decides, not the x-request-id's bits, and the request id is left as
        # the client sent it (Envoy otherwise rewrites one of its digits).
        manager["request_id_extension"] = {
            "typed_config": _typed(
                "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                pack_trace_reason=False,
                use_request_id_for_trace_sampling=False,
            )
        }
        config["layered_runtime"] = {
            "layers": [
                {"name": "static", "static_layer": {"tracing.opentelemetry.flush_interval_ms": OTEL_FLUSH_INTERVAL_MS}}
            ]
        }
    return config


def _sampler(settings: Settings) -> dict[str, Any]:
    """The one sampling decision of a trace: a client's `traceparent` flag if it sent one, else
    TRACING_SAMPLE_PERCENT of trace ids. Envoy sends the outcome upstream in `traceparent`
    (without a sampler its flag says sampled even for requests it does not trace), and every
    service follows that flag."""
    percent = tracing.sample_percent(settings)
    by_trace_id = {
        "name": "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based",
        "typed_config": _typed(
            "envoy.extensions.tracers.opentelemetry.samplers.v3.TraceIdRatioBasedSamplerConfig",
            sampling_percentage={"numerator": round(percent * 10_000), "denominator": "MILLION"},
        ),
    }
    return {
        "name": "envoy.tracers.opentelemetry.samplers.parent_based",
        "typed_config": _typed(
            "envoy.extensions.tracers.opentelemetry.samplers.v3.ParentBasedSamplerConfig",
            wrapped_sampler=by_trace_id,
        ),
    }


def _otel_cluster(endpoint: str) -> dict[str, Any]:
    """The OTLP/gRPC collector at `endpoint` (http://host:port; https:// for TLS)."""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 4317
    cluster = _cluster(OTEL_CLUSTER, host, port, grpc=False)
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": {}},
        )
    }
    if parts.scheme == "https":
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _typed("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", sni=host),
        }
    return cluster


def _stats_listener() -> dict[str, Any]:
    """0.0.0.0:CONTAINER_STATS_PORT: GET /stats/prometheus from the admin; anything else 404."""
    routes = [
        {"match": {"path": "/stats/prometheus"}, "route": {"cluster": ADMIN_CLUSTER}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    manager = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="stats",
        route_config={"virtual_hosts": [{"name": "stats", "domains": ["*"], "routes": routes}]},
        http_filters=[
            {
                "name": "envoy.filters.http.router",
                "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
            }
        ],
    )
    return {
        "name": "stats",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": CONTAINER_STATS_PORT}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def write(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render Envoy's configuration from the settings (environment).")
    parser.add_argument("--target", choices=["native", "docker"], default="native")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--descriptor", help="path of todo.pb as Envoy sees it")
    parser.add_argument("--openapi", help="path of openapi.json as Envoy sees it")
    parser.add_argument(
        "--copy-assets",
        action="store_true",
        help="also put todo.pb and openapi.json (for PUBLIC_BASE_URL) beside --out",
    )
    args = parser.parse_args(argv)
    settings = Settings.load()
    config = render(settings, args.target, descriptor_path=args.descriptor, openapi_path=args.openapi)
    print(f"wrote {write(config, args.out)}")
    if args.copy_assets:  # the gateway-config job: Envoy's container reads all three from one volume
        shutil.copyfile(BUILD_DIR / "todo.pb", args.out.parent / "todo.pb")
        print(f"copied todo.pb to {args.out.parent}")
        # Written, not copied: its `servers` URL is this deployment's PUBLIC_BASE_URL.
        generated = openapi.generate(out=args.out.parent / "openapi.json", server_url=settings.public_base_url)
        print(f"wrote {generated}")


if __name__ == "__main__":
    main()
