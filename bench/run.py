"""The benchmark run: every phase, in order, against real processes; then the report.

Phases (each a fresh load-generator process, clients = users, keep-alive connections):
1. PostgreSQL stack: its RSS once started and warmed up (idle); task REST (create, get, list 50,
   update, complete) at each client count, then pgbench's ceiling for the same create transaction
   on the same database; chat turns (add-task, list) against the zero-latency model, sequentially
   and concurrently; the fan-out attack: users whose model asks for a thousand tool calls in one
   step, while one ordinary user chats (their latency beside the quiet figure);
   tracing: the same sequential turns on six fresh stacks (metrics and tracing off, twice; metrics
   on; tracing at the default sampling, at 10 %, every request traced), in rounds whose turns are
   interleaved across the stacks, CPU per turn of each against the untouched two;
   think time: many users, each pausing (exponentially) between turns, against a 1 s-per-step model;
   burst: many turns offered at once, each answer classified (turn, fast refusal, anything else);
   many concurrent chat sessions against a 1 s-per-step model.
2. Replicas: the same add-task chat load on that stack (one process of each service) and on a
   fresh PostgreSQL stack with two processes of each behind Envoy (throughput and CPU per turn
   side by side).
3. SQLite stack: task REST again.
RSS and sockets of every process are sampled throughout.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import ceiling, hops, profile_summary, report
from bench.cpu import cpu_by_name_of, metrics_recording_cost
from bench.harness import (
    ModelServer,
    OtlpReceiver,
    StackHandle,
    envoy_outcomes,
    open_stack,
    open_stacks,
    run_loadgen,
    scratch_dir,
)
from bench.procs import BENCH_PROCESSES, Peaks, Sampler, cpu_by_name, descendants, process_name
from common.settings import Settings

TASK_OPS = ["task_create", "task_get", "task_list", "task_update", "task_complete"]
MODEL_STEPS_PER_TURN = 2  # tool call, then text


@dataclass(frozen=True)
class Sizes:
    task_clients: tuple[int, ...]
    task_seconds: float
    chat_sequential_turns: int
    chat_clients: tuple[int, ...]
    chat_seconds: float
    sessions: tuple[int, ...]
    session_model_seconds: float
    profile_seconds: float
    fanout_attackers: int = 30  # the attack of issue 20: a whole chat budget of fan-out turns
    # The ordinary user's sequential turns run this long quiet and as long under the attack
    # (in fanout_windows alternations), which keeps going for the whole time (refused turns come
    # back after their Retry-After).
    fanout_seconds: float = 10.0
    # The same attack on a stack with the production rate limits: ordinary users who each send
    # a turn after a pause (mean this long, within the chat budget), quiet and under attack.
    fanout_users: int = 16
    fanout_users_pause_seconds: float = 2.0
    fanout_limited_seconds: float = 30.0
    # Quiet and attacked alternate this many times (each way `seconds / fanout_windows` long).
    fanout_windows: int = 3
    # Issue 17: sequential turns per stack and round; every round runs every stack, rotated; the
    # rounds run in batches, each on six fresh stacks (processes that are identical but for their
    # settings still differ by a per cent or so of CPU, as long as they live: memory layout).
    tracing_turns: int = 25
    tracing_rounds: int = 8
    tracing_batches: int = 4
    # A pause after each round's turns, inside its CPU window (the rounds' windows are back to back,
    # so every export is counted in the round it happens in, whichever that is).
    tracing_settle_seconds: float = 0.3
    # OTEL_BSP_SCHEDULE_DELAY (ms) of the traced stacks: the SDK's default, what a deployment gets.
    # The warm-up's exports are waited out before the first round, the last batch after the last.
    tracing_batch_delay_ms: int = 5000
    # Issue 19: users with think time, and the overload burst.
    thinktime_users: int = 5000
    thinktime_mean_seconds: float = 20.0
    thinktime_seconds: float = 180.0
    burst_turns: int = 5000


QUICK = Sizes(
    (1, 4),
    0.4,
    10,
    (4,),
    1.0,
    (20,),
    1.0,
    0,
    fanout_attackers=3,
    fanout_seconds=1.0,
    fanout_users=2,
    fanout_users_pause_seconds=0.2,
    fanout_limited_seconds=1.0,
    fanout_windows=1,
    tracing_turns=5,
    tracing_rounds=2,
    tracing_batches=1,
    tracing_settle_seconds=0.3,
    tracing_batch_delay_ms=100,
    thinktime_users=20,
    thinktime_mean_seconds=0.5,
    thinktime_seconds=2.0,
    burst_turns=50,
)
FULL = Sizes((1, 16, 64), 5.0, 200, (16, 64), 8.0, (1000, 5000), 1.0, 10)
STACK_PROCESSES = ("agent_service", "conversation_service", "task_service", "envoy")


@dataclass
class Results:
    sizes: Sizes
    quick: bool
    tasks: list[dict[str, Any]] = field(default_factory=list)
    ceilings: list[dict[str, Any]] = field(default_factory=list)
    chat: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    fanout: list[dict[str, Any]] = field(default_factory=list)
    replicas: list[dict[str, Any]] = field(default_factory=list)
    tracing: dict[str, Any] = field(default_factory=dict)
    thinktime: dict[str, Any] = field(default_factory=dict)
    burst: dict[str, Any] = field(default_factory=dict)
    idle: Peaks | None = None  # the stack's RSS once started and warmed up, before any load
    peaks: Peaks = field(default_factory=Peaks)
    stacks: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    hops: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    ramp_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _fresh_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def job(stack: StackHandle, scenario: str, clients: int, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "base_url": stack.gateway_url,
        "secret": stack.secret,
        "scenario": scenario,
        "concurrency": clients,
        "user_prefix": prefix,
        **extra,
    }


def measure(results: Results, spec: dict[str, Any]) -> dict[str, Any]:
    """One load-generator run while every process is sampled."""
    cpu_before = cpu_by_name()
    with Sampler() as sampler:
        result = run_loadgen(spec)
    cpu_after = cpu_by_name()
    results.peaks.merge(sampler.peaks)
    # CPU each process spent per completed request: robust to a busy machine, unlike latency.
    done = max(1, result["ok"])
    result["cpu_ms_per_request"] = {
        name: (cpu_after[name] - cpu_before.get(name, 0.0)) * 1000 / done
        for name in cpu_after
        if name not in BENCH_PROCESSES
    }
    result["peaks"] = sampler.peaks
    latencies = result.pop("latencies_ms")
    result["count"] = len(latencies)
    result["rate"] = len(latencies) / result["wall_s"] if result["wall_s"] else 0.0
    for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        result[name] = report.percentile(latencies, fraction)
    result["_latencies"] = latencies
    if result["errors"]:
        log(
            f"  {spec['scenario']} x{spec['concurrency']}: {result['errors']} errors, e.g. {result['error_samples'][:1]}"
        )
    return result


def idle_phase(results: Results, stack: StackHandle) -> None:
    """RSS of every stack process right after the start and a few requests (lazy imports, pools,
    first connections done), before any load: what the stack holds doing nothing."""
    scenario = "chat_add" if stack.has_chat else "task_create"
    run_loadgen(job(stack, scenario, 1, "pg-idle-warm", requests_per_client=3))
    time.sleep(0.5)
    sampler = Sampler()
    for _ in range(3):
        sampler.sample()
        time.sleep(0.2)
    results.idle = sampler.peaks
    log(f"idle stack RSS: {sampler.peaks.stack_total_rss_mb:.0f} MB")


def task_phases(results: Results, stack: StackHandle, backend: str) -> None:
    sizes = results.sizes
    for clients in sizes.task_clients:
        prefix = f"{backend}-tasks-c{clients}"
        # Creates first: afterwards every client's user is topped up to the 50 tasks list/get use.
        for scenario in TASK_OPS:
            if scenario == "task_get":
                run_loadgen(job(stack, "seed_tasks", clients, prefix, requests_per_client=1))
            log(f"{backend}: {scenario} with {clients} clients")
            result = measure(results, job(stack, scenario, clients, prefix, duration=sizes.task_seconds))
            result.update(backend=backend, op=scenario.removeprefix("task_"), clients=clients)
            results.tasks.append(result)


def ceiling_phases(results: Results, stack: StackHandle) -> None:
    for clients in results.sizes.task_clients:
        log(f"pgbench ceiling with {clients} clients")
        measured = ceiling.create_ceiling(stack.task_database_url, clients, max(1.0, results.sizes.task_seconds))
        ours = next(
            r for r in results.tasks if r["backend"] == "postgres" and r["op"] == "create" and r["clients"] == clients
        )
        tps = float(measured.get("tps", 0.0))
        results.ceilings.append(
            {
                "clients": clients,
                "ours": ours["rate"],
                "tps": tps,
                "ratio": ours["rate"] / tps if tps else 0.0,
                "error": measured.get("error", ""),
                "note": measured.get("note", ""),
                "latency_avg_ms": measured.get("latency_avg_ms", 0.0),
            }
        )


def hops_phase(results: Results, stack: StackHandle, model: ModelServer) -> None:
    log("single hops, sequentially")
    calls = 30 if results.quick else 300
    coroutine = hops.measure_hops(
        stack.task_addr, stack.conversation_addr, stack.gateway_url, model.url, stack.secret, calls
    )
    results.hops = asyncio.run(coroutine)


def chat_phases(results: Results, stack: StackHandle, model: ModelServer) -> None:
    sizes = results.sizes
    model.set_delay(0.0)
    warm = job(stack, "chat_add", 2, "pg-chat-warm", requests_per_client=5)
    run_loadgen(warm)  # first turns pay for connection setup and lazy imports
    for scenario in ("chat_add", "chat_list"):
        runs: list[tuple[int, dict[str, float]]] = [(1, {"requests_per_client": sizes.chat_sequential_turns})]
        runs += [(clients, {"duration": sizes.chat_seconds}) for clients in sizes.chat_clients]
        for clients, bound in runs:
            prefix = f"pg-{scenario}-c{clients}"
            if scenario == "chat_list":  # something to list: 20 tasks per user
                run_loadgen(job(stack, "seed_chat_tasks", clients, prefix, requests_per_client=1))
            log(f"chat: {scenario} with {clients} users")
            result = measure(results, job(stack, scenario, clients, prefix, **bound))
            result.update(turn=scenario.removeprefix("chat_"), clients=clients)
            results.chat.append(result)


def fanout_phase(results: Results, stack: StackHandle, model: ModelServer, workdir: Path) -> None:
    """One account keeps sending turns whose model step asks for FANOUT_CALLS tool calls, from
    `fanout_attackers` connections at once, while ordinary users chat. The per-user turn bound
    (AGENT_MAX_TURNS_PER_USER), the per-user tool concurrency and the tool budget must keep their
    latency at its quiet value (measured in alternating windows on the same stack), and the attacker's turns
    must end in answers or 429s, not 5xx. Twice: on a stack with the production rate limits (the
    attack as it would land), and on the main stack, whose limits are raised out of the way (what
    the bounds alone do), with one user chatting as fast as it can."""
    sizes = results.sizes
    model.set_delay(0.0)
    with open_stack("postgres", model.url, workdir / "fanout", extra_env=PRODUCTION_RATE_LIMITS) as limited:
        results.stacks.append(f"fan-out, production rate limits: {limited.kind}")
        ordinary = {"think_mean_seconds": sizes.fanout_users_pause_seconds}
        results.fanout.append(
            fanout_run(results, limited, "production", sizes.fanout_limited_seconds, sizes.fanout_users, ordinary)
        )
    results.fanout.append(fanout_run(results, stack, "raised", sizes.fanout_seconds, 1, {}))


# What a deployment has (common/settings.py's defaults), instead of the bench's raised limits.
_DEFAULTS = Settings.load({})
PRODUCTION_RATE_LIMITS = {
    "RATE_LIMIT_WRITES_PER_MINUTE": str(_DEFAULTS.rate_limit_writes_per_minute),
    "RATE_LIMIT_CHAT_PER_MINUTE": str(_DEFAULTS.rate_limit_chat_per_minute),
    "RATE_LIMIT_READS_PER_MINUTE": str(_DEFAULTS.rate_limit_reads_per_minute),
}


def fanout_run(
    results: Results, stack: StackHandle, limits: str, seconds: float, users: int, ordinary: dict[str, Any]
) -> dict[str, Any]:
    """The ordinary users quiet, then under the attack, in `fanout_windows` alternations that
    share `seconds` each way (a machine whose speed drifts then weighs on both alike); the row of
    the fan-out table, percentiles over every window's turns."""
    sizes = results.sizes
    windows = max(1, sizes.fanout_windows)
    window = {**ordinary, "duration": seconds / windows}
    users_name = f"pg-fanout-{limits}-user"
    quiet: list[dict[str, Any]] = []
    under_attack: list[dict[str, Any]] = []
    attacked: list[dict[str, Any]] = []
    log(f"fan-out ({limits} rate limits): {sizes.fanout_attackers} connections of one account, {users} user(s)")
    for _ in range(windows):
        quiet.append(measure(results, job(stack, "chat_add", users, users_name, **window)))
        # One account, as in the attack: its turns in parallel, each on its own connection, for
        # longer than the ordinary users' window; a refused turn is sent again after its
        # Retry-After (a client hammering 429s is a request flood, which the chat rate limit
        # answers, not this attack).
        attack = job(
            stack,
            "chat_fanout",
            sizes.fanout_attackers,
            f"pg-fanout-{limits}-attack",
            duration=window["duration"] + 1.5,
            timeout=150,
            one_user=True,
            honor_retry_after=True,
        )
        with ThreadPoolExecutor(1) as pool:
            attacking = pool.submit(run_loadgen, attack)
            time.sleep(0.5)  # the attack's turns are under way
            under_attack.append(measure(results, job(stack, "chat_add", users, users_name, **window)))
            attacked.append(attacking.result())
    attack_latencies = [ms for run in attacked for ms in run.pop("latencies_ms")]
    quiet_latencies = [ms for run in quiet for ms in run["_latencies"]]
    attacked_latencies = [ms for run in under_attack for ms in run["_latencies"]]
    return {
        "limits": limits,
        "attackers": sizes.fanout_attackers,
        "seconds": seconds,
        "windows": windows,
        "users": users,
        "pause": ordinary.get("think_mean_seconds", 0.0),
        "attack_ok": sum(run["ok"] for run in attacked),
        "attack_errors": sum(run["errors"] for run in attacked),
        "attack_refused": sum(run.get("refused", 0) for run in attacked),
        "attack_error_samples": [sample for run in attacked for sample in run["error_samples"]][:2],
        "attack_p50": report.percentile(attack_latencies, 0.5),
        "victim_turns": len(attacked_latencies),
        "victim_errors": sum(run["errors"] for run in under_attack),
        "victim_p50": report.percentile(attacked_latencies, 0.5),
        "victim_p99": report.percentile(attacked_latencies, 0.99),
        "quiet_turns": len(quiet_latencies),
        "quiet_errors": sum(run["errors"] for run in quiet),
        "quiet_p50": report.percentile(quiet_latencies, 0.5),
        "quiet_p99": report.percentile(quiet_latencies, 0.99),
    }


