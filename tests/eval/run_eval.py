"""The built-in model's labelled evaluation: run every case through a real stack, score it.

Each case (tests/eval/dev/*.yaml and tests/eval/held_out/*.yaml, see README.md) gets a fresh
user: its seed tasks are created through the task API, its messages are sent to the chat agent one after the other in one conversation,
and the case passes when the user's tasks afterwards are the expected ones (titles,
completed flags, which numbers still exist) and the last answer has the expected properties.

Backends:
  --local                 start task_service, conversation_service and agent_service here
                          (SQLite in a temporary folder, no LLM_BASE_URL: the built-in model)
  --grpc TASK_ADDR AGENT_ADDR   a running stack, over gRPC
  --rest BASE_URL         a running stack through the gateway (Envoy), over REST
  --driver TASK_ADDR      no agent_service: the model through the openai SDK, tools run here
  --memory                no services: the model with in-memory tools (memory.py), a quick
                          development loop; not the score of record
Tokens are minted per user with --secret (default: BETTER_AUTH_SECRET, or the local one).

    python -m tests.eval.run_eval --local
    python -m tests.eval.run_eval --local --set held_out      # only the held-out batches
    python -m tests.eval.run_eval --rest http://127.0.0.1:8080 --secret "$BETTER_AUTH_SECRET"
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
import time
import uuid
import zoneinfo
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import yaml

from common.tokens import mint

EVAL_DIR = Path(__file__).parent
# The development set (cases the model was tuned on) and the held-out batches (written
# before the model saw them, scored on their first run; see README.md).
CASE_SETS = {"dev": EVAL_DIR / "dev", "held_out": EVAL_DIR / "held_out"}
CONCURRENCY = 8
PLANNING_KEYS = ("due", "priority", "tags", "seed_meta")


# ---------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class TaskState:
    id: int
    title: str
    completed: bool
    due_date: str = ""
    due_time: str = ""
    priority: str = "none"
    tags: tuple[str, ...] = ()


@dataclass
class Case:
    name: str
    seed: list[tuple[str, bool]]
    say: list[str]
    tasks: list[TaskState] | None  # None: not checked
    reply_has: list[str] = field(default_factory=list)
    reply_lacks: list[str] = field(default_factory=list)
    asks: bool = False
    # Planning (round 2): expected due dates ({task number: spec}, see due_matches),
    # priorities and tags; seed_meta gives seed tasks their own. `planning` cases need a
    # stack with the planning tools and are skipped (and counted) by one without them.
    due: dict[int | str, str] = field(default_factory=dict)  # by task number, or by title
    priority: dict[int, str] = field(default_factory=dict)
    tags: dict[int, list[str]] = field(default_factory=dict)
    seed_meta: dict[int, dict[str, Any]] = field(default_factory=dict)
    planning: bool = False


def _task_line(line: str, default_id: int) -> TaskState:
    """ "3. [x] Pay bills" -> TaskState(3, "Pay bills", True); the number may be left out."""
    text = line.strip()
    task_id = default_id
    head, _, rest = text.partition(". ")
    if head.isdigit() and rest:
        task_id, text = int(head), rest
    completed = text.startswith("[x] ")
    return TaskState(task_id, text[4:] if completed else text, completed)


def _apply_changes(seed: list[TaskState], entry: dict[str, Any]) -> list[TaskState]:
    """The seed tasks with a case's expected changes: added (new titles, numbered on from the
    seed), completed / deleted (task numbers), renamed ({number: new title})."""
    tasks = {task.id: task for task in seed}
    next_id = len(seed) + 1
    for title in entry.get("added") or []:
        task = _task_line(title, next_id)
        tasks[next_id] = task
        next_id += 1
    for task_id in entry.get("completed") or []:
        tasks[task_id] = TaskState(task_id, tasks[task_id].title, True)
    for task_id, title in (entry.get("renamed") or {}).items():
        tasks[task_id] = TaskState(task_id, title, tasks[task_id].completed)
    for task_id in entry.get("deleted") or []:
        del tasks[task_id]
    return [tasks[task_id] for task_id in sorted(tasks)]


def case_files(which: str = "all", path: Path | None = None) -> list[Path]:
    """The YAML files of a case set ("dev", "held_out", "all"), or of one file or folder."""
    if path is not None:
        return [path] if path.is_file() else sorted(path.glob("*.yaml"))
    folders = list(CASE_SETS.values()) if which == "all" else [CASE_SETS[which]]
    return [file for folder in folders for file in sorted(folder.glob("*.yaml"))]


def load_cases(path: Path | None = None, which: str = "all") -> list[Case]:
    raw = [entry for file in case_files(which, path) for entry in yaml.safe_load(file.read_text()) or []]
    cases = []
    names: set[str] = set()
    for entry in raw:
        seed = [_task_line(line, index + 1) for index, line in enumerate(entry.get("seed") or [])]
        say = entry["say"] if isinstance(entry["say"], list) else [entry["say"]]
        expected = entry.get("tasks", "same")
        if expected == "same":
            tasks: list[TaskState] | None = _apply_changes(seed, entry)
        elif expected == "any":
            tasks = None
        else:
            tasks = [_task_line(line, index + 1) for index, line in enumerate(expected)]
        name = entry["name"]
        if name in names:
            raise ValueError(f"duplicate case name {name!r}")
        names.add(name)
        cases.append(
            Case(
                name=name,
                seed=[(task.title, task.completed) for task in seed],
                say=[str(message) for message in say],
                tasks=tasks,
                reply_has=list(entry.get("reply_has") or []),
                reply_lacks=list(entry.get("reply_lacks") or []),
                asks=bool(entry.get("asks", False)),
                due={
                    (int(k) if str(k).isdigit() else str(k)): str(v or "") for k, v in (entry.get("due") or {}).items()
                },
                priority={int(k): str(v) for k, v in (entry.get("priority") or {}).items()},
                tags={int(k): [str(t) for t in v or []] for k, v in (entry.get("tags") or {}).items()},
                seed_meta={int(k): dict(v) for k, v in (entry.get("seed_meta") or {}).items()},
                planning=bool(entry.get("planning")) or any(entry.get(key) for key in PLANNING_KEYS),
            )
        )
    return cases


_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def due_matches(spec: str, due_date: str, due_time: str, today: dt.date) -> bool:
    """Does a task's due date fit a case's spec? "" none; "*" any date; "+2" two days from
    today; "+1..+13" a range of them; "fri" the next Friday (today included); "2026-12-24";
    "sat|sun" either; any of them with " HH:MM" for the time."""
    day, _, time_part = spec.strip().partition(" ")
    if not day:
        return not due_date
    if not due_date or (time_part and due_time != time_part):
        return False
    if "|" in day:
        return any(due_matches(option, due_date, "", today) for option in day.split("|"))
    date = dt.date.fromisoformat(due_date)
    if day == "*":
        return True
    if ".." in day:
        low, high = (int(part) for part in day.split(".."))
        return low <= (date - today).days <= high
    if day.startswith("+") or day.startswith("-"):
        return date == today + dt.timedelta(days=int(day))
    if day[:3].lower() in _WEEKDAYS:
        return date.weekday() == _WEEKDAYS.index(day[:3].lower()) and 0 <= (date - today).days <= 7
    return date == dt.date.fromisoformat(day)


def resolve_due(spec: str, today: dt.date) -> tuple[str, str]:
    """A seed's due spec as the (due_date, due_time) to store."""
    day, _, time_part = spec.strip().partition(" ")
    if day.startswith(("+", "-")):
        return (today + dt.timedelta(days=int(day))).isoformat(), time_part
    if day[:3].lower() in _WEEKDAYS:
        ahead = (_WEEKDAYS.index(day[:3].lower()) - today.weekday()) % 7
        return (today + dt.timedelta(days=ahead)).isoformat(), time_part
    return day, time_part


