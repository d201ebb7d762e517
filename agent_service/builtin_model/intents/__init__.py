"""From a user message to its intents, in order.

The message is split into sentences, and each sentence into clauses: a piece after "and"
or "," starts a new clause only if it reads as a command on its own ("add milk and delete
task 3"); otherwise it stays with the title ("call mom and dad"). Each clause goes through
the intent rules in order (update, complete, delete, list, add), then small talk.
"""

from __future__ import annotations

import re

from agent_service.builtin_model.intents.add import explicit_title, read_add
from agent_service.builtin_model.intents.chat import read_chat
from agent_service.builtin_model.intents.complete import read_complete
from agent_service.builtin_model.intents.delete import read_delete
from agent_service.builtin_model.intents.list import read_list
from agent_service.builtin_model.intents.plan import read_plan
from agent_service.builtin_model.intents.update import read_update
from agent_service.builtin_model.meaning import Clause, Intent
from agent_service.builtin_model.reading import (
    CLAUSE_SPLIT,
    FINISHED_TALKING,
    SENTENCE_SPLIT,
    TYPOGRAPHIC,
    fix_typos,
    fix_word,
    protect_quotes,
    restore,
    strip_filler,
)
from agent_service.builtin_model.vocabulary import STATUS_DONE

_RULES = (read_plan, read_update, read_complete, read_delete, read_list, read_add)


def read_clause(raw: str, quoted: list[str]) -> Intent:
    """One clause's intent; "unknown" when no rule fits."""
    stripped = strip_filler(raw)
    text = fix_typos(stripped)
    clause = Clause(text, quoted)
    if text:
        for rule in _RULES:
            intent = rule(clause)
            if intent is not None:
                return intent
    stripped_chat = read_chat(clause) if text else None
    if stripped_chat is not None and stripped_chat.kind == "undo":
        return stripped_chat  # "no wait, put it back": the undo, not the "no"
    chat = read_chat(Clause(raw.strip(" .!?,"), quoted)) or stripped_chat
    if chat is not None:
        return chat
    return Intent("unknown", text=restore(text or raw.strip(), quoted))


def read_message(text: str) -> list[Intent]:
    """Every intent in a user message, in order."""
    protected, quoted = protect_quotes(" ".join(text.translate(TYPOGRAPHIC).split()))
    if FINISHED_TALKING.match(protected):
        return [Intent("thanks", text=protected)]
    intents: list[Intent] = []
    for sentence in SENTENCE_SPLIT.split(protected):
        if sentence.strip():
            intents.extend(_read_sentence(sentence.strip(), quoted))
    return _merge_adds(intents)


def _read_sentence(sentence: str, quoted: list[str]) -> list[Intent]:
    whole = read_clause(sentence, quoted)
    # An explicit title ("add a task: ...", "todo: ...", a quoted title) runs to the end of the
    # sentence: whatever it says is the task's text, not more commands.
    if whole.kind == "add" and explicit_title(sentence):
        return [whole]
    segments = CLAUSE_SPLIT.split(sentence)
    clauses: list[str] = [segments[0]]
    remarks: list[str] = []
    index = 1
    while index < len(segments):
        separator, segment = segments[index], segments[index + 1] if index + 1 < len(segments) else ""
        index += 2
        if _starts_command(segment, quoted, clauses[-1], bare=not separator.strip()):
            clauses.append(segment)
        elif _is_remark(clauses[-1], separator, segment, quoted):
            remarks.append(segment)  # "mark the meeting done, it went well": asks for nothing
        else:
            clauses[-1] = clauses[-1] + separator + segment
    if len(clauses) == 1 and not remarks:
        return [whole]
    pieces = [read_clause(clause, quoted) for clause in clauses]
    if whole.kind in ("complete", "delete", "reopen") and any(piece.kind == "unknown" for piece in pieces):
        # "mark feed the fish and send the invoice as done": one request on two titles
        return [whole]
    return pieces


def _is_remark(previous: str, separator: str, segment: str, quoted: list[str]) -> bool:
    """After a comma, words that ask for nothing ("it went well", "it's over") once the
    clause before them is a whole request that they would only spoil."""
    if "," not in separator or len(previous) > 200 or len(segment.split()) > 8:
        return False  # a remark is a few words after a short request (and this keeps long input linear)
    before = read_clause(previous, quoted).kind
    if before not in ("complete", "delete", "update", "reopen", "list", "show"):
        return False
    return read_clause(previous + separator + segment, quoted).kind == "unknown"


def _starts_command(segment: str, quoted: list[str], previous: str, bare: bool = False) -> bool:
    """Does this piece after "and"/"," start a new command (rather than continue a title or a
    list)? A `bare` piece (no separator: "add eggs add bread") splits only between two adds."""
    segment = segment.strip()
    if not segment:
        return False
    intent = read_clause(segment, quoted)
    if bare:  # (a long previous clause is not re-read: that would make long input quadratic)
        return (
            intent.kind == "add"
            and len(previous) <= 300
            and read_clause(previous, quoted).kind not in ("unknown", "empty_add", "greet", "thanks", "help")
        )
    if intent.kind in ("unknown", "greet", "thanks", "help", "reopen", "empty_add", "undo", "timezone"):
        return intent.kind in ("reopen", "undo", "timezone")
    first = fix_word(strip_filler(segment).split(" ")[0]).lower()
    # A title-only piece ("milk") never splits; a piece opening with a command word does.
    if intent.kind == "add":
        previous_intent = read_clause(previous, quoted)
        explicit_add = bool(re.match(r"^(?:add|create|remind|remember|put|insert|also|new|todo|note)", first))
        if previous_intent.kind in ("delete", "complete") and not explicit_add:
            # "delete call mom and walk the dog": another title to act on, not an errand to add
            return not any(ref.kind == "title" for ref in previous_intent.refs)
        if previous_intent.kind == "update" and previous_intent.title and not explicit_add:
            return False  # "change X to sort and file the mail": the rest of the new title
        return previous_intent.kind != "add" or explicit_add
    if intent.kind in ("list", "show"):
        return bool(re.match(r"^(?:show|list|display|what|which|how|give|tell|let|view|see|print|and)", first))
    if intent.kind == "complete" and re.match(r"^(?:i|we)$", first):
        return True
    return first in _COMMAND_STARTS or (
        intent.kind in ("complete", "delete") and bool(re.search(r"\b(?:is|are)\s+" + STATUS_DONE, segment, re.I))
    )


_COMMAND_STARTS = {
    "make",
    "move",
    "push",
    "postpone",
    "reschedule",
    "tag",
    "untag",
    "label",
    "prioritize",
    "prioritise",
    "reopen",
    "uncheck",
    "delete",
    "remove",
    "cancel",
    "drop",
    "erase",
    "scratch",
    "complete",
    "finish",
    "mark",
    "check",
    "tick",
    "cross",
    "change",
    "rename",
    "update",
    "edit",
    "modify",
    "get",
    "clear",
    "trash",
    "set",
    "done",
    "close",
}


def _merge_adds(intents: list[Intent]) -> list[Intent]:
    """One add intent per new task (an add of several items holds one per item)."""
    merged: list[Intent] = []
    for intent in intents:
        merged.extend(intent.items or [intent])
    return merged