# Issue 17's stacks: what each adds over (a). (a2) is (a) again, a control: (a2 - a) is what the
# measurement reads when nothing differs, its noise floor.
METRICS_OFF = {"TASK_METRICS_PORT": "0", "CONVERSATION_METRICS_PORT": "0", "AGENT_METRICS_PORT": "0"}
TRACING_VARIANTS = {
    "a": "metrics and tracing off (metrics ports 0: no /metrics server, no RPC metrics interceptor)",
    "a2": "the same as a, a second stack (the control: a2 - a is the noise)",
    "b": "metrics on (the default), no tracing",
    "c": "metrics on, tracing on (OTEL_EXPORTER_OTLP_ENDPOINT: the bench's OTLP receiver), default sampling",
    "c10": "metrics on, tracing on, 10 % of requests traced (TRACING_SAMPLE_PERCENT=10, the default until 4 Dec)",
    "d": "metrics on, tracing on, every request traced (TRACING_SAMPLE_PERCENT=100)",
}
TRACED_VARIANTS = ("c", "c10", "d")


def _cpu_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: (after.get(name, 0.0) - before.get(name, 0.0)) * 1000 for name in STACK_PROCESSES}


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 with fewer than two values)."""
    if len(values) < 2:
        return (values[0] if values else 0.0), 0.0
    return statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5


def _batched_mean_and_error(values: list[float], batches: list[int]) -> dict[str, float]:
    """The mean of per-round `values`, and its standard error: from the spread of the batches'
    means when there are several batches (rounds on the same stacks share their offsets), else
    from the rounds'."""
    by_batch: dict[int, list[float]] = {}
    for value, batch in zip(values, batches, strict=True):
        by_batch.setdefault(batch, []).append(value)
    if len(by_batch) < 2:
        mean, error = _mean_and_error(values)
    else:
        mean, error = _mean_and_error([statistics.fmean(group) for group in by_batch.values()])
    return {"mean": mean, "error": error}


