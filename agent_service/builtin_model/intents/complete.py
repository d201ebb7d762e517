"""Complete: "mark task 3 as done", "I finished the report", "the bills were paid"; and asking to un-complete."""

from __future__ import annotations

import re
from dataclasses import replace

from lemminflect import getAllLemmas, getInflection

from agent_service.builtin_model.meaning import Clause, Intent
from agent_service.builtin_model.reading import fix_status_word
from agent_service.builtin_model.references import expand_ranges, parse_refs
from agent_service.builtin_model.vocabulary import STATUS_DONE

_NOT_DONE_STATE = (
    r"(?:not\s+(?:yet\s+|really\s+|actually\s+)?(?:done|complete|completed|finished)|undone|incomplete|uncompleted|"
    r"unfinished|pending|open|active|todo|to do|not checked off)"
)
# Reopening, as an order or as a fact: "mark X as not done", "uncheck X", "X isn't done",
# "I haven't actually cleaned the garage yet", "I didn't finish X after all".
_REOPEN_RULES = (
    rf"^(?:mark|set|flag|make|put|move)\s+(?P<ref>.+?)\s+(?:as\s+|to\s+|back\s+to\s+|back\s+as\s+)?{_NOT_DONE_STATE}(?:\s+again)?$",
    r"^(?:uncomplete|un-complete|uncheck|untick|unmark|reopen|re-open|undo completing|undo complete|unfinish|un-finish)\s+(?P<ref>.+)$",
    r"^(?P<ref>.+?)\s+(?:is|are|was|were|isn't|isnt|aren't|wasn't|is not|are not|was not)\s+(?:not\s+)?(?:actually\s+|really\s+|quite\s+|even\s+)?"
    r"(?:not done|undone|incomplete|unfinished|done|finished|complete|completed)(?:\s+(?:yet|after all|actually|really))*$",
    r"^(?P<ref>.+?)\s+(?:still needs (?:doing|to be done|work)|needs to be (?:re-?opened|done again)|is still (?:pending|open|to do))$",
    r"^(?:i|we)\s+(?:haven't|have not|havent|didn't|did not|didnt|never)\s+(?:actually\s+|really\s+|even\s+|quite\s+)?"
    r"(?:finished\s+|finish\s+|done\s+|do\s+|completed\s+|complete\s+|got to\s+|get to\s+|had\s+|have\s+|gone to\s+|"
    r"been to\s+|go to\s+|attended\s+|attend\s+|made it to\s+)?(?P<ref>.+?)"
    r"(?:\s+(?:yet|after all|actually|really|at all))*$",
)


def _read_reopen(clause: Clause) -> Intent | None:
    text = clause.text
    # "the rent isn't paid yet": a task named by its verb ("pay the rent") is not done
    if match := re.match(
        r"^(?P<ref>.+?)\s+(?:isn't|isnt|is not|wasn't|was not|hasn't been|has not been|aren't|are not|haven't been)\s+"
        r"(?:actually\s+|really\s+|even\s+)?(?P<verb>[a-z]+)(?:\s+(?:yet|after all|actually))*$",
        text,
        re.I,
    ):
        lemma = past_tense_lemma(match.group("verb").lower())
        status_word = match.group("verb").lower() in ("done", "finished", "completed", "complete")  # rule 3 reads those
        if (
            lemma
            and not status_word
            and lemma not in _NOT_ERRANDS
            and not re.match(r"^(?:which|what|how|any)\b", match.group("ref"), re.I)
        ):
            refs = parse_refs(f"{lemma} {match.group('ref')}", clause.quoted)
            if refs:
                return Intent("reopen", refs=refs, text=text)
    for rule in _REOPEN_RULES:
        if match := re.match(rule, text, re.I):
            ref_text = match.group("ref")
            if re.match(r"^(?:which|what|how|any|are|do|does|is|show|list)\b", ref_text, re.I):
                continue  # "which tasks are not done yet?" asks for a list
            negated = re.search(r"\b(?:isn't|isnt|aren't|wasn't|not|haven't|havent|didn't|didnt|never)\b", text, re.I)
            if (
                rule is _REOPEN_RULES[2]
                and not negated
                and not re.search(r"not done|undone|incomplete|unfinished", text, re.I)
            ):
                continue  # "X is done" is a completion, not this
            refs = parse_refs(ref_text, clause.quoted)
            if refs and not (
                refs[0].kind == "title" and re.fullmatch(r"(?:it|anything|that|this)", refs[0].words, re.I)
            ):
                return Intent("reopen", refs=expand_ranges(refs), text=text)
            if refs:
                return Intent("reopen", refs=(replace(refs[0], kind="it"),), text=text)
    return None


