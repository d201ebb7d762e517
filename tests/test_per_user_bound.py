"""`PerUserBound` (agent_service/admission.py): AGENT_TOOL_CONCURRENCY counts a user's tool calls
across all of their turns, so one account's parallel turns get no more calls in flight than one
turn; other users are not held back by it, and a user who holds nothing is forgotten."""

from __future__ import annotations

import asyncio

from agent_service.admission import PerUserBound


async def _in_flight_peaks(bound: PerUserBound, calls: list[str]) -> dict[str, int]:
    """Runs every call (a user id each) at once under `bound`; the most in flight per user."""
    current: dict[str, int] = {}
    peak: dict[str, int] = {}

    async def call(user: str) -> None:
        async with bound.hold(user):
            current[user] = current.get(user, 0) + 1
            peak[user] = max(peak.get(user, 0), current[user])
            await asyncio.sleep(0.01)
            current[user] -= 1

    await asyncio.gather(*(call(user) for user in calls))
    return peak


def test_a_users_calls_share_the_bound_and_other_users_have_their_own() -> None:
    bound = PerUserBound(3)
    # Four "turns" of alice with 10 calls each, beside one of bob's with 5.
    peaks = asyncio.run(_in_flight_peaks(bound, ["alice"] * 40 + ["bob"] * 5))
    assert peaks == {"alice": 3, "bob": 3}
    assert bound._users == {}  # nobody holds or waits: no state kept


def test_a_waiting_call_that_is_cancelled_gives_its_place_back() -> None:
    async def scenario() -> None:
        bound = PerUserBound(1)
        entered = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            async with bound.hold("alice"):
                entered.set()
                await release.wait()

        async def waiter() -> None:
            async with bound.hold("alice"):
                pass

        holding = asyncio.create_task(holder())
        await entered.wait()
        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        release.set()
        await holding
        assert bound._users == {}
        async with bound.hold("alice"):  # the place is free again
            pass

    asyncio.run(scenario())
