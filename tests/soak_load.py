"""Mixed REST and chat load from many simulated users, and per-process resource samples.

Used by tests/test_soak.py; also runnable by hand against a running stack (`make up`):

    .venv/bin/python -m tests.soak_load --base-url http://127.0.0.1:8080 --seconds 600 \
        --secret "$BETTER_AUTH_SECRET" --pid envoy=1234 --pid task=1235

Each simulated user owns its tasks: users are split among the workers (one worker per
in-flight request), so no two requests race on one user's task and every complete/delete
targets a task that exists. Every answer must be 2xx; anything else is recorded as an error.
The run stops by itself after `seconds` or `max_requests`, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx2

from common.tokens import mint

MAX_TASKS_PER_USER = 15  # beyond this a user deletes instead of creating: the data stays bounded
CHAT_MESSAGES = ("add a task to buy milk", "show my tasks", "add a task to call mom", "what is pending?")
# Operation -> weight; chat is the expensive one (a model run and several gRPC hops).
MIX = {"create": 30, "list": 25, "get": 10, "complete": 15, "delete": 10, "chat": 10}


@dataclass
class SoakOptions:
    base_url: str
    secret: str
    users: int = 200
    concurrency: int = 32
    seconds: float = 120.0
    max_requests: int = 1_000_000
    timeout: float = 60.0
    seed: int = 7


@dataclass
class SoakResult:
    requests: int = 0
    elapsed: float = 0.0
    by_operation: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def record(self, operation: str, status: int, body: bytes) -> None:
        self.requests += 1
        self.by_operation[operation] += 1
        self.statuses[f"{operation} {status}"] += 1
        if not 200 <= status < 300:
            self.error(f"{operation} -> {status}: {body[:300]!r}")

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(text)


@dataclass
class ProcessSample:
    rss_kib: int
    socket_fds: int


def sample_process(pid: int) -> ProcessSample:
    """VmRSS from /proc/<pid>/status and the number of open socket file descriptors."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:  # closed between listdir and readlink
            continue
    return ProcessSample(rss, sockets)


def sample_processes(pids: dict[str, int]) -> dict[str, ProcessSample]:
    return {name: sample_process(pid) for name, pid in pids.items()}


@dataclass
class User:
    user_id: str
    headers: dict[str, str]
    task_ids: list[int] = field(default_factory=list)
    completed: set[int] = field(default_factory=set)
    conversation_id: int | None = None


