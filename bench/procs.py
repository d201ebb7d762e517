"""What every process of the stack holds: RSS and open sockets, sampled from /proc.

The stack's processes are found as descendants of the benchmark process (Envoy included),
named by their command line; the model server and the load generator are named too and
reported apart, since they are the benchmark's, not the product's.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# Command-line fragments -> the name a process is reported under (first match wins).
NAMES = (
    ("bench.model_server", "model_server (bench)"),
    ("bench.loadgen", "loadgen (bench)"),
    ("task_service", "task_service"),
    ("conversation_service", "conversation_service"),
    ("agent_service", "agent_service"),
    ("envoy", "envoy"),
)
BENCH_PROCESSES = {"model_server (bench)", "loadgen (bench)"}


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces or parentheses: the ppid follows the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry.name))
    return children


def descendants(root: int | None = None) -> list[int]:
    children = _children_map()
    found, todo = [], [root or os.getpid()]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


def process_name(pid: int) -> str | None:
    try:
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    for fragment, name in NAMES:
        if fragment in cmdline:
            return name
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3 of stat(5), so utime (14) and stime (15) are 11 and 12 here.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_name() -> dict[str, float]:
    """CPU seconds used so far by every named descendant process, summed per name."""
    totals: dict[str, float] = defaultdict(float)
    for pid in descendants():
        name = process_name(pid)
        if name is not None:
            totals[name] += cpu_seconds(pid)
    return dict(totals)


def rss_mb(pid: int) -> float:
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def socket_count(pid: int) -> int:
    count = 0
    fd_dir = Path("/proc") / str(pid) / "fd"
    try:
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(fd_dir / fd).startswith("socket:"):
                    count += 1
            except OSError:
                continue
    except OSError:
        return 0
    return count


@dataclass
class Peaks:
    """Per process name: peak RSS (MB) and peak socket count; plus the peak of the stack's total RSS."""

    rss_mb: dict[str, float] = field(default_factory=dict)
    sockets: dict[str, int] = field(default_factory=dict)
    stack_total_rss_mb: float = 0.0

    def merge(self, other: Peaks) -> None:
        for name, value in other.rss_mb.items():
            self.rss_mb[name] = max(self.rss_mb.get(name, 0.0), value)
        for name, count in other.sockets.items():
            self.sockets[name] = max(self.sockets.get(name, 0), count)
        self.stack_total_rss_mb = max(self.stack_total_rss_mb, other.stack_total_rss_mb)


class Sampler:
    """Samples every descendant process on a thread while a phase runs (`with Sampler() as s:`)."""

    def __init__(self, interval: float = 0.2, sockets_every: int = 5) -> None:
        # Counting sockets means a readlink per descriptor (thousands with many sessions):
        # done on every 5th sample only, so the sampler stays cheap next to what it measures.
        self.interval, self.sockets_every = interval, sockets_every
        self.samples = 0
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        rss: dict[str, float] = defaultdict(float)
        sockets: dict[str, int] = defaultdict(int)
        with_sockets = self.samples % self.sockets_every == 0
        self.samples += 1
        for pid in descendants():
            name = process_name(pid)
            if name is None:
                continue
            rss[name] += rss_mb(pid)  # several replicas of a name add up
            if with_sockets:
                sockets[name] += socket_count(pid)
        total = sum(value for name, value in rss.items() if name not in BENCH_PROCESSES)
        self.peaks.merge(Peaks(dict(rss), dict(sockets), total))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
