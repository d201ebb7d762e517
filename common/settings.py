"""Settings from environment variables, each with a documented default.

`Settings.load()` reads the environment once; every service takes the fields it needs.
The README's settings table lists the same variables (a test keeps the two in step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def setting(env: str, default: Any, doc: str) -> Any:
    """A dataclass field read from the environment variable `env`."""
    return field(default=default, metadata={"env": env, "doc": doc})


@dataclass(frozen=True)
class Settings:
    state_dir: str = setting("STATE_DIR", ".state", "Folder for local state: SQLite files, the generated secret, logs.")
    log_level: str = setting("LOG_LEVEL", "INFO", "Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: str = setting("LOG_FORMAT", "json", "`json` (one object per line) or `text`.")

    # Where each gRPC service listens and where the others reach it.
    grpc_bind_host: str = setting(
        "GRPC_BIND_HOST", "127.0.0.1", "Interface the gRPC servers bind (0.0.0.0 in containers)."
    )
    task_service_addr: str = setting(
        "TASK_SERVICE_ADDR", "127.0.0.1:50051", "task_service's host:port; it listens on this port."
    )
    conversation_service_addr: str = setting(
        "CONVERSATION_SERVICE_ADDR", "127.0.0.1:50052", "conversation_service's host:port; it listens on this port."
    )
    agent_service_addr: str = setting(
        "AGENT_SERVICE_ADDR", "127.0.0.1:50053", "agent_service's host:port; it listens on this port."
    )
    grpc_shutdown_grace_seconds: float = setting(
        "GRPC_SHUTDOWN_GRACE_SECONDS", 10.0, "On SIGTERM, how long in-flight calls may finish."
    )

    # Databases: one per service.
    task_database_url: str = setting(
        "TASK_DATABASE_URL", "", "task_service's database; default `sqlite+aiosqlite:///$STATE_DIR/tasks.db`."
    )
    conversation_database_url: str = setting(
        "CONVERSATION_DATABASE_URL",
        "",
        "conversation_service's database; default `sqlite+aiosqlite:///$STATE_DIR/conversations.db`.",
    )
    task_database_migration_url: str = setting(
        "TASK_DATABASE_MIGRATION_URL",
        "",
        "Direct (unpooled) connection for task_service's migrations, when TASK_DATABASE_URL is a "
        "transaction-mode pooler (PgBouncer, Neon's `-pooler` host); empty = TASK_DATABASE_URL.",
    )
    conversation_database_migration_url: str = setting(
        "CONVERSATION_DATABASE_MIGRATION_URL",
        "",
        "Direct (unpooled) connection for conversation_service's migrations; empty = CONVERSATION_DATABASE_URL.",
    )
    database_pool_size: int = setting("DATABASE_POOL_SIZE", 10, "Connections per service process (PostgreSQL).")

    # Identity.
    better_auth_secret: str = setting(
        "BETTER_AUTH_SECRET", "", "Shared HS256 secret (Better Auth). `make up` creates one if unset."
    )
    auth_jwks_url: str = setting(
        "AUTH_JWKS_URL", "", "JWKS URL (EdDSA/RS256/ES256); when set, tokens are verified against it."
    )
    auth_issuer: str = setting("AUTH_ISSUER", "", "Required `iss` in JWKS mode, if set.")
    auth_audience: str = setting("AUTH_AUDIENCE", "", "Required `aud` in JWKS mode, if set.")
    auth_leeway_seconds: int = setting("AUTH_LEEWAY_SECONDS", 30, "Clock skew allowed on `exp`/`nbf`/`iat`.")
    auth_jwks_cache_seconds: int = setting("AUTH_JWKS_CACHE_SECONDS", 300, "How long fetched JWKS keys are cached.")
    auth_max_token_lifetime_seconds: int = setting(
        "AUTH_MAX_TOKEN_LIFETIME_SECONDS",
        86400,
        "Longest token lifetime accepted: `exp` - `iat` (or `exp` - now, without `iat`); 0 = no limit.",
    )
    auth_better_auth_url: str = setting(
        "AUTH_BETTER_AUTH_URL",
        "",
        "Better Auth's base URL (e.g. `http://127.0.0.1:3000`); when set, a bearer that is not a JWT is a "
        "session token, checked with `GET <url>/api/auth/get-session` (its `bearer` plugin).",
    )
    auth_session_cache_seconds: int = setting(
        "AUTH_SESSION_CACHE_SECONDS",
        30,
        "How long a Better Auth session check is remembered (never past the session's `expiresAt`): "
        "a signed-out session is refused at most this long after; 0 = ask every time.",
    )
    page_token_secret: str = setting(
        "PAGE_TOKEN_SECRET", "", "Key that signs page tokens; defaults to BETTER_AUTH_SECRET, else random per process."
    )

    # The model.
    llm_base_url: str = setting("LLM_BASE_URL", "", "OpenAI-compatible endpoint; empty uses the built-in model.")
    llm_api_key: str = setting("LLM_API_KEY", "", "API key for LLM_BASE_URL (any non-empty string for local servers).")
    llm_model: str = setting("LLM_MODEL", "gpt-4o-mini", "Model name sent to LLM_BASE_URL.")
    llm_timeout_seconds: float = setting("LLM_TIMEOUT_SECONDS", 60.0, "Timeout of one model request.")
    llm_max_retries: int = setting("LLM_MAX_RETRIES", 2, "Retries (with backoff) on 429, 5xx and timeouts.")
    agent_max_steps: int = setting("AGENT_MAX_STEPS", 8, "Model steps per chat turn before a polite stop.")
    agent_turn_timeout_seconds: float = setting(
        "AGENT_TURN_TIMEOUT_SECONDS",
        100.0,
        "Bound on a whole chat turn (all model steps and tools); the gateway's chat route allows 20 s more.",
    )
    agent_history_window: int = setting("AGENT_HISTORY_WINDOW", 20, "Earlier messages sent to the model each turn.")
    agent_max_tool_calls_per_step: int = setting(
        "AGENT_MAX_TOOL_CALLS_PER_STEP", 20, "Tool calls run from one model step; the rest become tool errors."
    )
    agent_max_tool_calls_per_turn: int = setting(
        "AGENT_MAX_TOOL_CALLS_PER_TURN", 50, "Tool calls run in one chat turn, all steps together."
    )
    agent_tool_concurrency: int = setting(
        "AGENT_TOOL_CONCURRENCY", 4, "Tool calls of one user that run at the same time, across all their turns."
    )
    agent_max_turns_in_progress: int = setting(
        "AGENT_MAX_TURNS_IN_PROGRESS",
        256,
        "Chat turns one agent process runs at once (waiting on the model included); the gateway "
        "answers 503 with Retry-After beyond this many per replica.",
    )
    agent_max_turns_per_user: int = setting(
        "AGENT_MAX_TURNS_PER_USER", 4, "Chat turns of one user in progress at once; more are 429 with Retry-After."
    )
    agent_admission_wait_seconds: float = setting(
        "AGENT_ADMISSION_WAIT_SECONDS",
        0.05,
        "How long a turn waits for a free slot when all are taken before it is refused (503, Retry-After).",
    )
    agent_http_host: str = setting("AGENT_HTTP_HOST", "127.0.0.1", "Interface of the agent's HTTP server (MCP).")
    agent_http_port: int = setting("AGENT_HTTP_PORT", 8001, "Port of the agent's HTTP server (MCP at /mcp).")
    mcp_allowed_hosts: str = setting(
        "MCP_ALLOWED_HOSTS",
        "127.0.0.1:*,localhost:*,[::1]:*",
        "Host headers the MCP endpoint accepts (comma-separated, `*` port wildcard).",
    )
    public_base_url: str = setting(
        "PUBLIC_BASE_URL", "http://127.0.0.1:8080", "The gateway's public URL (MCP metadata, the OpenAPI servers URL)."
    )

    # The gateway.
    gateway_port: int = setting("GATEWAY_PORT", 8080, "Port of the REST gateway (Envoy).")
    gateway_tls_cert: str = setting(
        "GATEWAY_TLS_CERT",
        "",
        "PEM certificate chain file; with GATEWAY_TLS_KEY the gateway serves HTTPS only (HTTP/2 and "
        "HTTP/1.1 by ALPN) on GATEWAY_PORT. Paths as Envoy sees them (in containers, the mounted file).",
    )
    gateway_tls_key: str = setting("GATEWAY_TLS_KEY", "", "PEM private key file of GATEWAY_TLS_CERT.")
    cors_allowed_origins: str = setting(
        "CORS_ALLOWED_ORIGINS", "http://localhost:3000", "Comma-separated origins allowed by CORS."
    )

    # Operations: metrics (common/metrics.py) and tracing (common/tracing.py), see OPERATIONS.md.
    task_metrics_port: int = setting(
        "TASK_METRICS_PORT",
        9101,
        "task_service's Prometheus `/metrics` port; 0 = off (its RPC metrics not recorded unless tracing is on).",
    )
    conversation_metrics_port: int = setting(
        "CONVERSATION_METRICS_PORT",
        9102,
        "conversation_service's Prometheus `/metrics` port; 0 = off (its RPC metrics not recorded unless tracing is on).",
    )
    agent_metrics_port: int = setting(
        "AGENT_METRICS_PORT",
        9103,
        "agent_service's Prometheus `/metrics` port; 0 = off (its RPC metrics not recorded unless tracing is on).",
    )
    metrics_bind_host: str = setting(
        "METRICS_BIND_HOST",
        "",
        "Interface the metrics ports bind; empty = GRPC_BIND_HOST. Never exposed by the gateway.",
    )
    envoy_admin_port: int = setting(
        "ENVOY_ADMIN_PORT", 9901, "Envoy's admin port on 127.0.0.1 (Prometheus at `/stats/prometheus`); 0 = no admin."
    )
    otel_exporter_otlp_endpoint: str = setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "",
        "OTLP/gRPC collector for traces (e.g. `http://127.0.0.1:4317`); empty = tracing off, at no cost.",
    )
    tracing_sample_percent: float = setting(
        "TRACING_SAMPLE_PERCENT",
        1.0,
        "Share of requests traced, decided once at Envoy (a trace has all its hops or none; a "
        "client's sampled `traceparent` is always followed, so one request can be traced on "
        "demand); 100 = every request. A traced chat turn costs about 2.5-5 ms more CPU, so 1 % "
        "adds about 0.04 ms per turn beside the unsampled tracing cost (bench/NOTES.md); every log "
        "line has the trace id either way.",
    )

    # Per-user rate limits (common/ratelimit.py).
    rate_limit_writes_per_minute: int = setting(
        "RATE_LIMIT_WRITES_PER_MINUTE",
        120,
        "Writes per user per minute: task create/update/complete/delete, undo, settings, and the "
        "conversations and messages a client records itself; 0 = off.",
    )
    rate_limit_reads_per_minute: int = setting(
        "RATE_LIMIT_READS_PER_MINUTE",
        600,
        "Task and conversation reads (get/list tasks, conversations, messages) per user per minute; 0 = off.",
    )
    rate_limit_chat_per_minute: int = setting(
        "RATE_LIMIT_CHAT_PER_MINUTE", 30, "Chat turns per user per minute; 0 = off."
    )
    rate_limit_redis_url: str = setting(
        "RATE_LIMIT_REDIS_URL",
        "",
        "Redis holding the budgets, shared by all replicas (e.g. `redis://127.0.0.1:6379/0`); empty = per process. "
        "If Redis is unreachable, requests are let through (fail open) and a warning is logged.",
    )
    rate_limit_key_prefix: str = setting(
        "RATE_LIMIT_KEY_PREFIX", "todo:ratelimit:", "Prefix of the rate-limit keys in Redis."
    )

    @classmethod
    def load(cls, environ: dict[str, str] | None = None) -> Settings:
        """Read every setting from `environ` (default: os.environ), converting to the field's type."""
        environ = dict(os.environ) if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = environ.get(spec.metadata["env"])
            if raw is None:
                continue
            values[spec.name] = _convert(raw, type(spec.default), spec.metadata["env"])
        return cls(**values)

    def database_url(self, service: str) -> str:
        """The service's database URL; a SQLite file under STATE_DIR unless configured."""
        configured = {"task": self.task_database_url, "conversation": self.conversation_database_url}[service]
        if configured:
            return configured
        filename = {"task": "tasks.db", "conversation": "conversations.db"}[service]
        return f"sqlite+aiosqlite:///{Path(self.state_dir).resolve() / filename}"


def _convert(raw: str, kind: type, env: str) -> Any:
    try:
        return kind(raw)
    except ValueError as error:
        raise SystemExit(f"setting {env}={raw!r} is not a valid {kind.__name__}") from error


def port_of(addr: str) -> int:
    """The port of a host:port address."""
    return int(addr.rsplit(":", 1)[1])


def env_name(field_name: str) -> str:
    """The environment variable of a Settings field ("gateway_port" -> "GATEWAY_PORT")."""
    return str(Settings.__dataclass_fields__[field_name].metadata["env"])


def documented_settings() -> list[tuple[str, Any, str]]:
    """(variable, default, description) for every setting, for docs and tests."""
    return [(spec.metadata["env"], spec.default, spec.metadata["doc"]) for spec in fields(Settings)]