def tracing_phase(results: Results, model: ModelServer, workdir: Path) -> None:
    """Issue 17: the CPU metrics and tracing add to a chat turn. Batches of six fresh PostgreSQL
    stacks side by side (TRACING_VARIANTS; which variant gets which folder and ports rotates from
    batch to batch), warmed up alike; then rounds: in each, every stack gets a new user and the
    same short run of sequential add-task turns, the stacks' turns interleaved one by one (so all
    six meet the same moments of a noisy machine), in an order rotated every round. Every stack's
    CPU is read before each round and again a settle time after it, the windows back to back, so
    the traced stacks' span exports (every 5 s, the SDK's default) are counted in the round they
    happen in; the last batch of spans is waited for and counted in the last round. Per round,
    each variant's CPU per turn less the mean of the two untouched stacks' (a, a2); the mean over
    the rounds, and its standard error from the spread of the batches' means (a stack's own
    offset lasts its life, so rounds on the same stacks are not independent)."""
    sizes = results.sizes
    model.set_delay(0.0)
    receivers = {key: OtlpReceiver(_fresh_dir(workdir / f"otlp-{key}")).start() for key in TRACED_VARIANTS}
    envs: dict[str, dict[str, str]] = {"a": METRICS_OFF, "a2": METRICS_OFF, "b": {}}
    for key, receiver in receivers.items():
        envs[key] = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": str(sizes.tracing_batch_delay_ms),
        }
    envs["c10"]["TRACING_SAMPLE_PERCENT"] = "10"
    envs["d"]["TRACING_SAMPLE_PERCENT"] = "100"
    keys = list(envs)
    slices: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}  # per round: batch, cpu, turns, p50
    spans: dict[str, dict[str, int]] = {}  # per traced variant (and "<key>_server"): per service
    try:
        for batch in range(sizes.tracing_batches):
            for key, counts in _tracing_batch(batch, model.url, envs, receivers, slices, workdir, sizes).items():
                for service, count in counts.items():
                    spans.setdefault(key, {})[service] = spans.get(key, {}).get(service, 0) + count
    finally:
        for receiver in receivers.values():
            receiver.stop()
    results.stacks += [f"tracing {key}: postgres" for key in keys]
    results.tracing = _tracing_summary(slices, spans, sizes)


