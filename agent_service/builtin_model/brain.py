"""Deciding the next step of a turn from the messages alone (the model keeps no state).

A turn goes: the user's message -> (lookups: `list_tasks` when a task is named by its words
or a class of tasks by a date) -> the action tool calls -> (actions on tasks this message
added) -> (the lists the user asked for) -> the answer in text. Each request re-reads the
user's message and counts the tool results of this turn already in `messages`; since reading
is deterministic, it lands on the same plan every time and just takes the next step.

A step holds at most 20 tool calls and a turn at most 50 (what the agent allows), so a big
phase runs over several steps, and a message that adds more than 10 tasks is first
confirmed ("Add these 37 tasks?").

The request's `tools` say what the tools can do: due dates, priority and tags, filters,
reopen, undo, timezone. Without them the model keeps to the five original tools (date words
stay in the title, "I can't undo" is said plainly).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from agent_service.builtin_model import replies
from agent_service.builtin_model.conversation import (
    Context,
    Conversation,
    ToolEvent,
    read_conversation,
    task_results,
)
from agent_service.builtin_model.dates import plainer
from agent_service.builtin_model.intents import read_clause, read_message
from agent_service.builtin_model.meaning import Intent, Ref
from agent_service.builtin_model.reading import protect_quotes, strip_filler
from agent_service.builtin_model.references import Lookups, match_title, parse_refs, resolve

MAX_CALLS_PER_STEP = 20  # the agent runs at most this many tool calls per model step
MAX_CALLS_PER_TURN = 50  # and this many per turn
CONFIRM_OVER = 10  # more adds than this in one message: ask first
GENERAL_LOOKUP = {"status": "all"}


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


# ---------------------------------------------------------------------------------------
# What the tools can do


_PLANNING_TOOLS = ("reopen_task", "undo_last_change", "set_timezone")


@dataclass(frozen=True)
class Abilities:
    """What the offered tools accept, read from the request's `tools` (none listed: all of
    the contract's tools with all their arguments)."""

    tools: frozenset[str]
    fields: dict[str, frozenset[str]]  # tool name -> its argument names

    @classmethod
    def of(cls, tools: Any) -> Abilities:
        if not isinstance(tools, list) or not tools:
            everything = {
                "add_task": frozenset({"title", "description", "due", "priority", "tags"}),
                "update_task": frozenset({"task_id", "title", "description", "due", "priority", "tags"}),
                "list_tasks": frozenset({"status", "query", "due", "tag", "priority", "sort"}),
                "complete_task": frozenset({"task_id", "task_ids"}),
                "delete_task": frozenset({"task_id", "task_ids"}),
                **{name: frozenset() for name in _PLANNING_TOOLS},
            }
            return cls(frozenset(everything), everything)
        fields: dict[str, frozenset[str]] = {}
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and function.get("name"):
                properties = (function.get("parameters") or {}).get("properties") or {}
                fields[str(function["name"])] = frozenset(properties)
        return cls(frozenset(fields), fields)

    def accepts(self, tool: str, argument: str) -> bool:
        return argument in self.fields.get(tool, frozenset())

    def has(self, tool: str) -> bool:
        return tool in self.tools


# ---------------------------------------------------------------------------------------
# The plan of a turn


@dataclass
class Plan:
    intents: list[Intent]
    context: Context
    abilities: Abilities
    lookups: list[dict[str, Any]] = field(default_factory=list)  # list_tasks arguments to run first


def make_plan(conversation: Conversation, abilities: Abilities) -> Plan:
    text = conversation.user_text or ""
    context = conversation.context
    intents = read_message(text)
    confirmed = False
    if context.confirm_adds and _YES.match(text.strip()):
        intents, confirmed = read_message(context.question_request), True
    elif context.confirm_adds and _CANCEL.match(text.strip()):
        intents = [Intent("cancelled")]
    elif context.question and not any(intent.kind in ("add", "list", *_TARGETED) for intent in intents):
        answered = _answer_to_question(text, context)
        if answered is not None:
            intents = answered
    if context.last_request and not any(intent.kind in ("add", "list", *_TARGETED) for intent in intents):
        intents = _same_again(text, context) or intents
    if context.offered_title and _YES.match(text.strip()):
        # the offered phrase as a task, with any date or priority it names ("Dentist on Friday")
        offered = read_clause(f"add {context.offered_title}", [])
        intents = [
            offered if offered.kind == "add" and not offered.items else Intent("add", title=context.offered_title)
        ]
    elif context.offered_title and _CANCEL.match(text.strip()):
        intents = [Intent("cancelled")]
    intents = _point_at_new_tasks(_guard_bulk_delete(intents))
    intents = _finds_as_shows(_confirm_many_adds(intents, confirmed), abilities)
    plan = Plan(intents, context, abilities)
    plan.lookups = _lookups(plan)
    return plan


