"""Better Auth session tokens (AUTH_BETTER_AUTH_URL) against a real Better Auth server.

tests/better_auth_server/server.mjs runs the `better-auth` npm package under Node (email and
password, the `bearer` and `jwt` plugins, SQLite in a temp folder, migrated at start); the first
run installs it (`npm ci`) when node_modules is missing. Node and npm are required: without them
these tests fail (.ci/run installs Debian's nodejs and npm when absent).

- In process: common.auth.TokenVerifier with HS256 + sessions and with JWKS (Better Auth's own
  /api/auth/jwks) + sessions, against the real server; SessionVerifier's answers to what Better
  Auth may say (null, 401, 5xx, garbage, slow, gone), its cache bound (AUTH_SESSION_CACHE_SECONDS,
  never past `expiresAt`) and one request for concurrent checks of a token.
- Through Envoy (the whole stack, HS256 + sessions): sign up, sign in (`set-auth-token`), the
  session token over REST, chat (the agent forwards it to task_service, which checks it again),
  MCP and ChatKit; HS256 tokens beside it; another user's session on A's path: 403; a garbage
  session token: 401; sign-out: refused within the cache bound; Better Auth stopped: 503 with
  Retry-After on REST, MCP and ChatKit, and back to 200 once it is up again.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2
import pytest
from chatkit.types import ThreadListParams, ThreadsListReq

from common.auth import TokenVerifier
from common.better_auth import SessionServiceUnavailable, SessionVerifier, is_jwt
from common.errors import Unauthenticated
from common.settings import Settings
from tests.gateway_fixtures import Gateway, start_gateway
from tests.support import ROOT, SECRET, free_port, token
from tests.test_mcp import mcp_session, structured

SERVER_DIR = ROOT / "tests" / "better_auth_server"
CACHE_SECONDS = 2
PASSWORD = "correct horse battery staple"
NPM_CI_TIMEOUT_SECONDS = 900


def install_server() -> None:
    """`npm ci` in tests/better_auth_server when its node_modules is missing (the first run)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node 20 and npm are needed for the Better Auth tests (.ci/run installs them)"
    native = SERVER_DIR / "node_modules" / "better-sqlite3" / "build" / "Release" / "better_sqlite3.node"
    if (SERVER_DIR / "node_modules" / "better-auth").is_dir() and native.is_file():
        return
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=SERVER_DIR,
        capture_output=True,
        text=True,
        timeout=NPM_CI_TIMEOUT_SECONDS,
    )
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


class BetterAuth:
    """The real Better Auth server as a Node process (restartable on the same port and database)."""

    def __init__(self, work_dir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "DATABASE_PATH": str(work_dir / "better-auth.db"),
            "BETTER_AUTH_SECRET": secrets.token_hex(32),
            "BETTER_AUTH_TELEMETRY": "0",
            "NODE_ENV": "test",
        }
        self.log_path = work_dir / "better-auth.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx2.Client(base_url=self.base_url, timeout=10, trust_env=False)
        self.emails: dict[str, str] = {}  # user id -> email, to sign in again

    def start(self, timeout: float = 60) -> BetterAuth:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            ["node", "server.mjs"], cwd=SERVER_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Better Auth exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if self.http.get("/healthz", timeout=1).status_code == 200:
                    return self
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"Better Auth did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def sign_up(self, name: str) -> tuple[str, str]:
        """A new user; returns (session token, user id)."""
        email = f"{name}-{uuid.uuid4().hex[:8]}@example.com"
        reply = self.http.post("/api/auth/sign-up/email", json={"email": email, "password": PASSWORD, "name": name})
        assert reply.status_code == 200, reply.text
        user_id = reply.json()["user"]["id"]
        self.emails[user_id] = email
        return reply.headers["set-auth-token"], user_id

    def sign_in(self, user_id: str) -> str:
        reply = self.http.post("/api/auth/sign-in/email", json={"email": self.emails[user_id], "password": PASSWORD})
        assert reply.status_code == 200, reply.text
        assert reply.json()["user"]["id"] == user_id
        return str(reply.headers["set-auth-token"])

    def sign_out(self, session_token: str) -> None:
        reply = self.http.post("/api/auth/sign-out", json={}, headers={"Authorization": f"Bearer {session_token}"})
        assert reply.status_code == 200 and reply.json() == {"success": True}, reply.text

    def jwt(self, session_token: str) -> str:
        """Better Auth's own JWT (the jwt plugin: EdDSA, 15 minutes) for a session."""
        reply = self.http.get("/api/auth/token", headers={"Authorization": f"Bearer {session_token}"})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["token"])