def user_today(timezone: str = "UTC") -> dt.date:
    return dt.datetime.now(zoneinfo.ZoneInfo(timezone)).date()


# ---------------------------------------------------------------------------------------
# Backends


class Backend(Protocol):
    supports_planning: bool

    async def create_task(self, user: str, title: str, completed: bool, meta: dict[str, Any]) -> None: ...
    async def chat(self, user: str, conversation_id: int | None, message: str) -> tuple[int | None, str]: ...
    async def tasks(self, user: str) -> list[TaskState]: ...
    async def close(self) -> None: ...


class GrpcBackend:
    """The real stack over gRPC: TaskService for seeding/reading, AgentService.Chat for the turns."""

    def __init__(self, task_addr: str, agent_addr: str | None, secret: str) -> None:
        from todo.v1 import agent_pb2_grpc, task_pb2_grpc

        self.secret = secret
        self.task_channel = grpc.aio.insecure_channel(task_addr)
        self.task_stub = task_pb2_grpc.TaskServiceStub(self.task_channel)
        self.agent_channel = grpc.aio.insecure_channel(agent_addr) if agent_addr else None
        self.agent_stub = agent_pb2_grpc.AgentServiceStub(self.agent_channel) if self.agent_channel else None

    def metadata(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {mint(self.secret, user, 3600)}"),)

    @property
    def supports_planning(self) -> bool:
        return stack_has_planning()

    async def create_task(self, user: str, title: str, completed: bool, meta: dict[str, Any]) -> None:
        from todo.v1 import task_pb2

        fields = _planning_fields(meta) if self.supports_planning else {}
        task = await self.task_stub.CreateTask(
            task_pb2.CreateTaskRequest(title=title, **fields), metadata=self.metadata(user), timeout=30
        )
        if completed:
            request = task_pb2.SetTaskCompletedRequest(task_id=task.id, completed=True)
            await self.task_stub.SetTaskCompleted(request, metadata=self.metadata(user), timeout=30)

    async def chat(self, user: str, conversation_id: int | None, message: str) -> tuple[int | None, str]:
        from todo.v1 import agent_pb2

        assert self.agent_stub is not None
        request = agent_pb2.ChatRequest(message=message, conversation_id=conversation_id)
        reply = await self.agent_stub.Chat(request, metadata=self.metadata(user), timeout=60)
        return reply.conversation_id, reply.response

    async def tasks(self, user: str) -> list[TaskState]:
        from todo.v1 import task_pb2

        request = task_pb2.ListTasksRequest(status="all", page_size=100)
        reply = await self.task_stub.ListTasks(request, metadata=self.metadata(user), timeout=30)
        return [_task_state(task.id, task.title, task.completed, task) for task in reply.tasks]

    async def close(self) -> None:
        await self.task_channel.close()
        if self.agent_channel is not None:
            await self.agent_channel.close()


class RestBackend:
    """The real stack through the gateway: the public REST API only."""

    def __init__(self, base_url: str, secret: str) -> None:
        import httpx2

        self.secret = secret
        self.client = httpx2.AsyncClient(base_url=base_url.rstrip("/"), timeout=60)

    def headers(self, user: str) -> dict[str, str]:
        return {"authorization": f"Bearer {mint(self.secret, user, 3600)}"}

    async def _send(self, method: str, path: str, user: str, body: Any = None) -> Any:
        response = await self.client.request(method, path, headers=self.headers(user), json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
        return response.json()

    @property
    def supports_planning(self) -> bool:
        return stack_has_planning()

    async def create_task(self, user: str, title: str, completed: bool, meta: dict[str, Any]) -> None:
        task = await self._send("POST", f"/api/{user}/tasks", user, {"title": title, **_planning_fields(meta)})
        if completed:
            await self._send("PATCH", f"/api/{user}/tasks/{task['id']}/complete", user, {"completed": True})

    async def chat(self, user: str, conversation_id: int | None, message: str) -> tuple[int | None, str]:
        body: dict[str, Any] = {"message": message}
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        reply = await self._send("POST", f"/api/{user}/chat", user, body)
        return int(reply["conversation_id"]), str(reply["response"])

    async def tasks(self, user: str) -> list[TaskState]:
        reply = await self._send("GET", f"/api/{user}/tasks?status=all&page_size=100", user)
        return [_task_state(int(task["id"]), task["title"], bool(task["completed"]), task) for task in reply["tasks"]]

    async def close(self) -> None:
        await self.client.aclose()


def _planning_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """A seed's planning fields as the task API takes them."""
    fields: dict[str, Any] = {}
    if meta.get("due"):
        fields["due_date"], fields["due_time"] = resolve_due(str(meta["due"]), user_today())
    if meta.get("priority"):
        fields["priority"] = meta["priority"]
    if meta.get("tags"):
        fields["tags"] = list(meta["tags"])
    return fields


def _task_state(task_id: int, title: str, completed: bool, source: Any) -> TaskState:
    """A task as scored; the planning fields are read when the API has them."""

    def read(name: str, default: Any) -> Any:
        value = source.get(name, default) if isinstance(source, dict) else getattr(source, name, default)
        return default if value is None else value

    return TaskState(
        task_id,
        title,
        completed,
        str(read("due_date", "")),
        str(read("due_time", "")),
        str(read("priority", "none")) or "none",
        tuple(read("tags", ())),
    )


class MemoryBackend:
    """No services: the model with in-memory tools (see memory.py)."""

    def __init__(self, planning: bool = True) -> None:
        from tests.eval import memory

        self.supports_planning = planning
        self.memory = memory
        self.schemas = memory.PLANNING_TOOLS if planning else memory.PLANNING_TOOLS[:5]
        self.stores: dict[str, Any] = {}
        self.histories: dict[int, list[list[dict[str, Any]]]] = {}

    def _store(self, user: str) -> Any:
        return self.stores.setdefault(user, self.memory.MemoryStore())

    async def create_task(self, user: str, title: str, completed: bool, meta: dict[str, Any]) -> None:
        store = self._store(user)
        store.add_task({"title": title})
        task = store.tasks[store.next_id - 1]
        task.completed = completed
        fields = _planning_fields(meta)
        task.due_date, task.due_time = fields.get("due_date", ""), fields.get("due_time", "")
        task.priority, task.tags = fields.get("priority", "none"), fields.get("tags", [])
        store.log.clear()

    async def chat(self, user: str, conversation_id: int | None, message: str) -> tuple[int | None, str]:
        if conversation_id is None:
            conversation_id = len(self.histories) + 1
            self.histories[conversation_id] = []
        text, _ = self.memory.run_turn(self._store(user), self.histories[conversation_id], message, self.schemas)
        return conversation_id, text

    async def tasks(self, user: str) -> list[TaskState]:
        return [
            TaskState(t.id, t.title, t.completed, t.due_date, t.due_time, t.priority, tuple(t.tags))
            for t in self._store(user).tasks.values()
        ]

    async def timezone(self, user: str) -> str:
        return str(self._store(user).timezone)

    async def close(self) -> None:
        return None


class DriverBackend(GrpcBackend):
    """No agent_service: a small agent loop here (the model via the openai SDK, tools via
    agent_service.tools.execute against the real task_service), keeping history in memory
    in the shape agent_service sends it."""

    def __init__(self, task_addr: str, secret: str) -> None:
        super().__init__(task_addr, None, secret)
        self.conversations: dict[int, list[dict[str, Any]]] = {}

    async def chat(self, user: str, conversation_id: int | None, message: str) -> tuple[int | None, str]:
        from tests.eval.driver import run_turn

        if conversation_id is None:
            conversation_id = len(self.conversations) + 1
            self.conversations[conversation_id] = []
        history = self.conversations[conversation_id]
        text, new_messages = await run_turn(history, message, user, mint(self.secret, user, 3600), self.task_stub)
        history.extend(new_messages)
        return conversation_id, text


# ---------------------------------------------------------------------------------------
# Running and scoring


@dataclass
class Outcome:
    case: Case
    passed: bool
    problems: list[str]
    replies: list[str]
    seconds: float


def check(case: Case, replies: list[str], tasks: list[TaskState], timezone: str = "UTC") -> list[str]:
    problems = []
    if case.tasks is not None:
        want = sorted((task.title, task.completed) for task in case.tasks)
        got = sorted((task.title, task.completed) for task in tasks)
        if want != got or sorted(task.id for task in case.tasks) != sorted(task.id for task in tasks):
            problems.append(f"tasks: expected {_show(case.tasks)}, got {_show(tasks)}")
    last = replies[-1] if replies else ""
    for text in case.reply_has:
        if text.lower() not in last.lower():
            problems.append(f"reply lacks {text!r}")
    for text in case.reply_lacks:
        if text.lower() in last.lower():
            problems.append(f"reply has {text!r}")
    if case.asks and "?" not in last:
        problems.append("reply is not a question")
    return problems + check_planning(case, tasks, user_today(timezone))


def check_planning(case: Case, tasks: list[TaskState], today: dt.date) -> list[str]:
    by_id = {task.id: task for task in tasks}
    problems = []
    by_title = {task.title: task for task in tasks}
    for task_id, spec in case.due.items():
        # by title when adds run in parallel and may be numbered in either order
        task = by_id.get(task_id) if isinstance(task_id, int) else by_title.get(task_id)
        if task is None or not due_matches(spec, task.due_date, task.due_time, today):
            got = f"{task.due_date} {task.due_time}".strip() if task else "no such task"
            problems.append(f"task {task_id} due: expected {spec or 'none'!r}, got {got or 'none'!r}")
    for task_id, priority in case.priority.items():
        task = by_id.get(task_id)
        if task is None or task.priority != priority:
            problems.append(f"task {task_id} priority: expected {priority}, got {task.priority if task else '-'}")
    for task_id, tags in case.tags.items():
        task = by_id.get(task_id)
        if task is None or sorted(task.tags) != sorted(tags):
            problems.append(f"task {task_id} tags: expected {tags}, got {list(task.tags) if task else '-'}")
    return problems


def _show(tasks: list[TaskState]) -> str:
    return (
        "["
        + ", ".join(f"{t.id}.{' [x]' if t.completed else ''} {t.title}" for t in sorted(tasks, key=lambda t: t.id))
        + "]"
    )


async def run_case(backend: Backend, case: Case) -> Outcome:
    started = time.perf_counter()
    user = f"eval-{uuid.uuid4().hex[:12]}"
    replies: list[str] = []
    try:
        for number, (title, completed) in enumerate(case.seed, start=1):
            await backend.create_task(user, title, completed, case.seed_meta.get(number, {}))
        conversation_id: int | None = None
        for message in case.say:
            conversation_id, reply = await backend.chat(user, conversation_id, message)
            replies.append(reply)
        timezone = await backend.timezone(user) if hasattr(backend, "timezone") else "UTC"
        problems = check(case, replies, await backend.tasks(user), timezone)
    except Exception as error:  # a failing case is scored, not fatal to the run
        problems = [f"{type(error).__name__}: {error}"]
    return Outcome(case, not problems, problems, replies, time.perf_counter() - started)


def stack_has_planning() -> bool:
    """Do this checkout's task API and chat tools have the round 2 planning features?"""
    from todo.v1 import task_pb2

    try:
        from agent_service import tools

        names = {tool.name for tool in tools.for_surface("chat")}
    except (ImportError, AttributeError):
        return False
    return "due_date" in task_pb2.Task.DESCRIPTOR.fields_by_name and "reopen_task" in names


def runnable(backend: Backend, cases: list[Case]) -> tuple[list[Case], list[Case]]:
    """(the cases this backend can run, the planning cases waiting on planning tools)."""
    if backend.supports_planning:
        return cases, []
    return [case for case in cases if not case.planning], [case for case in cases if case.planning]


async def run_all(backend: Backend, cases: list[Case], concurrency: int = CONCURRENCY) -> list[Outcome]:
    """Every case the backend can run (planning cases need planning tools)."""
    cases, _ = runnable(backend, cases)
    gate = asyncio.Semaphore(concurrency)

    async def bounded(case: Case) -> Outcome:
        async with gate:
            return await run_case(backend, case)

    return list(await asyncio.gather(*(bounded(case) for case in cases)))


def report(outcomes: list[Outcome]) -> str:
    passed = sum(outcome.passed for outcome in outcomes)
    lines = []
    for outcome in outcomes:
        if not outcome.passed:
            lines.append(f"FAIL {outcome.case.name}: {outcome.case.say}")
            lines.extend(f"    {problem}" for problem in outcome.problems)
            if outcome.replies:
                lines.append(f"    last reply: {outcome.replies[-1]!r}")
    lines.append(f"Score: {passed}/{len(outcomes)} = {100 * passed / max(len(outcomes), 1):.1f}%")
    return "\n".join(lines)


def score(outcomes: list[Outcome]) -> float:
    return sum(outcome.passed for outcome in outcomes) / max(len(outcomes), 1)


# ---------------------------------------------------------------------------------------
# A local stack


@contextmanager
def local_stack(log_dir: Path, secret: str) -> Iterator[tuple[str, str]]:
    """task_service, conversation_service and agent_service as processes on SQLite; yields (task, agent) addresses."""
    from tests.support import ServiceProcess, free_port

    state_dir = tempfile.TemporaryDirectory(prefix="eval-state-")
    state = Path(state_dir.name)
    addresses = {name: f"127.0.0.1:{free_port()}" for name in ("task", "conversation", "agent")}
    env = {
        "BETTER_AUTH_SECRET": secret,
        "STATE_DIR": str(state),
        "LLM_BASE_URL": "",
        "LOG_LEVEL": "WARNING",
        "GRPC_SHUTDOWN_GRACE_SECONDS": "2",
        "TASK_SERVICE_ADDR": addresses["task"],
        "CONVERSATION_SERVICE_ADDR": addresses["conversation"],
        "AGENT_SERVICE_ADDR": addresses["agent"],
        "AGENT_HTTP_PORT": str(free_port()),
        "TASK_DATABASE_URL": f"sqlite+aiosqlite:///{state / 'tasks.db'}",
        "CONVERSATION_DATABASE_URL": f"sqlite+aiosqlite:///{state / 'conversations.db'}",
    }
    with ExitStack() as stack:
        stack.callback(state_dir.cleanup)  # runs last: after the services have stopped
        for name in ("task", "conversation", "agent"):
            service = ServiceProcess(f"{name}_service", env, addresses[name], log_dir).start()
            stack.callback(service.stop)
        yield addresses["task"], addresses["agent"]


def _default_secret() -> str:
    from common.settings import Settings
    from common.tokens import local_secret

    return local_secret(Settings.load())


async def _main_async(args: argparse.Namespace, secret: str, cases: list[Case]) -> list[Outcome]:
    backend: Backend
    if args.memory:
        backend = MemoryBackend(planning=not args.five_tools)
    elif args.rest:
        backend = RestBackend(args.rest, secret)
    elif args.driver:
        backend = DriverBackend(args.driver, secret)
    else:
        backend = GrpcBackend(args.grpc[0], args.grpc[1], secret)
    waiting = runnable(backend, cases)[1]
    if waiting:
        print(f"{len(waiting)} planning cases wait on the planning tools (not run): {[c.name for c in waiting]}")
    try:
        return await run_all(backend, cases, args.concurrency)
    finally:
        await backend.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="start the three services here (SQLite)")
    where.add_argument("--grpc", nargs=2, metavar=("TASK_ADDR", "AGENT_ADDR"))
    where.add_argument("--rest", metavar="BASE_URL")
    where.add_argument("--driver", metavar="TASK_ADDR")
    where.add_argument("--memory", action="store_true", help="no services: in-memory tools (development loop)")
    parser.add_argument("--five-tools", action="store_true", help="with --memory: offer only the five original tools")
    parser.add_argument("--secret", help="BETTER_AUTH_SECRET of the stack (to mint a token per user)")
    parser.add_argument("--set", choices=("all", *CASE_SETS), default="all", help="which cases (default: all)")
    parser.add_argument("--cases", type=Path, help="a case file or folder instead of --set")
    parser.add_argument("--only", help="run only cases whose name contains this")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    args = parser.parse_args(argv)
    cases = [case for case in load_cases(args.cases, args.set) if not args.only or args.only in case.name]
    started = time.perf_counter()
    if args.local:
        secret = args.secret or "eval-secret-" + uuid.uuid4().hex
        log_dir = Path(tempfile.mkdtemp(prefix="eval-logs-"))
        print(f"service logs: {log_dir}")
        with local_stack(log_dir, secret) as (task_addr, agent_addr):
            args.grpc = (task_addr, agent_addr)
            outcomes = asyncio.run(_main_async(args, secret, cases))
    elif args.memory:
        outcomes = asyncio.run(_main_async(args, "", cases))
    else:
        outcomes = asyncio.run(_main_async(args, args.secret or _default_secret(), cases))
    if args.json:
        print(
            json.dumps(
                [
                    {"name": o.case.name, "passed": o.passed, "problems": o.problems, "replies": o.replies}
                    for o in outcomes
                ],
                indent=1,
            )
        )
    print(report(outcomes))
    print(f"({time.perf_counter() - started:.1f}s)")
    return 0 if outcomes else 1


if __name__ == "__main__":
    sys.exit(main())
