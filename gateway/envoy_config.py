"""The one source of Envoy's configuration, rendered for a native run or for containers.

`render(settings, target=...)` builds the bootstrap as a dict; `write(...)` dumps it as YAML.
Native: listens on 127.0.0.1:GATEWAY_PORT, upstreams from *_SERVICE_ADDR, files under build/.
Docker: listens on 0.0.0.0:8080 (GATEWAY_PORT), upstreams by service DNS name, files under
CONTAINER_CONFIG_DIR (a volume the `gateway-config` container fills).

What the gateway does, in filter order:
1. CORS (policy on the virtual host; a catch-all route so preflights of any path match).
2. /readyz: the health_check filter answers 200 only while every required gRPC cluster is
   healthy by active gRPC health checks (1 s interval, one failure marks a host unhealthy).
3. A 1 MiB request body limit (413).
4. The gRPC-JSON transcoder over the descriptor set: REST -> gRPC path, which the routes
   then match by service prefix; gRPC statuses become HTTP statuses with a JSON
   google.rpc.Status body. Unknown paths, query parameters and body/path collisions are 400/404.
5. The router: per-route timeouts; /mcp and /.well-known/ go to the agent's HTTP server.
Envoy's own replies (404, 413, 503, ...) get the same JSON error shape via local_reply_config.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from common.settings import Settings

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
# All request headers, in KiB: above it Envoy answers 431. Kept well under the services' gRPC
# metadata limit (16 KiB, common/server.py; the transcoder also copies the path into
# x-envoy-original-path), which gRPC would otherwise enforce as RESOURCE_EXHAUSTED, i.e. a 429.
MAX_REQUEST_HEADERS_KB = 8
# gRPC metadata keys are [0-9a-z_.-] and `-bin` values must be base64; grpc-core fails the whole
# call (a 500) on any other header a REST client may legally send, and on a malformed
# `grpc-timeout`. So, for requests the transcoder turns into gRPC calls, such headers are dropped.
# Native gRPC requests (content-type application/grpc*) pass untouched.
SANITIZE_HEADERS_LUA = """
function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local content_type = headers:get("content-type") or ""
  if string.sub(content_type, 1, 16) == "application/grpc" then
    return
  end
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
"""
MAX_CONNECTIONS = 10000  # downstream; beyond it Envoy refuses new connections instead of exhausting fds
UPSTREAM_MAX_REQUESTS = 20000  # in flight per upstream cluster
MAX_DIRECT_RESPONSE_BYTES = 4 * 1024 * 1024  # /openapi.json
DEFAULT_TIMEOUT = "15s"
CHAT_TIMEOUT_MARGIN_SECONDS = 20  # beyond AGENT_TURN_TIMEOUT_SECONDS: the agent answers first, with its own error
STREAM_IDLE_TIMEOUT = "300s"
HEALTH_CHECK_INTERVAL = "1s"

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


def _cluster(name: str, host: str, port: int, *, grpc: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "2s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}
            ],
        },
    }
    # Envoy's default circuit breakers allow 1,024 requests in flight per upstream and turn
    # the rest into 503s; our services queue and bound their own work, so admit far more
    # (MAX_CONNECTIONS above still bounds what reaches Envoy).
    cluster["circuit_breakers"] = {
        "thresholds": [
            {
                "max_connections": UPSTREAM_MAX_REQUESTS,
                "max_pending_requests": UPSTREAM_MAX_REQUESTS,
                "max_requests": UPSTREAM_MAX_REQUESTS,
                "max_retries": 3,
            }
        ]
    }
    if grpc:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
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


def _clusters(settings: Settings) -> list[dict[str, Any]]:
    clusters = []
    for cluster_name, field_name in GRPC_UPSTREAMS.values():
        host, port = _host_port(getattr(settings, field_name))
        clusters.append(_cluster(cluster_name, host, port, grpc=True))
    agent_host, _ = _host_port(settings.agent_service_addr)
    clusters.append(_cluster(AGENT_HTTP_CLUSTER, agent_host, settings.agent_http_port, grpc=False))
    clusters.append({"name": UNROUTED_CLUSTER, "type": "STATIC", "connect_timeout": "1s"})
    return clusters


def _no_transcoding() -> dict[str, Any]:
    return {
        "envoy.filters.http.grpc_json_transcoder": _typed("envoy.config.route.v3.FilterConfig", disabled=True),
    }


def _json_response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"status": status, "body": {"inline_string": json.dumps(body)}}


def _routes(openapi_path: str, chat_timeout: str) -> list[dict[str, Any]]:
    task, conversation, agent = (GRPC_UPSTREAMS[name][0] for name in ("task", "conversation", "agent"))
    json_header = [
        {
            "header": {"key": "content-type", "value": "application/json"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]
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
            "direct_response": {"status": 200, "body": {"filename": openapi_path}},
            "response_headers_to_add": json_header,
            "typed_per_filter_config": _no_transcoding(),
        },
        # After transcoding, requests carry the gRPC path; these match it.
        {
            "name": "chat_stream",
            "match": {"path": f"/{agent}/ChatStream"},
            "route": {"cluster": agent, "timeout": "0s", "idle_timeout": STREAM_IDLE_TIMEOUT},
        },
        {"name": "agent", "match": {"prefix": f"/{agent}/"}, "route": {"cluster": agent, "timeout": chat_timeout}},
        {"name": "task", "match": {"prefix": f"/{task}/"}, "route": {"cluster": task, "timeout": DEFAULT_TIMEOUT}},
        {
            "name": "conversation",
            "match": {"prefix": f"/{conversation}/"},
            "route": {"cluster": conversation, "timeout": DEFAULT_TIMEOUT},
        },
        # MCP streamable HTTP: a long-lived response stream, so no route timeout.
        {
            "name": "mcp",
            "match": {"prefix": "/mcp"},
            "route": {"cluster": AGENT_HTTP_CLUSTER, "timeout": "0s", "idle_timeout": STREAM_IDLE_TIMEOUT},
            "typed_per_filter_config": _no_transcoding(),
        },
        {
            "name": "well_known",
            "match": {"prefix": "/.well-known/"},
            "route": {"cluster": AGENT_HTTP_CLUSTER, "timeout": DEFAULT_TIMEOUT},
            "typed_per_filter_config": _no_transcoding(),
        },
        # Everything else. The CORS filter answers preflights only on a route with a route
        # entry, so the catch-all is one; REST requests never get here (the transcoder turns
        # them into gRPC paths above, or refuses unknown ones with 404), nor do preflights
        # (the CORS filter answers them), so its cluster has no endpoints: 503 for any gRPC call.
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


def _http_filters(descriptor_path: str, ready_clusters: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"name": "envoy.filters.http.cors", "typed_config": _typed("envoy.extensions.filters.http.cors.v3.Cors")},
        {
            "name": "envoy.filters.http.health_check",
            "typed_config": _typed(
                "envoy.extensions.filters.http.health_check.v3.HealthCheck",
                pass_through_mode=False,
                headers=[{"name": ":path", "string_match": {"exact": "/readyz"}}],
                cluster_min_healthy_percentages={name: {"value": 100} for name in ready_clusters},
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
                default_source_code={"inline_string": SANITIZE_HEADERS_LUA},
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
    return {"mappers": [*readyz, *errors]}


def _access_log() -> list[dict[str, Any]]:
    fields = {
        "ts": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
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
                "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", log_format={"json_format": fields}
            ),
        }
    ]


def render(
    settings: Settings,
    target: Target = "native",
    *,
    descriptor_path: str | None = None,
    openapi_path: str | None = None,
    ready_services: Sequence[str] = ("task", "conversation", "agent"),
) -> dict[str, Any]:
    """The Envoy bootstrap for `target`; /readyz requires the clusters of `ready_services`."""
    files = BUILD_DIR if target == "native" else Path(CONTAINER_CONFIG_DIR)
    descriptor_path = descriptor_path or str(files / "todo.pb")
    openapi_path = openapi_path or str(files / "openapi.json")
    listen_host = "127.0.0.1" if target == "native" else "0.0.0.0"
    ready_clusters = [GRPC_UPSTREAMS[name][0] for name in ready_services]
    connection_manager = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="gateway",
        codec_type="AUTO",
        use_remote_address=True,
        max_request_headers_kb=MAX_REQUEST_HEADERS_KB,
        generate_request_id=True,
        preserve_external_request_id=True,
        always_set_request_id_in_response=True,
        stream_idle_timeout=STREAM_IDLE_TIMEOUT,
        access_log=_access_log(),
        local_reply_config=_local_reply_config(),
        route_config={
            "name": "gateway",
            "max_direct_response_body_size_bytes": MAX_DIRECT_RESPONSE_BYTES,
            "virtual_hosts": [
                {
                    "name": "api",
                    "domains": ["*"],
                    "routes": _routes(openapi_path, _chat_timeout(settings)),
                    "typed_per_filter_config": {"envoy.filters.http.cors": _cors_policy(settings)},
                }
            ],
        },
        http_filters=_http_filters(descriptor_path, ready_clusters),
    )
    listener = {
        "name": "gateway",
        "address": {"socket_address": {"address": listen_host, "port_value": settings.gateway_port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": connection_manager}]}
        ],
    }
    return {
        "static_resources": {"listeners": [listener], "clusters": _clusters(settings)},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _typed(
                        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        max_active_downstream_connections=MAX_CONNECTIONS,
                    ),
                }
            ]
        },
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
        "--copy-assets", action="store_true", help="also copy build/todo.pb and build/openapi.json beside --out"
    )
    args = parser.parse_args(argv)
    config = render(Settings.load(), args.target, descriptor_path=args.descriptor, openapi_path=args.openapi)
    print(f"wrote {write(config, args.out)}")
    if args.copy_assets:  # the gateway-config job: Envoy's container reads all three from one volume
        for asset in ("todo.pb", "openapi.json"):
            shutil.copyfile(BUILD_DIR / asset, args.out.parent / asset)
            print(f"copied {asset} to {args.out.parent}")


if __name__ == "__main__":
    main()