@pytest.fixture(scope="module")
def better_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BetterAuth]:
    install_server()
    server = BetterAuth(tmp_path_factory.mktemp("better-auth")).start()
    try:
        yield server
    finally:
        server.stop()
        server.http.close()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    database_url_factory: Callable[[str, str], str],
    better_auth: BetterAuth,
) -> Iterator[Gateway]:
    extra_env = {"AUTH_BETTER_AUTH_URL": better_auth.base_url, "AUTH_SESSION_CACHE_SECONDS": str(CACHE_SECONDS)}
    with start_gateway(
        tmp_path_factory, database_url_factory, "sqlite", ["task", "conversation", "agent"], extra_env
    ) as gw:
        yield gw


# --- in process: the verifier against the real server ------------------------------------


def verifier(**env: str) -> TokenVerifier:
    return TokenVerifier(Settings.load(env))


async def test_hs256_and_session_tokens_side_by_side(better_auth: BetterAuth) -> None:
    session, user_id = better_auth.sign_up("side")
    assert session.count(".") == 1 and not is_jwt(session)  # `<token>.<signature>`
    check = verifier(BETTER_AUTH_SECRET=SECRET, AUTH_BETTER_AUTH_URL=better_auth.base_url)
    assert await check.verify(session) == user_id
    assert await check.verify(token("hs-user")) == "hs-user"
    with pytest.raises(Unauthenticated):
        await check.verify(token("hs-user", secret="another-secret-" + "y" * 32))
    with pytest.raises(Unauthenticated):
        await check.verify(session[:-4] + "AAA=")  # a forged signature: Better Auth says null


async def test_jwks_and_session_tokens_side_by_side(better_auth: BetterAuth) -> None:
    session, user_id = better_auth.sign_up("jwks")
    check = verifier(
        AUTH_JWKS_URL=better_auth.base_url + "/api/auth/jwks",
        AUTH_ISSUER=better_auth.base_url,
        AUTH_AUDIENCE=better_auth.base_url,
        AUTH_BETTER_AUTH_URL=better_auth.base_url,
    )
    assert await check.verify(better_auth.jwt(session)) == user_id  # EdDSA JWT, by the JWKS
    assert await check.verify(session) == user_id  # the session token, by Better Auth
    with pytest.raises(Unauthenticated):
        await check.verify(token(user_id))  # HS256 is not accepted in JWKS mode


async def test_sessions_only_refuse_every_jwt(better_auth: BetterAuth) -> None:
    session, user_id = better_auth.sign_up("only")
    check = verifier(AUTH_BETTER_AUTH_URL=better_auth.base_url)
    assert await check.verify(session) == user_id
    with pytest.raises(Unauthenticated):
        await check.verify(token(user_id))


async def test_a_signed_out_session_is_refused_once_the_cache_bound_passes(better_auth: BetterAuth) -> None:
    session, user_id = better_auth.sign_up("out")
    check = SessionVerifier(better_auth.base_url, cache_seconds=1)
    assert await check.verify(session) == user_id
    better_auth.sign_out(session)
    assert await check.verify(session) == user_id  # remembered, at most the cache bound
    await asyncio.sleep(1.2)
    with pytest.raises(Unauthenticated):
        await check.verify(session)
    await check.close()


# --- in process: what Better Auth may answer (a scripted transport) ----------------------


def session_body(user_id: str = "u1", expires_in: float = 3600) -> dict[str, Any]:
    expires = (datetime.now(UTC) + timedelta(seconds=expires_in)).isoformat().replace("+00:00", "Z")
    return {"session": {"expiresAt": expires, "userId": user_id, "token": "t"}, "user": {"id": user_id}}


def scripted(answer: Callable[[httpx2.Request], httpx2.Response]) -> tuple[SessionVerifier, list[httpx2.Request]]:
    seen: list[httpx2.Request] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return answer(request)

    return SessionVerifier("http://better-auth.test/", 30, transport=httpx2.MockTransport(handle)), seen


async def test_the_request_is_get_session_with_the_bearer_and_the_user_is_user_id() -> None:
    check, seen = scripted(lambda request: httpx2.Response(200, json=session_body("the-user")))
    assert await check.verify("abc.de+f/g=") == "the-user"
    assert str(seen[0].url) == "http://better-auth.test/api/auth/get-session"
    assert seen[0].method == "GET" and seen[0].headers["authorization"] == "Bearer abc.de+f/g="


@pytest.mark.parametrize(
    "answer",
    [
        httpx2.Response(200, content=b"null"),
        httpx2.Response(401, json={"message": "Unauthorized"}),
        httpx2.Response(403),
        httpx2.Response(200, json=session_body(expires_in=-5)),
        httpx2.Response(200, json={"session": {"expiresAt": "soon"}, "user": {"id": "u1"}}),
        httpx2.Response(200, json={**session_body(), "user": {"id": ""}}),
        httpx2.Response(200, json={**session_body(), "user": {"id": "a\nb"}}),
    ],
)
async def test_no_session_is_unauthenticated(answer: httpx2.Response) -> None:
    check, _ = scripted(lambda request: answer)
    with pytest.raises(Unauthenticated):
        await check.verify("abc.def")


