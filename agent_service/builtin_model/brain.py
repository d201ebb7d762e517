"""Deciding the next step of a turn from the messages alone (the model keeps no state).

A turn goes: the user's message -> (a lookup `list_tasks` when a task is named by its
words) -> the action tool calls -> (the lists the user asked for) -> the answer in text.
Each request re-reads the user's message and looks at which tool results of this turn are
already in `messages`; since reading is deterministic, it lands on the same plan every time
and just takes the next step.

Earlier turns give the context: the task acted on last ("delete it"), the list the user
saw last ("the second one") and a question still open ("which one?").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from agent_service.builtin_model import replies
from agent_service.builtin_model.language import (
    Intent,
    Ref,
    close_enough,
    norm,
    protect_quotes,
    read_clause,
    read_message,
    stem,
)


@dataclass(frozen=True)
class Call:
    """A tool call the model asks for."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """What the model answers: tool calls, or text."""

    text: str = ""
    calls: tuple[Call, ...] = ()


@dataclass
class ToolEvent:
    name: str
    arguments: dict[str, Any]
    result: Any = None
    error: str | None = None


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


_LISTING_LINE = re.compile(r"^\s*(\d+)\.\s+(.*?)(?:\s+\(done\))?\s*$")


_SHOWN_TASK = re.compile(r"^Task (\d+): (.*?) \((?:pending|completed)\)\.$", re.M)


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
    acted = [
        (index, event)
        for index, event in events
        if event.error is None and isinstance(event.result, dict) and "task_id" in event.result
    ]
    last_acted_index = acted[-1][0] if acted else -1
    if acted:
        result = acted[-1][1].result
        context.last_task = (int(result["task_id"]), str(result.get("title", "")))
        # the tool calls answered together with the last one form "them"
        last_message = max((index for index, _ in acted), default=-1)
        context.last_batch = [
            int(event.result["task_id"]) for index, event in acted if _same_turn(history, index, last_message)
        ]
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
    return context


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
            if replies.WHICH_ONE in text:
                context.question = listing_of(text)
                for earlier in range(index - 1, -1, -1):
                    if history[earlier].get("role") == "user":
                        context.question_request = _content_text(history[earlier].get("content"))
                        break
            return
        if message.get("role") == "user":
            return


# ---------------------------------------------------------------------------------------
# Matching titles

_STOPWORDS = {
    "the",
    "a",
    "an",
    "my",
    "to",
    "for",
    "of",
    "on",
    "in",
    "at",
    "with",
    "task",
    "todo",
    "one",
    "about",
    "that",
    "this",
    "item",
}


def _content_words(text: str) -> list[str]:
    return [stem(word) for word in norm(text).split() if word not in _STOPWORDS]


def match_title(query: str, tasks: list[dict[str, Any]], exact: bool = False) -> list[dict[str, Any]]:
    """The tasks whose titles the words name: exact title, then phrase, then all words, then near-typos."""
    wanted = norm(query)
    if not wanted:
        return []
    levels = [
        lambda title: title == wanted,
        lambda title: re.search(rf"\b{re.escape(wanted)}\b", title) is not None,
    ]
    words = _content_words(query)
    if words and not exact:
        levels.append(lambda title: all(word in {stem(w) for w in title.split()} for word in words))
        levels.append(
            lambda title: all(
                any(w == word or (len(word) >= 4 and close_enough(word, stem(w))) for w in title.split())
                for word in words
            )
        )
    for level in levels:
        found = [task for task in tasks if level(norm(str(task.get("title", ""))))]
        if found:
            return found
    return []


# ---------------------------------------------------------------------------------------
# Resolving references


@dataclass
class Resolution:
    ids: list[int] = field(default_factory=list)
    titles: dict[int, str] = field(default_factory=dict)
    note: str = ""  # a sentence for the answer (no such task...)
    question: str = ""  # a question for the answer (which one?)
    needs_lookup: bool = False


def resolve(ref: Ref, intent: Intent, context: Context, tasks: list[dict[str, Any]] | None) -> Resolution:
    if ref.kind == "new":  # a task added earlier in this same message: known once the add has run
        return Resolution()
    if ref.kind == "id":
        return Resolution([ref.task_id])
    if ref.kind == "it":
        if context.last_task is None:
            return Resolution(question=replies.which_task())
        return Resolution([context.last_task[0]], {context.last_task[0]: context.last_task[1]})
    if ref.kind == "them":
        listed = [task_id for task_id, _ in context.listing]
        ids = (listed or context.last_batch) if context.them_from_listing else (context.last_batch or listed)
        if not ids:
            return Resolution(question=replies.which_task())
        return Resolution(ids)
    if ref.kind == "position":
        listing = context.listing or (
            [(int(task["id"]), str(task["title"])) for task in tasks] if tasks is not None else None
        )
        if listing is None:
            return Resolution(needs_lookup=True)
        position = ref.position - 1 if ref.position > 0 else len(listing) + ref.position
        if not 0 <= position < len(listing):
            return Resolution(note=replies.no_position(ref.position, len(listing)))
        task_id, title = listing[position]
        return Resolution([task_id], {task_id: title})
    if tasks is None:
        return Resolution(needs_lookup=True)
    if ref.kind == "all":
        return _resolve_all(ref, intent, tasks)
    return _resolve_title(ref, intent, tasks)


def _resolve_all(ref: Ref, intent: Intent, tasks: list[dict[str, Any]]) -> Resolution:
    status = ref.status
    if intent.kind == "complete" and status == "all":
        status = "pending"
    chosen = [task for task in tasks if status == "all" or bool(task.get("completed")) == (status == "completed")]
    if not chosen:
        return Resolution(note=replies.nothing_to(intent.kind, status))
    return Resolution([int(task["id"]) for task in chosen], {int(task["id"]): str(task["title"]) for task in chosen})


def _resolve_title(ref: Ref, intent: Intent, tasks: list[dict[str, Any]]) -> Resolution:
    found = match_title(ref.words, tasks, exact=ref.exact)
    if not found and ref.parts:
        combined = Resolution()
        for part in ref.parts:
            partial = resolve(part, intent, Context(), tasks)
            combined.ids.extend(task_id for task_id in partial.ids if task_id not in combined.ids)
            combined.titles.update(partial.titles)
            combined.note = " ".join(filter(None, [combined.note, partial.note]))
            combined.question = "\n\n".join(filter(None, [combined.question, partial.question]))
        return combined
    if intent.kind == "complete" and len(found) > 1:
        pending = [task for task in found if not task.get("completed")]
        found = pending or found
    if not found:
        return Resolution(note=replies.no_task_called(ref.words))
    if len(found) > 1:
        return Resolution(question=replies.which_one(ref.words, found, intent))
    task = found[0]
    return Resolution([int(task["id"])], {int(task["id"]): str(task["title"])})


# ---------------------------------------------------------------------------------------
# The plan of a turn


@dataclass
class Plan:
    intents: list[Intent]
    context: Context
    needs_lookup: bool = False


def make_plan(conversation: Conversation) -> Plan:
    text = conversation.user_text or ""
    intents = read_message(text)
    context = conversation.context
    if context.question and not any(intent.kind in ("add", "list", *_TARGETED) for intent in intents):
        answered = _answer_to_question(text, context)
        if answered is not None:
            intents = answered
    if context.offered_title and _YES.match(text.strip()):
        intents = [Intent("add", title=context.offered_title)]
    elif context.offered_title and _CANCEL.match(text.strip()):
        intents = [Intent("cancelled")]
    intents = _point_at_new_tasks(_guard_bulk_delete(intents))
    plan = Plan(intents, context)
    plan.needs_lookup = any(
        resolve(ref, intent, context, None).needs_lookup
        for intent in intents
        if intent.kind in _TARGETED
        for ref in intent.refs
    ) or any(intent.kind == "show" for intent in intents)
    return plan


_TARGETED = ("complete", "delete", "update", "show")


def _point_at_new_tasks(intents: list[Intent]) -> list[Intent]:
    """In "add buy milk and mark it as done", "it" is the task this message adds; in "the bills
    were paid, mark that task done", the task named earlier in the message."""
    pointed: list[Intent] = []
    seen_add = False
    named: Ref | None = None
    for intent in intents:
        if named is not None and not seen_add and intent.kind in _TARGETED:
            intent = replace(intent, refs=tuple(named if ref.kind == "it" else ref for ref in intent.refs))
        if intent.kind in _TARGETED and len(intent.refs) == 1 and intent.refs[0].kind in ("id", "title"):
            named = intent.refs[0]
        if seen_add and intent.kind in _TARGETED and any(ref.kind in ("it", "them") for ref in intent.refs):
            intent = replace(
                intent,
                refs=tuple(
                    Ref("new", position=-1 if ref.kind == "it" else 0) if ref.kind in ("it", "them") else ref
                    for ref in intent.refs
                ),
            )
        seen_add = seen_add or intent.kind == "add"
        pointed.append(intent)
    return pointed


