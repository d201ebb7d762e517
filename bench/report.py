"""The machine description, percentiles and the markdown that every run prints and writes."""

from __future__ import annotations

import math
import os
import platform
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from bench.ceiling import pgbench_version
from tests.support import POSTGRES_ADMIN_URL


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


def machine() -> dict[str, str]:
    return {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": f"{_mem_total_gb():.1f} GB",
        "load average at start (1/5/15 min)": " / ".join(f"{value:.2f}" for value in os.getloadavg()),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "postgresql": _postgres_version(),
        "pgbench": pgbench_version(),
        "sqlite": sqlite3.sqlite_version,
        "envoy": _envoy_version(),
    }


def machine_was_busy() -> bool:
    return os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _postgres_version() -> str:
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            max_connections = conn.execute("SHOW max_connections").fetchone()
        return f"{row[0] if row else '?'} (max_connections {max_connections[0] if max_connections else '?'})"
    except psycopg.Error as error:
        return f"unreachable: {error}"


def _envoy_version() -> str:
    envoy = Path(sys.executable).parent / "envoy"
    try:
        output = subprocess.run(
            [str(envoy) if envoy.exists() else "envoy", "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    for token in output.split():
        if token.count("/") >= 2 and token[0].isalnum():  # e.g. <sha>/1.40.0/Clean/RELEASE/BoringSSL
            return token.split("/")[1]
    return output.strip()[-60:] or "unknown"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
        # One line per row: error texts may hold newlines and pipes.
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def loadgen_note(result: dict[str, Any]) -> str:
    """A short mark when the load generator itself may have been the bottleneck."""
    cpu = result.get("loadgen_cpu_fraction", 0.0) * 100
    mark = f"{cpu:.0f}%"
    if result.get("self_bottleneck"):
        mark += f" ⚠ lag p99 {result.get('loadgen_loop_lag_p99_ms', 0):.0f} ms"
    return mark