@pytest.mark.parametrize(
    "answer",
    [
        httpx2.Response(500),
        httpx2.Response(502, text="bad gateway"),
        httpx2.Response(429),
        httpx2.Response(404),
        httpx2.Response(200, text="<html>"),
        httpx2.Response(200, json={"session": None, "user": None}),
        httpx2.Response(200, json=[1, 2]),
    ],
)
async def test_no_answer_is_unavailable_with_a_retry_hint(answer: httpx2.Response) -> None:
    check, _ = scripted(lambda request: answer)
    with pytest.raises(SessionServiceUnavailable) as refused:
        await check.verify("abc.def")
    assert refused.value.retry_after_seconds == 5


async def test_better_auth_gone_or_slow_is_unavailable() -> None:
    gone = SessionVerifier(f"http://127.0.0.1:{free_port()}", 30)
    with pytest.raises(SessionServiceUnavailable):
        await gone.verify("abc.def")

    def slow(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("slow", request=request)

    check, _ = scripted(slow)
    with pytest.raises(SessionServiceUnavailable):
        await check.verify("abc.def")


async def test_answers_are_cached_never_past_expires_at_and_refusals_not_at_all() -> None:
    expiring = session_body("u1", expires_in=1)  # the same session each time it is asked about
    check, seen = scripted(lambda request: httpx2.Response(200, json=expiring))
    assert await check.verify("abc.def") == "u1"
    assert await check.verify("abc.def") == "u1"
    assert len(seen) == 1
    await asyncio.sleep(1.1)  # the session's expiresAt has passed, well within the 30 s cache
    with pytest.raises(Unauthenticated):
        await check.verify("abc.def")  # asked again: the session has expired
    assert len(seen) == 2

    refusing, asked = scripted(lambda request: httpx2.Response(200, content=b"null"))
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await refusing.verify("abc.def")
    assert len(asked) == 2


async def test_concurrent_checks_of_one_token_share_one_request() -> None:
    async def answer(request: httpx2.Request) -> httpx2.Response:
        await asyncio.sleep(0.05)
        return httpx2.Response(200, json=session_body("u1"))

    seen: list[httpx2.Request] = []

    async def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return await answer(request)

    check = SessionVerifier("http://better-auth.test", 30, transport=httpx2.MockTransport(handle))
    assert await asyncio.gather(*(check.verify("abc.def") for _ in range(10))) == ["u1"] * 10
    assert len(seen) == 1


async def test_jwts_and_strange_tokens_never_reach_better_auth() -> None:
    seen: list[httpx2.Request] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json=session_body("u1"))

    check = verifier(BETTER_AUTH_SECRET=SECRET, AUTH_BETTER_AUTH_URL="http://better-auth.test")
    check._sessions = SessionVerifier("http://better-auth.test", 30, transport=httpx2.MockTransport(handle))
    assert await check.verify(token("jwt-user")) == "jwt-user"  # three parts: a JWT, verified here
    with pytest.raises(Unauthenticated):
        await check.verify("a.b.c")  # JWT-shaped: PyJWT refuses it, Better Auth is not asked
    for strange in ("abc def", 'abc"def', "abc\\def", "x" * 9000):
        with pytest.raises(Unauthenticated):
            await check.verify(strange)
    assert seen == []
    assert await check.verify("abc%2Bdef.ghi%3D") == "u1"  # percent-encoded, as cookies carry it
    assert len(seen) == 1


# --- through Envoy: the whole stack with session tokens ----------------------------------


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def test_sign_up_sign_in_and_use_the_session_token_over_rest(gateway: Gateway, better_auth: BetterAuth) -> None:
    _, user_id = better_auth.sign_up("rest")
    session = better_auth.sign_in(user_id)
    made = gateway.call("POST", f"/api/{user_id}/tasks", bearer=session, body={"title": "via a session"})
    assert made.status == 200, made
    listed = gateway.call("GET", f"/api/{user_id}/tasks", bearer=session)
    assert listed.status == 200, listed
    assert [task["title"] for task in listed.json()["tasks"]] == ["via a session"]
    # HS256 tokens keep working beside sessions, in every service: the same user's data.
    assert gateway.call("GET", f"/api/{user_id}/tasks", user=user_id).json() == listed.json()