def _actions_on_new_tasks(plan: Plan, turn: list[ToolEvent]) -> list[Call]:
    added = [
        int(event.result["task_id"])
        for event in turn
        if event.name == "add_task"
        and event.error is None
        and isinstance(event.result, dict)
        and "task_id" in event.result
    ]
    if not added:
        return []
    retargeted: list[Intent] = []
    for intent in plan.intents:
        new_refs = [ref for ref in intent.refs if ref.kind == "new"]
        if intent.kind in _TARGETED and new_refs:
            ids = [added[-1]] if all(ref.position == -1 for ref in new_refs) else added
            retargeted.append(replace(intent, refs=tuple(Ref("id", task_id=task_id) for task_id in ids)))
    calls, _, _, _ = _actions(Plan(retargeted, plan.context), None)
    return calls


def _guard_bulk_delete(intents: list[Intent]) -> list[Intent]:
    """Deleting or completing everything (neither can be undone) is done only when asked for on
    its own, never as a side effect of a longer message."""
    if len(intents) <= 1:
        return intents
    return [
        replace(intent, kind="bulk_refused")
        if intent.kind in ("delete", "complete") and any(ref.kind == "all" for ref in intent.refs)
        else intent
        for intent in intents
    ]


_YES = re.compile(
    r"^(?:yes|yeah|yep|yup|sure|ok|okay|please|please do|do it|go ahead|y|add it|yes please|sounds good|correct|right)\b[\s,.!]*(?:please|add it|thanks|thank you|do it)?[\s.!]*$",
    re.I,
)
_CANCEL = re.compile(
    r"^(?:neither|none|none of them|never ?mind|cancel|no|nope|forget it|nothing|stop|don't|leave it|skip it)\b", re.I
)
_BOTH = re.compile(
    r"^(?:both|all|all of them|both of them|them all|either|each|every one|all \d+|all (?:two|three|four))\b", re.I
)


