"""Admission control for chat turns: a bound on turns in progress, a short wait, a fast refusal.

A turn holds a slot from its first check until its background work ends (the answer stored),
even if its client has gone. When every slot is taken a new turn waits at most
AGENT_ADMISSION_WAIT_SECONDS for one, then is refused at once with UNAVAILABLE (HTTP 503) and
`retry-after`, instead of queueing until the gateway gives up on it (the 499/CANCELLED after
30-45 s that 5,000 simultaneous turns used to end in). One user holds at most
AGENT_MAX_TURNS_PER_USER slots: more turns of the same user in parallel are RESOURCE_EXHAUSTED
(HTTP 429, `retry-after`), so one account cannot take the capacity everyone shares.

Tool calls are bounded per user too (`PerUserBound`, AGENT_TOOL_CONCURRENCY): a user's turns
in progress share that many calls in flight, so one account's parallel turns cannot hold the
services' capacity either.

Per process: N replicas admit N times as many, which is what their capacity is.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from common import metrics
from common.errors import ResourceExhausted, Unavailable

RETRY_AFTER_SECONDS = 1


class Busy(Unavailable):
    """Every slot is taken: try again in a moment."""

    retry_after_seconds = RETRY_AFTER_SECONDS


class TooManyTurns(ResourceExhausted):
    """This user already has as many turns in progress as one user may."""

    retry_after_seconds = RETRY_AFTER_SECONDS


class Admission:
    def __init__(self, max_turns: int, max_turns_per_user: int, wait_seconds: float) -> None:
        self.max_turns = max(1, max_turns)
        self.max_turns_per_user = max(1, max_turns_per_user)
        self.wait_seconds = max(0.0, wait_seconds)
        self._slots = asyncio.Semaphore(self.max_turns)
        self._per_user: Counter[str] = Counter()

    async def admit(self, user_id: str) -> Slot:
        """A slot for one turn of `user_id`, or the refusal (raised) when there is none soon."""
        if self._per_user[user_id] >= self.max_turns_per_user:
            metrics.chat_turn("refused_user_busy")
            raise TooManyTurns(
                f"at most {self.max_turns_per_user} chat turns of one user at a time; retry when one has answered",
                reason="per-user turn bound",
            )
        self._per_user[user_id] += 1  # counted while waiting too, so a user cannot queue many
        try:
            if self._slots.locked():  # all taken (or others already waiting): wait a little, in turn
                await asyncio.wait_for(self._slots.acquire(), self.wait_seconds)
            else:
                await self._slots.acquire()  # returns at once
        except TimeoutError:
            self._release_user(user_id)
            metrics.chat_turn("refused_busy")
            raise Busy("the assistant is busy right now; try again in a moment", reason="no free turn slot") from None
        except BaseException:
            self._release_user(user_id)
            raise
        return Slot(self, user_id)

    def _release_user(self, user_id: str) -> None:
        self._per_user[user_id] -= 1
        if self._per_user[user_id] <= 0:
            del self._per_user[user_id]

    def _release(self, user_id: str) -> None:
        self._release_user(user_id)
        self._slots.release()


class Slot:
    """One admitted turn's place; `release()` is idempotent (the turn may end on several paths)."""

    def __init__(self, admission: Admission, user_id: str) -> None:
        self._admission, self._user_id = admission, user_id
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release(self._user_id)


class PerUserBound:
    """At most `limit` holders at a time per user, across all of that user's turns."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._users: dict[str, tuple[asyncio.Semaphore, int]] = {}  # semaphore, holders and waiters

    @asynccontextmanager
    async def hold(self, user_id: str) -> AsyncIterator[None]:
        semaphore, holders = self._users.get(user_id) or (asyncio.Semaphore(self.limit), 0)
        self._users[user_id] = (semaphore, holders + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, holders = self._users[user_id]
            if holders == 1:  # nobody of this user holds or waits: forget them
                del self._users[user_id]
            else:
                self._users[user_id] = (semaphore, holders - 1)
