"""Update: renaming a task ("change task 1 to X", "rename milk to oat milk") or changing its description."""

from __future__ import annotations

import re

from agent_service.builtin_model.dates import due_of, is_due_phrase
from agent_service.builtin_model.meaning import Clause, Intent, Ref
from agent_service.builtin_model.reading import QUOTE_SLOT, capitalize, is_only_quote, strip_filler
from agent_service.builtin_model.references import parse_refs
from agent_service.builtin_model.vocabulary import STATUS_DONE

_TASK_NOUN = r"(?:task|todo|to-do|to do|item|reminder|entry|note|chore|thing|one|errand|job)"


def read_update(clause: Clause) -> Intent | None:
    text = clause.text
    description_rules = (
        r"^(?:change|update|edit|set|modify|rewrite|replace|make)\s+(?:the\s+)?(?:description|desc|note|notes|details)\s+(?:of|for|on|in)\s+(?P<ref>.+?)\s+(?:to|as|with|into|:|=)\s*(?P<d>.+)$",
        r"^(?:change|update|edit|set|modify)\s+(?P<ref>.+?)(?:'s|s')?\s+(?:description|desc|notes?|details)\s*(?:to|as|:|=|with)\s*(?P<d>.+)$",
        r"^(?:add|give|put|attach|set|write)\s+(?:a\s+|the\s+|an?\s+)?(?:description|desc|note|notes|details)\s+(?:to|for|on)\s+(?P<ref>.+?)(?:\s*:|\s+(?:saying|that says|-|=|with|as|reading))\s*(?P<d>.+)$",
        r"^(?:add|give|put|attach|set|write)\s+(?:a\s+|the\s+)?(?:description|desc|note|notes|details)\s*(?::|saying|that says|-|=)?\s*(?P<d>.+?)\s+(?:to|for|on)\s+(?P<ref>(?:task|#|number|item)\s*#?\s*\d+)$",
        r"^(?:describe)\s+(?P<ref>.+?)\s+as\s+(?P<d>.+)$",
    )
    for rule in description_rules:
        if match := re.match(rule, text, re.I):
            refs = parse_refs(match.group("ref"), clause.quoted)
            if refs:
                return Intent("update", description=clause.title(match.group("d")), refs=refs, text=text)
    title_rule = (
        r"^(?:change|rename|update|edit|modify|alter|reword|rewrite|correct|fix|retitle|switch|swap|replace|amend|adjust|set)\s+"
        r"(?:the\s+)?(?:(?:title|name|text|wording|label)\s+(?:of|for|on)\s+)?(?P<ref>.+?)(?:'s\s+(?:title|name|text))?(?:\s+(?:title|name|text))?"
        r"\s*(?:\s+to\s+say|\s+to\s+read|\s+so\s+(?:that\s+)?it\s+(?:says|reads)|\s+to|\s+into|\s+as|\s+with|\s*->|\s*=>|\s*=|\s*:)\s+(?P<t>.+)$"
    )
    if (match := re.match(title_rule, text, re.I)) and not re.fullmatch(
        rf"(?:a|an|new|a new|one)\s+{_TASK_NOUN}", match.group("ref").strip(), re.I
    ):
        if intent := _renamed(clause, match.group("ref"), match.group("t"), _ANY_REF):
            return intent
    for rule, kinds in _RENAME_RULES:
        if (match := re.match(rule, text, re.I)) and (
            intent := _renamed(clause, match.group("ref"), match.group("t"), kinds)
        ):
            return intent
    if match := re.match(r"^(?:change|rename|update|edit|modify)\s+(?P<ref>.+)$", text, re.I):
        refs = parse_refs(match.group("ref"), clause.quoted)
        if refs and refs[0].kind in ("id", "it", "position"):
            return Intent("update", refs=refs, text=text)  # no new title given: ask for it
    return None


