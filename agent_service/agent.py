"""One chat turn, stateless: everything it needs is loaded from and stored to the services.

A turn (`Agent.turn`) is an async stream of events — text deltas, tool calls with their
outcome, then `Done` or `Failed` — that both Chat and ChatStream consume:

1. checks (caller, path user, message, idempotency key) and the conversation (the given one, or
   a new one), failing as an ordinary gRPC status before any event;
2. with an Idempotency-Key: the answer already stored for it is replayed, nothing runs;
3. the user's message is stored (first, so it is kept whatever fails next; a missing or
   another user's conversation is NOT_FOUND here), and the same call returns the history
   window: two conversation_service calls per turn in all;
4. the rest runs as a background task bounded in time (steps x model timeout, at most
   AGENT_TURN_TIMEOUT_SECONDS): loop model step → tools until the model answers in text or
   the step bound is reached, store the assistant's message, `Done`.

Tools run within a budget (`ToolBudget`): at most AGENT_MAX_TOOL_CALLS_PER_STEP calls of one
step and AGENT_MAX_TOOL_CALLS_PER_TURN in the turn, AGENT_TOOL_CONCURRENCY of one user at a time; calls
past it become tool errors the model can explain, and once the user's write budget answers
RESOURCE_EXHAUSTED no further write is attempted in the turn. So one message cannot fan out
into a thousand calls that starve everyone else.

A turn that fails after tools ran loses nothing: the assistant message is stored with the
tool calls that ran and a note that the turn did not finish, and the error names the actions
that were carried out.

The background task finishes even if the client goes away, so a retry with the same key
finds the stored answer instead of running the tools again. A retry that arrives while the
first attempt still runs (its user message exists, its answer not yet) waits for that answer;
if the first attempt failed, or is too old to be running, the retry is ABORTED and asks for a
new key. Tools of one key never run twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import grpc

from agent_service import history, tools
from agent_service.admission import Admission, PerUserBound, Slot
from agent_service.llm import ModelClient, ModelToolCall
from agent_service.prompt import system_prompt
from common import metrics, validation
from common.auth import Caller, authorized_user, current_caller
from common.clients import caller_metadata
from common.errors import InvalidArgument, ServiceError, Unavailable, status_for
from common.settings import Settings
from todo.v1 import agent_pb2, conversation_pb2, conversation_pb2_grpc, task_pb2, task_pb2_grpc

log = logging.getLogger("agent")

RPC_TIMEOUT_SECONDS = 10.0  # one call to conversation_service
KEY_MAX_LENGTH = 200
TOOL_NAME_MAX = 255  # what conversation_service stores
RETRY_POLL_SECONDS = 0.25  # how often a retried turn looks for the first attempt's answer
RETRY_WAIT_SECONDS = 30.0  # how long it looks at most
REUSED_KEY = "idempotency_key was already used for a different message"
# Our own service down, slow, or the call cancelled under it (overload, shutdown): UNAVAILABLE.
DEFAULT_TIMEZONE = "UTC"
# conversation_service stores at most 100 tool calls with a message: the calls a turn runs (at
# most AGENT_MAX_TOOL_CALLS_PER_TURN, capped below this) and the first refusals of its budget.
MAX_RECORDED_CALLS = 100
MAX_RECORDED_REFUSALS = 20
# An error's message travels in gRPC trailers (grpc-message): a long one would break the
# HTTP/2 connection it shares with other users' calls, so a failed turn names a few actions.
MAX_NAMED_ACTIONS = 10
UPSTREAM_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class ToolRun:
    call: conversation_pb2.ToolCall


@dataclass(frozen=True)
class Done:
    response: agent_pb2.ChatResponse


@dataclass(frozen=True)
class Failed:
    code: grpc.StatusCode
    message: str


Event = Delta | ToolRun | Done | Failed
Emit = Callable[[Event], Awaitable[None]]


class TurnFailed(ServiceError):
    """A failed turn answered as a plain gRPC status (Chat)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


