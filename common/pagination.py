"""Opaque page tokens that a client can neither read meaningfully nor forge.

A token carries the position after which the next page starts plus the query it belongs
to, and an HMAC over both and the user id. A tampered token, one made for another query,
or one minted for another user fails the check: INVALID_ARGUMENT. (Queries are scoped by
the caller anyway; the MAC makes misuse a clear error instead of a silent wrong page.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from typing import Any

from common.errors import InvalidArgument
from common.settings import Settings

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE) -> int:
    if requested == 0:
        return default
    if not 1 <= requested <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    return requested


class PageTokens:
    def __init__(self, settings: Settings) -> None:
        secret = settings.page_token_secret or settings.better_auth_secret or secrets.token_hex(32)
        self._key = hashlib.sha256(b"page-token:" + secret.encode()).digest()

    def encode(self, user_id: str, query: str, position: Any) -> str:
        body = json.dumps({"q": query, "p": position}, separators=(",", ":")).encode()
        mac = self._mac(user_id, body)
        return base64.urlsafe_b64encode(body + mac).decode().rstrip("=")

    def decode(self, user_id: str, query: str, token: str) -> Any:
        """The position stored in `token`; None for an empty token (the first page)."""
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError) as error:
            raise InvalidArgument("page_token is invalid") from error
        body, mac = raw[:-32], raw[-32:]
        if len(raw) <= 32 or not hmac.compare_digest(mac, self._mac(user_id, body)):
            raise InvalidArgument("page_token is invalid")
        payload = json.loads(body)
        if payload.get("q") != query:
            raise InvalidArgument("page_token belongs to a different query")
        return payload["p"]

    def _mac(self, user_id: str, body: bytes) -> bytes:
        return hmac.new(self._key, user_id.encode() + b"\x00" + body, hashlib.sha256).digest()
