"""Bearer-token verification (PyJWT) and the caller of the current request.

Two modes, chosen by settings:
- shared secret: `BETTER_AUTH_SECRET`, HS256 only;
- JWKS: `AUTH_JWKS_URL`, EdDSA/RS256/ES256 only, with `AUTH_ISSUER`/`AUTH_AUDIENCE` enforced
  when set. Keys are cached per `kid`; a fetch (PyJWKClient is synchronous) runs in a
  thread so the event loop never blocks on the network.
The allow-list per mode is what stops `alg: none` and HS/RS key confusion.

Beside either (or alone), Better Auth session tokens: with `AUTH_BETTER_AUTH_URL` set, a bearer
that is not a JWT (not three dot-separated parts) is checked by Better Auth itself
(common/better_auth.py); the user is the session's `user.id`.

Clients learn only that a token was refused ("invalid or expired token"); the exact reason
(PyJWT's message, ours) travels in the error's `reason` to the audit log, so a refusal never
tells a forger which check to work around next.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass

import jwt

from common.better_auth import SessionVerifier, is_jwt
from common.errors import PermissionDenied, Unauthenticated, Unavailable
from common.settings import Settings

SECRET_ALGORITHMS = ["HS256"]
JWKS_ALGORITHMS = ["EdDSA", "RS256", "ES256"]
MAX_TOKEN_LENGTH = 8192
MAX_SUBJECT_LENGTH = 255
INVALID_TOKEN = "invalid or expired token"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's subject, the token itself (forwarded downstream), the request id."""

    user_id: str
    token: str
    request_id: str = ""


_caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_caller() -> Caller:
    caller = _caller_var.get()
    if caller is None:  # only reachable if a handler runs without the auth interceptor
        raise Unauthenticated("missing bearer token")
    return caller


def set_caller(caller: Caller) -> contextvars.Token[Caller | None]:
    return _caller_var.set(caller)


def reset_caller(token: contextvars.Token[Caller | None]) -> None:
    _caller_var.reset(token)


