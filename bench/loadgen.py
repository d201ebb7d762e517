"""The load generator: a separate process driving the REST gateway over raw HTTP/1.1 keep-alive.

Reads one JSON job on stdin, prints one JSON result on stdout. Each virtual client is its own
user (own token, own tasks, own conversation) on its own keep-alive connection, so clients do
not contend on one user's counter row; all connections are opened before the clock starts.

It watches itself: its CPU time over wall time and its event loop's lag (a 10 ms ticker).
When either is high, the latencies it measured include its own queueing, and the result says so
(`self_bottleneck`).

Job fields: base_url, secret, scenario (see SCENARIOS), concurrency, duration (s) and/or
requests_per_client, user_prefix, one_user (every client the same user), honor_retry_after (a
refused client waits its Retry-After before the next request), timeout (s per request), ramp_seconds (start the clients
spread over this long instead of all at once), think_mean_seconds (before every request, the
first one included, each client pauses for an exponentially distributed time of this mean: users
who read and type, not a closed loop), max_latencies. A job of the form {"interleave": [job, ...]}
runs jobs of one client each with their requests taken in turn (`run_interleaved`) and prints
{"results": [result, ...]}.

Every failure is counted by kind (`error_kinds`: "HTTP 499", "timeout", ...). The `chat_burst`
scenario also tells refusals apart: a 503 or 429 that carries `Retry-After` is a refusal (its time
from sending to the answer is kept in `refusal_latencies_ms`), not an error; any other non-200 is.
A connection the server closed while idle (Envoy's idle timeout) is opened again before the next
request, as a browser would (`reconnects`).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from common.tokens import mint

LIST_SIZE = 50  # tasks every user has before get/list/update/complete phases
CHAT_LIST_SIZE = 20  # tasks every user has before list turns (the model then sees 20 tasks)


class HttpError(Exception):
    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind or message.split(":", 1)[0]  # e.g. "HTTP 499"


class Refused(Exception):
    """A fast, explicit refusal: 503 or 429 with Retry-After (the client is told when to come back)."""

    def __init__(self, status: int, retry_after: str) -> None:
        super().__init__(f"HTTP {status}, Retry-After {retry_after}")
        self.status, self.retry_after = status, retry_after


@dataclass
class Response:
    status: int
    body: bytes
    retry_after: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects after the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0  # reopened after the server closed an idle connection
        self.written_at = 0.0  # perf_counter() when the last request was handed to the socket

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, headers: bytes, body: bytes | None = None) -> Response:
        if self.reader is not None and self.reader.at_eof():  # closed by the server while idle
            self.close()
            self.reconnects += 1
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n".encode() + headers
        if body is not None:
            head += b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode() + b"\r\n"
        self.written_at = time.perf_counter()
        self.writer.write(head + b"\r\n" + (body or b""))
        try:
            return await self._read_response()
        except BaseException:
            self.close()  # a half-read response poisons the connection
            raise

    async def _read_response(self) -> Response:
        assert self.reader is not None
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as error:
            raise HttpError("connection closed by server") from error
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, chunked, close, retry_after = -1, False, False, None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                close = "close" in value.lower()
            elif name == "retry-after":
                retry_after = value.strip()
        if chunked:
            body = await self._read_chunked()
        elif length >= 0:
            body = await self.reader.readexactly(length)
        else:
            body = await self.reader.read()
            close = True
        if close:
            self.close()
        return Response(status, body, retry_after)

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)


@dataclass
class Client:
    """One virtual user: its connection, its auth header and whatever state its scenario keeps."""

    index: int
    user: str
    connection: Connection
    auth: bytes
    sent: int = 0
    conversation_id: int | None = None
    rng: random.Random = field(default_factory=random.Random)

    async def call(self, method: str, path: str, payload: Any = None) -> Response:
        body = None if payload is None else json.dumps(payload).encode()
        return await self.connection.request(method, f"/api/{self.user}{path}", self.auth, body)


def _expect(response: Response, status: int = 200) -> Response:
    if response.status != status:
        raise HttpError(f"HTTP {response.status}: {response.body[:200]!r}")
    return response


async def chat_turn(client: Client, message: str, tool: str, *, refusals: bool = False) -> None:
    """One chat turn; with `refusals`, a 503/429 with Retry-After raises Refused instead of an error."""
    payload: dict[str, Any] = {"message": message}
    if client.conversation_id is not None:
        payload["conversation_id"] = client.conversation_id
    response = await client.call("POST", "/chat", payload)
    if refusals and response.status in (429, 503):
        if response.retry_after:
            raise Refused(response.status, response.retry_after)
        kind = f"HTTP {response.status} without Retry-After"
        raise HttpError(f"{kind}: {response.body[:200]!r}", kind)
    reply = _expect(response).json()
    client.conversation_id = reply["conversation_id"]
    calls = reply.get("tool_calls") or []
    # A turn only counts when the tool really ran: an error inside a 200 is still an error.
    if not calls or calls[0].get("name") != tool or "error" in calls[0]:
        raise HttpError(f"unexpected tool calls: {calls!r:.200}", "200 without the tool's result")


async def chat_add(client: Client) -> None:
    await chat_turn(client, f"Add a task to buy milk number {client.sent}", "add_task")


async def chat_burst(client: Client) -> None:
    """An add-task turn that may be refused (503/429 with Retry-After): overload, issue 19."""
    await chat_turn(client, f"Add a task to buy milk number {client.sent}", "add_task", refusals=True)


FANOUT_CALLS = 1000  # tool calls the attacker's model asks for in one step


async def chat_fanout(client: Client) -> None:
    """The attack of issue 20: one message whose model step asks for a thousand tool calls. A
    turn counts when it is answered with a 200 (its calls past the tool budget are tool errors)."""
    response = await client.call("POST", "/chat", {"message": f"fanout {FANOUT_CALLS}"})
    if response.status == 429 and response.retry_after:  # the user's turns in progress are bounded
        raise Refused(response.status, response.retry_after)
    _expect(response)


async def chat_list(client: Client) -> None:
    await chat_turn(client, "Show me all my tasks", "list_tasks")


async def task_create(client: Client) -> None:
    _expect(await client.call("POST", "/tasks", {"title": f"Buy milk {client.sent}"}))


async def task_get(client: Client) -> None:
    _expect(await client.call("GET", f"/tasks/{client.rng.randint(1, LIST_SIZE)}"))


async def task_list(client: Client) -> None:
    reply = _expect(await client.call("GET", f"/tasks?page_size={LIST_SIZE}")).json()
    if len(reply["tasks"]) != LIST_SIZE:
        raise HttpError(f"listed {len(reply['tasks'])} tasks, expected {LIST_SIZE}")


async def task_update(client: Client) -> None:
    task_id = client.sent % LIST_SIZE + 1
    _expect(await client.call("PATCH", f"/tasks/{task_id}", {"title": f"Buy oat milk {client.sent}"}))


async def task_complete(client: Client) -> None:
    # Walk the ids, flipping each on one pass and back on the next: every call is a real write.
    task_id = client.sent % LIST_SIZE + 1
    completed = (client.sent // LIST_SIZE) % 2 == 0
    _expect(await client.call("PATCH", f"/tasks/{task_id}/complete", {"completed": completed}))


async def seed_tasks(client: Client, count: int = LIST_SIZE) -> None:
    """Top the user up to `count` tasks (one request per missing task)."""
    have = len(_expect(await client.call("GET", f"/tasks?page_size={count}")).json()["tasks"])
    for number in range(have, count):
        _expect(await client.call("POST", "/tasks", {"title": f"Seeded task {number}"}))


SCENARIOS: dict[str, Callable[[Client], Awaitable[None]]] = {
    "chat_add": chat_add,
    "chat_burst": chat_burst,
    "chat_list": chat_list,
    "chat_fanout": chat_fanout,
    "task_create": task_create,
    "task_get": task_get,
    "task_list": task_list,
    "task_update": task_update,
    "task_complete": task_complete,
    "seed_tasks": seed_tasks,
    "seed_chat_tasks": lambda client: seed_tasks(client, CHAT_LIST_SIZE),
}


class LagMonitor:
    """How late a 10 ms ticker wakes up: the event loop's own queueing delay."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags_ms.append((time.perf_counter() - before - 0.01) * 1000)

    def stop(self) -> None:
        if self._task:
            self._task.cancel()


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    error_kinds: Counter[str] = field(default_factory=Counter)
    refusal_latencies_ms: list[float] = field(default_factory=list)
    refusal_statuses: Counter[str] = field(default_factory=Counter)
    first_sends: list[float] = field(default_factory=list)  # perf_counter of each client's first request

    def error(self, text: str, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text[:300])

    def refused(self, latency_ms: float, status: int) -> None:
        self.refusal_latencies_ms.append(latency_ms)
        self.refusal_statuses[str(status)] += 1


