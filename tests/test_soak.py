"""Soak: sustained mixed REST and chat load through Envoy, then resource checks per process.

200 simulated users, 32 requests in flight, for SOAK_SECONDS (default 120; the full soak is
SOAK_SECONDS=1800), against the whole stack on PostgreSQL with the built-in model. Proven:
- every answer is 2xx (the load only asks for what exists: see tests/soak_load.py);
- no memory growth: VmRSS of every service process and of Envoy at the end is within
  SOAK_MAX_RSS_GROWTH (default 10%) of its value after warm-up (25% of the run);
- no leaked connections: each process's open socket count at the end is within a small
  tolerance of its count after warm-up.
Per-user rate limits are turned off here (their tests are in test_ratelimit.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator

import pytest

from tests.gateway_fixtures import NO_RATE_LIMITS, Gateway, start_gateway
from tests.soak_load import ProcessSample, Soak, SoakOptions, SoakResult, sample_processes
from tests.support import SECRET

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
MAX_RSS_GROWTH = float(os.environ.get("SOAK_MAX_RSS_GROWTH", "0.10"))
SOCKET_TOLERANCE = 4  # sockets a pool may open or close between the two samples
USERS, CONCURRENCY = 200, 32
# A ceiling on the request count, so the run ends even if the stack is unexpectedly fast.
MAX_REQUESTS = int(SOAK_SECONDS * 2000)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SOAK_SECONDS) + 600)]


class SoakOutcome:
    def __init__(self, result: SoakResult, warm: dict[str, ProcessSample], end: dict[str, ProcessSample]) -> None:
        self.result, self.warm, self.end = result, warm, end

    def table(self) -> str:
        rows = [
            f"{name:<13} rss {self.warm[name].rss_kib:>8} -> {self.end[name].rss_kib:>8} KiB, "
            f"sockets {self.warm[name].socket_fds:>4} -> {self.end[name].socket_fds:>4}"
            for name in self.warm
        ]
        return "\n".join(rows)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str]
) -> Iterator[Gateway]:
    with start_gateway(tmp_path_factory, database_url_factory, "postgres", extra_env=NO_RATE_LIMITS) as started:
        yield started


@pytest.fixture(scope="module")
def soak(gateway: Gateway) -> SoakOutcome:
    pids = {name: component.pid for name, component in gateway.stack.components.items() if component.pid}
    assert set(pids) == {"task", "conversation", "agent", "envoy"}, pids
    options = SoakOptions(
        gateway.base_url,
        SECRET,
        users=USERS,
        concurrency=CONCURRENCY,
        seconds=SOAK_SECONDS,
        max_requests=MAX_REQUESTS,
    )
    warm: dict[str, ProcessSample] = {}
    result = asyncio.run(Soak(options).run(on_warm=lambda: warm.update(sample_processes(pids))))
    end = sample_processes(pids)
    for name, component in gateway.stack.components.items():
        assert component.alive(), f"{name} died during the soak:\n{component.log_tail()}"
    outcome = SoakOutcome(result, warm, end)
    print(
        f"\nsoak: {result.requests} requests in {result.elapsed:.0f}s, {dict(result.by_operation)}\n{outcome.table()}"
    )
    return outcome


def test_the_load_ran_every_operation(soak: SoakOutcome) -> None:
    assert soak.result.elapsed >= SOAK_SECONDS * 0.9 or soak.result.requests >= MAX_REQUESTS, soak.result
    assert soak.result.requests >= SOAK_SECONDS * 5, soak.result  # a floor far below any healthy rate
    assert set(soak.result.by_operation) == {"create", "list", "get", "complete", "delete", "chat"}


def test_every_answer_was_2xx(soak: SoakOutcome) -> None:
    assert soak.result.error_count == 0, soak.result.errors


def test_no_process_grew_its_memory(soak: SoakOutcome) -> None:
    assert soak.warm, "the warm-up sample was never taken"
    grown = {
        name: (soak.warm[name].rss_kib, sample.rss_kib)
        for name, sample in soak.end.items()
        if sample.rss_kib > soak.warm[name].rss_kib * (1 + MAX_RSS_GROWTH)
    }
    assert not grown, f"VmRSS grew more than {MAX_RSS_GROWTH:.0%} after warm-up:\n{soak.table()}"


def test_no_process_leaked_connections(soak: SoakOutcome) -> None:
    leaked = {
        name: (soak.warm[name].socket_fds, sample.socket_fds)
        for name, sample in soak.end.items()
        if sample.socket_fds > soak.warm[name].socket_fds + max(SOCKET_TOLERANCE, soak.warm[name].socket_fds // 10)
    }
    assert not leaked, f"open sockets grew after warm-up:\n{soak.table()}"
