"""Delete: "delete task 2", "get rid of the milk task", "I don't need to call Bob anymore"."""

from __future__ import annotations

import re

from agent_service.builtin_model.meaning import Clause, Intent
from agent_service.builtin_model.references import expand_ranges, parse_refs


def read_delete(clause: Clause) -> Intent | None:
    text = clause.text
    rules = (
        r"^(?:delete|remove|cancel|drop|erase|scratch|scrap|trash|discard|ditch|nuke|kill|axe|clear out|clear|purge|wipe out|wipe|"
        r"get rid of|take off|take out|throw away|throw out|toss|forget about|forget|eliminate|destroy|bin|dump|rid me of|lose)\s+(?P<ref>.+?)"
        r"(?:\s+(?:from|off|of|in)\s+(?:my|the)\s+(?:todo\s+|to-do\s+|to do\s+|task\s+)?(?:list|tasks|todos|to-dos))?$",
        r"^(?:take|knock|get|strike)\s+(?P<ref>.+?)\s+(?:off|out of)(?:\s+(?:my|the)\s+(?:todo\s+|to-do\s+)?list)?$",
        r"^(?:i|we)\s+(?:don't|do not|dont|no longer|won't|will not)\s+(?:need|want|have|have to|need to|want to)\s+(?:to\s+)?(?P<ref>.+?)(?:\s+(?:anymore|any more|any longer|after all))?$",
        r"^(?:no need (?:to|for)|never mind|nevermind|forget)\s+(?P<ref>.+?)$",
        r"^no (?:need|reason) (?:to|for)\s+(?P<ref>.+?)\s+(?:anymore|any more|any longer|after all)$",
        r"^(?:i'?m|i am|we'?re|we are)\s+not\s+(?:going|gonna|doing)\s+(?:to\s+)?(?P<ref>.+?)\s+(?:anymore|any more|after all|any longer)$",
        r"^(?P<ref>.+?)\s+(?:is|are|was|has been|got)\s+(?:cancell?ed|called off|no longer needed|not needed(?: anymore)?|off)$",
    )
    for index, rule in enumerate(rules):
        if match := re.match(rule, text, re.I):
            ref_text = match.group("ref")
            if index == 3 and not re.search(r"\b(?:task|todo|#\d|\d)\b", ref_text.lower()):
                continue
            refs = parse_refs(ref_text, clause.quoted)
            if refs:
                return Intent("delete", refs=expand_ranges(refs), text=text)
    return None