async def drive(client: Client, step: Callable[[Client], Awaitable[None]], job: dict[str, Any], tally: Tally) -> None:
    deadline = time.perf_counter() + job["duration"] if job.get("duration") else None
    limit = job.get("requests_per_client")
    ramp = float(job.get("ramp_seconds", 0))
    think = float(job.get("think_mean_seconds", 0))
    if ramp:  # spread the clients' first requests evenly over the ramp instead of a burst
        await asyncio.sleep(ramp * client.index / job["concurrency"])
    while (limit is None or client.sent < limit) and (deadline is None or time.perf_counter() < deadline):
        if think:  # the user reads and types: an exponential pause before every turn, the first included
            await asyncio.sleep(client.rng.expovariate(1.0 / think))
            if deadline is not None and time.perf_counter() >= deadline:
                break
        await attempt(client, step, job, tally)


async def attempt(client: Client, step: Callable[[Client], Awaitable[None]], job: dict[str, Any], tally: Tally) -> None:
    """One request of `client`, counted in `tally` as a latency, a refusal or an error."""
    timeout = float(job.get("timeout", 120))
    started = time.perf_counter()
    try:
        await asyncio.wait_for(step(client), timeout)
        tally.latencies_ms.append((time.perf_counter() - started) * 1000)
    except Refused as refusal:  # one request: timed from its write (see first_sends below)
        written = max(started, client.connection.written_at)
        tally.refused((time.perf_counter() - written) * 1000, refusal.status)
        if job.get("honor_retry_after"):  # as a client told when to come back does
            await asyncio.sleep(float(refusal.retry_after))
    except TimeoutError:
        tally.error(f"timeout after {timeout}s", "timeout")
        client.connection.close()
    except HttpError as error:
        tally.error(f"HttpError: {error}", error.kind)
    except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as error:
        tally.error(f"{type(error).__name__}: {error}", type(error).__name__)
    if client.sent == 0 and client.connection.written_at >= started:
        # When the first request really went out (a burst's 5,000 tasks reach their writes
        # one after another in this one loop), not when its task was started.
        tally.first_sends.append(client.connection.written_at)
    client.sent += 1