_WHEN_SAID = re.compile(
    r"\s+(?:today|yesterday|just now|already|finally|earlier(?: today)?|this morning|last night|at last)$", re.I
)


def read_complete(clause: Clause) -> Intent | None:
    # "mark buying the drill as done today": when it was done says nothing about which task
    text = _WHEN_SAID.sub("", clause.text) or clause.text
    if reopen := _read_reopen(clause):
        return reopen
    rules = (
        r"^(?:mark|set|flag|make|put|move)\s+(?P<ref>.+?)\s+(?:as\s+|to\s+|to be\s+|in\s+)?(?:done|complete|completed|finished|checked(?: off)?|ticked(?: off)?|resolved|closed|crossed off)$",
        r"^(?:mark|set|flag)\s+(?:as\s+)?(?:done|complete|completed|finished)\s*:?\s*(?P<ref>.+)$",
        r"^(?:complete|finish|close|resolve|accomplish|check off|tick off|cross off|cross out|strike off|strike out|done with|finished with|wrap up|close out|mark off|check|tick|cross)\s+(?P<ref>.+?)(?:\s+(?:off|as done))?(?:\s+(?:from|on)\s+(?:my|the)\s+(?:todo\s+|to-do\s+)?list)?$",
        r"^(?:done|did|finished|completed|knocked out|wrapped up|took care of|taken care of|sorted out|dealt with|nailed|crushed)\s*[:\-]?\s+"
        r"(?P<ref>(?!(?:ones|tasks|items|todos|stuff|things)\W*$).+)$",
        r"^(?:(?:i'?m|i am|we'?re)\s+)?(?:all\s+|finally\s+)?(?:done|finished|through)\s+with\s+(?P<ref>.+)$",
        r"^(?:mark|check|tick|cross|strike|knock|scratch)\s+(?P<ref>.+?)\s+off(?:\s+(?:of\s+)?(?:my|the)\s+(?:todo\s+|to-do\s+)?list)?$",
        r"^(?:put|place|add|give)\s+(?:a\s+)?(?:check|tick|checkmark|tick mark)(?:\s*mark)?\s+(?:on|next to|by|to|against)\s+(?P<ref>.+)$",
        r"^(?:i|we)(?:'ve| have|'m| am)?\s+(?:just\s+|already\s+|finally\s+|now\s+)?(?:finished|completed|done with|done|accomplished|wrapped up|took care of|taken care of|dealt with|handled|ticked off|checked off|knocked out|got done|did|sorted)\s+(?P<ref>.+)$",
        r"^(?P<ref>.+?)(?:\s+(?:is|are|was|were|has been|have been|got|just got)|'s)\s+(?:now\s+|finally\s+|all\s+|already\s+)?"
        + STATUS_DONE
        + r"$",
        r"^(?P<ref>(?:task|#|number|item|no\.?)\s*#?\s*\d+(?:\s*(?:,|and|&)\s*#?\s*\d+)*)\s*[:\-]?\s*(?:done|complete|completed|finished)$",
        r"^(?P<ref>.+?)\s*(?:\s-|:|=>|->)\s*(?:done|complete|completed|finished)$",
    )
    for rule in rules:
        if match := re.match(rule, text, re.I):
            refs = parse_refs(match.group("ref"), clause.quoted)
            if (
                rule.startswith("^(?P<ref>.+?)(?:\\s+(?:is")
                and refs
                and refs[0].kind == "all"
                and "task" not in text.lower()
            ):
                return None  # "all done" / "everything is done": small talk, not an order
            if refs:
                return Intent("complete", refs=expand_ranges(refs), text=text)
    if (
        match := re.match(r"^(?:mark|set|flag)\s+(?P<ref>.+?)\s+(?:as\s+|to\s+)?(?P<status>\w+)$", text, re.I)
    ) and fix_status_word(match.group("status")) in ("completed", "complete", "finished"):
        refs = parse_refs(match.group("ref"), clause.quoted)
        if refs:
            return Intent("complete", refs=expand_ranges(refs), text=text)
    # "the bills were paid", "the milk got bought"
    if match := re.match(
        r"^(?P<ref>.+?)\s+(?:is|are|was|were|has been|have been|got)\s+(?:now\s+|finally\s+|already\s+)?(?:paid|bought|called|sent|cleaned|fixed|booked|washed|fed|walked|returned|submitted|mailed|renewed|ordered|picked up|emailed|watered|filed)$",
        text,
        re.I,
    ):
        refs = parse_refs(match.group("ref"), clause.quoted)
        if refs:
            return Intent("complete", refs=refs, text=text)
    # "I bought the milk", "I called mom": a finished errand named by its object.
    if match := re.match(
        r"^i(?:'ve| have)?\s+(?:just\s+|already\s+|finally\s+)?(?P<verb>bought|paid|called|sent|wrote|emailed|picked up|cleaned|fixed|booked|walked|washed|fed|returned|submitted|read|watched|cooked|made|visited|mailed|renewed|scheduled|ordered|texted|got)\s+(?P<ref>.+)$",
        text,
        re.I,
    ):
        refs = parse_refs(match.group("ref"), clause.quoted)
        if refs:
            return Intent("complete", refs=refs, text=text)
    # "the fence is painted": the task named by the verb in its plain form ("paint the fence")
    if match := re.match(
        r"^(?P<ref>.+?)\s+(?:is|are|was|were|has been|have been|got|'s)\s+(?:now\s+|finally\s+|all\s+|already\s+)?(?P<verb>[a-z]+)$",
        text,
        re.I,
    ):
        lemma = past_tense_lemma(match.group("verb").lower())
        if lemma and lemma not in _NOT_ERRANDS and lemma not in ("cancel", "call off"):
            refs = parse_refs(f"{lemma} {match.group('ref')}", clause.quoted)
            if refs and refs[0].kind == "title":
                return Intent("complete", refs=refs, text=text)
    return _read_past_errand(clause)


