"""References to tasks: how the user names them, and which task numbers they mean.

`parse_refs` reads an object phrase ("task 3", "2 and 5", "the milk task", "it", "the second
one", "all completed tasks") into `Ref`s. `resolve` turns a Ref into task numbers: by number,
by context (the task acted on last, the last list shown), or by title words matched against
a `list_tasks` lookup (exact title, then phrase, then all words, then one typo per word).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from lemminflect import getAllLemmas

from agent_service.builtin_model import replies
from agent_service.builtin_model.conversation import Context
from agent_service.builtin_model.meaning import Intent, Ref
from agent_service.builtin_model.reading import close_enough, is_only_quote, norm, restore, stem, strip_filler

_ORDINALS = {
    "first": 1,
    "1st": 1,
    "second": 2,
    "2nd": 2,
    "third": 3,
    "3rd": 3,
    "fourth": 4,
    "4th": 4,
    "fifth": 5,
    "5th": 5,
    "sixth": 6,
    "6th": 6,
    "seventh": 7,
    "7th": 7,
    "eighth": 8,
    "8th": 8,
    "ninth": 9,
    "9th": 9,
    "tenth": 10,
    "10th": 10,
    "last": -1,
    "final": -1,
}
_CARDINALS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
}

_NOT_DONE = r"(?:not (?:yet )?(?:done|complete|completed|finished)|undone|incomplete|unfinished|uncompleted|open|pending|active|to ?do|todo|outstanding|unchecked)"


# References


_PRONOUN = re.compile(
    r"^(?:it|that|this|that one|this one|that task|this task|the task|same one|the same one|the same task|"
    r"the one (?:i|you) just (?:added|created|mentioned|made|completed|updated|renamed)|"
    r"(?:the )?(?:task|one) (?:i|you) just (?:added|created|mentioned|made)|what i just added|"
    r"the (?:new|latest|newest|most recent|recent) (?:one|task)|the last task i added|the last one i added|"
    r"the last (?:task|one) you added|the previous (?:one|task)|that last one|that item|this item|that todo|this todo)$",
    re.I,
)
_THEM = re.compile(
    r"^(?:them|those|these|both|both of them|all of them|them all|all those|all these|those tasks|these tasks|those ones|these ones|all three of them|all 3|"
    r"them both|both of those|both of these|those two|these two|the two of them|them two|the both of them|all of those|all of these)$",
    re.I,
)
_ALL = re.compile(
    r"^(?:all|everything|every(?:thing)? (?:on|in) (?:my|the) list|all (?:of )?(?:my |the )?(?:tasks|todos|to-dos|items|things)|"
    r"every (?:single )?(?:task|todo|item)|each task|the (?:whole|entire) list|my (?:whole |entire )?list|"
    r"my tasks|my todos|(?:all )?(?:of )?(?:my |the )?(?P<status>completed|complete|done|finished|checked|pending|open|remaining|incomplete|unfinished|old)"
    r" (?:tasks|todos|to-dos|items|ones|things)|all (?:the )?(?P<status2>completed|done|finished|pending|open|remaining|incomplete) ones?|"
    r"(?:the )?(?P<status3>completed|done|finished) (?:ones?|tasks|todos|items)|(?P<status4>completed|done|finished|checked off)|"
    r"all (?:the )?(?P<status5>completed|done|finished|pending|open|remaining))$",
    re.I,
)
_POSITION = re.compile(
    r"^(?:the\s+)?(?:very\s+)?(?P<ord>first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|last|final|\d+(?:st|nd|rd|th)|"
    r"second to last|second-to-last|second last|penultimate)"
    r"(?:\s+(?:one|ones|task|tasks|item|items|todo|to-do|entry|thing))?(?:\s+(?:on|in|from|of)\s+(?:the|my|that|this)\s+list)?$",
    re.I,
)
_NUMBER = re.compile(
    r"^(?:the\s+)?(?:task|tasks|todo|todos|number|num|no\.?|nr\.?|item|items|id|entry|task number|task no\.?|task #|tasks #)?\s*#?\s*(?P<n>\d+|"
    + "|".join(_CARDINALS)
    + r")(?:\s+(?:task|one|item|todo))?$",
    re.I,
)
_RANGE = re.compile(r"^(?:tasks?|items?|numbers?|#)?\s*#?(?P<a>\d+)\s*(?:-|to|through|thru)\s*#?(?P<b>\d+)$", re.I)
_TITLE_PREFIX = re.compile(
    r"^(?:the\s+|my\s+|a\s+|an\s+|our\s+|that\s+|this\s+)?(?:(?:task|todo|to-do|item|one|reminder|entry|thing)s?\s+"
    r"(?:called|named|titled|about|for|to|with|saying|that says|which says|regarding|re|on|that is|that's|is)\s+|"
    r"(?:task|todo|to-do|item|reminder)\s*[:\-]?\s+)?(?:the\s+|my\s+|a\s+|an\s+|to\s+)?",
    re.I,
)
_TITLE_SUFFIX = re.compile(
    r"(?:\s+(?:task|todo|to-do|item|one|reminder|entry|thing|tasks|todos|items|ones)|"
    r"\s+(?:from|off|on|in|of)\s+(?:my|the)\s+(?:todo\s+|to-do\s+|to do\s+|task\s+|shopping\s+)?(?:list|tasks|todos)|"
    r"\s+(?:as|to)\s+(?:done|complete|completed|finished))+$",
    re.I,
)


_SEVERAL_POSITIONS = re.compile(
    r"^(?:the\s+)?(?P<end>first|last|top|bottom)\s+(?P<n>\d+|two|three|four|five|six|seven|eight|nine|ten)(?:\s+(?:ones|tasks|items|todos|things))?(?:\s+(?:on|in|from|of)\s+(?:the|my|that)\s+list)?$",
    re.I,
)


# Words after a reference that only say when or how it went: "finished calling mom just now".
_TRAILING_ADVERBS = re.compile(
    r"(?:[\s,]+(?:just now|earlier(?: today| this morning)?|this morning|last night|yesterday|finally|already|at last|"
    r"at long last|too|as well|completely|fully|a (?:minute|while|bit) ago|an hour ago|for good|for today|today|"
    r"for real|like you said|as planned|on time|again))+$",
    re.I,
)
_NUMBER_LIST = re.compile(
    r"^(?:(?:tasks?|numbers?|items?|#)\s*)?#?\d+(?:(?:\s*,\s*|\s+and\s+|\s*&\s*|\s+)#?\d+)+$", re.I
)


def parse_refs(phrase: str, quoted: list[str]) -> tuple[Ref, ...]:
    """The task references in an object phrase such as "task 3", "2 and 5", "the milk task", "it"."""
    phrase = strip_filler(phrase)
    phrase = re.sub(r"^(?:on|of|with|for|about)\s+", "", phrase, flags=re.I)
    if not phrase:
        return ()
    if (class_ref := _class_ref(phrase, quoted)) is not None:  # before trimming: "everything due today"
        return (class_ref,)
    phrase = _TRAILING_ADVERBS.sub("", phrase).strip() or phrase
    if re.match(r"^both\s+\S.*\s+(?:and|&)\s+\S", phrase, re.I):
        phrase = phrase[5:]  # "both the resume and recruiter tasks"
    if _NUMBER_LIST.match(phrase):  # "1 3 and 5"
        return tuple(Ref("id", task_id=int(number)) for number in re.findall(r"\d+", phrase))
    if match := _SEVERAL_POSITIONS.match(phrase):
        count = _CARDINALS.get(match.group("n").lower()) or int(match.group("n"))
        from_end = match.group("end").lower() in ("last", "bottom")
        return tuple(Ref("position", position=-(i + 1) if from_end else i + 1) for i in range(min(count, 20)))
    single = _single_ref(phrase, quoted)
    if single is not None and single.kind != "title":
        return (single,)
    pieces = [piece for piece in re.split(r"\s*,\s*(?:and\s+|&\s+)?|\s+(?:and|&|plus|as well as)\s+", phrase) if piece]
    if len(pieces) > 1:
        parts = [_single_ref(piece, quoted) for piece in pieces]
        if all(part is not None and part.kind not in ("title",) for part in parts):
            return tuple(part for part in parts if part is not None)
        if single is not None:  # a title with "and" in it, or several titles: decided against the list
            return (replace(single, parts=tuple(part for part in parts if part is not None)),)
    return (single,) if single is not None else ()


def _single_ref(phrase: str, quoted: list[str]) -> Ref | None:
    phrase = phrase.strip().strip(",.;:!?").strip()
    lower = phrase.lower()
    if not lower:
        return None
    if is_only_quote(phrase):
        return Ref("title", words=restore(phrase, quoted), exact=True)
    if _PRONOUN.match(lower):
        return Ref("it")
    if _THEM.match(lower):
        return Ref("them")
    if match := _ALL.match(lower):
        status_word = next((word for word in match.groups() if word), "")
        return Ref("all", status=_status_of(status_word))
    if match := _POSITION.match(lower):
        word = match.group("ord").replace("-", " ")
        if word in ("second to last", "second last", "penultimate"):
            return Ref("position", position=-2)
        position = _ORDINALS.get(word) or int(re.sub(r"\D", "", word))
        return Ref("position", position=position)
    if match := _NUMBER.match(lower):
        number = match.group("n")
        task_id = int(number) if number.isdigit() else _CARDINALS[number]
        if number.isdigit() or re.match(r"^(?:the\s+)?(?:task|number|no|item|id|#)", lower):
            return Ref("id", task_id=task_id)
    if match := _RANGE.match(lower):
        low, high = int(match.group("a")), int(match.group("b"))
        if 0 < low <= high <= low + 50:
            return Ref("id", task_id=low, parts=tuple(Ref("id", task_id=n) for n in range(low, high + 1)))
    words = _title_words(phrase)
    if not words:
        return None
    if is_only_quote(words):
        return Ref("title", words=restore(words, quoted), exact=True)
    return Ref("title", words=restore(words, quoted))


_CLASS_NOUN = r"(?:tasks?|todos?|to-dos?|items?|things?|ones?|stuff|reminders?|entries)"
_EVERY = r"(?:all(?: of)?(?: the| my)?|every(?: single)?|each|any)"
# "everything due today", "all overdue tasks", "everything tagged errands"
_CLASS_BY_FILTER = re.compile(
    rf"^(?:{_EVERY}\s+{_CLASS_NOUN}|everything|anything|all|the)\s+(?:(?:that(?:'s| is| are)|which (?:is|are))\s+)?"
    r"(?:(?P<due>due today|due tomorrow|overdue|late|past due|due this week)|(?:tagged|with the tag|labell?ed)\s+#?(?P<tag>[\w-]+)|"
    r"(?P<priority>high|low|medium)[- ]priority)$"
    rf"|^{_EVERY}\s+(?:the\s+|my\s+)?(?P<due2>overdue|late)\s+{_CLASS_NOUN}$"
    rf"|^{_EVERY}\s+(?:the\s+|my\s+)?(?P<priority2>high|low|medium|urgent)[- ]priority\s+{_CLASS_NOUN}$"
    rf"|^{_EVERY}\s+(?:the\s+|my\s+)?#(?P<tag2>[\w-]+)\s+{_CLASS_NOUN}$",
    re.I,
)
# "all the call tasks", "every task that mentions the party", "all tasks with milk in them"
_CLASS_BY_WORDS = re.compile(
    rf"^(?:{_EVERY}\s+{_CLASS_NOUN}|everything|anything)\s+(?:that\s+(?:mention|mentions|say|says|contain|contains|have|has|are about|is about)|"
    r"which\s+(?:mention|mentions|contain|contains)|with|about|mentioning|containing|regarding|related to|to do with|for|saying)"
    r"\s+(?P<words>.+?)(?:\s+in\s+(?:them|it|the title|their titles?))?$"
    rf"|^{_EVERY}\s+(?:the\s+|my\s+)?(?P<words2>(?!completed?\b|done\b|finished\b|pending\b|open\b|remaining\b|old\b|other\b)[\w' -]+?)\s+{_CLASS_NOUN}$",
    re.I,
)
_DUE_FILTER = {"due today": "today", "overdue": "overdue", "late": "overdue", "past due": "overdue"}


def _class_ref(phrase: str, quoted: list[str]) -> Ref | None:
    """A class of tasks: by a filter (due, tag, priority) or by the words in their titles."""
    lower = phrase.lower().strip(" .!?")
    if _ALL.match(lower):
        return None  # by status ("all completed tasks"): _single_ref reads it
    if match := _CLASS_BY_FILTER.match(lower):
        due = match.group("due") or match.group("due2")
        tag = match.group("tag") or match.group("tag2")
        priority = match.group("priority") or match.group("priority2")
        if due in _DUE_FILTER:
            return Ref("all", filters=(("due", _DUE_FILTER[due]),))
        if tag:
            return Ref("all", filters=(("tag", tag.lower()),))
        if priority:
            return Ref("all", filters=(("priority", "high" if priority == "urgent" else priority),))
    if match := _CLASS_BY_WORDS.match(lower):
        words = _title_words(match.group("words") or match.group("words2") or "")
        if words and not re.fullmatch(r"(?:my|the|of|them|those|these)", words):
            return Ref("all", words=restore(words, quoted))
    return None


def _title_words(phrase: str) -> str:
    words = phrase
    for _ in range(3):
        stripped = _TITLE_SUFFIX.sub("", _TITLE_PREFIX.sub("", words, count=1)).strip(" ,.")
        if stripped == words or not stripped:
            break
        words = stripped
    words = re.sub(r"^(?:one|task)\s+(?:about|for|with|called|named)\s+", "", words, flags=re.I)
    return re.sub(r"^(?:the|my|a|an)\s+", "", words, flags=re.I).strip()


def expand_ranges(refs: tuple[Ref, ...]) -> tuple[Ref, ...]:
    expanded: list[Ref] = []
    for ref in refs:
        if ref.kind == "id" and ref.parts:
            expanded.extend(ref.parts)
        else:
            expanded.append(ref)
    return tuple(expanded)


def _status_of(text: str) -> str:
    text = text.lower()
    if re.search(_NOT_DONE, text) or re.search(
        r"\b(?:remaining|left|still|outstanding|open|unfinished|incomplete|pending|old)\b", text
    ):
        return "pending" if "old" not in text else "completed"
    if re.search(r"\b(?:completed|complete|done|finished|checked|ticked|accomplished|achieved|did)\b", text):
        return "completed"
    return "all"


# ---------------------------------------------------------------------------------------


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


Lookups = dict[str, list[dict[str, Any]]]  # list_tasks arguments (as sorted JSON) -> the tasks listed


@lru_cache(maxsize=4096)
def word_forms(word: str) -> frozenset[str]:
    """A word's plain forms, so "calling", "called" and "call", or "paid" and "pay", meet:
    its lemmas as lemminflect knows them (irregular forms too), and its folded stem."""
    forms = {word, stem(word)}
    for lemmas in getAllLemmas(word).values():
        forms.update(lemma.lower() for lemma in lemmas)
    return frozenset(forms)


def _content_words(text: str) -> list[str]:
    return [word for word in norm(text).split() if word not in _STOPWORDS]


def _one_typo(typed: str, word: str) -> bool:
    """ "shrits" for "shirts": one letter wrong, missing, extra or swapped, in any plain form."""
    return close_enough(typed, word) or close_enough(typed, stem(word)) or close_enough(stem(typed), stem(word))


def _same_word(typed: str, word: str) -> bool:
    return bool(word_forms(typed) & word_forms(word))


def match_title(
    query: str, tasks: list[dict[str, Any]], exact: bool = False, loose: bool = False
) -> list[dict[str, Any]]:
    """The tasks whose titles the words name: exact title, then phrase, then all words (in any
    form), then near-typos; `loose` adds a last try: titles whose words all appear in the
    query ("i paid the bills earlier today" names "Pay bills")."""
    wanted = norm(query)
    if not wanted:
        return []
    levels = [
        lambda title: title == wanted,
        lambda title: re.search(rf"\b{re.escape(wanted)}\b", title) is not None,
    ]
    words = _content_words(query)
    if words and not exact:
        levels.append(lambda title: all(any(_same_word(word, w) for w in title.split()) for word in words))
        levels.append(
            lambda title: all(
                any(_same_word(word, w) or (len(word) >= 4 and _one_typo(word, w)) for w in title.split())
                for word in words
            )
        )
        if loose:
            levels.append(
                lambda title: (
                    bool(_content_words(title))
                    and all(any(_same_word(word, w) for w in words) for word in _content_words(title))
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


def resolve(
    ref: Ref, intent: Intent, context: Context, tasks: list[dict[str, Any]] | None, lookups: Lookups | None = None
) -> Resolution:
    """The task numbers a reference means. `tasks` is the whole list when it was looked up
    (None: not yet); `lookups` has the filtered lists ("due today") looked up too."""
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
    if ref.kind == "all" and (due := dict(ref.filters).get("due")) and lookups is not None:
        filtered = lookups.get(json.dumps({"status": "all", "due": due}, sort_keys=True))
        if filtered is not None:
            return _resolve_all(ref, intent, filtered)
    if tasks is None:
        return Resolution(needs_lookup=True)
    if ref.kind == "all":
        return _resolve_all(ref, intent, tasks)
    return _resolve_title(ref, intent, tasks)


def _resolve_all(ref: Ref, intent: Intent, tasks: list[dict[str, Any]]) -> Resolution:
    """A class of tasks: by status, by title words ("all the call tasks"), by tag or priority."""
    status = ref.status
    if intent.kind == "complete" and status == "all":
        status = "pending"
    if intent.kind == "reopen" and status == "all":
        status = "completed"
    chosen = [task for task in tasks if status == "all" or bool(task.get("completed")) == (status == "completed")]
    if ref.words:
        chosen = match_title(ref.words, chosen)
    filters = dict(ref.filters)
    if tag := filters.get("tag"):
        chosen = [task for task in chosen if tag in [str(t).lower() for t in task.get("tags") or []]]
    if priority := filters.get("priority"):
        chosen = [task for task in chosen if task.get("priority") == priority]
    if not chosen:
        if ref.words or filters:
            return Resolution(note=replies.no_task_called(ref.words or " ".join(filters.values())))
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
    if not found and not ref.exact:
        found = match_title(ref.words, tasks, loose=True)
    if len(found) > 1 and intent.kind in ("complete", "reopen"):
        # completing prefers pending matches, reopening completed ones
        preferred = [task for task in found if bool(task.get("completed")) == (intent.kind == "reopen")]
        found = preferred or found
    if not found:
        return Resolution(note=replies.no_task_called(ref.words))
    if len(found) > 1:
        return Resolution(question=replies.which_one(ref.words, found, intent))
    task = found[0]
    return Resolution([int(task["id"])], {int(task["id"]): str(task["title"])})