def test_another_users_session_on_my_path_is_403(gateway: Gateway, better_auth: BetterAuth) -> None:
    _, alice = better_auth.sign_up("alice")
    bob_session, _ = better_auth.sign_up("bob")
    for method, path, body in (
        ("GET", f"/api/{alice}/tasks", None),
        ("POST", f"/api/{alice}/tasks", {"title": "not mine"}),
        ("POST", f"/api/{alice}/chat", {"message": "add a task to steal"}),
    ):
        reply = gateway.call(method, path, bearer=bob_session, body=body)
        assert reply.status == 403, (path, reply)
    assert gateway.call("GET", f"/api/{alice}/tasks", user=alice).json()["tasks"] == []


def test_a_garbage_session_token_is_401_everywhere(gateway: Gateway) -> None:
    rest = gateway.call("GET", "/api/someone/tasks", bearer="bm90LmE.c2Vzc2lvbg==")
    assert rest.status == 401, rest
    assert rest.headers["www-authenticate"].startswith("Bearer")
    mcp = httpx2.post(
        gateway.base_url + "/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
        headers={**bearer("bm90LmE.c2Vzc2lvbg=="), "Accept": "application/json, text/event-stream"},
        timeout=10,
    )
    assert mcp.status_code == 401, mcp.text
    chatkit = httpx2.post(
        gateway.base_url + "/chatkit",
        content=ThreadsListReq(params=ThreadListParams()).model_dump_json(),
        headers=bearer("bm90LmE.c2Vzc2lvbg=="),
        timeout=10,
    )
    assert chatkit.status_code == 401, chatkit.text


def test_chat_mcp_and_chatkit_with_a_session_token(gateway: Gateway, better_auth: BetterAuth) -> None:
    session, user_id = better_auth.sign_up("chat")
    # Chat: the agent forwards the session token to task_service, which checks it again.
    reply = gateway.call("POST", f"/api/{user_id}/chat", bearer=session, body={"message": "add a task to buy milk"})
    assert reply.status == 200, reply
    calls = reply.json()["tool_calls"]
    assert [call["name"] for call in calls] == ["add_task"] and "error" not in calls[0], calls

    async def over_mcp() -> list[str]:
        async with mcp_session(gateway.base_url + "/mcp", session) as mcp:
            structured(await mcp.call_tool("add_task", {"title": "via MCP"}))
            listed = structured(await mcp.call_tool("list_tasks", {}))
            return [task["title"] for task in listed["tasks"]]

    assert [title.lower() for title in asyncio.run(over_mcp())] == ["buy milk", "via mcp"]

    chatkit = httpx2.post(
        gateway.base_url + "/chatkit",
        content=ThreadsListReq(params=ThreadListParams()).model_dump_json(),
        headers=bearer(session),
        timeout=10,
    )
    assert chatkit.status_code == 200, chatkit.text
    assert [thread["id"] for thread in json.loads(chatkit.text)["data"]] == ["thr_1"]  # the chat's conversation


def test_sign_out_is_refused_within_the_cache_bound(gateway: Gateway, better_auth: BetterAuth) -> None:
    session, user_id = better_auth.sign_up("leaving")
    assert gateway.call("GET", f"/api/{user_id}/tasks", bearer=session).status == 200
    better_auth.sign_out(session)
    signed_out = time.monotonic()
    while True:
        reply = gateway.call("GET", f"/api/{user_id}/tasks", bearer=session)
        if reply.status == 401:
            break
        assert reply.status == 200, reply
        assert time.monotonic() - signed_out < CACHE_SECONDS + 1.5, "a signed-out session still works"
        time.sleep(0.2)
    assert time.monotonic() - signed_out < CACHE_SECONDS + 1.5


def test_better_auth_down_is_503_with_retry_after_then_it_recovers(gateway: Gateway, better_auth: BetterAuth) -> None:
    _, user_id = better_auth.sign_up("outage")
    session = better_auth.sign_in(user_id)  # never used yet: nothing remembers it
    better_auth.stop()
    try:
        rest = gateway.call("GET", f"/api/{user_id}/tasks", bearer=session)
        assert rest.status == 503, rest
        assert rest.headers["retry-after"] == "5"
        mcp = httpx2.post(
            gateway.base_url + "/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
            headers={**bearer(session), "Accept": "application/json, text/event-stream"},
            timeout=10,
        )
        assert mcp.status_code == 503 and mcp.headers["retry-after"] == "5", mcp.text
        chatkit = httpx2.post(
            gateway.base_url + "/chatkit",
            content=ThreadsListReq(params=ThreadListParams()).model_dump_json(),
            headers=bearer(session),
            timeout=10,
        )
        assert chatkit.status_code == 503 and chatkit.headers["retry-after"] == "5", chatkit.text
        # HS256 tokens do not depend on Better Auth.
        assert gateway.call("GET", f"/api/{user_id}/tasks", user=user_id).status == 200
    finally:
        better_auth.start()
    assert gateway.call("GET", f"/api/{user_id}/tasks", bearer=session).status == 200
