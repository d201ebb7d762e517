"""List: "show my tasks", "what's pending?", "what have I completed?"; "show task 3";
views by date ("what's due today", "what's overdue", "this week"), tag ("show my errands"),
priority ("what's urgent"), order ("sorted by due date"); and search ("find the lisbon task")."""

from __future__ import annotations

import re

from agent_service.builtin_model.meaning import Clause, Intent, Ref
from agent_service.builtin_model.reading import fix_status_word
from agent_service.builtin_model.references import parse_refs

_LIST_NOUN = r"(?:tasks?|todos?|to-?dos?|to do's|to-do's|items?|list|lists|things|stuff|agenda|plate|reminders?|chores?|jobs?|errands?|backlog)"


_LIST_RULE = re.compile(
    r"^(?:(?:show|list|display|see|view|get|give|tell|read|print|fetch|pull up|bring up|open|check|review|recap|summarize|"
    r"let me see|let me know|can i see|may i see|i want to see|i'd like to see|i wanna see|lemme see|show me|what's|whats|wats|wat's|wat|what is|what are|"
    r"what|which|how many|how much|do i have|did i|have i|is there|are there|anything|any|got any|where are|what've|what have|tell me|"
    r"am i behind|am i late|are we behind|am i missing|is anything|is there anything|are any|is something)\b.*|"
    r"(?:my\s+|all\s+(?:my\s+)?|the\s+)?(?:(?:pending|remaining|open|completed|done|finished|outstanding|current|incomplete|unfinished)\s+)?"
    r"(?:tasks|todos|to-dos|todo list|to-do list|to do list|task list|list|agenda|items)(?:\s+(?:please|pls))?|"
    r"(?:only\s+|just\s+)?(?:the\s+)?(?:pending|remaining|completed|done|finished|outstanding|open|incomplete|unfinished)(?:\s+(?:ones|tasks|items|todos))?(?:\s+only)?|"
    r"status|overview|summary|whats left|what's left|anything left|what's next|whats next)$",
    re.I,
)


def read_list(clause: Clause) -> Intent | None:
    if found := _read_find(clause):
        return found
    text = " ".join(fix_status_word(word) for word in clause.text.split(" "))
    lower = text.lower()
    if not _LIST_RULE.match(text):
        return None
    mentions_tasks = re.search(
        rf"\b{_LIST_NOUN}\b|\b(?:everything|all|finish|get done|got done|pending|remaining|left|open|outstanding|completed|complete|done|finished|incomplete|unfinished|accomplished|achieved|do today|to do|need to do|have to do|next|status|overview|summary|plate|agenda|"
        r"due|overdue|late|upcoming|coming up|scheduled|deadlines?|urgent|important|priority|tagged|behind|miss|missed)\b|#\w|"
        r"\b(?:do i have|have i got|is there|are there|what's on|whats on)\b.*\b(?:today|tomorrow|this week|next week)\b|"
        r"^what (?:do|have) i (?:have|got)\W*$",
        lower,
    )
    if not mentions_tasks:
        return None
    if re.match(r"^(?:what|how)\b.*\b(?:can|could)\s+you\b", lower):
        return None
    status = "all"
    if re.search(
        r"\b(?:including|incl\.?|with|plus|and|even|as well as)\s+(?:the\s+|all\s+)?(?:done|completed|finished)\b",
        lower,
    ):
        pass  # "all my tasks including the done ones"
    elif re.search(
        r"n't\s+(?:yet\s+|been\s+)?(?:done|finished|completed|complete|gotten to|got to)\b|\byet to\b", lower
    ):
        status = "pending"  # "anything i haven't done yet"
    elif re.search(
        r"\b(?:pending|remaining|left|open|outstanding|incomplete|unfinished|uncompleted|not (?:yet )?(?:done|completed|complete|finished)|still|undone|active)\b",
        lower,
    ):
        status = "pending"
    elif re.search(r"\b(?:need to do|have to do|got to do|next|to do today|due)\b", lower):
        status = "pending"
    elif re.search(r"\b(?:completed|complete|done|finished|accomplished|achieved|checked off|ticked off|did)\b", lower):
        status = "completed"
    # "show task 3" / "what is task 3": one task's details
    if match := re.search(r"\b(?:task|number|item|#)\s*#?\s*(?P<n>\d+)\b", lower):
        if not re.search(r"\btasks\b", lower):
            return Intent("show", refs=(Ref("id", task_id=int(match.group("n"))),), text=text)
    filters = _filters(lower)
    if dict(filters).get("due") == "overdue":
        status = "all"  # overdue tasks are pending ones; "what did i miss" is not about completed ones
    if dict(filters).get("due") in ("today", "week", "upcoming", "scheduled") and status == "all":
        status = "pending"  # "what's due today" asks what is still to do
    return Intent("list", status=status, filters=filters, text=text)


