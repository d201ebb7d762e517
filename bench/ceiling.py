"""The database's own ceiling for the writes a task create makes, measured with pgbench.

The script is the same transaction task_service runs for CreateTask: bump the user's counter
with the upsert (RETURNING the new number), insert the task with that number, commit. Each
pgbench client is its own user, as each load-generator client is, against the same database.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

CREATE_SCRIPT = """\
BEGIN;
INSERT INTO task_counters (user_id, last_id) VALUES ('pgbench-' || :client_id, 1)
  ON CONFLICT (user_id) DO UPDATE SET last_id = task_counters.last_id + 1 RETURNING last_id \\gset
INSERT INTO tasks (user_id, id, title, description, completed, created_at, updated_at)
  VALUES ('pgbench-' || :client_id, :last_id, 'Buy milk', '', false, now(), now());
COMMIT;
"""


def pgbench_binary() -> str | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"), reverse=True)
    return candidates[0] if candidates else shutil.which("pgbench")


def pgbench_version() -> str:
    binary = pgbench_binary()
    if not binary:
        return "pgbench not found"
    return subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.strip()


def free_connection_slots(database_url: str) -> int:
    """Connections PostgreSQL would still accept (max_connections less those open, less a margin)."""
    url = make_url(database_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity)"
        ).fetchone()
    return int(row[0]) if row else 0


def create_ceiling(database_url: str, clients: int, seconds: float) -> dict[str, float | str]:
    """pgbench -n -f create.sql against `database_url` (a SQLAlchemy URL): tps and latency.

    PostgreSQL's max_connections is shared with everything else on the server: when fewer slots
    are free than `clients`, pgbench runs with what is free (leaving 5) and says so in `note`.
    """
    binary = pgbench_binary()
    if binary is None:
        return {"error": "pgbench not found"}
    url = make_url(database_url)
    note = ""
    available = free_connection_slots(database_url) - 5
    if available < clients:
        note = f"ran with {max(1, available)} clients: only {max(0, available)} connections were free"
        clients = max(1, available)
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "create.sql"
        script.write_text(CREATE_SCRIPT)
        command = [
            binary,
            "-n",
            "-f",
            str(script),
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(max(1, round(seconds))),
            "-M",
            "prepared",
            "-h",
            url.host or "127.0.0.1",
            "-p",
            str(url.port or 5432),
            "-U",
            url.username or "postgres",
            url.database or "postgres",
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False, timeout=seconds + 60)
    if completed.returncode != 0:
        return {"error": (completed.stderr or completed.stdout).strip()[-300:]}
    return {**_parse(completed.stdout), "note": note, "clients": float(clients)}


def _parse(output: str) -> dict[str, float | str]:
    tps = re.search(r"tps = ([\d.]+)", output)
    latency = re.search(r"latency average = ([\d.]+) ms", output)
    failed = re.search(r"number of failed transactions: (\d+)", output)
    return {
        "tps": float(tps.group(1)) if tps else 0.0,
        "latency_avg_ms": float(latency.group(1)) if latency else 0.0,
        "failed": float(failed.group(1)) if failed else 0.0,
    }
