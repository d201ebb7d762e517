"""Two replicas of every service behind one Envoy, one of each SIGKILLed in turn under load.

The stack (scripts/stack.py, `replicas=2`) runs two processes of task_service,
conversation_service and agent_service on PostgreSQL, with the rate-limit budgets in Redis
(RATE_LIMIT_REDIS_URL), and the built-in model. Steady load through the gateway: REST creates
(each with a title of its own), REST reads of tasks and conversations, and chat turns ("add ...",
each with an Idempotency-Key, retried with the same key after a 503). Replica 1 of task_service,
then of conversation_service, then of agent_service is SIGKILLed; each comes back before the next.

Proven:
- both replicas of each service served requests (Envoy balances over them);
- every acknowledged REST create is stored exactly once, an unacknowledged one at most once;
- every failure is a 503 with the JSON error body (code 14, UNAVAILABLE), which the client may
  retry. The exception, a chat turn in flight at a kill: when its attempt died with the agent
  replica running it, or its user message was stored by a conversation replica killed before it
  answered (the agent's channel retries the append elsewhere, finds the message, and takes it for
  another attempt's), the turn waits for an answer that never comes and ends 504 (the turn's
  bound, AGENT_TURN_TIMEOUT_SECONDS) or 409 (ABORTED, "send the message again with a new key"),
  also for retries with its key. A retry with its key never runs a turn again: each turn's task
  is stored at most once, exactly once when the turn was answered;
- from a few seconds after each kill until the next one, every request succeeds: Envoy stops
  sending to the dead replica (connect failure -> retried on the other host, outlier ejection,
  health checks), the agents' channels move to the surviving task and conversation replicas;
- /readyz stays 200 while a replica is down (every service still has a healthy one);
- the rate-limit budgets live in Redis: its script ran once per request served.
- no chat turn's add_task runs twice, even when the task_service replica dies after committing it
  (the agents' channels retry only idempotent calls, common/clients.py).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import redis

from scripts.stack import Stack, http_status
from tests.gateway_fixtures import gateway_env
from tests.support import token

REPLICAS = 2
RECOVERY_SECONDS = 3.0  # requests started this long after a kill must all succeed
DOWN_SECONDS = 5.0  # how long a killed replica stays down
UP_SECONDS = 3.0  # load with both replicas up again before the next kill
TURN_SECONDS = 5  # AGENT_TURN_TIMEOUT_SECONDS: bounds how long a retry waits for a dead attempt
REDIS_URL = "redis://127.0.0.1:6379/0"
LIMIT = "1000000"  # per user per minute: far above the load, but counted in Redis


@dataclass
class Outcome:
    kind: str  # "create", "read", "chat"
    started: float  # monotonic; a chat turn: when its first attempt started
    answered: float  # when the (first) attempt's answer came
    status: int
    body: dict[str, Any]
    token_word: str = ""  # the create's title / the chat turn's unique word
    attempts: int = 1


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


@pytest.fixture(scope="module")
def stack(database_url_factory: Callable[[str, str], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work_dir = tmp_path_factory.mktemp("replicas")
    (work_dir / "state").mkdir()
    databases = {name: database_url_factory("postgres", f"replicas_{name}") for name in ("task", "conversation")}
    env = {
        **gateway_env(databases, work_dir / "state"),
        "RATE_LIMIT_REDIS_URL": REDIS_URL,
        "RATE_LIMIT_KEY_PREFIX": f"todo:test-replicas:{uuid.uuid4().hex[:8]}:",
        "RATE_LIMIT_WRITES_PER_MINUTE": LIMIT,
        "RATE_LIMIT_READS_PER_MINUTE": LIMIT,
        "RATE_LIMIT_CHAT_PER_MINUTE": LIMIT,
        "AGENT_TURN_TIMEOUT_SECONDS": str(TURN_SECONDS),
        "DATABASE_POOL_SIZE": "4",
    }
    started = Stack(env, work_dir=work_dir, services=["task", "conversation", "agent"], replicas=REPLICAS)
    started.start(timeout=120)
    try:
        yield started
    finally:
        started.stop()


def call(stack: Stack, method: str, path: str, user: str, body: Any = None, key: str = "") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token(user)}", "Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{stack.base_url}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw)
        except ValueError:
            return error.code, {"raw": raw.decode(errors="replace")}
    except OSError as error:  # the gateway itself never goes away here: count it as a failure
        return 0, {"error": repr(error)}


def word(prefix: str, number: int) -> str:
    """`prefix` + three letters, unique per number (letters only: the built-in model takes it as a title)."""
    letters = ""
    number += 26 * 26
    while number:
        number, digit = divmod(number, 26)
        letters = "abcdefghijklmnopqrstuvwxyz"[digit] + letters
    return f"{prefix}{letters}"


def creator(stack: Stack, load: Load, user: str, prefix: str) -> None:
    n = 0
    while not load.stop.is_set():
        title = word(prefix, n)
        n += 1
        started = time.monotonic()
        status, body = call(stack, "POST", f"/api/{user}/tasks", user, {"title": title})
        load.record(Outcome("create", started, time.monotonic(), status, body, title))
        if status != 200:
            time.sleep(0.05)  # a client backing off; a retry is a new create with a new title


def reader(stack: Stack, load: Load, user: str) -> None:
    paths = [f"/api/{user}/tasks?page_size=5", f"/api/{user}/conversations?page_size=5"]
    n = 0
    while not load.stop.is_set():
        started = time.monotonic()
        status, body = call(stack, "GET", paths[n % 2], user)
        n += 1
        load.record(Outcome("read", started, time.monotonic(), status, body))
        if status != 200:
            time.sleep(0.05)


def chatter(stack: Stack, load: Load, user: str, prefix: str) -> None:
    n = 0
    while not load.stop.is_set():
        unique = word(prefix, n)
        key = f"turn-{user}-{n}"
        n += 1
        started, answered, attempts = time.monotonic(), 0.0, 0
        while True:  # a 503 is retried with the same key: the turn runs at most once
            attempts += 1
            status, body = call(stack, "POST", f"/api/{user}/chat", user, {"message": f"add {unique}"}, key)
            answered = answered or time.monotonic()
            if status != 503 or attempts >= 20:
                break
            time.sleep(0.2)
        load.record(Outcome("chat", started, answered, status, body, unique, attempts))


def envoy_host_requests(stack: Stack) -> dict[str, Counter[str]]:
    """Per cluster, requests Envoy sent to each host (admin /clusters)."""
    admin = f"http://127.0.0.1:{stack.settings.envoy_admin_port}/clusters"
    with urllib.request.urlopen(admin, timeout=10) as response:
        text = response.read().decode()
    hosts: dict[str, Counter[str]] = {}
    for match in re.finditer(r"^([\w.]+)::([\d.]+:\d+)::rq_total::(\d+)$", text, re.MULTILINE):
        hosts.setdefault(match[1], Counter())[match[2]] = int(match[3])
    return hosts


def script_calls() -> int:
    """How many Lua scripts Redis has run (the rate limiter's GCRA script is one call per charge)."""
    stats = redis.Redis.from_url(REDIS_URL).info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))