def authorized_user(requested_user_id: str) -> str:
    """The caller's user id, after checking that a user id named in the request is the caller's."""
    caller = current_caller()
    if requested_user_id and requested_user_id != caller.user_id:
        raise PermissionDenied(
            "user_id does not match the authenticated user", reason=f"request names user_id {requested_user_id!r}"
        )
    return caller.user_id


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` value."""
    if not authorization:
        raise Unauthenticated("missing bearer token")
    if "," in authorization:  # HTTP joins repeated headers with commas; no token contains one
        raise Unauthenticated("send one authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def _has_control(text: str) -> bool:
    # A user id is stored and logged: NUL cannot go into PostgreSQL text, control characters into logs.
    return any(ord(char) < 32 or ord(char) == 127 for char in text)


VERIFIED_CACHE_SIZE = 4096
VERIFIED_CACHE_SECONDS = 60.0


class TokenVerifier:
    """Verifies a bearer token and returns its user: a JWT's subject, or (AUTH_BETTER_AUTH_URL)
    a Better Auth session's `user.id`.

    A chat turn presents the same token to several services and to each several times, so a
    verified token is remembered (by its exact text) for a short while: never past its `exp`,
    and in JWKS mode never longer than keys are cached, so a removed key stops working as
    soon as it would without this cache.
    """

    def __init__(self, settings: Settings) -> None:
        self._leeway = settings.auth_leeway_seconds
        self._issuer = settings.auth_issuer or None
        self._audience = settings.auth_audience or None
        self._cache_seconds = settings.auth_jwks_cache_seconds
        self._max_lifetime = settings.auth_max_token_lifetime_seconds
        self._keys: dict[str, tuple[float, object]] = {}
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (subject, monotonic deadline)
        self._verified_seconds = VERIFIED_CACHE_SECONDS
        self._jwks_client: jwt.PyJWKClient | None = None
        if settings.auth_jwks_url:
            self._algorithms = JWKS_ALGORITHMS
            # cache_keys=False: PyJWKClient's per-kid LRU never expires, so a key removed from the
            # JWKS would stay valid forever; `self._keys` below caches per kid for cache_seconds.
            self._jwks_client = jwt.PyJWKClient(
                settings.auth_jwks_url, cache_keys=False, lifespan=settings.auth_jwks_cache_seconds, timeout=5
            )
            self._secret = ""
            self._verified_seconds = min(VERIFIED_CACHE_SECONDS, float(settings.auth_jwks_cache_seconds))
        elif settings.better_auth_secret:
            self._algorithms = SECRET_ALGORITHMS
            self._secret = settings.better_auth_secret
        elif settings.auth_better_auth_url:
            self._algorithms = []  # Better Auth session tokens only: every JWT is refused
            self._secret = ""
        else:
            raise SystemExit(
                "no token verification configured: set BETTER_AUTH_SECRET, AUTH_JWKS_URL or AUTH_BETTER_AUTH_URL"
            )
        # Better Auth session tokens (not JWTs), checked by Better Auth: common/better_auth.py.
        self._sessions: SessionVerifier | None = None
        if settings.auth_better_auth_url:
            self._sessions = SessionVerifier(settings.auth_better_auth_url, settings.auth_session_cache_seconds)

    async def verify(self, token: str) -> str:
        remembered = self._verified.get(token)
        if remembered is not None and remembered[1] > time.monotonic():
            return remembered[0]
        if self._sessions is not None and not is_jwt(token):
            if len(token) > MAX_TOKEN_LENGTH:
                raise Unauthenticated(INVALID_TOKEN, reason=f"longer than {MAX_TOKEN_LENGTH} characters")
            return await self._sessions.verify(token)
        subject, expires_at = await self._verify(token)
        self._remember(token, subject, expires_at)
        return subject

    def _remember(self, token: str, subject: str, expires_at: float) -> None:
        seconds = min(self._verified_seconds, expires_at - time.time())  # exp without the leeway
        if seconds <= 0:
            return
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            now = time.monotonic()
            self._verified = {key: entry for key, entry in self._verified.items() if entry[1] > now}
            while len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.pop(next(iter(self._verified)))  # the oldest entry
        self._verified[token] = (subject, time.monotonic() + seconds)

    async def _verify(self, token: str) -> tuple[str, float]:
        """The token's subject and `exp`, after full verification."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated(INVALID_TOKEN, reason=f"longer than {MAX_TOKEN_LENGTH} characters")
        if not self._algorithms:
            raise Unauthenticated(INVALID_TOKEN, reason="JWTs are not accepted: only Better Auth session tokens")
        try:
            key = await self._key_for(token)
            claims = jwt.decode(
                token,
                key=key,  # type: ignore[arg-type]
                algorithms=self._algorithms,
                leeway=self._leeway,
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except (jwt.PyJWTError, ValueError, TypeError) as error:
            raise Unauthenticated(INVALID_TOKEN, reason=f"{type(error).__name__}: {error}") from error
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_LENGTH or _has_control(subject):
            raise Unauthenticated(INVALID_TOKEN, reason="bad 'sub' claim")
        self._check_lifetime(claims)
        return subject, float(claims["exp"])

    def _check_lifetime(self, claims: dict[str, object]) -> None:
        """Refuse tokens minted to live longer than AUTH_MAX_TOKEN_LIFETIME_SECONDS (a leaked one
        must not stay usable for months). PyJWT has already checked `exp` and `iat` are numbers."""
        if self._max_lifetime <= 0:
            return
        expires_at = float(claims["exp"])  # type: ignore[arg-type]
        issued_at = claims.get("iat")
        if issued_at is not None:
            lifetime = expires_at - float(issued_at)  # type: ignore[arg-type]
        else:  # no `iat`: judge from now, allowing the clock skew
            lifetime = expires_at - time.time() - self._leeway
        if lifetime > self._max_lifetime:
            raise Unauthenticated(
                INVALID_TOKEN, reason=f"lifetime {lifetime:.0f} s exceeds the maximum {self._max_lifetime} s"
            )

    async def _key_for(self, token: str) -> object:
        if self._jwks_client is None:
            return self._secret
        header = jwt.get_unverified_header(token)
        if header.get("alg") not in self._algorithms:
            raise jwt.InvalidAlgorithmError(f"algorithm {header.get('alg')!r} is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise jwt.InvalidTokenError("the token has no 'kid'")
        cached = self._keys.get(kid)
        if cached and time.monotonic() - cached[0] < self._cache_seconds:
            return cached[1]
        try:
            signing_key = await asyncio.to_thread(self._jwks_client.get_signing_key, kid)
        except jwt.PyJWKClientConnectionError as error:
            raise Unavailable("cannot fetch the signing keys (JWKS) right now") from error
        except jwt.PyJWKClientError as error:
            raise jwt.InvalidTokenError(f"unknown signing key {kid!r}") from error
        self._keys[kid] = (time.monotonic(), signing_key.key)
        return signing_key.key