_TARGETED = ("complete", "delete", "update", "show", "reopen")


def _confirm_many_adds(intents: list[Intent], confirmed: bool) -> list[Intent]:
    """More than a handful of adds at once ("add x, add x, add x, ..."): ask first; once
    confirmed, add at most what one turn allows."""
    adds = [intent for intent in intents if intent.kind == "add"]
    if len(adds) <= CONFIRM_OVER:
        return intents
    others = [intent for intent in intents if intent.kind != "add"]
    if not confirmed:
        return [Intent("confirm_adds", title="\n".join(intent.title for intent in adds))]
    room = max(MAX_CALLS_PER_TURN - len(others), 0)
    return [*adds[:room], *others]


def _lookups(plan: Plan) -> list[dict[str, Any]]:
    """The list_tasks calls the references need: the whole list for titles and positions,
    and a filtered list for a class of tasks named by a date ("everything due today")."""
    lookups: list[dict[str, Any]] = []
    for intent in plan.intents:
        if intent.kind not in _TARGETED:
            continue
        if intent.kind == "show" or (intent.kind == "update" and (intent.tags_added or intent.tags_removed)):
            lookups.append(GENERAL_LOOKUP)
        for ref in intent.refs:
            due = dict(ref.filters).get("due")
            if ref.kind == "all" and due and plan.abilities.accepts("list_tasks", "due"):
                lookups.append({"status": "all", "due": due})
            elif resolve(ref, intent, plan.context, None).needs_lookup:
                lookups.append(GENERAL_LOOKUP)
    unique = {json.dumps(args, sort_keys=True): args for args in lookups}
    return list(unique.values())


_SAME_AGAIN = re.compile(
    r"^(?:and\s+|also\s+|oh and\s+)?(?P<ref>.+?)\s+(?:too|as well|also)[.!]*$"
    r"|^(?:same (?:for|with)|do the same (?:for|with)|also|and|now|then|next)\s+(?P<ref2>.+?)[.!]*$",
    re.I,
)


def _same_again(text: str, context: Context) -> list[Intent] | None:
    """ "task 2 too" after "mark task 1 done": the previous request's action, on new tasks."""
    if not (match := _SAME_AGAIN.match(text.strip())):
        return None
    protected, quoted = protect_quotes(match.group("ref") or match.group("ref2"))
    refs = parse_refs(protected, quoted)
    previous = next((intent for intent in read_message(context.last_request) if intent.kind in _TARGETED), None)
    if previous is None or not refs or refs[0].kind not in ("id", "title", "position", "them"):
        return None
    return [replace(previous, refs=refs)]


_LEAD_IN = re.compile(
    r"^(?:never ?mind|forget|about|regarding|as for|so|the thing (?:with|about))\s+(?:about\s+)?", re.I
)


def _mention(intent: Intent) -> Ref | None:
    """A clause that asks for nothing but names something ("about the milk"): what a later
    "it" in the same message may point at."""
    if intent.kind not in ("unknown", "thanks") or len(intent.text.split()) > 8:
        return None
    words = strip_filler(_LEAD_IN.sub("", intent.text)).strip(" ,.")
    if intent.kind == "thanks" and words == strip_filler(intent.text).strip(" ,."):
        return None  # plain thanks, nothing named
    return Ref("title", words=words) if re.search(r"[A-Za-z]{3}", words) else None


def _point_at_new_tasks(intents: list[Intent]) -> list[Intent]:
    """In "add buy milk and mark it as done", "it" is the task this message adds; in "the bills
    were paid, mark that task done", the task named earlier in the message. A "find X" that
    an action then points at ("find the milk task and mark it done") is only the reference."""
    pointed: list[Intent] = []
    seen_add = False
    named: Ref | None = None
    for intent in intents:
        if named is None and (mention := _mention(intent)):
            named = mention  # words that only name a task ("never mind about the milk, delete it")
            pointed.append(intent)
            continue
        if named is not None and not seen_add and intent.kind in _TARGETED:
            if pointed and pointed[-1].kind in ("unknown", "thanks") and any(ref.kind == "it" for ref in intent.refs):
                pointed.pop()  # that clause was the reference, not a request
            if any(ref.kind == "it" for ref in intent.refs) and pointed and _is_find(pointed[-1]):
                pointed.pop()  # "find X and mark it done": the find was the reference
            intent = replace(intent, refs=tuple(named if ref.kind == "it" else ref for ref in intent.refs))
        if (
            (intent.kind in _TARGETED or _is_find(intent))
            and len(intent.refs) == 1
            and intent.refs[0].kind in ("id", "title")
        ):
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


