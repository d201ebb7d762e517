"""Bearer-token auth of the MCP endpoint, with the same verifier as the gRPC services.

The SDK's bearer middleware asks a `TokenVerifier` (its protocol) for an `AccessToken`; this
adapter answers with common.auth.TokenVerifier, so a token the services accept is accepted
here and the user is the token's `sub`. The raw token travels on in the `Caller`, so
task_service verifies the very same token again (it never trusts the agent's word).
"""

from __future__ import annotations

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import ServerRequestContext
from starlette.authentication import AuthenticationError
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response

from common import audit
from common.auth import Caller, TokenVerifier
from common.errors import Unauthenticated, Unavailable
from common.settings import Settings

MCP_PATH = "/mcp"
CHATKIT_PATH = "/chatkit"  # ChatKit's custom backend, beside MCP (agent_service/chatkit_server.py)


class KeysUnavailable(AuthenticationError):
    """The signing keys (JWKS) cannot be fetched: the token can be neither accepted nor refused."""


class SubjectTokenVerifier:
    """mcp's TokenVerifier protocol over our verifier: valid token -> AccessToken naming its `sub`."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            subject = await self._verifier.verify(token)
        except Unauthenticated as error:
            audit.record("auth_refused", surface="mcp", method=MCP_PATH, user=None, reason=error.reason)
            return None  # the SDK answers 401 with the resource-metadata pointer
        except Unavailable as error:
            raise KeysUnavailable(error.message) from error
        # expires_at stays unset: `exp` (with our leeway) was checked by the verifier; a second
        # check without leeway would refuse tokens the gRPC services still accept.
        return AccessToken(token=token, client_id=subject, subject=subject, scopes=[])


def auth_error_response(conn: HTTPConnection, error: AuthenticationError) -> Response:
    """The answer when verification itself failed (not a bad token): 503, the client may retry."""
    return JSONResponse(
        {"error": "temporarily_unavailable", "error_description": str(error)},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def resource_url(settings: Settings) -> str:
    """The MCP endpoint's public URL: what clients connect to and the token's intended resource."""
    return settings.public_base_url.rstrip("/") + MCP_PATH


def auth_settings(settings: Settings) -> AuthSettings:
    """Resource-server-only auth: we verify tokens, an external server (Better Auth) issues them.

    The authorization server advertised in the protected-resource metadata is AUTH_ISSUER when
    set (Better Auth's base URL in JWKS mode), else the public base URL (shared-secret mode has
    no discoverable issuer). Audience is checked by our verifier (AUTH_AUDIENCE), so the SDK's
    RFC 8707 resource check stays off.
    """
    # Strings, not AnyHttpUrl objects: AuthSettings keeps a path-less issuer as written (no
    # trailing slash added), and issuer comparison (RFC 8414) is exact.
    return AuthSettings.model_validate(
        {
            "issuer_url": settings.auth_issuer or settings.public_base_url,
            "resource_server_url": resource_url(settings),
            "required_scopes": None,
            "validate_token_resource": False,
        }
    )


def caller_of(ctx: ServerRequestContext[object, object]) -> Caller:
    """The authenticated caller of this MCP request (the bearer middleware has let it through)."""
    request = ctx.request
    scope_user = getattr(request, "scope", {}).get("user") if request is not None else None
    access_token = scope_user.access_token if isinstance(scope_user, AuthenticatedUser) else get_access_token()
    if access_token is None or not access_token.subject:  # unreachable behind RequireAuthMiddleware
        raise Unauthenticated("missing bearer token")
    headers = getattr(request, "headers", None)
    request_id = headers.get("x-request-id", "") if headers is not None else ""
    return Caller(user_id=access_token.subject, token=access_token.token, request_id=request_id)