def _tracing_batch(
    batch: int,
    model_url: str,
    envs: dict[str, dict[str, str]],
    receivers: dict[str, OtlpReceiver],
    slices: dict[str, list[dict[str, Any]]],
    workdir: Path,
    sizes: Sizes,
) -> dict[str, dict[str, int]]:
    """One batch: six fresh stacks, warmed up, then `tracing_rounds` rounds appended to `slices`;
    the spans the rounds exported (`_exported_spans`)."""
    keys = list(envs)
    placed = keys[batch % len(keys) :] + keys[: batch % len(keys)]  # folders and ports rotate
    log(f"tracing: batch {batch + 1}/{sizes.tracing_batches}, starting {len(keys)} stacks ({', '.join(placed)})")
    folders = [(_fresh_dir(workdir / f"tracing-{batch}-{key}"), envs[key]) for key in placed]
    with open_stacks("postgres", model_url, folders) as stacks:
        by_key = dict(zip(placed, stacks, strict=True))
        with ThreadPoolExecutor(len(stacks)) as pool:  # the same warm-up as the chat phase, side by side
            warm = [job(stack, "chat_add", 2, f"pg-trace-warm{batch}", requests_per_client=5) for stack in stacks]
            list(pool.map(run_loadgen, warm))
        drain_seconds = sizes.tracing_batch_delay_ms / 1000 + 0.5
        time.sleep(drain_seconds)  # the warm-up's exports out of the way
        spans_before = {key: receiver.counts() for key, receiver in receivers.items()}
        log(f"tracing: {sizes.tracing_rounds} rounds of {sizes.tracing_turns} sequential turns per stack, interleaved")
        for number in range(sizes.tracing_rounds):
            order = keys[number % len(keys) :] + keys[: number % len(keys)]
            name = f"{batch}-{number}"
            for key, row in _tracing_round({key: by_key[key] for key in order}, name, sizes).items():
                slices[key].append({**row, "batch": batch})
        # The last batch of spans: its export's CPU goes to the last round, as every earlier
        # export's went to the round it happened in.
        tail_before = {key: cpu_by_name_of(stack.pids) for key, stack in by_key.items()}
        time.sleep(drain_seconds)
        for key, stack in by_key.items():
            last = slices[key][-1]["cpu"]
            for process, spent in _cpu_ms(tail_before[key], cpu_by_name_of(stack.pids)).items():
                last[process] += spent
    return _exported_spans(receivers, spans_before)


