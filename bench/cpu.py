"""CPU time of chosen processes at nanosecond resolution, and what the metrics interceptor costs.

/proc/<pid>/stat counts CPU in clock ticks (10 ms): over 200 turns that is 0.05 ms per turn per
process, too coarse for a difference of half a millisecond. The scheduler's own account
(/proc/<pid>/task/<tid>/schedstat, nanoseconds on the CPU) is exact, summed over the threads
alive at the reading: a thread that ends between two readings takes its time with it, so this is
for processes whose threads live as long as they do (the services and Envoy).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.procs import cpu_seconds, descendants, process_name


def precise_cpu_seconds(pid: int) -> float:
    """CPU seconds of every live thread of `pid` (schedstat), or stat's ticks when unavailable."""
    total_ns, found = 0, False
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                total_ns += int((Path("/proc") / str(pid) / "task" / tid / "schedstat").read_text().split()[0])
                found = True
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return 0.0
    return total_ns / 1e9 if found else cpu_seconds(pid)


def cpu_by_name_of(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of `pids` and their descendants, summed per process name."""
    totals: dict[str, float] = {}
    for pid in pids:
        for each in [pid, *descendants(pid)]:
            name = process_name(each)
            if name is not None:
                totals[name] = totals.get(name, 0.0) + precise_cpu_seconds(each)
    return totals


class _Context:
    """The part of grpc.aio.ServicerContext the interceptor reads."""

    def code(self) -> Any:
        return None


async def _interceptor_cost_us(calls: int) -> float:
    """The server interceptor (common/interceptor.py) around a trivial handler, with the RPC
    metrics recorded against without: what recording adds per call (token verified, access line
    logged in both)."""
    import logging

    import grpc

    from common.auth import TokenVerifier
    from common.interceptor import CallInterceptor
    from common.settings import Settings
    from common.tokens import mint

    async def behavior(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(behavior)

    async def continuation(details: Any) -> Any:
        return handler

    secret = "bench-secret-" + "x" * 32
    verifier = TokenVerifier(Settings.load({"BETTER_AUTH_SECRET": secret, "RATE_LIMIT_REDIS_URL": ""}))
    metadata = (("authorization", f"Bearer {mint(secret, 'bench-user')}"),)
    details = SimpleNamespace(method="/bench.v1.Bench/Call", invocation_metadata=metadata)
    context = _Context()
    timings: dict[bool, list[float]] = {}
    logging.getLogger("rpc").disabled = True  # the bench's own stderr is not the subject
    try:
        for record_metrics in (False, True, False, True):
            interceptor = CallInterceptor(verifier, record_metrics)
            for _ in range(200):  # label children built, caches warm
                await (await interceptor.intercept_service(continuation, details)).unary_unary(b"", context)
            started = time.process_time()
            for _ in range(calls):
                await (await interceptor.intercept_service(continuation, details)).unary_unary(b"", context)
            timings.setdefault(record_metrics, []).append(time.process_time() - started)
    finally:
        logging.getLogger("rpc").disabled = False
    return max(0.0, min(timings[True]) - min(timings[False])) / calls * 1e6


def _turn_metrics_cost_us(turns: int) -> float:
    """The agent's own counters of one add-task turn: the turn, its tool call, two model requests."""
    from common import metrics

    def one_turn() -> None:
        metrics.chat_turn("ok")
        metrics.tool_call("add_task", "ok")
        for _ in range(2):
            with metrics.model_request() as request:
                request.tokens(100, 10)

    for _ in range(100):
        one_turn()
    started = time.process_time()
    for _ in range(turns):
        one_turn()
    return (time.process_time() - started) / turns * 1e6


def metrics_recording_cost(calls: int = 20000) -> dict[str, float]:
    """µs of CPU the always-on metrics take, measured in this process (tracing off): per RPC
    (the server interceptor recording them against not) and per turn (the agent's product
    counters)."""
    return {
        "per_rpc_us": asyncio.run(_interceptor_cost_us(calls)),
        "per_turn_counters_us": _turn_metrics_cost_us(calls // 4),
    }