def _answer_to_question(text: str, context: Context) -> list[Intent] | None:
    """The user's reply to "which one?": the original request, aimed at the task(s) picked."""
    candidates = context.question or []
    reply = re.sub(
        r"^(?:the|i mean|i meant|i mean the|oh|um|it's|it is|that's|that is|go with|pick|choose|do)\s+",
        "",
        text.strip().lower(),
    ).strip(" .!?")
    reply = re.sub(r"^(?:the|i mean|i meant|oh|um|it's|it is|that's|that is|go with|pick|choose)\s+", "", reply).strip()
    if _CANCEL.match(reply):
        return [Intent("cancelled")]
    chosen: list[int] = []
    if _BOTH.match(reply):
        chosen = [task_id for task_id, _ in candidates]
    elif match := re.match(r"^(?:task\s*|number\s*|no\.?\s*|#\s*)?(\d+)\b", reply):
        number = int(match.group(1))
        ids = [task_id for task_id, _ in candidates]
        if number in ids:
            chosen = [number]
        elif 1 <= number <= len(candidates):
            chosen = [candidates[number - 1][0]]
    else:
        protected, quoted = protect_quotes(text)
        ref = read_clause(f"delete {protected}", quoted).refs
        if ref and ref[0].kind == "position":
            position = ref[0].position
            index = position - 1 if position > 0 else len(candidates) + position
            if 0 <= index < len(candidates):
                chosen = [candidates[index][0]]
        elif ref and ref[0].kind == "title":
            found = match_title(ref[0].words, [{"id": task_id, "title": title} for task_id, title in candidates])
            if len(found) == 1:
                chosen = [int(found[0]["id"])]
    if not chosen:
        return None
    return _retarget(context, chosen)


def _retarget(context: Context, chosen: list[int]) -> list[Intent] | None:
    candidates = [{"id": task_id, "title": title} for task_id, title in context.question or []]
    retargeted: list[Intent] = []
    for intent in read_message(context.question_request):
        if intent.kind not in _TARGETED:
            continue
        for ref in intent.refs:
            if ref.kind == "title" and len(match_title(ref.words, candidates, exact=ref.exact)) > 1:
                retargeted.append(replace(intent, refs=tuple(Ref("id", task_id=task_id) for task_id in chosen)))
                break
    return retargeted or None


