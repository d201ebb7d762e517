"""Reading a Chat Completions request's messages: this turn's request, its progress, and context.

The last user message is this turn's request; the tool results after it are this turn's
progress; everything before it is context: the task acted on last ("delete it"), the list
the user saw last ("the second one"), and a question still open ("which one?", "should I
add ...?"). Lists are read back from the assistant's own text, the list the user saw.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agent_service.builtin_model import replies


@dataclass
class ToolEvent:
    name: str
    arguments: dict[str, Any]
    result: Any = None
    error: str | None = None
    note: str = ""  # a sentence the answer adds after this call's outcome


@dataclass
class Context:
    """What earlier turns tell: what "it", "them" and "the second one" point at."""

    last_task: tuple[int, str] | None = None
    last_batch: list[int] = field(default_factory=list)
    listing: list[tuple[int, str]] = field(default_factory=list)
    them_from_listing: bool = True  # the last list shown is more recent than the last actions
    question: list[tuple[int, str]] | None = None  # candidates of an open "which one?" question
    offered_title: str = ""  # an open "Should I add ... as a task?" offer
    question_request: str = ""  # the user message that question was about
    confirm_adds: int = 0  # an open "Add these N tasks?" question
    last_request: str = ""  # the user's message before this one ("task 2 too" repeats it)


@dataclass
class Conversation:
    user_text: str | None
    context: Context
    turn: list[ToolEvent]


# ---------------------------------------------------------------------------------------
# Reading the messages


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def _events(messages: list[dict[str, Any]]) -> list[tuple[int, ToolEvent]]:
    """Every tool call with its outcome, with the index of the tool message that answered it."""
    pending: dict[str, ToolEvent] = {}
    events: list[tuple[int, ToolEvent]] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                arguments = _load(function.get("arguments") or "{}")
                pending[str(call.get("id"))] = ToolEvent(
                    str(function.get("name", "")), arguments if isinstance(arguments, dict) else {}
                )
        elif role == "tool":
            event = pending.pop(str(message.get("tool_call_id")), None)
            if event is None:
                continue
            outcome = _load(_content_text(message.get("content")))
            if isinstance(outcome, dict) and "error" in outcome and len(outcome) == 1:
                event.error = str(outcome["error"])
            elif isinstance(outcome, str) and outcome.lower().startswith("error"):
                event.error = outcome
            else:
                event.result = outcome
            events.append((index, event))
    return events


# "3. Pay rent (done) [due Fri 2026-12-04, high priority]": number and title.
_LISTING_LINE = re.compile(r"^\s*(\d+)\.\s+(.*?)(?:\s+\(done\))?(?:\s+\[[^\]]*\])?\s*$")


_SHOWN_TASK = re.compile(r"^Task (\d+): (.*?) \((?:pending|completed)[^)]*\)\.$", re.M)


def listing_of(text: str) -> list[tuple[int, str]]:
    return [(int(match.group(1)), match.group(2)) for line in text.splitlines() if (match := _LISTING_LINE.match(line))]


def read_conversation(messages: list[dict[str, Any]]) -> Conversation:
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        return Conversation(None, Context(), [])
    events = _events(messages)
    turn = [event for index, event in events if index > last_user]
    earlier = [(index, event) for index, event in events if index < last_user]
    return Conversation(
        _content_text(messages[last_user].get("content")), _context(messages[:last_user], earlier), turn
    )


def _context(history: list[dict[str, Any]], events: list[tuple[int, ToolEvent]]) -> Context:
    context = Context()
    acted = [(index, result) for index, event in events for result in task_results(event)]
    last_acted_index = acted[-1][0] if acted else -1
    if acted:
        result = acted[-1][1]
        context.last_task = (int(result["task_id"]), str(result.get("title", "")))
        # the tool calls answered together with the last one form "them"
        last_message = max((index for index, _ in acted), default=-1)
        context.last_batch = list(
            dict.fromkeys(int(result["task_id"]) for index, result in acted if _same_turn(history, index, last_message))
        )
    for index in range(len(history) - 1, -1, -1):
        message = history[index]
        if message.get("role") != "assistant" or message.get("tool_calls"):
            continue
        text = _content_text(message.get("content"))
        lines = listing_of(text) or [(int(m.group(1)), m.group(2)) for m in _SHOWN_TASK.finditer(text)]
        if lines:
            context.listing = lines
            context.them_from_listing = index > last_acted_index
            if len(lines) == 1 and index > last_acted_index:
                context.last_task = lines[0]
            break
    _open_question(history, context)
    context.last_request = next(
        (_content_text(m.get("content")) for m in reversed(history) if m.get("role") == "user"), ""
    )
    return context


def task_results(event: ToolEvent) -> list[dict[str, Any]]:
    """The tasks a successful tool call acted on: its result, or each good result of a batch
    (`{"results": [...]}` from task_ids). list_tasks and set_timezone act on none."""
    if event.error is not None or not isinstance(event.result, dict):
        return []
    if isinstance(event.result.get("results"), list):
        return [r for r in event.result["results"] if isinstance(r, dict) and "task_id" in r and "error" not in r]
    return [event.result] if "task_id" in event.result else []


def _same_turn(history: list[dict[str, Any]], first: int, last: int) -> bool:
    return not any(message.get("role") == "user" for message in history[first:last])


def _open_question(history: list[dict[str, Any]], context: Context) -> None:
    """If the assistant's last words were "which one?", remember its candidates and the request."""
    for index in range(len(history) - 1, -1, -1):
        message = history[index]
        if message.get("role") == "assistant" and not message.get("tool_calls"):
            text = _content_text(message.get("content"))
            if offer := replies.SHOULD_I_ADD.search(text):
                context.offered_title = offer.group("title")
            if confirm := replies.CONFIRM_ADDS.search(text):
                context.confirm_adds = int(confirm.group("count"))
            if replies.WHICH_ONE in text or context.confirm_adds:
                context.question = listing_of(text)
                for earlier in range(index - 1, -1, -1):
                    if history[earlier].get("role") == "user":
                        context.question_request = _content_text(history[earlier].get("content"))
                        break
            return
        if message.get("role") == "user":
            return
