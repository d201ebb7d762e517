"""Bearer-token verification (PyJWT) and the caller of the current request.

Two modes, chosen by settings:
- shared secret: `BETTER_AUTH_SECRET`, HS256 only;
- JWKS: `AUTH_JWKS_URL`, EdDSA/RS256/ES256 only, with `AUTH_ISSUER`/`AUTH_AUDIENCE` enforced
  when set. Keys are cached per `kid`; a fetch (PyJWKClient is synchronous) runs in a
  thread so the event loop never blocks on the network.
The allow-list per mode is what stops `alg: none` and HS/RS key confusion.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass

import jwt

from common.errors import PermissionDenied, Unauthenticated, Unavailable
from common.settings import Settings

SECRET_ALGORITHMS = ["HS256"]
JWKS_ALGORITHMS = ["EdDSA", "RS256", "ES256"]
MAX_TOKEN_LENGTH = 8192
MAX_SUBJECT_LENGTH = 255


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
        raise PermissionDenied("user_id does not match the authenticated user")
    return caller.user_id


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` value."""
    if not authorization:
        raise Unauthenticated("missing bearer token")
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
    """Verifies a JWT and returns its subject.

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
        else:
            raise SystemExit("no token verification configured: set BETTER_AUTH_SECRET or AUTH_JWKS_URL")

    async def verify(self, token: str) -> str:
        remembered = self._verified.get(token)
        if remembered is not None and remembered[1] > time.monotonic():
            return remembered[0]
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
            raise Unauthenticated("invalid token: too long")
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
        except jwt.ExpiredSignatureError as error:
            raise Unauthenticated("invalid token: expired") from error
        except (jwt.PyJWTError, ValueError, TypeError) as error:
            raise Unauthenticated(f"invalid token: {error}") from error
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_LENGTH or _has_control(subject):
            raise Unauthenticated("invalid token: bad 'sub' claim")
        return subject, float(claims["exp"])

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