# ---------------------------------------------------------------------------------------
# The next step


def respond(messages: list[dict[str, Any]]) -> Reply:
    """The model's answer to a Chat Completions request's messages."""
    conversation = read_conversation(messages)
    if conversation.user_text is None:
        return Reply(replies.HELP)
    plan = make_plan(conversation)
    turn = conversation.turn
    step = 0
    tasks: list[dict[str, Any]] | None = None
    if plan.needs_lookup:
        if not turn:
            return Reply(calls=(Call("list_tasks", {"status": "all"}),))
        lookup = turn[0]
        if lookup.error is not None or not isinstance(lookup.result, list):
            return Reply(replies.lookup_failed(lookup.error or "unexpected answer"))
        tasks = [task for task in lookup.result if isinstance(task, dict) and "id" in task]
        step = 1
    actions, notes, questions, shows = _actions(plan, tasks)
    if actions and len(turn) <= step:
        return Reply(calls=tuple(actions))
    step += len(actions)
    follow_ups = _actions_on_new_tasks(plan, turn[step - len(actions) :]) if len(turn) >= step else []
    if follow_ups and len(turn) <= step:
        return Reply(calls=tuple(follow_ups))
    step += len(follow_ups)
    lists = [Call("list_tasks", {"status": intent.status}) for intent in plan.intents if intent.kind == "list"]
    if lists and len(turn) <= step:
        return Reply(calls=tuple(lists))
    return Reply(_compose(plan, turn[1 if plan.needs_lookup else 0 :], notes, questions, shows))


def _actions(plan: Plan, tasks: list[dict[str, Any]] | None) -> tuple[list[Call], list[str], list[str], list[str]]:
    calls: list[Call] = []
    notes: list[str] = []
    questions: list[str] = []
    shows: list[str] = []
    done: set[tuple[str, int]] = set()
    for intent in plan.intents:
        if intent.kind == "add":
            arguments: dict[str, Any] = {"title": intent.title}
            if intent.description:
                arguments["description"] = intent.description
            calls.append(Call("add_task", arguments))
            continue
        if intent.kind not in _TARGETED:
            continue
        for ref in intent.refs:
            resolution = resolve(ref, intent, plan.context, tasks)
            notes.extend(filter(None, [resolution.note]))
            questions.extend(filter(None, [resolution.question]))
            for task_id in resolution.ids:
                if (intent.kind, task_id) in done:
                    continue
                done.add((intent.kind, task_id))
                if intent.kind == "show":
                    shows.append(replies.show(task_id, tasks or []))
                elif intent.kind == "update":
                    if not intent.title and intent.description is None:
                        questions.append(replies.update_what(task_id))
                        continue
                    arguments = {"task_id": task_id}
                    if intent.title:
                        arguments["title"] = intent.title
                    if intent.description is not None:
                        arguments["description"] = intent.description
                    calls.append(Call("update_task", arguments))
                else:
                    calls.append(Call(f"{intent.kind}_task", {"task_id": task_id}))
    return calls, notes, questions, shows


def _adds_in_number_order(events: list[ToolEvent]) -> list[ToolEvent]:
    """Adds run concurrently, so their numbers may come out of order; confirm them in number order."""
    adds = sorted(
        (event for event in events if event.name == "add_task"),
        key=lambda event: event.result.get("task_id", 0) if isinstance(event.result, dict) else 0,
    )
    return [adds.pop(0) if event.name == "add_task" else event for event in events]


def _compose(plan: Plan, events: list[ToolEvent], notes: list[str], questions: list[str], shows: list[str]) -> str:
    blocks: list[str] = []
    sentences = [replies.outcome(event) for event in _adds_in_number_order(events) if event.name != "list_tasks"]
    sentences += notes
    sentences += [replies.chat(intent) for intent in plan.intents if intent.kind not in ("add", "list", *_TARGETED)]
    acted = bool(events) or bool(shows) or bool(questions)
    sentences = [sentence for sentence in sentences if sentence and not (acted and sentence in replies.SMALL_TALK)]
    if sentences:
        blocks.append(" ".join(dict.fromkeys(sentences)))
    blocks += shows
    blocks += [replies.listing(event) for event in events if event.name == "list_tasks"]
    blocks += questions
    if not blocks:
        return replies.HELP
    return "\n\n".join(blocks)
