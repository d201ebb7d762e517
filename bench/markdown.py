"""RESULTS.md: targets (measured, met/missed) first, then every phase's numbers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.procs import BENCH_PROCESSES
from bench.report import loadgen_note, table

if TYPE_CHECKING:
    from bench.run import Results

TARGET_SESSIONS = 5000
TARGET_CHAT_USERS = 16


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((row for row in rows if all(row.get(key) == value for key, value in match.items())), None)


def targets(results: Results) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    sequential = _find(results.chat, turn="add", clients=1)
    if sequential:
        errors = f", {sequential['errors']} errors" if sequential["errors"] else ""
        rows.append(
            (
                "add-task turn overhead p50, sequential",
                "≤ 15 ms",
                f"{sequential['p50']:.1f} ms{errors}",
                _verdict(sequential["p50"] <= 15 and not sequential["errors"]),
            )
        )
        rows.append(
            (
                "add-task turn overhead p99, sequential",
                "≤ 50 ms",
                f"{sequential['p99']:.1f} ms",
                _verdict(sequential["p99"] <= 50 and not sequential["errors"]),
            )
        )
    concurrent = _find(results.chat, turn="add", clients=TARGET_CHAT_USERS)
    fallback = concurrent or next((row for row in results.chat if row["turn"] == "add" and row["clients"] > 1), None)
    if fallback:
        measured = f"{fallback['rate']:.0f} turns/s, {fallback['errors']} errors"
        verdict = (
            _verdict(fallback["rate"] >= 150 and fallback["errors"] == 0) if concurrent else "not run at this size"
        )
        if not concurrent:
            measured += f" (at {fallback['clients']} users)"
        rows.append(
            (
                f"add-task turns/s at {TARGET_CHAT_USERS} users, zero-latency model",
                "≥ 150/s, 0 errors",
                measured,
                verdict,
            )
        )
    total = results.peaks.stack_total_rss_mb
    rows.append(("all stack processes together, peak RSS", "≤ 400 MB", f"{total:.0f} MB", _verdict(0 < total <= 400)))
    sessions = _find(results.sessions, sessions=TARGET_SESSIONS) or (results.sessions[-1] if results.sessions else None)
    if sessions:
        exact = sessions["sessions"] == TARGET_SESSIONS
        size = "" if exact else f" (at N={sessions['sessions']})"
        rows.append(
            (
                f"{TARGET_SESSIONS:,} concurrent chat sessions, 1 s model: errors",
                "0",
                f"{sessions['errors']}{size}",
                _verdict(sessions["errors"] == 0) if exact else "not run at this size",
            )
        )
        rows.append(
            (
                f"{TARGET_SESSIONS:,} sessions: p99 overhead above model time",
                "≤ 250 ms",
                f"{sessions['overhead_p99']:.0f} ms{size}",
                _verdict(sessions["overhead_p99"] <= 250) if exact else "not run at this size",
            )
        )
    for ceiling in results.ceilings:
        if ceiling["error"]:
            rows.append(
                (
                    f"task create vs PostgreSQL ceiling, {ceiling['clients']} clients",
                    "≥ 40%",
                    f"pgbench failed: {ceiling['error']}",
                    "not measured",
                )
            )
            continue
        rows.append(
            (
                f"task create vs PostgreSQL ceiling, {ceiling['clients']} clients",
                "≥ 40%",
                f"{ceiling['ratio'] * 100:.0f}% ({ceiling['ours']:.0f} / {ceiling['tps']:.0f} per s)",
                _verdict(ceiling["ratio"] >= 0.4),
            )
        )
    return rows


SHORT = {"agent_service": "agent", "conversation_service": "conv", "task_service": "task", "envoy": "envoy"}


def cpu_cell(result: dict[str, Any]) -> str:
    """CPU ms per request by process (those that did work), and their sum."""
    spent = {name: ms for name, ms in result.get("cpu_ms_per_request", {}).items() if ms >= 0.05}
    if not spent:
        return ""
    parts = [f"{SHORT.get(name, name)} {ms:.1f}" for name, ms in sorted(spent.items(), key=lambda item: -item[1])]
    return ", ".join(parts) + f" = {sum(spent.values()):.1f}"


def _task_table(results: Results) -> str:
    rows = [
        (r["backend"], r["op"], r["clients"], r["rate"], r["p50"], r["p99"], r["errors"], cpu_cell(r), loadgen_note(r))
        for r in results.tasks
    ]
    headers = [
        "database",
        "operation",
        "clients",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "CPU ms/request",
        "loadgen CPU",
    ]
    return table(headers, rows)


def _ceiling_table(results: Results) -> str:
    rows = [
        (
            c["clients"],
            c["ours"],
            c["tps"] if not c["error"] else c["error"],
            f"{c['ratio'] * 100:.0f}%",
            c["latency_avg_ms"],
        )
        for c in results.ceilings
    ]
    return table(
        [
            "clients",
            "ours: creates/s through Envoy",
            "pgbench tps (same transaction)",
            "ours/ceiling",
            "pgbench latency avg ms",
        ],
        rows,
    )


def _chat_table(results: Results) -> str:
    rows = [
        (
            r["turn"],
            r["clients"],
            r["count"],
            r["rate"],
            r["p50"],
            r["p90"],
            r["p99"],
            r["errors"],
            cpu_cell(r),
            loadgen_note(r),
        )
        for r in results.chat
    ]
    headers = [
        "turn",
        "users",
        "turns",
        "turns/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "CPU ms/turn",
        "loadgen CPU",
    ]
    return table(headers, rows)


def _replicas_table(results: Results) -> str:
    rows = [
        (r["replicas"], r["clients"], r["count"], r["rate"], r["p50"], r["p99"], r["errors"], cpu_cell(r))
        for r in results.replicas
    ]
    headers = ["replicas of each service", "users", "turns", "turns/s", "p50 ms", "p99 ms", "errors", "CPU ms/turn"]
    return table(headers, rows)


def _sessions_table(results: Results) -> str:
    rows = []
    for r in results.sessions:
        sockets = r["peaks"].sockets
        product = ", ".join(f"{name} {count}" for name, count in sorted(sockets.items()) if name not in BENCH_PROCESSES)
        rows.append(
            (
                r["sessions"],
                r["ok"],
                r["errors"],
                r["model_time_ms"],
                r["overhead_p50"],
                r["overhead_p99"],
                r["overhead_max"],
                r["peaks"].stack_total_rss_mb,
                product,
                loadgen_note(r),
            )
        )
    return table(
        [
            "sessions",
            "ok",
            "errors",
            "model time ms",
            "overhead p50 ms",
            "overhead p99 ms",
            "overhead max ms",
            "stack RSS peak MB",
            "peak sockets",
            "loadgen CPU",
        ],
        rows,
    )


def _peaks_table(results: Results) -> str:
    peaks = results.peaks
    rows: list[tuple[str, float, int | str]] = [
        (name, peaks.rss_mb[name], peaks.sockets.get(name, 0)) for name in sorted(peaks.rss_mb)
    ]
    rows.append(("**stack total (without bench processes)**", peaks.stack_total_rss_mb, ""))
    return table(["process", "peak RSS MB", "peak open sockets"], rows)


def _errors(results: Results) -> str:
    lines = []
    for row in [*results.tasks, *results.chat, *results.sessions]:
        if row["errors"]:
            what = row.get("op") or row.get("turn") or "sessions"
            lines.append(
                f"- {what} x{row['concurrency']}: {row['errors']} errors, e.g. `{(row['error_samples'] or [''])[0]}`"
            )
    return "\n".join(lines)


def _fanout_table(results: Results) -> str:
    row = results.fanout
    quiet = "n/a" if row["quiet_p50"] is None else f"{row['quiet_p50']:.1f} / {row['quiet_p99']:.1f}"
    lines = [
        "| attackers (1 turn each, 1,000 tool calls asked) | attack turns ok / errors | attack turn p50 ms "
        "| ordinary user's turns (errors) | their p50 / p99 ms under attack | quiet p50 / p99 ms |",
        "|---|---|---|---|---|---|",
        f"| {row['attackers']} | {row['attack_ok']} / {row['attack_errors']} | {row['attack_p50']:.0f} "
        f"| {row['victim_turns']} ({row['victim_errors']}) | {row['victim_p50']:.1f} / {row['victim_p99']:.1f} | {quiet} |",
    ]
    if row["attack_error_samples"]:
        lines.append(f"\nattack errors, e.g.: {row['attack_error_samples']}")
    return "\n".join(lines)


def render(
    results: Results,
    machine: dict[str, str],
    busy: bool,
    command: str,
    when: dt.datetime,
    seconds: float,
    workdir: Path,
) -> str:
    mode = "quick (tiny sizes, for CI; not a measurement)" if results.quick else "full"
    parts = [
        "# Benchmark results",
        "",
        f"- date: {when.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        f"- mode: {mode}; took {seconds:.0f} s",
        "- stacks: " + "; ".join(results.stacks),
    ]
    parts += [f"- {key}: {value}" for key, value in machine.items()]
    if busy:
        parts.append(
            "- **the machine was loaded when this run started (1-minute load average above half the cores): treat the numbers as noisy**"
        )
    parts += [
        "",
        "Overhead = everything in a chat turn except the model's own time: the model server answers at once "
        "(bench/model_server.py over real HTTP), so the openai SDK, Envoy, every gRPC hop and every database write are "
        "in the path. Ratios compare numbers measured in this same run.",
        "",
        "## Targets",
        "",
        table(["target", "goal", "measured", "status"], targets(results)),
        "",
        "## Chat turns (PostgreSQL, zero-latency model, POST /api/{user}/chat through Envoy)",
        "",
        "Each user keeps one conversation (the model sees up to the 20-message window); list turns list 20 tasks.",
        "",
        _chat_table(results) if results.chat else "not run",
        "",
        "## Many concurrent chat sessions (one add-task turn each, model takes 1 s per step, 2 steps; "
        + (f"starts spread over {results.ramp_seconds:g} s)" if results.ramp_seconds else "all start at once)"),
        "",
        _sessions_table(results) if results.sessions else "not run",
        "",
        "## Replicas (add-task chat turns through Envoy, zero-latency model, PostgreSQL)",
        "",
        "The same load on one process of every service (the stack above) and on two (a fresh stack, "
        "`scripts/stack.py` replicas, Envoy balancing over them). CPU per turn is summed over a service's "
        "processes. On a machine with few cores more processes cannot add CPU: the difference is what "
        "balancing and the extra processes cost or win.",
        "",
        _replicas_table(results) if results.replicas else "not run",
        "",
        "## The fan-out attack (issue 20): turns asking for 1,000 tool calls beside an ordinary user",
        "",
        "Every attacker's model asks for 1,000 add_task calls in one step; the agent runs at most "
        "AGENT_MAX_TOOL_CALLS_PER_STEP (20) of a step and AGENT_MAX_TOOL_CALLS_PER_TURN (50) of a turn, "
        "AGENT_TOOL_CONCURRENCY at a time. Meanwhile one ordinary user sends add-task turns one after another.",
        "",
        _fanout_table(results) if results.fanout else "not run",
        "",
        "## Single hops, sequentially (what a turn is made of)",
        "",
        table(["hop", "p50 ms", "p99 ms"], [(name, v["p50"], v["p99"]) for name, v in results.hops])
        if results.hops
        else "not run",
        "",
        "## Task REST through Envoy",
        "",
        _task_table(results),
        "",
        "## Database ceiling for task create (pgbench -n -M prepared, same upsert + insert, same database)",
        "",
        _ceiling_table(results),
        "",
        "## Peak memory and sockets per process (whole run)",
        "",
        _peaks_table(results),
        "",
    ]
    errors = _errors(results)
    if errors:
        parts += ["## Errors", "", errors, ""]
    if results.notes or results.profiles:
        parts += ["## Notes", ""] + [f"- {note}" for note in [*results.notes, *results.profiles]] + [""]
    parts += [f"Logs of this run: `{workdir}`. What dominates the hot path: bench/NOTES.md.", ""]
    return "\n".join(parts)