def _is_find(intent: Intent) -> bool:
    return intent.kind == "list" and bool(intent.refs)


def _finds_as_shows(intents: list[Intent], abilities: Abilities) -> list[Intent]:
    """Without a search filter, "find the milk task" shows the task its words name."""
    if abilities.accepts("list_tasks", "query"):
        return intents
    return [replace(intent, kind="show", filters=()) if _is_find(intent) else intent for intent in intents]


def _actions_on_new_tasks(plan: Plan, events: list[ToolEvent]) -> list[Call]:
    added = [int(result["task_id"]) for event in events if event.name == "add_task" for result in task_results(event)]
    if not added:
        return []
    retargeted: list[Intent] = []
    for intent in plan.intents:
        new_refs = [ref for ref in intent.refs if ref.kind == "new"]
        if intent.kind in _TARGETED and new_refs:
            ids = [added[-1]] if all(ref.position == -1 for ref in new_refs) else added
            retargeted.append(replace(intent, refs=tuple(Ref("id", task_id=task_id) for task_id in ids)))
    return _actions(replace(plan, intents=retargeted), None).calls


def _guard_bulk_delete(intents: list[Intent]) -> list[Intent]:
    """Deleting or completing everything is done only when asked for on its own, never as a
    side effect of a longer message."""
    actions = [intent for intent in intents if intent.kind not in ("remark", "thanks")]
    if len(actions) <= 1:
        return intents
    return [
        replace(intent, kind="bulk_refused")
        if intent.kind in ("delete", "complete")
        and any(ref.kind == "all" and not ref.words and not ref.filters for ref in intent.refs)
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


class Progress:
    """How far this turn has got: its tool results, consumed phase by phase."""

    def __init__(self, turn: list[ToolEvent]) -> None:
        self.turn = turn
        self.done = 0

    def next_step(self, calls: list[Call]) -> Reply | None:
        """The next at most 20 calls of this phase not yet run; None once all have results."""
        answered = len(self.turn) - self.done
        if answered < len(calls):
            return Reply(calls=tuple(calls[answered : answered + MAX_CALLS_PER_STEP]))
        return None

    def results(self, calls: list[Call]) -> list[ToolEvent]:
        events = self.turn[self.done : self.done + len(calls)]
        self.done += len(calls)
        return events


def respond(messages: list[dict[str, Any]], tools: Any = None) -> Reply:
    """The model's answer to a Chat Completions request's messages (and the tools offered)."""
    conversation = read_conversation(messages)
    if conversation.user_text is None:
        return Reply(replies.HELP)
    plan = make_plan(conversation, Abilities.of(tools))
    progress = Progress(conversation.turn)
    lookup_calls = [Call("list_tasks", args) for args in plan.lookups]
    if step := progress.next_step(lookup_calls):
        return step
    lookups: Lookups = {}
    for event in progress.results(lookup_calls):
        if event.error is not None or not isinstance(event.result, list):
            return Reply(replies.lookup_failed(event.error or "unexpected answer"))
        tasks = [task for task in event.result if isinstance(task, dict) and "id" in task]
        lookups[json.dumps(event.arguments, sort_keys=True)] = tasks
    actions = _actions(plan, lookups if plan.lookups else None)
    if step := progress.next_step(actions.calls):
        return step
    events = progress.results(actions.calls)
    retries = _retries_without_due(actions, events)
    if step := progress.next_step(retries):
        return step
    events = _replace_retried(events, progress.results(retries))
    follow_ups = _actions_on_new_tasks(plan, events)
    if step := progress.next_step(follow_ups):
        return step
    events += progress.results(follow_ups)
    list_calls = [call for intent in plan.intents if intent.kind == "list" for call in _list_calls(intent, plan)]
    if step := progress.next_step(list_calls):
        return step
    listed = progress.results(list_calls)
    return Reply(_compose(plan, events, listed, actions))


def _retries_without_due(actions: Actions, events: list[ToolEvent]) -> list[Call]:
    """An add whose date phrase the task service could not read is added again with the date
    words kept in its title, so nothing the user said is lost."""
    retries = []
    for call, event in zip(actions.calls, events, strict=False):
        intent = actions.sources.get(id(call))
        if event.name == "add_task" and event.error and "due" in event.error.lower() and intent is not None:
            arguments = {key: value for key, value in call.arguments.items() if key != "due"}
            retries.append(Call("add_task", {**arguments, "title": intent.title}))
    return retries


def _replace_retried(events: list[ToolEvent], retried: list[ToolEvent]) -> list[ToolEvent]:
    """The turn's events with each failed dated add replaced by its retry."""
    pending = list(retried)
    replaced = []
    for event in events:
        if pending and event.name == "add_task" and event.error and "due" in event.error.lower():
            retry = pending.pop(0)
            retry.note = replies.kept_date_in_title(event.arguments.get("due", ""))
            replaced.append(retry)
        else:
            replaced.append(event)
    return replaced


def _list_calls(intent: Intent, plan: Plan) -> list[Call]:
    """The list_tasks calls of one list request; "this week" is today's and the coming ones."""
    arguments: dict[str, Any] = {"status": intent.status}
    for name, value in intent.filters:
        if plan.abilities.accepts("list_tasks", name):
            arguments[name] = value
    if arguments.get("due") == "week":
        return [Call("list_tasks", {**arguments, "due": due}) for due in ("today", "upcoming")]
    return [Call("list_tasks", arguments)]


@dataclass
class Actions:
    calls: list[Call] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # sentences for the answer (no such task...)
    questions: list[str] = field(default_factory=list)
    shows: list[str] = field(default_factory=list)
    sources: dict[int, Intent] = field(default_factory=dict)  # id(add call) -> the add intent it came from


def _actions(plan: Plan, lookups: Lookups | None) -> Actions:
    actions = Actions()
    done: set[tuple[str, int]] = set()
    general = (lookups or {}).get(json.dumps(GENERAL_LOOKUP, sort_keys=True))
    for intent in plan.intents:
        if intent.kind == "add":
            call = Call("add_task", _add_arguments(intent, plan.abilities))
            actions.calls.append(call)
            actions.sources[id(call)] = intent
        elif intent.kind == "undo" and plan.abilities.has("undo_last_change"):
            actions.calls.append(Call("undo_last_change", {}))
        elif intent.kind == "timezone" and intent.timezone and plan.abilities.has("set_timezone"):
            actions.calls.append(Call("set_timezone", {"timezone": intent.timezone}))
        elif intent.kind in _TARGETED:
            if intent.kind == "reopen" and not plan.abilities.has("reopen_task"):
                continue  # said in the answer: there is no tool for it
            ids: list[int] = []
            for ref in intent.refs:
                resolution = resolve(ref, intent, plan.context, general, lookups)
                actions.notes.extend(filter(None, [resolution.note]))
                actions.questions.extend(filter(None, [resolution.question]))
                # the same task twice is acted on once ("delete 3 and task 3"); updates are merged
                ids += [task_id for task_id in resolution.ids if (intent.kind, task_id) not in done]
                if intent.kind != "update":
                    done.update((intent.kind, task_id) for task_id in resolution.ids)
            _act_on(intent, list(dict.fromkeys(ids)), plan, general, actions)
    return actions


def _add_arguments(intent: Intent, abilities: Abilities) -> dict[str, Any]:
    arguments: dict[str, Any] = {"title": intent.title}
    if intent.due and abilities.accepts("add_task", "due"):
        arguments = {"title": intent.plain_title or intent.title, "due": plainer(intent.due)}
    if intent.description:
        arguments["description"] = intent.description
    if intent.priority and abilities.accepts("add_task", "priority"):
        arguments["priority"] = intent.priority
    if intent.tags_added and abilities.accepts("add_task", "tags"):
        arguments["tags"] = list(intent.tags_added)
    return arguments


def _act_on(intent: Intent, ids: list[int], plan: Plan, tasks: list[dict[str, Any]] | None, actions: Actions) -> None:
    """The calls of one targeted intent on the task numbers it resolved to."""
    name = f"{intent.kind}_task"
    if intent.kind == "show":
        actions.shows += [replies.show(task_id, tasks or []) for task_id in ids]
    elif intent.kind == "update":
        for task_id in ids:
            arguments = _update_arguments(intent, task_id, plan.abilities, tasks)
            if arguments is None:
                actions.questions.append(replies.update_what(task_id))
            elif len(arguments) == 1:
                actions.notes.append(replies.chat(Intent("no_planning")))
            elif earlier := next(
                (c for c in actions.calls if c.name == "update_task" and c.arguments["task_id"] == task_id), None
            ):
                earlier.arguments.update(arguments)  # "move X to friday and make it urgent": one update
            else:
                actions.calls.append(Call("update_task", arguments))
    elif len(ids) > MAX_CALLS_PER_STEP and plan.abilities.accepts(name, "task_ids"):
        # many at once ("delete all my completed tasks"): one call per 50 numbers
        actions.calls += [Call(name, {"task_ids": ids[i : i + 50]}) for i in range(0, len(ids), 50)]
    else:
        room = MAX_CALLS_PER_TURN - len(actions.calls)
        actions.calls += [Call(name, {"task_id": task_id}) for task_id in ids[:room]]


def _update_arguments(
    intent: Intent, task_id: int, abilities: Abilities, tasks: list[dict[str, Any]] | None
) -> dict[str, Any] | None:
    """update_task's arguments; None when nothing to change was said."""
    planning = (
        intent.due is not None or intent.priority or intent.tags_added or intent.tags_removed or intent.clear_tags
    )
    if not intent.title and intent.description is None and not planning:
        return None
    arguments: dict[str, Any] = {"task_id": task_id}
    if intent.title:
        arguments["title"] = intent.title
    if intent.description is not None:
        arguments["description"] = intent.description
    if intent.due is not None and abilities.accepts("update_task", "due"):
        arguments["due"] = plainer(intent.due)
    if intent.priority and abilities.accepts("update_task", "priority"):
        arguments["priority"] = intent.priority
    if (intent.tags_added or intent.tags_removed or intent.clear_tags) and abilities.accepts("update_task", "tags"):
        current = next((task.get("tags") or [] for task in tasks or [] if task.get("id") == task_id), [])
        tags = [] if intent.clear_tags else [str(tag) for tag in current if tag not in intent.tags_removed]
        arguments["tags"] = list(dict.fromkeys([*tags, *intent.tags_added]))
    return arguments


def _adds_in_number_order(events: list[ToolEvent]) -> list[ToolEvent]:
    """Adds run concurrently, so their numbers may come out of order; confirm them in number order."""
    adds = sorted(
        (event for event in events if event.name == "add_task"),
        key=lambda event: event.result.get("task_id", 0) if isinstance(event.result, dict) else 0,
    )
    return [adds.pop(0) if event.name == "add_task" else event for event in events]


_CHATTY = ("add", "list", "remark", *_TARGETED)


def _compose(plan: Plan, events: list[ToolEvent], listed: list[ToolEvent], actions: Actions) -> str:
    blocks: list[str] = []
    sentences = [
        " ".join(filter(None, [replies.outcome(event), event.note])) for event in _adds_in_number_order(events)
    ]
    sentences += actions.notes
    sentences += [
        _chat_sentence(intent, plan)
        for intent in plan.intents
        if intent.kind not in _CHATTY or (intent.kind == "reopen" and not plan.abilities.has("reopen_task"))
    ]
    acted = bool(events) or bool(actions.shows) or bool(actions.questions) or bool(listed)
    sentences = [sentence for sentence in sentences if sentence and not (acted and sentence in replies.SMALL_TALK)]
    if sentences:
        blocks.append(" ".join(dict.fromkeys(sentences)))
    blocks += actions.shows
    blocks += _list_blocks(plan, listed)
    blocks += actions.questions
    if not blocks:
        return replies.HELP
    return "\n\n".join(blocks)


def _chat_sentence(intent: Intent, plan: Plan) -> str:
    if intent.kind == "confirm_adds":
        return replies.confirm_adds(intent.title.split("\n"), MAX_CALLS_PER_TURN)
    if intent.kind in ("undo", "timezone") and plan.abilities.has(
        "undo_last_change" if intent.kind == "undo" else "set_timezone"
    ):
        return "" if intent.kind == "undo" or intent.timezone else replies.chat(intent)
    return replies.chat(intent)


def _list_blocks(plan: Plan, listed: list[ToolEvent]) -> list[str]:
    """One block per list request; "this week" merges its two lists into one."""
    blocks = []
    position = 0
    for intent in (intent for intent in plan.intents if intent.kind == "list"):
        count = len(_list_calls(intent, plan))
        events = listed[position : position + count]
        position += count
        failed = next((event for event in events if event.error is not None), None)
        if failed is not None:
            blocks.append(replies.listing(failed))
            continue
        tasks = [task for event in events for task in event.result or [] if isinstance(task, dict)]
        arguments = dict(events[0].arguments) if events else {}
        if count > 1:
            arguments["due"] = "week"
        blocks.append(replies.list_block(arguments, tasks))
    return blocks
