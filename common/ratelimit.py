"""Per-user rate limits: a GCRA budget per (user, bucket), in process or shared through Redis.

Buckets: "writes" (task create/update/complete/delete), "reads" (get/list of tasks,
conversations and messages) and "chat" (agent turns), each `RATE_LIMIT_*_PER_MINUTE` per user,
with bursts up to the whole minute's budget. A refused call answers RESOURCE_EXHAUSTED (HTTP 429
through the gateway) with `retry-after: <seconds>` in its trailing metadata.

GCRA (the generic cell rate algorithm, a token bucket stored as one timestamp): each key holds
the "theoretical arrival time" (TAT). A call is allowed when now >= TAT + interval - period;
allowing it moves TAT to max(TAT, now) + interval. With RATE_LIMIT_REDIS_URL set, one Lua script
does the read-check-write atomically on the Redis server, with the Redis server's clock, so every
replica draws from the same budget. When Redis is unreachable the limiter lets calls through
(availability over strictness) and logs a warning; it retries Redis after a short pause.

Wiring: `configure(settings)` once at service start (common/server.py does it); the auth
interceptor calls `charge(method, context)` for every authenticated call, and METHOD_BUCKETS below
says which budget each RPC spends: the one table to extend when an RPC is added.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from common import metrics
from common.auth import current_caller
from common.errors import ResourceExhausted
from common.settings import Settings

log = logging.getLogger("ratelimit")

PERIOD_SECONDS = 60.0
REDIS_TIMEOUT_SECONDS = 0.5  # a slow Redis must not slow every write down
REDIS_RETRY_PAUSE_SECONDS = 5.0  # after a Redis failure, fail open without asking it for this long
MAX_LOCAL_KEYS = 100_000  # the in-process store prunes idle keys beyond this

# The budget each RPC spends; an RPC not listed spends none. GetRecentMessages and
# GetMessageByRequestId are steps of a chat turn (already counted as "chat"): charging them as
# reads would let a burst of reads break a turn half-way. AppendMessage and the conversation
# writes likewise happen inside turns.
METHOD_BUCKETS = {
    "/todo.v1.TaskService/CreateTask": "writes",
    "/todo.v1.TaskService/UpdateTask": "writes",
    "/todo.v1.TaskService/SetTaskCompleted": "writes",
    "/todo.v1.TaskService/DeleteTask": "writes",
    "/todo.v1.TaskService/UpdateSettings": "writes",
    "/todo.v1.TaskService/Undo": "writes",
    # What a client writes to its conversations directly (the agent's own appends are chat turns).
    "/todo.v1.ConversationService/StartConversation": "writes",
    "/todo.v1.ConversationService/RecordMessage": "writes",
    "/todo.v1.ConversationService/UpdateConversation": "writes",
    "/todo.v1.ConversationService/DeleteConversation": "writes",
    "/todo.v1.TaskService/GetTask": "reads",
    "/todo.v1.TaskService/ListTasks": "reads",
    "/todo.v1.TaskService/GetSettings": "reads",
    "/todo.v1.TaskService/ListActivity": "reads",
    "/todo.v1.ConversationService/GetConversation": "reads",
    "/todo.v1.ConversationService/ListConversations": "reads",
    "/todo.v1.ConversationService/GetMessage": "reads",
    "/todo.v1.ConversationService/ListMessages": "reads",
    "/todo.v1.ConversationService/ListHistory": "reads",
    "/todo.v1.AgentService/Chat": "chat",
    "/todo.v1.AgentService/ChatStream": "chat",
}

# KEYS[1]: the budget's key. ARGV: interval and period in microseconds.
# Returns 0 when allowed, else the microseconds until the next call would be allowed.
GCRA_LUA = """
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local allowed_at = tat + interval - period
if now < allowed_at then return allowed_at - now end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
"""


class Store(Protocol):
    async def acquire(self, key: str, limit: int, period: float) -> float:
        """Take one unit of `key`'s budget: 0 if allowed, else seconds until it would be."""
        ...

    async def close(self) -> None: ...