@dataclass(frozen=True)
class Turn:
    caller: Caller
    conversation_id: int
    text: str
    key: str

    def request_id(self, role: str) -> str:
        return f"{self.key}:{role}" if self.key else ""


@dataclass(frozen=True)
class Stored:
    """A message as conversation_service stored it (or had already stored it, on a retry),
    with the messages before it that were asked for."""

    message: conversation_pb2.Message
    created: bool
    history: list[conversation_pb2.Message]
    timezone: str = DEFAULT_TIMEZONE  # the user's, for the system prompt


class Agent:
    def __init__(
        self,
        settings: Settings,
        task_stub: task_pb2_grpc.TaskServiceStub,
        conversation_stub: conversation_pb2_grpc.ConversationServiceStub,
        model: ModelClient,
    ) -> None:
        self._tasks = task_stub
        self._conversations = conversation_stub
        self._model = model
        self._max_steps = max(1, settings.agent_max_steps)
        self._window = min(max(0, settings.agent_history_window), 99)
        self._tools_per_step = max(1, settings.agent_max_tool_calls_per_step)
        # A step's answer is read up to the calls that can run and the refusals worth recording
        # (ModelReply.calls_cut past them): the model and the user are told the rest did not run.
        self._calls_read_per_step = self._tools_per_step + MAX_RECORDED_REFUSALS
        # Every call that runs is stored with the answer: within conversation_service's bound.
        self._tools_per_turn = min(
            max(1, settings.agent_max_tool_calls_per_turn), MAX_RECORDED_CALLS - MAX_RECORDED_REFUSALS
        )
        # Shared by all of a user's turns: parallel turns of one account get no more calls in flight.
        self._tool_slots = PerUserBound(settings.agent_tool_concurrency)
        self._tool_schemas = [tool.openai_schema() for tool in tools.for_surface("chat")]
        # A turn ends well before the gateway gives up on it, so the client gets our answer.
        self.turn_seconds = min(settings.llm_timeout_seconds * self._max_steps, settings.agent_turn_timeout_seconds)
        self._running: set[asyncio.Task[None]] = set()
        self._owners: set[int] = set()
        self._failed_keys = FailedKeys()
        self._admission = Admission(
            settings.agent_max_turns_in_progress,
            settings.agent_max_turns_per_user,
            settings.agent_admission_wait_seconds,
        )

    async def turn(self, request: agent_pb2.ChatRequest, header_key: str) -> AsyncGenerator[Event, None]:
        """The events of one turn; errors before the first event are raised (plain gRPC statuses)."""
        caller = current_caller()
        authorized_user(request.user_id)
        text = validation.message_text(request.message)
        key = idempotency_key(header_key, request.idempotency_key)
        # A slot before any work (admission.py): refused at once when none is free soon.
        slot = await self._admission.admit(caller.user_id)
        handed_over = False
        try:
            if key:
                # A key is the user's, whatever conversation it came with: a retry replays the first
                # answer where that turn really happened, and never creates a conversation.
                answered = await self._answer(caller, key)
                if answered is not None:
                    await self._check_same_message(caller, key, text)
                    metrics.chat_turn("replayed")
                    for event in replay(answered):
                        yield event
                    return
            turn = Turn(caller, await self._conversation(request, caller, key), text, key)
            # Stored first, so it is kept whatever fails next; a missing or foreign conversation is
            # NOT_FOUND here, still a plain status. The same call brings the history window.
            stored, timezone = await asyncio.gather(
                self._append(turn, "user", turn.text, [], history_limit=self._window), self._timezone(caller)
            )
            stored = replace(stored, timezone=timezone)
            events: asyncio.Queue[Event] = asyncio.Queue()
            # From here the slot is the background work's: it is released when that ends.
            self._start(self._run_bounded(turn, stored, events.put), slot)
            handed_over = True
        finally:
            if not handed_over:  # answered from the key, or failed before the turn started
                slot.release()
        while True:
            event = await events.get()
            yield event
            if isinstance(event, Done | Failed):
                return

    async def close(self) -> None:
        """At shutdown: turns still running (their clients gone) are cancelled."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    def _start(self, work: Awaitable[None], slot: Slot) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._running.add(task)  # a reference, so the task is not garbage-collected mid-turn
        task.add_done_callback(self._running.discard)
        task.add_done_callback(lambda _: slot.release())

    async def _conversation(self, request: agent_pb2.ChatRequest, caller: Caller, key: str) -> int:
        metadata = caller_metadata(caller)
        with upstream("conversation service"):
            if request.HasField("conversation_id"):
                # Not looked up here: appending the user's message answers NOT_FOUND for a
                # missing or another user's conversation, before the turn starts.
                return validation.positive_id(request.conversation_id, "conversation_id")
            created = await self._conversations.CreateConversation(
                # Untitled: conversation_service names it after the first user message.
                conversation_pb2.CreateConversationRequest(request_id=key),
                metadata=metadata,
                timeout=RPC_TIMEOUT_SECONDS,
            )
            return int(created.id)

    async def _timezone(self, caller: Caller) -> str:
        """The user's timezone (task_service's settings), so the model knows the user's today;
        UTC if task_service can't say (a turn without tools still works)."""
        try:
            settings = await self._tasks.GetSettings(
                task_pb2.GetSettingsRequest(), metadata=caller_metadata(caller), timeout=RPC_TIMEOUT_SECONDS
            )
            ZoneInfo(settings.timezone)
            return settings.timezone or DEFAULT_TIMEZONE
        except (grpc.aio.AioRpcError, ValueError, KeyError) as error:
            log.warning("user settings unavailable, using UTC", extra={"error": repr(error)[:200]})
            return DEFAULT_TIMEZONE

    async def _answer(self, caller: Caller, key: str) -> conversation_pb2.Message | None:
        """The assistant message stored for this key (in any of the user's conversations), if
        the turn already ran."""
        # conversation_id 0: request ids are unique per user, so look in all their conversations.
        request = conversation_pb2.GetMessageByRequestIdRequest(conversation_id=0, request_id=f"{key}:assistant")
        try:
            with upstream("conversation service"):
                return await self._conversations.GetMessageByRequestId(
                    request, metadata=caller_metadata(caller), timeout=RPC_TIMEOUT_SECONDS
                )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def _check_same_message(self, caller: Caller, key: str, text: str) -> None:
        """A key reused for another message is a client bug: refuse it rather than answer the wrong turn."""
        request = conversation_pb2.GetMessageByRequestIdRequest(conversation_id=0, request_id=f"{key}:user")
        with upstream("conversation service"):
            stored = await self._conversations.GetMessageByRequestId(
                request, metadata=caller_metadata(caller), timeout=RPC_TIMEOUT_SECONDS
            )
        if stored.content != text:
            raise InvalidArgument(REUSED_KEY)

    async def _run_bounded(self, turn: Turn, stored: Stored, emit: Emit) -> None:
        failed: Failed | None = None
        ran: list[conversation_pb2.ToolCall] = []  # the tools this attempt ran, kept if it fails
        try:
            async with asyncio.timeout(self.turn_seconds) as bound:
                await self._run(turn, stored, emit, ran)
        except TimeoutError as error:
            if bound.expired():
                failed = Failed(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"the turn did not finish within {self.turn_seconds:g} s"
                )
            else:
                failed = failure(error)
        except Exception as error:
            failed = failure(error)
        if failed is not None:
            if any(not was_refused(call) for call in ran):
                failed = await self._keep_unfinished(turn, failed, ran)
            if id(turn) in self._owners:
                self._failed_keys.remember(turn, failed, self.turn_seconds)
            await emit(failed)
        metrics.chat_turn(failed.code if failed is not None else "ok")
        self._owners.discard(id(turn))

    async def _keep_unfinished(self, turn: Turn, failed: Failed, ran: list[conversation_pb2.ToolCall]) -> Failed:
        """A turn that failed after tools ran: store what ran (so the next turn's history and the
        conversation show it) and say so in the error."""
        named = [describe(call) for call in ran if not was_refused(call)]
        if len(named) > MAX_NAMED_ACTIONS:
            named = [*named[:MAX_NAMED_ACTIONS], f"and {len(named) - MAX_NAMED_ACTIONS} more"]
        done = "; ".join(named)
        note = f"(This turn did not finish: {failed.message}. What was done before it stopped: {done}.)"
        try:
            await self._append(turn, "assistant", note, ran)
        except Exception as error:  # the conversation service may be what failed
            log.warning("could not store an unfinished turn", extra={"error": repr(error)})
        return Failed(failed.code, f"{failed.message}; some actions were carried out before it failed: {done}")

    async def _run(self, turn: Turn, stored: Stored, emit: Emit, ran: list[conversation_pb2.ToolCall]) -> None:
        if not stored.created:
            await self._follow_first_attempt(turn, stored.message, emit)
            return
        if turn.key:
            self._owners.add(id(turn))  # this attempt holds the key: a failure of it is remembered
        started = time.perf_counter()
        earlier = list(stored.history)
        prompt = system_prompt(datetime.now(ZoneInfo(stored.timezone)), stored.timezone)
        messages = history.model_messages(prompt, earlier, turn.text)
        text, calls = await self._loop(turn, messages, emit, ran)
        answer = await self._append(turn, "assistant", text, calls)
        log.info(
            "chat turn",
            extra={
                "conversation_id": turn.conversation_id,
                "history": len(earlier),
                "tools": [call.name for call in calls],
                "tool_errors": sum(call.HasField("error") for call in calls),
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        response = agent_pb2.ChatResponse(
            conversation_id=turn.conversation_id, response=text, tool_calls=calls, message_id=answer.message.id
        )
        await emit(Done(response))

    async def _loop(
        self, turn: Turn, messages: list[dict[str, Any]], emit: Emit, calls: list[conversation_pb2.ToolCall]
    ) -> tuple[str, list[conversation_pb2.ToolCall]]:
        """Model steps until a text answer (or the step bound); returns the text and the tools run
        (also added to `calls` as they finish)."""
        speech = Speech(emit)
        budget = ToolBudget(self._tools_per_step, self._tools_per_turn)
        refusals_recorded = 0
        unrecorded = 0  # refused calls past MAX_RECORDED_REFUSALS, counted instead of stored
        cut = False  # a step asked for more calls than were read
        for step in range(1, self._max_steps + 1):
            speech.next_step()
            reply = await self._model.step(messages, self._tool_schemas, speech.say, self._calls_read_per_step)
            if not reply.tool_calls:
                break
            cut = cut or reply.calls_cut
            for index, requested in enumerate(reply.tool_calls):
                requested.id = requested.id or f"call_s{step}_{index}"
            outcomes = await self._run_tools(turn.caller, reply.tool_calls, budget)
            messages.extend(step_messages(reply.text, reply.tool_calls, outcomes, reply.calls_cut))
            for ran in outcomes:
                if not was_refused(ran) or refusals_recorded < MAX_RECORDED_REFUSALS:
                    refusals_recorded += was_refused(ran)
                    calls.append(ran)
                    await emit(ToolRun(ran))
                else:  # counted, not stored one by one: each costs a tool call proto and bytes
                    unrecorded += 1
        else:
            await speech.say_apart(stopped_early(self._max_steps, calls))
        if unrecorded or cut:
            await speech.say_apart(not_carried_out(unrecorded, cut))
        if not speech.text.strip():
            await speech.say_apart(fallback_answer(calls))
        # Stored as a message: within its limits, whatever the model produced.
        return speech.text.replace("\x00", "")[: validation.MESSAGE_MAX], calls

    async def _run_tools(
        self, caller: Caller, requested: list[ModelToolCall], budget: ToolBudget
    ) -> list[conversation_pb2.ToolCall]:
        """The tool calls of one step, a few at a time and within the turn's budget; a failing
        service fails the turn. The calls past the budget are refused in one go (counted and
        audited once per tool), without a task each: the loop is every turn's."""
        admitted = budget.admit(len(requested))

        async def run(call: ModelToolCall) -> conversation_pb2.ToolCall:
            async with self._tool_slots.hold(caller.user_id):
                return await self._run_tool(caller, call, budget)

        to_run = [call for call, refusal in zip(requested, admitted, strict=True) if refusal is None]
        ran: list[conversation_pb2.ToolCall] = []
        for outcome in await asyncio.gather(*(run(call) for call in to_run), return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
            ran.append(outcome)
        refused = Counter(call.name for call, refusal in zip(requested, admitted, strict=True) if refusal is not None)
        tools.account_refused(refused, tools.ToolContext(caller, self._tasks), "tool_budget")
        results = iter(ran)
        return [
            next(results)
            if refusal is None
            else history.tool_call(tool_name(call), recorded_arguments(call.arguments), error=refusal)
            for call, refusal in zip(requested, admitted, strict=True)
        ]

    async def _run_tool(
        self, caller: Caller, requested: ModelToolCall, budget: ToolBudget
    ) -> conversation_pb2.ToolCall:
        arguments = recorded_arguments(requested.arguments)
        name = tool_name(requested)
        context = tools.ToolContext(caller, self._tasks, self._conversations)
        if budget.writes_stopped and tools.is_write(requested.name):
            tools.account(requested.name, context, "refused", "write_budget_spent")
            return history.tool_call(name, arguments, error=WRITES_STOPPED)
        try:
            with upstream("task service"):
                result = await tools.execute(requested.name, requested.arguments, context)
        except tools.ToolError as error:
            log.info("tool error", extra={"tool": name, "error": str(error)})
            if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                budget.writes_stopped = True
            return history.tool_call(name, arguments, error=str(error))
        return history.tool_call(name, arguments, result=result)

    async def _append(
        self, turn: Turn, role: str, content: str, calls: list[conversation_pb2.ToolCall], history_limit: int = 0
    ) -> Stored:
        request = conversation_pb2.AppendMessageRequest(
            conversation_id=turn.conversation_id,
            role=role,
            content=content,
            tool_calls=calls,
            request_id=turn.request_id(role),
            history_limit=history_limit,
        )
        with upstream("conversation service"):
            reply = await self._conversations.AppendMessage(
                request, metadata=caller_metadata(turn.caller), timeout=RPC_TIMEOUT_SECONDS
            )
        return Stored(reply.message, reply.created, list(reply.history))

    async def _follow_first_attempt(self, turn: Turn, user_message: conversation_pb2.Message, emit: Emit) -> None:
        """A retry whose first attempt stored the user's message: wait for that attempt's answer, never rerun."""
        if user_message.content != turn.text:
            raise InvalidArgument(REUSED_KEY)
        received = user_message.created_at.ToDatetime(tzinfo=UTC)
        first_attempt_left = self.turn_seconds - (datetime.now(UTC) - received).total_seconds()
        if first_attempt_left <= 0:
            raise Aborted(
                "a request with this Idempotency-Key was received earlier and did not finish; "
                "send the message again with a new key"
            )
        give_up = time.monotonic() + min(first_attempt_left + 1, RETRY_WAIT_SECONDS)
        while time.monotonic() < give_up:
            first_failure = self._failed_keys.get(turn)
            if first_failure is not None:
                raise Aborted(
                    f"the first request with this Idempotency-Key failed ({first_failure.message}); "
                    "send the message again with a new key"
                )
            answered = await self._answer(turn.caller, turn.key)
            if answered is not None:
                for event in replay(answered):
                    await emit(event)
                return
            await asyncio.sleep(RETRY_POLL_SECONDS)
        raise Aborted("a request with this Idempotency-Key is still in progress")


NOT_RUN = "not run: "  # how a refused call's error starts
WRITES_STOPPED = NOT_RUN + "the user's write budget is spent for now (rate limit); try again in a minute"


def was_refused(call: conversation_pb2.ToolCall) -> bool:
    return call.HasField("error") and call.error.startswith(NOT_RUN)


class ToolBudget:
    """How many tool calls a turn may still run, and whether it may still write."""

    def __init__(self, per_step: int, per_turn: int) -> None:
        self.per_step, self.per_turn = per_step, per_turn
        self.used = 0
        self.writes_stopped = False  # set by the first RESOURCE_EXHAUSTED of the turn

    def admit(self, count: int) -> list[str | None]:
        """For each of a step's `count` calls: None (it runs) or why it does not."""
        refusals: list[str | None] = []
        for index in range(count):
            if index >= self.per_step:
                refusals.append(
                    f"{NOT_RUN}at most {self.per_step} tool calls per step; ask the user to split the request"
                )
            elif self.used >= self.per_turn:
                refusals.append(
                    f"{NOT_RUN}at most {self.per_turn} tool calls per turn; ask the user to continue in a new message"
                )
            else:
                self.used += 1
                refusals.append(None)
        return refusals


class FailedKeys:
    """Keyed turns that failed in this process, so a retry learns it at once instead of waiting.

    In process only: a retry reaching another replica waits for the answer, then gets ABORTED.
    """

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[float, Failed]] = {}

    def remember(self, turn: Turn, failed: Failed, seconds: float) -> None:
        now = time.monotonic()
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries = {key: entry for key, entry in self._entries.items() if entry[0] > now}
            while len(self._entries) >= self.MAX_ENTRIES:
                self._entries.pop(next(iter(self._entries)))
        self._entries[self._key(turn)] = (now + seconds, failed)

    def get(self, turn: Turn) -> Failed | None:
        entry = self._entries.get(self._key(turn))
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    @staticmethod
    def _key(turn: Turn) -> tuple[str, str]:
        return (turn.caller.user_id, turn.key)  # a key is the user's, whatever the conversation


class Speech:
    """The assistant's text of a turn, streamed as deltas; steps' texts are set apart by a blank line."""

    def __init__(self, emit: Emit) -> None:
        self.text = ""
        self._emit = emit
        self._new_step = False

    def next_step(self) -> None:
        self._new_step = True

    async def say(self, piece: str) -> None:
        if self._new_step and self.text.strip():
            piece = "\n\n" + piece
        self._new_step = False
        self.text += piece
        await self._emit(Delta(piece))

    async def say_apart(self, text: str) -> None:
        self._new_step = True
        await self.say(text)


@contextmanager
def upstream(service: str) -> Iterator[None]:
    """Our own service being down is UNAVAILABLE with a plain message; its other answers pass through."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        if error.code() in UPSTREAM_DOWN:
            log.warning("%s unavailable: %s", service, error.details())
            raise Unavailable(f"the {service} is unavailable; try again") from error
        raise


def failure(error: BaseException) -> Failed:
    mapped = status_for(error)
    if mapped is None:
        log.error("chat turn failed", exc_info=error)
        return Failed(grpc.StatusCode.INTERNAL, "internal error")
    return Failed(*mapped)


def idempotency_key(header: str, field: str) -> str:
    if header and field and header != field:
        raise InvalidArgument("idempotency_key differs from the Idempotency-Key header")
    key = (header or field).strip()
    if len(key) > KEY_MAX_LENGTH or not key.isprintable():
        raise InvalidArgument(f"idempotency_key must be at most {KEY_MAX_LENGTH} printable characters")
    return key


def replay(answered: conversation_pb2.Message) -> list[Event]:
    """A stored answer as the events of a turn (tools are not run again), in its own conversation."""
    response = agent_pb2.ChatResponse(
        conversation_id=answered.conversation_id,
        response=answered.content,
        tool_calls=answered.tool_calls,
        message_id=answered.id,
    )
    return [*(ToolRun(call) for call in answered.tool_calls), Delta(answered.content), Done(response)]


def tool_name(call: ModelToolCall) -> str:
    """Whatever name the model made up, within what a stored tool call may hold."""
    return call.name.replace("\x00", "").strip()[:TOOL_NAME_MAX] or "(no name)"


def recorded_arguments(raw: str) -> dict[str, Any]:
    """The arguments as recorded on the ToolCall: the model's JSON object, or {} when it sent none
    or sent something that is not one (the tool's error says what was wrong)."""
    try:
        return tools.parse_arguments(raw.strip())
    except tools.ToolError:
        return {}


def step_messages(
    text: str, requested: list[ModelToolCall], outcomes: list[conversation_pb2.ToolCall], cut: bool = False
) -> list[dict[str, Any]]:
    """What the model is told of its step: its tool-call message and each result.

    Of the calls refused by the budget only the first is echoed (its error says how many more
    were not run): a step asking for a thousand calls would otherwise make every later request
    of the turn carry a thousand calls and results, and the agent's CPU would go to that. `cut`:
    the step asked for more calls than were read (ModelReply.calls_cut)."""
    shown = [(call, ran) for call, ran in zip(requested, outcomes, strict=True) if not was_refused(ran)]
    refused = [(call, ran) for call, ran in zip(requested, outcomes, strict=True) if was_refused(ran)]
    results = [history.outcome_of(ran) for _, ran in shown]
    if refused:
        first_call, first_refusal = refused[0]
        shown.append((first_call, first_refusal))
        after = ", nor any after them" if cut else ""
        more = (
            f" ({len(refused) - 1} more calls of this step were not run either{after})"
            if len(refused) > 1 or cut
            else ""
        )
        results.append({"error": first_refusal.error + more})
    messages = [assistant_step(text, [call for call, _ in shown])]
    messages += [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}
        for (call, _), result in zip(shown, results, strict=True)
    ]
    return messages


def not_carried_out(unrecorded: int, cut: bool) -> str:
    """The answer's note on the calls a turn neither ran nor listed one by one."""
    if cut:  # the step's answer was not read to its end: how many it asked for is unknown
        return "(More requested actions were not carried out: too many at once.)"
    return f"({unrecorded} more requested actions were not carried out: too many at once.)"


def assistant_step(text: str, calls: list[ModelToolCall]) -> dict[str, Any]:
    """The model's own tool-calling message, sent back to it with the results."""
    return {
        "role": "assistant",
        # A string, never null: llama.cpp's server rejects `"content": null` with a 500, and
        # OpenAI, vLLM, Ollama and Groq all take a string.
        "content": text,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                # Invalid JSON is not echoed back: some endpoints reject a request containing it.
                "function": {"name": call.name, "arguments": json.dumps(recorded_arguments(call.arguments))},
            }
            for call in calls
        ],
    }


def describe(call: conversation_pb2.ToolCall) -> str:
    """One tool call in words, for the answers the agent writes itself."""
    if call.HasField("error"):
        return f"{call.name} failed ({call.error})"
    outcome = history.outcome_of(call)
    if isinstance(outcome, list):
        return f"listed {len(outcome)} task(s)"
    if isinstance(outcome, dict) and {"status", "task_id", "title"} <= set(outcome):
        return f"{outcome['status']} task {outcome['task_id']}: {outcome['title']}"
    return f"ran {call.name}"


def stopped_early(max_steps: int, calls: list[conversation_pb2.ToolCall]) -> str:
    done = "; ".join(describe(call) for call in calls)
    return (
        f"Sorry, I couldn't finish this request within {max_steps} steps, so I stopped here. "
        f"What I did: {done}. Please tell me what is still missing."
    )


def fallback_answer(calls: list[conversation_pb2.ToolCall]) -> str:
    """When the model ends a turn without any text."""
    if calls:
        return "Done: " + "; ".join(describe(call) for call in calls) + "."
    return "I can add, list, complete, update and delete your tasks. What would you like to do?"