def _exported_spans(receivers: dict[str, OtlpReceiver], before: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per traced variant (and "<key>_server"): the spans each service exported since `before`."""
    spans: dict[str, dict[str, int]] = {}
    for key, receiver in receivers.items():
        after = receiver.counts()
        for kind, suffix in (("spans", ""), ("server_spans", "_server")):
            spans[key + suffix] = {
                service: count - before[key].get(kind, {}).get(service, 0)
                for service, count in after.get(kind, {}).items()
            }
    return spans


def _tracing_round(stacks: dict[str, StackHandle], number: str, sizes: Sizes) -> dict[str, dict[str, Any]]:
    """Round `number`: a new user on every stack, their turns interleaved (one on each stack in
    `stacks`' order, again and again); each stack's CPU from just before the round to `settle`
    after it (its exports included: a process's CPU is its own, whenever it runs)."""
    before = {key: cpu_by_name_of(stack.pids) for key, stack in stacks.items()}
    jobs = [
        job(stack, "chat_add", 1, f"pg-trace-r{number}", requests_per_client=sizes.tracing_turns)
        for stack in stacks.values()
    ]
    outcomes = run_loadgen({"interleave": jobs})["results"]
    time.sleep(sizes.tracing_settle_seconds)
    return {
        key: {
            "cpu": _cpu_ms(before[key], cpu_by_name_of(stack.pids)),
            "turns": outcome["ok"],
            "errors": outcome["errors"],
            "error_samples": outcome["error_samples"],
            "p50": report.percentile(outcome["latencies_ms"], 0.5),
        }
        for (key, stack), outcome in zip(stacks.items(), outcomes, strict=True)
    }


def _per_turn(row: dict[str, Any]) -> float:
    return float(sum(row["cpu"].values())) / max(1, row["turns"])


def _tracing_summary(
    slices: dict[str, list[dict[str, Any]]], spans: dict[str, dict[str, int]], sizes: Sizes
) -> dict[str, Any]:
    variants = []
    for key, rows in slices.items():
        turns = sum(row["turns"] for row in rows)
        cpu = {name: sum(row["cpu"][name] for row in rows) / max(1, turns) for name in STACK_PROCESSES}
        variants.append(
            {
                "key": key,
                "what": TRACING_VARIANTS[key],
                "rounds": len(rows),
                "turns": turns,
                "errors": sum(row["errors"] for row in rows),
                "error_samples": [sample for row in rows for sample in row["error_samples"]][:3],
                "cpu_total": sum(cpu.values()),
                "cpu": cpu,
                "p50": statistics.median(row["p50"] for row in rows) if rows else 0.0,
                "spans": spans.get(key),
            }
        )
    # Against the mean of the two untouched stacks, round by round; the control (a2 - a) is the
    # difference between those two, what the method reads when nothing differs.
    batches = [row["batch"] for row in slices["a"]]
    baseline = [(_per_turn(a) + _per_turn(a2)) / 2 for a, a2 in zip(slices["a"], slices["a2"], strict=True)]
    differences = {}
    for key in slices:
        if key in ("a", "a2"):
            continue
        paired = [_per_turn(row) - base for row, base in zip(slices[key], baseline, strict=True)]
        differences[key] = _batched_mean_and_error(paired, batches)
    control = [_per_turn(a2) - _per_turn(a) for a, a2 in zip(slices["a"], slices["a2"], strict=True)]
    differences["a2"] = _batched_mean_and_error(control, batches)
    every = next(v for v in variants if v["key"] == "d")
    server_spans = spans.get("d_server", {})
    rpc_spans = sum(count for service, count in server_spans.items() if service != "gateway")
    return {
        "variants": variants,
        "differences": differences,  # per turn, against (a): mean over the rounds, standard error over the batches
        "turns_per_round": sizes.tracing_turns,
        "rounds": sizes.tracing_rounds * sizes.tracing_batches,
        "batches": sizes.tracing_batches,
        "settle_seconds": sizes.tracing_settle_seconds,
        "batch_delay_ms": sizes.tracing_batch_delay_ms,
        # The services' RPCs per turn: their server spans when every request is traced.
        "rpcs_per_turn": rpc_spans / every["turns"] if every["turns"] else 0.0,
        "metrics_cost": metrics_recording_cost(),
    }


def thinktime_phase(results: Results, stack: StackHandle, model: ModelServer) -> None:
    """Issue 19: N users, each on its own connection with its own conversation, each pausing an
    exponentially distributed time (the first pause too: no burst at the start) before every
    add-task turn, for a fixed duration; the model takes 1 s per step."""
    sizes = results.sizes
    model.set_delay(sizes.session_model_seconds)
    model_time_ms = MODEL_STEPS_PER_TURN * sizes.session_model_seconds * 1000
    users, mean = sizes.thinktime_users, sizes.thinktime_mean_seconds
    log(f"think time: {users} users, mean pause {mean:g}s, {sizes.thinktime_seconds:g}s, model 1s/step")
    try:
        spec = job(
            stack,
            "chat_add",
            users,
            "pg-think",
            duration=sizes.thinktime_seconds,
            think_mean_seconds=mean,
            timeout=150,  # past Envoy's chat route timeout: the stack's own limits decide
        )
        result = measure(results, spec)
    finally:
        model.set_delay(0.0)
    overheads = [latency - model_time_ms for latency in result.pop("_latencies")]
    result.update(
        phase="think time",
        users=users,
        mean_pause_s=mean,
        duration_s=sizes.thinktime_seconds,
        model_time_ms=model_time_ms,
        overhead_p50=report.percentile(overheads, 0.5),
        overhead_p99=report.percentile(overheads, 0.99),
        overhead_max=max(overheads, default=0.0),
        envoy=envoy_outcomes(stack.log_dir / "envoy.log", "/api/pg-think-", result["ok"] + result["errors"]),
    )
    results.thinktime = result


def burst_phase(results: Results, stack: StackHandle, model: ModelServer) -> None:
    """Issue 19, overload: N add-task turns offered at the same moment (N users, every connection
    opened first), the model 1 s per step. Each answer is a turn (200), a fast refusal (503 or 429
    with Retry-After) or anything else, which is an error."""
    sizes = results.sizes
    model.set_delay(sizes.session_model_seconds)
    model_time_ms = MODEL_STEPS_PER_TURN * sizes.session_model_seconds * 1000
    log(f"burst: {sizes.burst_turns} add-task turns at once, model 1s/step")
    try:
        spec = job(stack, "chat_burst", sizes.burst_turns, "pg-burst", requests_per_client=1, timeout=150)
        result = measure(results, spec)
    finally:
        model.set_delay(0.0)
    overheads = [latency - model_time_ms for latency in result.pop("_latencies")]
    refusals = result.pop("refusal_latencies_ms")
    result.update(
        phase="burst",
        offered=sizes.burst_turns,
        model_time_ms=model_time_ms,
        overhead_p50=report.percentile(overheads, 0.5),
        overhead_p99=report.percentile(overheads, 0.99),
        overhead_max=max(overheads, default=0.0),
        refusal_p50=report.percentile(refusals, 0.5),
        refusal_p99=report.percentile(refusals, 0.99),
        refusal_max=max(refusals, default=0.0),
    )
    # Envoy's view: which of the refusals its circuit breaker made (UO), which came from the agent,
    # and how long each took from its arrival at the gateway (the target's measure).
    envoy = envoy_outcomes(stack.log_dir / "envoy.log", "/api/pg-burst-", sizes.burst_turns)
    at_gateway = envoy.pop("refusal_ms")
    result.update(
        envoy=envoy,
        gateway_refusals=len(at_gateway),
        gateway_refusal_p50=report.percentile(at_gateway, 0.5),
        gateway_refusal_p99=report.percentile(at_gateway, 0.99),
        gateway_refusal_max=max(at_gateway, default=0.0),
    )
    results.burst = result


def session_phases(results: Results, stack: StackHandle, model: ModelServer) -> None:
    sizes = results.sizes
    model.set_delay(sizes.session_model_seconds)
    model_time_ms = MODEL_STEPS_PER_TURN * sizes.session_model_seconds * 1000
    try:
        for sessions in sizes.sessions:
            log(f"sessions: {sessions} concurrent add-task turns, model {sizes.session_model_seconds}s/step")
            spec = job(
                stack,
                "chat_add",
                sessions,
                f"pg-sessions-{sessions}",
                requests_per_client=1,
                timeout=150,  # past Envoy's 120 s chat route timeout: the stack's own limits decide
                ramp_seconds=results.ramp_seconds,
            )
            result = measure(results, spec)
            overheads = [latency - model_time_ms for latency in result.pop("_latencies")]
            result.update(
                sessions=sessions,
                model_time_ms=model_time_ms,
                overhead_p50=report.percentile(overheads, 0.5),
                overhead_p99=report.percentile(overheads, 0.99),
                overhead_max=max(overheads, default=0.0),
            )
            results.sessions.append(result)
    finally:
        model.set_delay(0.0)


def profile_phase(results: Results, stack: StackHandle, out_dir: Path, summary_path: Path) -> None:
    """py-spy on every Python service of the stack while 16 users chat (not a measured phase)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        results.notes.append("profile skipped: py-spy not installed")
        return
    targets = {
        name: pid
        for pid in descendants()
        if (name := process_name(pid)) and name not in BENCH_PROCESSES and name != "envoy"
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = results.sizes.profile_seconds or 5
    spies = []
    for name, pid in targets.items():
        output = out_dir / f"{name}.txt"
        command = [
            py_spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(seconds)),
            "-r",
            "200",
            "-f",
            "raw",
            "--gil",  # only samples holding the GIL: Python CPU, not threads parked in a queue
            "--full-filenames",
            "--nonblocking",  # do not pause the service while sampling
            "-o",
            str(output),
        ]
        spies.append((name, output, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    log(f"profiling {', '.join(targets)} for {seconds}s under 16 chatting users")
    run_loadgen(job(stack, "chat_add", 16, "pg-profile", duration=seconds + 1))
    summaries = []
    for _name, output, spy in spies:
        spy.wait(60)
        if output.exists():
            summaries.append(profile_summary.summarize(output))
    summary_path.write_text("# py-spy summaries (16 users, add-task turns)\n\n" + "\n\n".join(summaries) + "\n")
    results.profiles.append(f"py-spy summary: {summary_path} (raw profiles: {out_dir})")


def replicas_phase(results: Results, single: StackHandle, model: ModelServer, workdir: Path) -> None:
    """Add-task turns from the first concurrent user count on `single` (one process of each
    service), then on a fresh stack with REPLICAS of each, warmed up the same way."""
    sizes = results.sizes
    clients = sizes.chat_clients[0]
    model.set_delay(0.0)

    def one_row(stack: StackHandle, replicas: int) -> None:
        run_loadgen(job(stack, "chat_add", 2 * replicas, f"pg-rep{replicas}-warm", requests_per_client=5))
        log(f"replicas: chat_add with {clients} users, {replicas} process(es) of each service")
        result = measure(results, job(stack, "chat_add", clients, f"pg-rep{replicas}", duration=sizes.chat_seconds))
        result.update(replicas=replicas, clients=clients)
        results.replicas.append(result)

    one_row(single, 1)
    with open_stack("postgres", model.url, workdir / "replicas", replicas=REPLICAS) as stack:
        results.stacks.append(f"replicas: {stack.kind}")
        one_row(stack, REPLICAS)


REPLICAS = 2
PHASES = (
    "tasks",
    "ceiling",
    "hops",
    "chat",
    "fanout",
    "tracing",
    "thinktime",
    "burst",
    "sessions",
    "replicas",
    "sqlite",
)


@dataclass(frozen=True)
class Options:
    quick: bool
    out: Path
    command: str
    profile: bool = False
    phases: tuple[str, ...] = PHASES
    sessions: tuple[int, ...] = ()  # overrides the sizes' session counts
    ramp_seconds: float = 0.0  # sessions start spread over this long (0: all at once)


def run(options: Options) -> str:
    started = time.monotonic()
    sizes = QUICK if options.quick else FULL
    if options.sessions:
        sizes = replace(sizes, sessions=options.sessions)
    results = Results(sizes, options.quick, ramp_seconds=options.ramp_seconds)
    wanted = set(options.phases)
    machine = report.machine()
    busy = report.machine_was_busy()
    workdir = scratch_dir()
    model = ModelServer(workdir).start()
    try:
        with open_stack("postgres", model.url, workdir / "postgres") as stack:
            results.stacks.append(f"postgres: {stack.kind}")
            idle_phase(results, stack)
            if "tasks" in wanted:
                task_phases(results, stack, "postgres")
                if "ceiling" in wanted:
                    ceiling_phases(results, stack)
            if "hops" in wanted:
                hops_phase(results, stack, model)
            if not stack.has_chat:
                results.notes.append("chat phases skipped: agent_service is not in this tree yet")
            elif "chat" in wanted:
                chat_phases(results, stack, model)
            if stack.has_chat and "fanout" in wanted:
                fanout_phase(results, stack, model, workdir)
            if stack.has_chat and "tracing" in wanted:
                tracing_phase(results, model, workdir)
            if stack.has_chat and "thinktime" in wanted:
                thinktime_phase(results, stack, model)
            if stack.has_chat and "burst" in wanted:
                burst_phase(results, stack, model)
            if stack.has_chat and "sessions" in wanted:
                session_phases(results, stack, model)
            if stack.has_chat and "replicas" in wanted:
                replicas_phase(results, stack, model, workdir)
            if stack.has_chat and options.profile:
                profile_phase(results, stack, workdir / "profiles", options.out.parent / "PROFILE.md")
        if "sqlite" in wanted:
            with open_stack("sqlite", model.url, workdir / "sqlite") as stack:
                results.stacks.append(f"sqlite: {stack.kind}")
                task_phases(results, stack, "sqlite")
    finally:
        model.stop()
    from bench.markdown import render

    elapsed = time.monotonic() - started
    text = render(results, machine, busy, options.command, dt.datetime.now(dt.UTC), elapsed, workdir)
    options.out.write_text(text + _kept_sections(options.out))
    return text


KEPT_MARKER = "<!-- kept by make bench -->"


def _kept_sections(path: Path) -> str:
    """What follows KEPT_MARKER in the previous file (the reliability suites' full-run numbers,
    measured by their own commands), so a benchmark run does not erase it."""
    previous = path.read_text() if path.exists() else ""
    return "\n" + previous[previous.index(KEPT_MARKER) :] if KEPT_MARKER in previous else ""