# Verbs that report something other than doing the task ("I added milk", "I meant...").
_NOT_ERRANDS = {
    "add",
    "delete",
    "remove",
    "complete",
    "finish",
    "rename",
    "forget",
    "need",
    "want",
    "mean",
    "say",
    "think",
    "ask",
    "tell",
    "guess",
    "be",
    "have",
    "mark",
    "list",
    "show",
    "forgot",
    "meant",
    "cancel",
    "try",
    "like",
    "love",
    "hate",
    "see",
    "hear",
    "know",
    "feel",
    "shall",
    "will",
    "can",
    "may",
    "might",
    "must",
    "should",
    "would",
    "could",
    "ought",
}


def _read_past_errand(clause: Clause) -> Intent | None:
    """ "called mom this morning", "I watered the plants": a finished errand, named by the
    verb in its plain form and what follows ("call mom", "water the plants")."""
    match = re.match(
        r"^(?:(?:i|we)(?:'ve| have)?\s+)?(?:just\s+|already\s+|finally\s+)?(?P<verb>[a-z]+)\s+(?P<rest>.+)$",
        clause.text,
        re.I,
    )
    if not match or len(clause.text.split()) > 9:
        return None
    lemma = past_tense_lemma(match.group("verb").lower())
    if not lemma or lemma in _NOT_ERRANDS:
        return None
    refs = parse_refs(f"{lemma} {match.group('rest')}", clause.quoted)
    if refs and refs[0].kind == "title":
        return Intent("complete", refs=refs, text=clause.text)
    return None


def past_tense_lemma(word: str) -> str:
    """The plain form of a verb in the past tense ("called" -> "call", "bought" -> "buy"); "" otherwise."""
    for lemma in getAllLemmas(word, upos="VERB").get("VERB", ()):
        if word != lemma and word in (getInflection(lemma, tag="VBD") or ()) + (getInflection(lemma, tag="VBN") or ()):
            return lemma
    return ""