class Soak:
    def __init__(self, options: SoakOptions) -> None:
        self.options = options
        self.result = SoakResult()
        self.random = random.Random(options.seed)
        run_id = self.random.randrange(16**8)
        self.users = [self._user(f"soak-{run_id:08x}-{index}") for index in range(options.users)]
        self.deadline = 0.0

    def _user(self, user_id: str) -> User:
        token = mint(self.options.secret, user_id, int(self.options.seconds) + 3600)
        return User(user_id, {"Authorization": f"Bearer {token}"})

    def done(self) -> bool:
        return time.monotonic() >= self.deadline or self.result.requests >= self.options.max_requests

    async def run(self, on_warm: Callable[[], None] | None = None, warm_fraction: float = 0.25) -> SoakResult:
        """Run the load; call `on_warm` once `warm_fraction` of the time has passed."""
        started = time.monotonic()
        self.deadline = started + self.options.seconds
        limits = httpx2.Limits(
            max_connections=self.options.concurrency, max_keepalive_connections=self.options.concurrency
        )
        async with httpx2.AsyncClient(
            base_url=self.options.base_url, limits=limits, timeout=self.options.timeout
        ) as client:
            workers = [
                self._worker(client, self.users[index :: self.options.concurrency])
                for index in range(self.options.concurrency)
            ]
            await asyncio.gather(*workers, self._call_when_warm(on_warm, started, warm_fraction))
        self.result.elapsed = time.monotonic() - started
        return self.result

    async def _call_when_warm(self, on_warm: Callable[[], None] | None, started: float, fraction: float) -> None:
        if on_warm is None:
            return
        await asyncio.sleep(max(0.0, started + fraction * self.options.seconds - time.monotonic()))
        if not self.done():
            on_warm()

    async def _worker(self, client: httpx2.AsyncClient, users: list[User]) -> None:
        while users and not self.done():
            user = self.random.choice(users)
            operation = self._pick(user)
            try:
                await getattr(self, f"_{operation}")(client, user)
            except httpx2.HTTPError as error:
                self.result.requests += 1
                self.result.error(f"{operation}: {error!r}")

    def _pick(self, user: User) -> str:
        operation = self.random.choices(list(MIX), weights=list(MIX.values()))[0]
        if operation in ("get", "complete", "delete") and not user.task_ids:
            return "create"
        if operation == "create" and len(user.task_ids) >= MAX_TASKS_PER_USER:
            return "delete"
        return operation

    async def _send(
        self, client: httpx2.AsyncClient, operation: str, method: str, path: str, user: User, body: Any = None
    ) -> Any:
        response = await client.request(method, path, headers=user.headers, json=body)
        self.result.record(operation, response.status_code, response.content)
        return response.json() if response.status_code == 200 else None

    async def _create(self, client: httpx2.AsyncClient, user: User) -> None:
        body = {"title": f"task {self.random.randrange(10**6)}", "description": "soak"}
        task = await self._send(client, "create", "POST", f"/api/{user.user_id}/tasks", user, body)
        if task is not None:
            user.task_ids.append(task["id"])

    async def _list(self, client: httpx2.AsyncClient, user: User) -> None:
        status = self.random.choice(("all", "pending", "completed"))
        await self._send(client, "list", "GET", f"/api/{user.user_id}/tasks?status={status}&page_size=20", user)

    async def _get(self, client: httpx2.AsyncClient, user: User) -> None:
        task_id = self.random.choice(user.task_ids)
        await self._send(client, "get", "GET", f"/api/{user.user_id}/tasks/{task_id}", user)

    async def _complete(self, client: httpx2.AsyncClient, user: User) -> None:
        task_id = self.random.choice(user.task_ids)
        completed = task_id not in user.completed
        path = f"/api/{user.user_id}/tasks/{task_id}/complete"
        if await self._send(client, "complete", "PATCH", path, user, {"completed": completed}) is not None:
            (user.completed.add if completed else user.completed.discard)(task_id)

    async def _delete(self, client: httpx2.AsyncClient, user: User) -> None:
        task_id = user.task_ids.pop(self.random.randrange(len(user.task_ids)))
        user.completed.discard(task_id)
        await self._send(client, "delete", "DELETE", f"/api/{user.user_id}/tasks/{task_id}", user)

    async def _chat(self, client: httpx2.AsyncClient, user: User) -> None:
        body: dict[str, Any] = {"message": self.random.choice(CHAT_MESSAGES)}
        if user.conversation_id is not None:
            body["conversation_id"] = user.conversation_id
        reply = await self._send(client, "chat", "POST", f"/api/{user.user_id}/chat", user, body)
        if reply is None:
            return
        user.conversation_id = reply["conversation_id"]
        for call in reply["tool_calls"]:  # tasks the model added are the user's too: track them
            if call["name"] == "add_task" and isinstance(call.get("result"), dict):
                user.task_ids.append(call["result"]["task_id"])


def main() -> None:
    parser = argparse.ArgumentParser(description="Soak a running stack with mixed REST and chat load.")
    parser.add_argument("--base-url", default="http://127.0.0.1:8080")
    parser.add_argument("--secret", default=os.environ.get("BETTER_AUTH_SECRET", ""))
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pid", action="append", default=[], help="name=pid of a process to sample (repeatable)")
    args = parser.parse_args()
    pids = {name: int(pid) for name, pid in (item.split("=", 1) for item in args.pid)}
    options = SoakOptions(args.base_url, args.secret, args.users, args.concurrency, args.seconds)
    warm: dict[str, ProcessSample] = {}
    result = asyncio.run(Soak(options).run(lambda: warm.update(sample_processes(pids))))
    end = sample_processes(pids)
    summary = {
        "result": asdict(result),
        "warm": {name: asdict(sample) for name, sample in warm.items()},
        "end": {name: asdict(sample) for name, sample in end.items()},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