async def open_clients(job: dict[str, Any]) -> list[Client]:
    url = urlsplit(job["base_url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    clients = []
    for index in range(job["concurrency"]):
        # one_user: every client is the same user (its own connection), as one attacking account.
        user = job["user_prefix"] if job.get("one_user") else f"{job['user_prefix']}-{index}"
        auth = f"authorization: Bearer {mint(job['secret'], user, 4 * 3600)}\r\n".encode()
        clients.append(Client(index, user, Connection(host, port), auth, rng=random.Random(index)))
    # Connect everyone before the clock starts, a few hundred at a time (listen backlogs).
    gate = asyncio.Semaphore(200)

    async def connect(client: Client) -> None:
        async with gate:
            await client.connection.open()

    await asyncio.gather(*(connect(client) for client in clients))
    return clients


async def run(job: dict[str, Any]) -> dict[str, Any]:
    step = SCENARIOS[job["scenario"]]
    clients = await open_clients(job)
    tally, lag = Tally(), LagMonitor()
    lag.start()
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    await asyncio.gather(*(drive(client, step, job, tally) for client in clients))
    wall = time.perf_counter() - wall_before
    cpu = time.process_time() - cpu_before
    lag.stop()
    for client in clients:
        client.connection.close()
    result = summarize(job, tally, lag.lags_ms, wall, cpu)
    result["reconnects"] = sum(client.connection.reconnects for client in clients)
    return result


async def run_interleaved(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jobs of one client each (usually on different stacks), their requests taken in turn: one
    of the first job's, then one of the second's, ... So every job's requests meet the same
    moments of a noisy machine, and a difference between them is the stacks', not the minute's."""
    clients = [(await open_clients(job))[0] for job in jobs]
    tallies = [Tally() for _ in jobs]
    lag = LagMonitor()
    lag.start()
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    for _ in range(max(int(job["requests_per_client"]) for job in jobs)):
        for client, job, tally in zip(clients, jobs, tallies, strict=True):
            if client.sent < int(job["requests_per_client"]):
                await attempt(client, SCENARIOS[job["scenario"]], job, tally)
    wall, cpu = time.perf_counter() - wall_before, time.process_time() - cpu_before
    lag.stop()
    for client in clients:
        client.connection.close()
    return [summarize(job, tally, lag.lags_ms, wall, cpu) for job, tally in zip(jobs, tallies, strict=True)]


def summarize(job: dict[str, Any], tally: Tally, lags_ms: list[float], wall: float, cpu: float) -> dict[str, Any]:
    lags = sorted(lags_ms) or [0.0]
    cpu_fraction = cpu / wall if wall else 0.0
    lag_p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
    limit = int(job.get("max_latencies", 200_000))

    def bounded(values: list[float]) -> list[float]:  # keep the distribution, drop the bulk
        return random.Random(0).sample(values, limit) if len(values) > limit else values

    sends = tally.first_sends
    return {
        "scenario": job["scenario"],
        "concurrency": job["concurrency"],
        "ok": len(tally.latencies_ms),
        "errors": tally.errors,
        "error_samples": tally.error_samples,
        "error_kinds": dict(tally.error_kinds.most_common()),
        "refused": len(tally.refusal_latencies_ms),
        "refusal_statuses": dict(tally.refusal_statuses),
        "refusal_latencies_ms": bounded(tally.refusal_latencies_ms),
        # How far apart the clients' first requests went out (a burst: all at the same moment).
        "first_send_spread_ms": (max(sends) - min(sends)) * 1000 if sends else 0.0,
        "wall_s": wall,
        "latencies_ms": bounded(tally.latencies_ms),
        "loadgen_cpu_fraction": cpu_fraction,
        "loadgen_loop_lag_p99_ms": lag_p99,
        "loadgen_loop_lag_max_ms": lags[-1],
        # Near a full core, or a loop that wakes >20 ms late, means we measured ourselves too.
        "self_bottleneck": cpu_fraction > 0.9 or lag_p99 > 20,
    }


def main() -> None:
    job = json.loads(sys.stdin.read())
    if "interleave" in job:  # {"interleave": [job, ...]}: see run_interleaved
        result: dict[str, Any] = {"results": asyncio.run(run_interleaved(job["interleave"]))}
    else:
        result = asyncio.run(run(job))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
