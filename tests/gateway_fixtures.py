"""The real stack behind real Envoy, for end-to-end tests over HTTP (reusable by any suite).

    from tests.gateway_fixtures import Gateway, start_gateway

    @pytest.fixture(scope="module")
    def gateway(tmp_path_factory, database_url_factory):
        with start_gateway(tmp_path_factory, database_url_factory, "sqlite", services=["task"]) as gw:
            yield gw

    reply = gateway.call("POST", "/api/alice/tasks", user="alice", body={"title": "milk"})
    assert reply.status == 200 and reply.json()["id"] == 1

`Gateway.stack` is the scripts.stack.Stack: `gateway.stack.component("task").stop()` etc.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from scripts.stack import Stack, available_services
from tests.support import SECRET, free_port, token

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        return f"Reply({self.status}, {self.body[:500]!r})"


@dataclass
class Gateway:
    stack: Stack
    base_url: str
    env: dict[str, str]

    def token(self, user_id: str, **claims: Any) -> str:
        return token(user_id, **claims)

    def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = None,
        bearer: str | None = None,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> Reply:
        """One HTTP request; `user` sends a valid token for that user, `bearer` a given token."""
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if user is not None:
            bearer = self.token(user)
        if bearer is not None:
            all_headers["Authorization"] = f"Bearer {bearer}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Reply(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            return Reply(error.code, error.headers, error.read())


# For suites that send far more requests per user than any sane limit (fuzzing, soak, abuse).
NO_RATE_LIMITS = {
    "RATE_LIMIT_WRITES_PER_MINUTE": "0",
    "RATE_LIMIT_READS_PER_MINUTE": "0",
    "RATE_LIMIT_CHAT_PER_MINUTE": "0",
}


def free_ports_env() -> dict[str, str]:
    """Every listening port of a stack (gateway, three gRPC services, the agent's HTTP, the metrics
    ports, Envoy's admin) on a free loopback port."""
    gateway_port = free_port()
    return {
        "GATEWAY_PORT": str(gateway_port),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{gateway_port}",
        "TASK_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "CONVERSATION_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "AGENT_SERVICE_ADDR": f"127.0.0.1:{free_port()}",
        "AGENT_HTTP_PORT": str(free_port()),
        "TASK_METRICS_PORT": str(free_port()),
        "CONVERSATION_METRICS_PORT": str(free_port()),
        "AGENT_METRICS_PORT": str(free_port()),
        "ENVOY_ADMIN_PORT": str(free_port()),
    }


def gateway_env(database_urls: dict[str, str], state_dir: Path) -> dict[str, str]:
    """Settings for a private stack: free loopback ports, the test secret, the given databases."""
    return {
        "BETTER_AUTH_SECRET": SECRET,
        "STATE_DIR": str(state_dir),
        **free_ports_env(),
        "GRPC_SHUTDOWN_GRACE_SECONDS": "3",
        "LOG_FORMAT": "json",
        "TASK_DATABASE_URL": database_urls.get("task", ""),
        "CONVERSATION_DATABASE_URL": database_urls.get("conversation", ""),
        "CORS_ALLOWED_ORIGINS": "http://localhost:3000,https://app.example.com",
    }


@contextmanager
def start_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    database_url_factory: Callable[[str, str], str],
    backend: str,
    services: Sequence[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Gateway]:
    """Start `services` (default: every one that exists) and Envoy; stop them afterwards.

    Needs build/todo.pb and build/openapi.json (`make protos`)."""
    services = list(services) if services is not None else available_services()
    work_dir = tmp_path_factory.mktemp(f"gateway-{backend}")
    databases = {name: database_url_factory(backend, name) for name in services if name in ("task", "conversation")}
    env = {**gateway_env(databases, work_dir / "state"), **(extra_env or {})}
    (work_dir / "state").mkdir()
    stack = Stack(env, work_dir=work_dir, services=services)
    stack.start(timeout=120)
    try:
        yield Gateway(stack=stack, base_url=stack.base_url, env=env)
    finally:
        stack.stop()


def collect(gateway: Gateway, user: str, path: str, key: str) -> list[Any]:
    """Every item of a paginated list endpoint (`key`: "tasks", "conversations", "messages")."""
    items: list[Any] = []
    page_token = ""
    separator = "&" if "?" in path else "?"
    while True:
        reply = gateway.call("GET", f"{path}{separator}page_size=100&page_token={page_token}", user=user)
        assert reply.status == 200, reply
        body = reply.json()
        items.extend(body[key])
        page_token = body["next_page_token"]
        if not page_token:
            return items