_DUE_VIEWS = (
    (r"\bover ?due\b|\blate\b|\bpast due\b|\bbehind on\b|\bmissed\b|\bdid i miss\b|\bhave i missed\b", "overdue"),
    (r"\bdue\s+(?:by\s+|on\s+)?today\b|\btoday'?s (?:tasks|list|deadlines)\b|\bdue\b.*\btoday\b", "today"),
    (r"\bthis week\b|\bthe week\b|\bweek'?s\b", "week"),
    (
        r"\bupcoming\b|\bcoming up\b|\bnext (?:few|couple of|7|seven) days\b|\bdue (?:tomorrow|soon)\b|\bsoon\b",
        "upcoming",
    ),
    (
        r"\b(?:without|no|with no|don't have|have no|lack) (?:a |any )?(?:due dates?|deadlines?|dates?)\b|\bunscheduled\b|\bundated\b",
        "none",
    ),
    (
        r"\bwith (?:a |any )?(?:due dates?|deadlines?)\b|\bscheduled\b|\bdeadlines\b|\bwhat'?s due\b|\bdue dates\b|\bdated\b",
        "scheduled",
    ),
)
_NOT_TAGS = (
    "pending",
    "remaining",
    "open",
    "completed",
    "complete",
    "done",
    "finished",
    "outstanding",
    "current",
    "incomplete",
    "unfinished",
    "old",
    "new",
    "other",
    "overdue",
    "upcoming",
    "late",
    "urgent",
    "important",
    "scheduled",
    "all",
    "recent",
    "latest",
    "first",
    "last",
    "next",
    "whole",
    "entire",
    "todo",
    "to-do",
    "daily",
    "active",
    "priority",
    "my",
    "the",
    "your",
    "our",
    "of",
    "these",
    "those",
    "some",
    "any",
    "every",
    "today",
    "tomorrow",
)


def _filters(lower: str) -> tuple[tuple[str, str], ...]:
    """list_tasks filters a list request names: due view, tag, priority, order."""
    filters: list[tuple[str, str]] = []
    due = next((view for pattern, view in _DUE_VIEWS if re.search(pattern, lower)), "")
    if due:
        filters.append(("due", due))
    if match := re.search(r"\b(?:(?P<p>high|top|low|medium)[- ]priority|(?P<u>urgent|important))\b", lower):
        filters.append(
            ("priority", "high" if match.group("u") else {"top": "high"}.get(match.group("p"), match.group("p")))
        )
    if tag := _tag_named(lower):
        filters.append(("tag", tag))
    if re.search(
        r"\b(?:by|in order of)\s+(?:due\s+)?(?:date|deadline|due)\b|\bsoonest first\b|\bearliest first\b", lower
    ):
        filters.append(("sort", "due"))
    elif re.search(r"\b(?:by|in order of)\s+(?:priority|importance)\b|\bmost (?:important|urgent) first\b", lower):
        filters.append(("sort", "priority"))
    elif re.search(r"\b(?:recently (?:changed|updated|edited)|by (?:last )?update[ds]?)\b", lower):
        filters.append(("sort", "updated"))
    elif due == "scheduled":
        filters.append(("sort", "due"))
    return tuple(filters)


def _tag_named(lower: str) -> str:
    """ "tagged errands", "#work", "my errands", "my work tasks" -> the tag."""
    if match := re.search(
        r"\b(?:tagged|with the tag|with tag|labell?ed|under)\s+#?([a-z][\w-]{0,31})|#([a-z][\w-]{0,31})", lower
    ):
        return match.group(1) or match.group(2)
    if match := re.search(r"\b(?:my|the|all)\s+([a-z][\w-]{1,31})\s+(?:tasks|todos|items|stuff|things|list)\b", lower):
        if match.group(1) not in _NOT_TAGS:
            return match.group(1)
    if match := re.fullmatch(
        r"(?:show|list|see|view|display|what are|whats|what's|get)\s+(?:me\s+)?(?:all\s+)?(?:my|the)\s+(errands|chores)\s*\??",
        lower,
    ):
        return match.group(1)
    return ""


_FIND = re.compile(
    r"^(?:find|look up|lookup|locate|search for|search|look for|where is|where's|wheres|"
    r"search (?:my )?(?:tasks|list|todos) for|do i have (?:a |any )?(?:tasks?|todos?|anything) (?:about|for|with|called|named|mentioning)|"
    r"(?:are there |is there )?(?:any|a) tasks? (?:about|for|with|called|named|mentioning|that mentions?)|"
    r"anything (?:about|for|with|mentioning)|(?:show|list|give)(?: me)? (?:the |my |all )?(?:tasks?|todos?|items?) "
    r"(?:about|for|with|mentioning|matching|containing|called|named|that mention))\s+(?P<q>.+?)\??$",
    re.I,
)


def _read_find(clause: Clause) -> Intent | None:
    """A search: list_tasks with a query, and a reference to what it finds ("find the milk
    task and mark it done")."""
    if not (match := _FIND.match(clause.text)):
        return None
    refs = parse_refs(match.group("q"), clause.quoted)
    if not refs or refs[0].kind != "title":
        return None
    words = re.sub(r"\b(?:tasks?|todos?|items?|ones?|my|the|a|an|in|it|them|in it)\b", " ", refs[0].words, flags=re.I)
    query = " ".join(words.split()) or refs[0].words
    return Intent("list", filters=(("query", query),), refs=refs, text=clause.text)