def stored_titles(stack: Stack, users: list[str]) -> list[str]:
    url = stack.settings.task_database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, connect_timeout=10) as conn:
        rows = conn.execute("SELECT lower(title) FROM tasks WHERE user_id = ANY(%s)", (users,)).fetchall()
    return [row[0] for row in rows]


def test_sigkill_one_replica_of_each_service_under_load(stack: Stack) -> None:
    run = uuid.uuid4().hex[:6]
    writers = [f"w{i}-{run}" for i in range(2)]
    chatters = [f"c{i}-{run}" for i in range(2)]
    load = Load()
    threads = [
        *(
            threading.Thread(target=creator, args=(stack, load, user, f"rest{'ab'[i]}"))
            for i, user in enumerate(writers)
        ),
        threading.Thread(target=reader, args=(stack, load, writers[0])),
        *(
            threading.Thread(target=chatter, args=(stack, load, user, f"chat{'ab'[i]}"))
            for i, user in enumerate(chatters)
        ),
    ]
    kills: list[tuple[str, float, float]] = []  # (service, killed at, back at)
    readiness: list[tuple[str, int | None]] = []  # /readyz while a replica was down
    scripts_before = script_calls()
    for thread in threads:
        thread.start()
    try:
        time.sleep(UP_SECONDS)
        for service in ("task", "conversation", "agent"):
            victim = stack.component(service)  # replica 1: the agents' channels start on it
            killed = time.monotonic()
            victim.kill()
            time.sleep(RECOVERY_SECONDS)
            # The gateway stays ready: every service still has a healthy replica.
            readiness.append((service, http_status(f"{stack.base_url}/readyz")))
            time.sleep(DOWN_SECONDS - RECOVERY_SECONDS)
            victim.start()  # from this (the main) thread: children die with the thread that started them
            kills.append((service, killed, time.monotonic()))
            time.sleep(UP_SECONDS)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(90)
    hosts = envoy_host_requests(stack)

    outcomes = load.outcomes
    by_kind = Counter(outcome.kind for outcome in outcomes if outcome.status == 200)
    failed = [outcome for outcome in outcomes if outcome.status != 200]
    slowest = sorted(round(o.answered - o.started, 2) for o in outcomes if o.status == 200)[-5:]
    print(f"ok: {dict(by_kind)}; failed: {Counter((o.kind, o.status) for o in failed)}; slowest ok: {slowest}")
    print(f"kills: {[(s, round(b - k, 1)) for s, k, b in kills]}; envoy hosts: {hosts}")
    assert by_kind["create"] > 50 and by_kind["read"] > 50 and by_kind["chat"] > 20, by_kind

    assert readiness == [(service, 200) for service, _, _ in kills]

    # Envoy balanced over both replicas of every service.
    for cluster in ("todo.v1.TaskService", "todo.v1.ConversationService", "todo.v1.AgentService"):
        assert len(hosts[cluster]) == REPLICAS and all(hosts[cluster].values()), (cluster, hosts[cluster])

    # Every failure is a clear, retryable 503, except for a chat turn caught by a kill on its way
    # (see the module's docstring): refused, 409 or 504, naming why, and never run a second time.
    for outcome in failed:
        if outcome.kind == "chat" and outcome.status in (409, 504):
            assert outcome.body["code"] in (10, 4), outcome
            assert "Idempotency-Key" in outcome.body["message"] or "did not finish" in outcome.body["message"]
            continue
        assert outcome.status == 503, outcome
        assert outcome.body.get("code") == 14 and isinstance(outcome.body.get("message"), str), outcome
        assert "Traceback" not in outcome.body["message"]

    # Back to no errors within RECOVERY_SECONDS of each kill: a request failed only if it was in
    # flight at a kill, or started at most that long after one.
    def near_a_kill(outcome: Outcome) -> bool:
        return any(outcome.started < killed + RECOVERY_SECONDS and outcome.answered >= killed for _, killed, _ in kills)

    timeline = [
        (
            o.kind,
            o.status,
            o.body.get("message"),
            [(s, round(o.started - k, 2), round(o.answered - k, 2)) for s, k, _ in kills],
        )
        for o in failed
    ]
    assert all(near_a_kill(outcome) for outcome in failed), timeline
    for service, killed, _back in kills:
        served_while_down = [o for o in outcomes if o.status == 200 and killed + 1 < o.started < killed + DOWN_SECONDS]
        assert len(served_while_down) > 10, (service, len(served_while_down))

    # Every acknowledged create stored exactly once; others at most once.
    stored = Counter(stored_titles(stack, writers + chatters))
    creates = [outcome for outcome in outcomes if outcome.kind == "create"]
    for outcome in creates:
        count = stored[outcome.token_word]
        assert count == 1 if outcome.status == 200 else count <= 1, (outcome, count)
    # The budgets the replicas spent are Redis's: its rate-limit script ran for every request served.
    assert script_calls() - scripts_before >= sum(by_kind.values())

    # Every chat turn's add_task ran at most once; exactly once when the turn was answered.
    for outcome in (o for o in outcomes if o.kind == "chat"):
        count = stored[outcome.token_word]
        if outcome.status == 200:
            [added] = [c for c in outcome.body["tool_calls"] if c["name"] == "add_task"]
            assert added["result"]["status"] == "created", outcome
            assert count == 1, (outcome, count)
        else:
            assert count <= 1, (outcome, count)
