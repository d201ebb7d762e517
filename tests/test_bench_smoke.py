"""`python -m bench --quick` runs through a real stack (Envoy, every service, PostgreSQL and
SQLite, the model server, the load generator) and writes its markdown tables.

Only completion and the report's shape are checked, never speed: CI machines vary.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_bench_completes_and_writes_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,  # inside pytest-timeout's 600 s: a hang ends as TimeoutExpired, the bench killed
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    text = out.read_text()
    assert text in completed.stdout  # printed as well as written
    for heading in (
        "## Targets",
        "## Chat turns",
        "## The fan-out attack",
        "## Task REST through Envoy",
        "## Database ceiling",
    ):
        assert heading in text
    assert "| target | goal | measured | status |" in text
    # Every task operation on both databases produced a row with a request rate.
    for backend in ("postgres", "sqlite"):
        for operation in ("create", "get", "list", "update", "complete"):
            assert f"| {backend} | {operation} |" in text
    assert "python -m bench --quick" in text  # the exact command
    # Both fan-out rows (production and raised rate limits): the attacking account's turns were
    # answered or refused with Retry-After, none failed; the ordinary users' turns too.
    fanout_rows = re.findall(r"\| 3 for 1 s \| (\d+) / \d+ / (\d+) \| .*? \| \d+ \((\d+)\) \|", text)
    assert len(fanout_rows) == 2 and all(
        int(ok) > 0 and errors == "0" == victim_errors for ok, errors, victim_errors in fanout_rows
    )
    assert "- cores:" in text and "- postgresql:" in text
