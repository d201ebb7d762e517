"""Mint a shared-secret (HS256) token for local use: `make token USER=alice`.

Uses BETTER_AUTH_SECRET, or the secret `make up` keeps in $STATE_DIR/auth_secret.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jwt

from common.settings import Settings

SECRET_FILE = "auth_secret"


def mint(secret: str, user_id: str, ttl_seconds: int = 3600, **claims: object) -> str:
    now = int(time.time())
    payload = {"sub": user_id, "iat": now, "exp": now + ttl_seconds, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def local_secret(settings: Settings) -> str:
    if settings.better_auth_secret:
        return settings.better_auth_secret
    path = Path(settings.state_dir) / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    raise SystemExit(f"no secret: set BETTER_AUTH_SECRET or run `make up` once (it writes {path})")


if __name__ == "__main__":
    user = sys.argv[1] if len(sys.argv) > 1 else "alice"
    ttl = int(sys.argv[2]) if len(sys.argv) > 2 else 24 * 3600
    print(mint(local_secret(Settings.load()), user, ttl))