class LocalStore:
    """Budgets in this process only (one replica). The clock is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}

    async def acquire(self, key: str, limit: int, period: float) -> float:
        now = self._clock()
        interval = period / limit
        tat = max(self._tats.get(key, now), now)
        allowed_at = tat + interval - period
        if now < allowed_at:
            return allowed_at - now
        self._tats[key] = tat + interval
        if len(self._tats) > MAX_LOCAL_KEYS:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        # A key whose TAT has passed holds a full budget: forgetting it changes nothing.
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}

    async def close(self) -> None:
        self._tats.clear()


class RedisStore:
    """Budgets in Redis, shared by every replica; fails open while Redis is unreachable."""

    def __init__(self, url: str, prefix: str) -> None:
        # Imported here, not at the top: redis-py adds ~8.5 MB to every process that imports
        # it, and a service without RATE_LIMIT_REDIS_URL never needs it.
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        self._failures = (RedisError, OSError, TimeoutError)
        self._prefix = prefix
        self._redis = aioredis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
        )
        self._script = self._redis.register_script(GCRA_LUA)
        self._skip_until = 0.0

    async def acquire(self, key: str, limit: int, period: float) -> float:
        if time.monotonic() < self._skip_until:
            return 0.0
        interval_us = round(period * 1_000_000 / limit)
        try:
            wait_us = await self._script(keys=[self._prefix + key], args=[interval_us, round(period * 1_000_000)])
        except self._failures as error:
            self._skip_until = time.monotonic() + REDIS_RETRY_PAUSE_SECONDS
            log.warning(
                "rate-limit store unreachable; allowing requests (fail open)",
                extra={"error": repr(error), "retry_in_s": REDIS_RETRY_PAUSE_SECONDS},
            )
            return 0.0
        return int(wait_us) / 1_000_000

    async def close(self) -> None:
        await self._redis.aclose()


class RateLimiter:
    """Per-minute limits by bucket name; a limit of 0 (or a bucket not listed) means no limit."""

    def __init__(self, store: Store, limits_per_minute: dict[str, int]) -> None:
        self.store = store
        self.limits = limits_per_minute

    async def check(self, bucket: str, user_id: str) -> float:
        """0 if `user_id` may make one more `bucket` call now, else seconds to wait."""
        limit = self.limits.get(bucket, 0)
        if limit <= 0:
            return 0.0
        return await self.store.acquire(f"{bucket}:{user_id}", limit, PERIOD_SECONDS)


def limiter_from(settings: Settings) -> RateLimiter:
    store: Store
    if settings.rate_limit_redis_url:
        store = RedisStore(settings.rate_limit_redis_url, settings.rate_limit_key_prefix)
    else:
        store = LocalStore()
    limits = {
        "writes": settings.rate_limit_writes_per_minute,
        "reads": settings.rate_limit_reads_per_minute,
        "chat": settings.rate_limit_chat_per_minute,
    }
    return RateLimiter(store, limits)


_limiter: RateLimiter | None = None


def configure(settings: Settings) -> RateLimiter:
    """Set the process's limiter from settings (called once at service start)."""
    global _limiter
    _limiter = limiter_from(settings)
    return _limiter


def limiter() -> RateLimiter:
    """The configured limiter; configured from the environment on first use if nobody did."""
    return _limiter if _limiter is not None else configure(Settings.load())


async def close() -> None:
    global _limiter
    if _limiter is not None:
        await _limiter.store.close()
        _limiter = None


async def charge(method: str, context: Any) -> None:
    """Spend one unit of the caller's budget for `method` (METHOD_BUCKETS), or refuse with
    RESOURCE_EXHAUSTED and `retry-after` seconds in the trailing metadata."""
    bucket = METHOD_BUCKETS.get(method)
    if bucket is None:
        return
    wait_seconds = await limiter().check(bucket, current_caller().user_id)
    if wait_seconds <= 0:
        return
    retry_after = max(1, math.ceil(wait_seconds))
    metrics.rate_limited(bucket)
    context.set_trailing_metadata((("retry-after", str(retry_after)),))
    raise ResourceExhausted(f"rate limit exceeded for {bucket}; retry after {retry_after} s")
