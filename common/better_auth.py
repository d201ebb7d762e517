"""Better Auth session tokens, verified by Better Auth itself (AUTH_BETTER_AUTH_URL).

A frontend signed in with Better Auth's `bearer` plugin holds a session token (the signed
`<token>.<signature>` it got in the `set-auth-token` header; it may hold `+ / =`, or be
percent-encoded). It is not a JWT, so nothing here can check it offline: each token is asked
about with `GET {AUTH_BETTER_AUTH_URL}/api/auth/get-session` and `Authorization: Bearer <token>`.
Better Auth answers the session and its user (`user.id` is the caller) or `null`.

- The answer is remembered for AUTH_SESSION_CACHE_SECONDS, never past the session's
  `expiresAt`, so a signed-out session is refused at most that long after (0: ask every time).
  Refusals are not remembered.
- Concurrent checks of one token share one request (a chat turn presents the same token to
  several calls at once).
- `null`, 401 or 403: UNAUTHENTICATED. Better Auth unreachable, slow (5 s), answering 5xx or
  anything that is not a session: UNAVAILABLE with a retry hint (`SessionServiceUnavailable`,
  Retry-After 5 s over HTTP), never a silent accept.
- One `httpx2.AsyncClient` per event loop, created on first use inside it: pooled keep-alive
  connections, bounded timeouts, no redirects, no proxy from the environment (Better Auth is a
  direct neighbour).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import datetime
from typing import Any

import httpx2

from common.errors import Unauthenticated, Unavailable

log = logging.getLogger("auth.better_auth")

GET_SESSION_PATH = "/api/auth/get-session"
REQUEST_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 2.0
RETRY_AFTER_SECONDS = 5
CACHE_SIZE = 4096
MAX_USER_ID_LENGTH = 255
INVALID_TOKEN = "invalid or expired token"
# What a session token can be made of: base64 and base64url, the `.` before the signature and
# the `%` of a percent-encoded one. Anything else never reaches Better Auth.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/=%-]+")


def is_jwt(token: str) -> bool:
    """A JWT (JWS compact form) has exactly three dot-separated parts; a session token does not."""
    return token.count(".") == 2


class SessionServiceUnavailable(Unavailable):
    """Better Auth could not say whether the session is valid: retry later."""

    retry_after_seconds = RETRY_AFTER_SECONDS


class SessionVerifier:
    """Checks Better Auth session tokens against Better Auth; returns the session's user id."""

    def __init__(
        self,
        base_url: str,
        cache_seconds: float,
        timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + GET_SESSION_PATH
        self._cache_seconds = max(0.0, float(cache_seconds))
        self._timeout = timeout_seconds
        self._transport = transport
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (user id, monotonic deadline)
        self._pending: dict[str, asyncio.Future[tuple[str, float]]] = {}
        self._clients: dict[asyncio.AbstractEventLoop, httpx2.AsyncClient] = {}

    async def verify(self, token: str) -> str:
        remembered = self._verified.get(token)
        if remembered is not None and remembered[1] > time.monotonic():
            return remembered[0]
        if not TOKEN_PATTERN.fullmatch(token):
            raise Unauthenticated(INVALID_TOKEN, reason="not a JWT, and not a session token either")
        pending = self._pending.get(token)
        if pending is None or pending.get_loop() is not asyncio.get_running_loop():
            pending = asyncio.ensure_future(self._check(token))
            self._pending[token] = pending
            pending.add_done_callback(lambda done: self._settled(token, done))
        user_id, _ = await asyncio.shield(pending)
        return user_id

    def _settled(self, token: str, done: asyncio.Future[tuple[str, float]]) -> None:
        if self._pending.get(token) is done:
            del self._pending[token]
        if done.cancelled():
            return
        if done.exception() is None:  # also marks a failure as retrieved when nobody waits any more
            user_id, expires_at = done.result()
            self._remember(token, user_id, expires_at)

    def _remember(self, token: str, user_id: str, expires_at: float) -> None:
        seconds = min(self._cache_seconds, expires_at - time.time())
        if seconds <= 0:
            return
        if len(self._verified) >= CACHE_SIZE:
            now = time.monotonic()
            self._verified = {key: entry for key, entry in self._verified.items() if entry[1] > now}
            while len(self._verified) >= CACHE_SIZE:
                self._verified.pop(next(iter(self._verified)))
        self._verified[token] = (user_id, time.monotonic() + seconds)

    async def _check(self, token: str) -> tuple[str, float]:
        """Ask Better Auth: the session's user id and its expiry (epoch seconds)."""
        try:
            reply = await self._client().get(self.url, headers={"Authorization": f"Bearer {token}"})
        except httpx2.HTTPError as error:
            log.warning("better auth unreachable", extra={"url": self.url, "error": repr(error)[:200]})
            raise SessionServiceUnavailable("cannot check the session with Better Auth right now") from error
        if reply.status_code in (401, 403):
            raise Unauthenticated(INVALID_TOKEN, reason=f"Better Auth answered {reply.status_code}")
        if reply.status_code != 200:
            log.warning("better auth failed", extra={"url": self.url, "status": reply.status_code})
            raise SessionServiceUnavailable("cannot check the session with Better Auth right now")
        try:
            body = reply.json()
        except ValueError as error:
            log.warning("better auth answered something that is not JSON", extra={"url": self.url})
            raise SessionServiceUnavailable("cannot check the session with Better Auth right now") from error
        if body is None:
            raise Unauthenticated(INVALID_TOKEN, reason="no such session (signed out, expired or never issued)")
        return session_of(body, self.url)

    def _client(self) -> httpx2.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # Clients of loops that are gone (tests run one loop each) are dropped, not closed:
            # their connections went with their loop.
            self._clients = {known: kept for known, kept in self._clients.items() if not known.is_closed()}
            client = httpx2.AsyncClient(
                timeout=httpx2.Timeout(self._timeout, connect=min(CONNECT_TIMEOUT_SECONDS, self._timeout)),
                limits=httpx2.Limits(max_connections=32, max_keepalive_connections=8, keepalive_expiry=30.0),
                follow_redirects=False,
                trust_env=False,
                transport=self._transport,
            )
            self._clients[loop] = client
        return client

    async def close(self) -> None:
        """Close this loop's client (at shutdown)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()


def session_of(body: Any, url: str) -> tuple[str, float]:
    """The user id and expiry of a get-session answer `{"session": {...}, "user": {...}}`."""
    session = body.get("session") if isinstance(body, dict) else None
    user = body.get("user") if isinstance(body, dict) else None
    if not isinstance(session, dict) or not isinstance(user, dict):
        log.warning("better auth answered something that is not a session", extra={"url": url})
        raise SessionServiceUnavailable("cannot check the session with Better Auth right now")
    user_id = user.get("id")
    if (
        not isinstance(user_id, str)
        or not user_id
        or len(user_id) > MAX_USER_ID_LENGTH
        or any(ord(char) < 32 or ord(char) == 127 for char in user_id)
    ):
        raise Unauthenticated(INVALID_TOKEN, reason="the session's user.id is not a usable user id")
    expires_at = _epoch(session.get("expiresAt"))
    if expires_at is None:
        raise Unauthenticated(INVALID_TOKEN, reason="the session has no readable expiresAt")
    if expires_at <= time.time():
        raise Unauthenticated(INVALID_TOKEN, reason="the session has expired")
    return user_id, expires_at


def _epoch(value: Any) -> float | None:
    """An RFC 3339 timestamp (Better Auth's JSON dates) as epoch seconds, or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()