_ANY_REF = ("id", "it", "position", "title", "them", "all")
_CONTEXT_REF = ("id", "it", "position")
_NOT_INSTEAD = r"(?:\s+instead(?:\s+of\s+that)?)?"
# Renames said indirectly: (pattern, the kinds of reference it may name).
_RENAME_RULES = (
    (rf"^(?:change|rename|update|edit|retitle)\s+(?P<ref>.+?)\s+(?P<t>{QUOTE_SLOT})$", _ANY_REF),
    (r"^(?:make|have|let)\s+(?P<ref>.+?)\s+(?:say|read|be called|be named)\s+(?P<t>.+)$", _ANY_REF),
    # "call mom is wrong, it should be call grandma"
    (
        r"^(?P<ref>.+?)\s+(?:is|was)\s+(?:wrong|incorrect|a typo|misspelled|misspelt|not right|off)[,;]?\s+"
        r"(?:it|that|this)\s+(?:should|needs to|has to)\s+(?:be|say|read)\s+(?P<t>.+)$",
        ("id", "it", "position", "title"),
    ),
    # "fix the typo in task 1, it should be email the landlord"
    (
        r"^(?:fix|correct|change)\s+(?:the\s+|a\s+)?(?:typo|spelling|mistake|error|title|name|wording)s?\s+(?:in|of|on|for)\s+(?P<ref>.+?)"
        r"(?:[,;:]?\s+(?:it|that)\s+(?:should|needs to|has to)\s+(?:be|say|read)|\s*(?:->|:)|\s+to(?:\s+say|\s+read)?)\s+(?P<t>.+)$",
        ("id", "it", "position", "title"),
    ),
    # "the milk one should actually say buy almond milk", "task 1 needs to say X instead"
    (
        r"^(?P<ref>.+?)\s+(?:should|needs to|has to|must|ought to)\s+(?:actually\s+|really\s+|instead\s+|now\s+)?"
        rf"(?:say|read|be called|be named|be titled|be renamed(?:\s+to)?)\s+(?P<t>.+?){_NOT_INSTEAD}$",
        ("id", "it", "position", "title"),
    ),
    (rf"^(?P<ref>.+?)\s+should\s+(?:actually\s+|really\s+)?be\s+(?P<t>.+?){_NOT_INSTEAD}$", _CONTEXT_REF),
    # "i meant call dad not call mom", "it should be X, not Y"
    (
        r"^(?:i meant|i mean|i meant to say|i wanted|it should be|that should be|it should say|should be|it's supposed to be|"
        r"make it|make that)\s+(?P<t>.+?),?\s+(?:not|instead of|rather than)\s+(?P<ref>.+)$",
        ("title", "id"),
    ),
    # "oops i meant buy bread" (right after adding "buy bred")
    (r"^(?:i meant|i mean|i meant to say|meant|sorry,? i meant)\s+(?P<ref>)(?P<t>.+)$", ("it",)),
    # "actually make that buy roses", "call it X instead"
    (
        rf"^(?:make|change|turn)\s+(?P<ref>that|it|this|that one|this one)\s+(?:into\s+|to\s+)?(?P<t>.+?){_NOT_INSTEAD}$",
        ("it",),
    ),
    (rf"^(?:call|name|title)\s+(?P<ref>it|that|this|that one|task\s*#?\d+)\s+(?P<t>.+?){_NOT_INSTEAD}$", ("it", "id")),
)


def _renamed(clause: Clause, ref_text: str, title_text: str, kinds: tuple[str, ...]) -> Intent | None:
    """A rename of the task(s) named; a new "title" that is only a date moves the task
    instead ("update the meeting task to tomorrow" sets its due date)."""
    refs = parse_refs(ref_text, clause.quoted) if ref_text else (Ref("it"),)
    if not refs or refs[0].kind not in kinds:
        return None
    if refs[0].kind == "title" and re.fullmatch(r"(?:i|we|you|me|us|he|she|they)", refs[0].words, re.I):
        return None
    if not is_only_quote(title_text.strip()) and is_due_phrase(title_text):
        return Intent("update", due=due_of(title_text), refs=refs, text=clause.text)
    title = _clean_new_title(clause.title(title_text))
    if not title or re.fullmatch(STATUS_DONE, title.lower()):
        return None
    return Intent("update", title=title, refs=refs, text=clause.text)


def _clean_new_title(title: str) -> str:
    title = re.sub(r"^(?:the new title |the title |title |something like |say )", "", title, flags=re.I)
    return capitalize(strip_filler(title))
