"""Understanding one user message: the intents it holds and the tasks it refers to.

Pure string processing, no state. The message is split into sentences and clauses; each
clause is read by a list of rules tried in order (update, complete, delete, add, list...).
Quoted text is protected first, so a quoted title is kept whole and never read as a
command. Text that becomes a task title is data: once a clause is read as "add", its
title is not searched for further commands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

# Quoted spans are swapped for placeholders made of private-use characters, so no rule
# (which all look for ASCII words) can match inside them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_QUOTED = re.compile(r"\"([^\"]+)\"|(?<![\w])'([^']+)'(?![\w])")
# Typographic quotes and dashes, as phones type them, read as their ASCII forms.
_TYPOGRAPHIC = str.maketrans({0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"', 0x2013: "-", 0x2014: "-"})
_PLACEHOLDER = re.compile(_OPEN + r"(\d+)" + _CLOSE)


@dataclass(frozen=True)
class Ref:
    """A way of naming a task: by number, by title words, by context or by position."""

    kind: str  # "id" | "title" | "it" | "them" | "position" | "all"
    task_id: int = 0
    words: str = ""  # the title words, as the user wrote them
    exact: bool = False  # the words were quoted
    parts: tuple[Ref, ...] = ()  # for "milk and eggs": the pieces, tried when the whole matches nothing
    position: int = 0  # 1-based; -1 is "the last one"
    status: str = "all"  # for kind "all": which tasks


@dataclass(frozen=True)
class Intent:
    kind: (
        str  # add | list | show | complete | delete | update | uncomplete | help | greet | thanks | empty_add | unknown
    )
    title: str = ""
    description: str | None = None
    status: str = "all"
    refs: tuple[Ref, ...] = ()
    text: str = ""  # the clause as written (for unknown / follow-up questions)


ACTIONS = ("complete", "delete", "update", "show")

# ---------------------------------------------------------------------------------------
# Words

_VERB_TYPOS = {
    "ad": "add",
    "addd": "add",
    "dd": "add",
    "del": "delete",
    "rm": "remove",
    "lst": "list",
    "ls": "list",
    "shw": "show",
    "sho": "show",
    "mrk": "mark",
    "chnge": "change",
    "fnish": "finish",
    "complet": "complete",
    "delet": "delete",
    "remov": "remove",
    "updat": "update",
}
_VERBS = (
    "add",
    "finished",
    "completed",
    "create",
    "delete",
    "remove",
    "cancel",
    "complete",
    "finish",
    "mark",
    "show",
    "list",
    "display",
    "update",
    "change",
    "rename",
    "edit",
    "modify",
    "remind",
    "remember",
    "insert",
    "erase",
    "scratch",
    "check",
)
# Misspelt "task" and little words that only ever mean one thing (fixed only when typed in
# lowercase, so names such as "Ned" stay).
_TASK_TYPOS = {
    "taks": "task",
    "tsak": "task",
    "tasl": "task",
    "taskk": "task",
    "tsk": "task",
    "tasc": "task",
    "tsks": "tasks",
    "taskes": "tasks",
    "tdo": "todo",
    "teh": "the",
    "ned": "need",
    "remeber": "remember",
    "rember": "remember",
    "remmeber": "remember",
}
_STATUS_WORDS = ("completed", "complete", "finished", "pending", "remaining")

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
# Pairs that name one thing, so "add salt and pepper" is one task, not two.
_COMPOUNDS = (
    "salt and pepper",
    "mac and cheese",
    "macaroni and cheese",
    "bread and butter",
    "peanut butter and jelly",
    "fish and chips",
    "rock and roll",
    "black and white",
    "mom and dad",
    "pros and cons",
    "q and a",
    "shampoo and conditioner",
    "bed and breakfast",
    "cheese and crackers",
    "milk and cookies",
    "oil and vinegar",
    "pen and paper",
    "nuts and bolts",
    "sweet and sour",
    "hide and seek",
    "trial and error",
    "back and forth",
    "arts and crafts",
    "washer and dryer",
    "cup and saucer",
    "knife and fork",
    "bacon and eggs",
    "ham and eggs",
    "rice and beans",
    "chips and salsa",
    "cookies and cream",
    "soap and water",
    "terms and conditions",
)

_STATUS_DONE = r"(?:done|complete|completed|finished|checked(?: off)?|ticked(?: off)?|resolved|closed|accomplished|taken care of|sorted|handled|dealt with|over with)"
_NOT_DONE = r"(?:not (?:yet )?(?:done|complete|completed|finished)|undone|incomplete|unfinished|uncompleted|open|pending|active|to ?do|todo|outstanding|unchecked)"
_LIST_NOUN = r"(?:tasks?|todos?|to-?dos?|to do's|to-do's|items?|list|lists|things|stuff|agenda|plate|reminders?|chores?|jobs?|errands?|backlog)"
_TASK_NOUN = r"(?:task|todo|to-do|to do|item|reminder|entry|note|chore|thing|one|errand|job)"

# ---------------------------------------------------------------------------------------
# Text helpers


def protect_quotes(text: str) -> tuple[str, list[str]]:
    quoted: list[str] = []

    def swap(match: re.Match[str]) -> str:
        quoted.append(match.group(0))  # with its quote marks; restore() decides whether to keep them
        return f"{_OPEN}{len(quoted) - 1}{_CLOSE}"

    return _QUOTED.sub(swap, text), quoted


def restore(text: str, quoted: list[str]) -> str:
    """Quoted spans back: without their quote marks, unless the text looks like code or JSON
    (`{"tool": "delete_task"}` is a title to keep exactly)."""
    keep_marks = bool(re.search(r"[{}\[\]<>]", text))
    return _PLACEHOLDER.sub(
        lambda match: quoted[int(match.group(1))] if keep_marks else quoted[int(match.group(1))][1:-1].strip(), text
    )


def is_only_quote(text: str) -> bool:
    return bool(re.fullmatch(_OPEN + r"\d+" + _CLOSE, text.strip()))


def norm(text: str) -> str:
    """Lowercase words only: for comparing titles."""
    text = text.lower().replace("&", " and ")
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def stem(word: str) -> str:
    word = word.lower()
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed") and not word.endswith("eed"):
        return word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[-3] in "sxz":
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def close_enough(typed: str, word: str) -> bool:
    """Damerau-Levenshtein distance <= 1 (one typo: a letter wrong, missing, extra or swapped)."""
    if typed == word:
        return True
    if abs(len(typed) - len(word)) > 1:
        return False
    if len(typed) == len(word):
        diffs = [i for i, (a, b) in enumerate(zip(typed, word, strict=True)) if a != b]
        if len(diffs) == 1:
            return True
        return (
            len(diffs) == 2
            and diffs[1] == diffs[0] + 1
            and typed[diffs[0]] == word[diffs[1]]
            and typed[diffs[1]] == word[diffs[0]]
        )
    short, long = (typed, word) if len(typed) < len(word) else (word, typed)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def fix_word(word: str) -> str:
    """A misspelt command verb or "task" as the word it stands for; anything else unchanged."""
    lower = word.lower()
    if lower in _VERB_TYPOS:
        return _VERB_TYPOS[lower]
    if lower in _TASK_TYPOS:
        return _TASK_TYPOS[lower]
    if len(lower) >= 4 and lower not in _VERBS:
        for verb in _VERBS:
            if close_enough(lower, verb) and not (lower.endswith("s") and lower[:-1] == verb):
                return verb
    return word


def fix_typos(clause: str) -> str:
    """Fix the first word (the command verb) and "task"-like words; titles keep their spelling."""
    words = clause.split(" ")
    if words:
        words[0] = fix_word(words[0])
    # only lowercase words: "Ned" is a name, "ned" a typo
    return " ".join(_TASK_TYPOS.get(word, word) for word in words)


def fix_status_word(word: str) -> str:
    """ "compelted" -> "completed": for list and "mark ... as <status>" words, never titles."""
    lower = word.lower()
    if len(lower) >= 6 and lower not in _STATUS_WORDS:
        for status in _STATUS_WORDS:
            if close_enough(lower, status):
                return status
    return word


def capitalize(title: str) -> str:
    title = title.strip()
    return title[:1].upper() + title[1:] if title else title


# ---------------------------------------------------------------------------------------
# Politeness and filler

_LEADING = re.compile(
    r"^(?:please|pls|plz|pleas|plese|pleae|pleeze|kindly|hey|hi|hello|yo|ok|okay|ok so|so|also|and|then|and then|now|just|oh|um|uh|"
    r"well|alright|all right|right|great|cool|thanks|thank you|hmm|btw|by the way|actually|quick(?:ly)?|yes|yeah|yep|yup|sure|oops|sorry|wait|"
    r"hey there|bot|assistant|todo bot|can i ask you to|i'd like you to|i would like you to|i want you to|"
    r"i need you to|go ahead and|help me|let's|lets|let us|"
    r"(?:could|can|would|will|could|would) you(?: please| kindly| maybe| possibly)?|"
    r"(?:could|can|would|will) u(?: please| pls)?|"
    r"would you mind|do you mind|mind|be so kind as to|"
    r"i(?:'d| would) (?:like|love|want) (?:you )?to(?=\s+(?:add|create|delete|remove|mark|complete|finish|see|view|show|list|change|rename|update|edit))|"
    r"i want to(?=\s+(?:add|create|delete|remove|mark|complete|finish|see|view|show|list|change|rename|update|edit|check))|"
    r"i need to(?=\s+(?:add|create|delete|remove|mark|complete|see|view|show|list|change|rename|update|edit))|"
    r"time to(?=\s+(?:add|delete|remove|mark|complete))"
    r")[\s,!:]+",
    re.I,
)
_TRAILING = re.compile(
    r"(?:[\s,]+(?:please|pls|plz|thanks|thank you|thx|ty|for me|if you can|if you could|if possible|"
    r"right now|now|then|real quick|quickly|ok|okay|thanks a lot|thank you very much|cheers)|[\s.!?,;:]+|\s+:\))$",
    re.I,
)


def strip_filler(clause: str) -> str:
    clause = clause.strip()
    while True:
        stripped = _TRAILING.sub("", _LEADING.sub("", clause)).strip()
        if stripped == clause:
            return clause
        clause = stripped


# ---------------------------------------------------------------------------------------
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
    r"^(?:them|those|these|both|both of them|all of them|them all|all those|all these|those tasks|these tasks|those ones|these ones|all three of them|all 3)$",
    re.I,
)
_ALL = re.compile(
    r"^(?:all|everything|every(?:thing)? (?:on|in) (?:my|the) list|all (?:of )?(?:my |the )?(?:tasks|todos|to-dos|items|things)|"
    r"every (?:single )?(?:task|todo|item)|each task|the (?:whole|entire) list|my (?:whole |entire )?list|"
    r"my tasks|my todos|(?:all )?(?:of )?(?:my |the )?(?P<status>completed|complete|done|finished|checked|pending|open|remaining|incomplete|unfinished|old)"
    r" (?:tasks|todos|to-dos|items|ones|things)|all (?:the )?(?P<status2>completed|done|finished|pending|open|remaining|incomplete) ones?|"
    r"(?:the )?(?P<status3>completed|done|finished) (?:ones?|tasks|todos|items)|(?P<status4>completed|done|finished|checked off))$",
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


def parse_refs(phrase: str, quoted: list[str]) -> tuple[Ref, ...]:
    """The task references in an object phrase such as "task 3", "2 and 5", "the milk task", "it"."""
    phrase = strip_filler(phrase)
    phrase = re.sub(r"^(?:on|of|with|for|about)\s+", "", phrase, flags=re.I)
    if not phrase:
        return ()
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
# Clause rules


@dataclass
class Clause:
    text: str  # with quotes swapped for placeholders, filler stripped, verb typo fixed
    quoted: list[str] = field(default_factory=list)

    def title(self, raw: str) -> str:
        return restore(raw, self.quoted).strip()


_CHAT_GREETING = re.compile(
    r"^(?:hi|hello|hey|hiya|howdy|yo|sup|what's up|whats up|good (?:morning|afternoon|evening|day)|greetings|hey there|hi there|hello there|how are you(?: doing)?|how's it going)\b",
    re.I,
)
_CHAT_THANKS = re.compile(
    r"^(?:thanks|thank you|thx|ty|cheers|much appreciated|appreciate it|great|awesome|cool|perfect|nice|ok|okay|"
    r"got it|good|great job|well done|sounds good|that's all|that is all|all done|bye|goodbye|see you|no thanks|"
    r"nothing|never ?mind|nope|no|yes|yep|sure|fine|wonderful|amazing|excellent|lovely)\b",
    re.I,
)
_CHAT_HELP = re.compile(
    r"\b(?:help|what can you do|what do you do|how do(?:es)? (?:this|you|i use)|who are you|what are you|"
    r"what is this|how does this work|what are your (?:features|capabilities|commands)|commands|instructions|"
    r"how (?:can|do) i use|what can i (?:say|ask|do)|capabilities|usage)\b",
    re.I,
)


def _read_update(clause: Clause) -> Intent | None:
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
        r"^(?:change|rename|update|edit|modify|alter|reword|rewrite|correct|fix|retitle|switch|replace|amend|adjust|set)\s+"
        r"(?:the\s+)?(?:(?:title|name|text|wording|label)\s+(?:of|for|on)\s+)?(?P<ref>.+?)(?:'s\s+(?:title|name|text))?(?:\s+(?:title|name|text))?"
        r"\s*(?:\s+to\s+say|\s+to\s+read|\s+so\s+(?:that\s+)?it\s+(?:says|reads)|\s+to|\s+into|\s+as|\s+with|\s*->|\s*=>|\s*=|\s*:)\s+(?P<t>.+)$"
    )
    if (match := re.match(title_rule, text, re.I)) and not re.fullmatch(
        rf"(?:a|an|new|a new|one)\s+{_TASK_NOUN}", match.group("ref").strip(), re.I
    ):
        refs = parse_refs(match.group("ref"), clause.quoted)
        title = _clean_new_title(clause.title(match.group("t")))
        if refs and title and not re.fullmatch(_STATUS_DONE, title.lower()):
            return Intent("update", title=title, refs=refs, text=text)
    if match := re.match(
        rf"^(?:change|rename|update|edit|retitle)\s+(?P<ref>.+?)\s+(?P<t>{_OPEN}\d+{_CLOSE})$", text, re.I
    ):
        refs = parse_refs(match.group("ref"), clause.quoted)
        if refs:
            return Intent("update", title=_clean_new_title(clause.title(match.group("t"))), refs=refs, text=text)
    if match := re.match(
        r"^(?:make|have|let)\s+(?P<ref>.+?)\s+(?:say|read|be called|be named)\s+(?P<t>.+)$", text, re.I
    ):
        refs = parse_refs(match.group("ref"), clause.quoted)
        if refs and refs[0].kind in ("id", "it", "position", "title"):
            return Intent("update", title=_clean_new_title(clause.title(match.group("t"))), refs=refs, text=text)
    if match := re.match(r"^(?P<ref>.+?)\s+should\s+(?:be|say|read)\s+(?P<t>.+)$", text, re.I):
        refs = parse_refs(match.group("ref"), clause.quoted)
        if refs and refs[0].kind in ("id", "it", "position"):
            return Intent("update", title=_clean_new_title(clause.title(match.group("t"))), refs=refs, text=text)
    if match := re.match(r"^(?:change|rename|update|edit|modify)\s+(?P<ref>.+)$", text, re.I):
        refs = parse_refs(match.group("ref"), clause.quoted)
        if refs and refs[0].kind in ("id", "it", "position"):
            return Intent("update", refs=refs, text=text)  # no new title given: ask for it
    return None


def _clean_new_title(title: str) -> str:
    title = re.sub(r"^(?:the new title |the title |title |something like |say )", "", title, flags=re.I)
    return capitalize(strip_filler(title))


_UNDO = re.compile(
    r"^(?:(?:mark|set|flag|make)\s+.+?\s+(?:as\s+|to\s+)?(?:not\s+(?:yet\s+)?(?:done|complete|completed|finished)|undone|incomplete|uncompleted|unfinished|pending|open|active|todo|to do)|"
    r"(?:uncomplete|un-complete|uncheck|untick|unmark|reopen|re-open)\s+.+|.+\s+(?:is|isn't|is not)\s+(?:not\s+)?(?:actually\s+)?(?:not done|undone|incomplete|unfinished)|.+\s+isn't (?:done|finished|complete))$",
    re.I,
)


def _read_complete(clause: Clause) -> Intent | None:
    text = clause.text
    if _UNDO.match(text):
        return Intent("uncomplete", text=text)
    rules = (
        r"^(?:mark|set|flag|make|put|move)\s+(?P<ref>.+?)\s+(?:as\s+|to\s+|to be\s+|in\s+)?(?:done|complete|completed|finished|checked(?: off)?|ticked(?: off)?|resolved|closed|crossed off)$",
        r"^(?:mark|set|flag)\s+(?:as\s+)?(?:done|complete|completed|finished)\s*:?\s*(?P<ref>.+)$",
        r"^(?:complete|finish|close|resolve|accomplish|check off|tick off|cross off|cross out|strike off|strike out|done with|finished with|wrap up|close out|mark off|check|tick|cross)\s+(?P<ref>.+?)(?:\s+(?:off|as done))?(?:\s+(?:from|on)\s+(?:my|the)\s+(?:todo\s+|to-do\s+)?list)?$",
        r"^(?:done|finished|completed|knocked out|wrapped up|took care of|taken care of|sorted out|dealt with|nailed|crushed)\s*[:\-]?\s+(?P<ref>.+)$",
        r"^(?:put|place|add|give)\s+(?:a\s+)?(?:check|tick|checkmark|tick mark)(?:\s*mark)?\s+(?:on|next to|by|to|against)\s+(?P<ref>.+)$",
        r"^(?:i|we)(?:'ve| have|'m| am)?\s+(?:just\s+|already\s+|finally\s+|now\s+)?(?:finished|completed|done with|done|accomplished|wrapped up|took care of|taken care of|dealt with|handled|ticked off|checked off|knocked out|got done|did|sorted)\s+(?P<ref>.+)$",
        r"^(?P<ref>.+?)(?:\s+(?:is|are|was|were|has been|have been|got|just got)|'s)\s+(?:now\s+|finally\s+|all\s+|already\s+)?"
        + _STATUS_DONE
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
    return None


def _read_delete(clause: Clause) -> Intent | None:
    text = clause.text
    rules = (
        r"^(?:delete|remove|cancel|drop|erase|scratch|scrap|trash|discard|ditch|nuke|kill|axe|clear|clear out|purge|wipe|wipe out|"
        r"get rid of|take off|take out|throw away|throw out|toss|forget about|forget|eliminate|destroy|bin|dump|rid me of|lose)\s+(?P<ref>.+?)"
        r"(?:\s+(?:from|off|of|in)\s+(?:my|the)\s+(?:todo\s+|to-do\s+|to do\s+|task\s+)?(?:list|tasks|todos|to-dos))?$",
        r"^(?:take|knock|get|strike)\s+(?P<ref>.+?)\s+(?:off|out of)(?:\s+(?:my|the)\s+(?:todo\s+|to-do\s+)?list)?$",
        r"^(?:i|we)\s+(?:don't|do not|dont|no longer|won't|will not)\s+(?:need|want|have|have to|need to|want to)\s+(?:to\s+)?(?P<ref>.+?)(?:\s+(?:anymore|any more|any longer|after all))?$",
        r"^(?:no need (?:to|for)|never mind|nevermind|forget)\s+(?P<ref>.+?)$",
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


_ADD_VERB = (
    r"(?:add|create|insert|include|put down|put|jot down|jot|write down|note down|pencil in|log|enter|type in|append|"
    r"schedule|plan|set|make|new|save|record|note|stick|throw|slap|toss|pop)"
)
_ADD_NOUN = (
    r"(?:(?:a|an|the|one|another|some|new|my|more|one more|a new|an extra|extra|two|three|four|five|\d+|a few|few|these|the following|following)\s+)*(?:new\s+)?"
    r"(?:(?:todo|to-do|to do|task)\s+(?=items?\b|entry\b|reminders?\b))?"
    r"(?:tasks?|todos?|to-?dos?|to do|items?|reminders?|entry|entries|notes?|things?|errands?|chores?)\b"
)
_WHEN = r"(?:tomorrow|today|tonight|later|this (?:morning|afternoon|evening|week|weekend)|next week|next month|(?:on )?\w+day)"
_ADD_MARKER = r"(?:\s*(?::|-|=)\s*|\s+(?:called|named|titled|that says|saying|which says|with the title|with title|reading|labeled|labelled)\s*:?\s*)"
_LIST_TAIL = re.compile(
    r"\s+(?:to|on|in|onto|into|for)\s+(?:my|the|our)\s+(?:(?:todo|to-do|to do|task|tasks|shopping|grocery|groceries|daily|work)\s+)*"
    r"(?:list|tasks|todos|to-dos|tasks list|agenda)(?:\s+(?:too|as well|also))?$",
    re.I,
)


def _read_add(clause: Clause) -> Intent | None:
    text = clause.text
    # "remind me to X", "don't let me forget to X", "note to self: X"
    if match := re.match(
        r"^(?:remind me|pls remind me|remember|remember me|don't let me forget|do not let me forget|dont let me forget|"
        r"don't forget|dont forget|do not forget|never forget|make sure i|make sure to|make sure that i|note to self|memo|"
        r"i must not forget|i can't forget|i cannot forget|i shouldn't forget|i should not forget|i need to remember|"
        r"i have to remember|i must remember|i want to remember|help me remember|i gotta remember|i need a reminder|"
        r"i should remember)"
        r"(?P<when>\s+(?:tomorrow|tonight|today|later|this (?:morning|afternoon|evening|week|weekend)|next week|on \w+day|in the (?:morning|afternoon|evening)))?"
        r"(?:\s+(?:to|that i (?:need|have) to|that i should|that|about|of|:)|\s*:)?\s+(?P<t>.+)$",
        text,
        re.I,
    ):
        title = _clean_title(match.group("t"))
        when = (match.group("when") or "").strip()
        if when and when.lower() not in title.lower():
            title = f"{title} {when}"
        return _add_intent(title, clause, keep_whole=False)
    # "todo: X", "new task - X", "task: X"
    if match := re.match(
        r"^(?:new\s+)?(?:todo|to-do|to do|task|reminder|item|note)\s*(?::|-|=)\s*(?P<t>.+)$",
        text,
        re.I,
    ):
        return _add_intent(_clean_title(match.group("t")), clause, keep_whole=True)
    if match := re.match(
        r"^(?:new\s+)?(?:todo|to-do|reminder)\s+(?P<t>(?!list\b|lists\b|items?\b)[^\d\s].*)$", text, re.I
    ):
        return _add_intent(_clean_title(match.group("t")), clause, keep_whole=True)
    if match := re.match(rf"^(?P<verb>{_ADD_VERB})\b\s*(?P<rest>.*)$", text, re.I):
        return _read_add_object(match.group("verb").lower(), match.group("rest"), clause)
    # "I need to X", "I have to X", "I should X": a thing to do
    if match := re.match(
        r"^(?:i|we)\s+(?:need to|have to|must|should|gotta|got to|'ve got to|have got to|ought to|am supposed to|'m supposed to|want to|wanna|would like to|'d like to|plan to|am going to|'m going to|will)\s+(?P<t>.+)$",
        text,
        re.I,
    ):
        return _add_intent(_clean_title(match.group("t")), clause, keep_whole=False)
    if match := re.match(r"^(?:need to|have to|must|gotta|got to|should)\s+(?P<t>.+)$", text, re.I):
        return _add_intent(_clean_title(match.group("t")), clause, keep_whole=False)
    # "... and also to buy flowers": the rest of a reminder
    if (match := re.match(r"^to\s+(?P<t>(?!do\b)\w.+)$", text, re.I)) and len(text.split()) <= 12:
        return _add_intent(_clean_title(match.group("t")), clause, keep_whole=False)
    # "I have a meeting with Bob on Tuesday": an appointment to remember
    if match := re.match(
        r"^(?:i|we)(?:'ve| have)(?: got)?\s+(?P<t>(?:a|an|my|the)\s+(?:meeting|appointment|call|interview|exam|test|class|lesson|doctor's appointment|dentist appointment|deadline|flight|party|dinner|presentation|date|session|checkup|check-up)\b.*)$",
        text,
        re.I,
    ):
        title = re.sub(r"^(?:a|an|my|the)\s+", "", match.group("t"), flags=re.I)
        return _add_intent(_clean_title(title), clause, keep_whole=True)
    # A bare errand ("Buy milk", "Call the plumber tomorrow"): what a todo list is for.
    words = text.split()
    if (
        2 <= len(words) <= 8
        and words[1].lower() not in ("me", "us", "something", "anything")
        and not re.search(r"\b(?:you|your|yourself)\b", text, re.I)
        and words[0].lower() in _ERRAND_VERBS
        and words[0].lower() not in ("check", "finish", "cancel", "make", "review", "get")
    ):
        return _add_intent(_clean_title(text), clause, keep_whole=False)
    return None


# Verbs that mean "add" only with a task noun or a list ("make a task to...", "put X on my list").
_WEAK_ADD_VERBS = {
    "make",
    "new",
    "save",
    "record",
    "note",
    "set",
    "setup",
    "stick",
    "throw",
    "slap",
    "toss",
    "pop",
    "log",
    "enter",
    "put",
}
_SINGULAR_NOUN = re.compile(r"^(?:a|an|one|the|new|a new)\s+(?:task|todo|to-do|reminder|item|note)\b", re.I)
_PLURAL_NOUN = re.compile(
    r"^(?:some\s+|these\s+|the following\s+|a few\s+|few\s+|(?:two|three|four|five|\d+)\s+)?(?:new\s+)?"
    r"(?:tasks|todos|to-dos|items|reminders|things)\b",
    re.I,
)
_LISTED_ITEMS = re.compile(
    r"^(?:these|the following|following|those)(?:\s+(?:items|things|tasks|todos))?\s*:?\s*", re.I
)


def _strip_add_frame(rest: str) -> tuple[str, bool, str]:
    """The words after the add verb without their frame: (rest, "these:" items follow, a "for tomorrow:" time)."""
    # "add to my list: X", "add something to my list: X"
    rest = re.sub(
        r"^(?:something\s+|this\s+|the following\s+)?(?:to|on|onto|in)\s+(?:my|the)\s+(?:\w+\s+)?list\s*:\s*",
        ": ",
        rest.strip(),
        flags=re.I,
    )
    # "add X as a task" / "as one task"
    rest = re.sub(
        r"\s+as\s+(?:a|an|one|my|another)\s+(?:new\s+|single\s+)?(?:task|todo|to-do|item|reminder)$",
        "",
        rest,
        flags=re.I,
    )
    listed_items = bool(_LISTED_ITEMS.match(rest))
    rest = _LISTED_ITEMS.sub("", rest)
    when = ""
    if match := re.match(rf"^({_ADD_NOUN})\s+for\s+(?P<when>{_WHEN})\s*:\s*(?P<t>.+)$", rest, re.I):
        rest, when = f"{match.group(1)}: {match.group('t')}", match.group("when")
    return rest, listed_items, when


def _read_add_object(verb: str, rest: str, clause: Clause) -> Intent | None:
    """What follows an add verb: "a task to X", "task: X", "X to my list", "eggs and milk"..."""
    rest, listed_items, when = _strip_add_frame(rest)
    has_noun = False
    if match := re.match(rf"^{_ADD_NOUN}(?P<after>.*)$", rest, re.I):
        has_noun, rest = True, match.group("after")
    explicit = has_noun and (bool(re.match(_ADD_MARKER, rest, re.I)) or is_only_quote(rest.strip()))
    if not has_noun and re.match(r"^\s*:\s*", rest):
        explicit = True
    if has_noun or rest.lstrip().startswith(":"):
        rest = re.sub(r"^" + _ADD_MARKER, " ", rest, flags=re.I)
    if has_noun:
        rest = re.sub(r"^\s*(?:to|for|about|of|in)\s+(?=\S)", "", rest, flags=re.I)
    rest = rest.strip()
    if verb in _WEAK_ADD_VERBS and not has_noun and not _LIST_TAIL.search(" " + rest):
        return None
    if not rest:
        return Intent("empty_add", text=clause.text)
    title = _clean_title(rest if explicit else _LIST_TAIL.sub("", rest))
    if verb in ("schedule", "plan") and not has_noun and not title.lower().startswith(verb):
        first_word = title.split()[0]
        plain_word = len(first_word) == 1 or first_word[1:].islower()  # "A", "Haircut"; not "NASA"
        uncapitalized = title[:1].lower() + title[1:] if plain_word else title
        title = capitalize(f"{verb} {uncapitalized}")
    after_verb = clause.text.split(" ", 1)[1] if " " in clause.text else ""
    plural = bool(_PLURAL_NOUN.match(after_verb)) or listed_items
    keep_whole = (explicit or bool(_SINGULAR_NOUN.match(after_verb))) and not plural
    if when and when.lower() not in title.lower():
        title = f"{title} {when}"
    return _add_intent(title, clause, keep_whole=keep_whole)


_LIST_TAIL_INSIDE = re.compile(
    r"\s+(?:to|on|in|onto|into)\s+(?:my|the|our)\s+(?:(?:todo|to-do|to do|task|shopping|grocery)\s+)*(?:list|tasks|todos|to-dos)"
    r"(?=\s+(?:for|on|by|at|before|tomorrow|today|tonight|this|next)\b)",
    re.I,
)


def _clean_title(title: str) -> str:
    title = _LIST_TAIL.sub("", _LIST_TAIL_INSIDE.sub("", title.strip()))
    title = re.sub(
        r"^(?:probably|really|definitely|maybe|also|still|eventually|finally|at some point|seriously)\s+",
        "",
        title,
        flags=re.I,
    )
    title = re.sub(
        r"^(?:to|that i (?:need|have) to|that i should|about|i need to|i have to|i must)\s+", "", title, flags=re.I
    )
    title = strip_filler(title)
    return capitalize(title.strip(" \t,.;:!?-"))


def _add_intent(title: str, clause: Clause, keep_whole: bool) -> Intent:
    description = None
    if match := re.match(
        r"^(?P<t>.+?)\s*(?:,\s*|\s+)(?:with\s+(?:a\s+|the\s+)?(?:description|desc|note|notes|details)|(?:description|desc|notes|details)\s*:)\s*(?::|of|saying|that says|=|-)?\s*(?P<d>.+)$",
        title,
        re.I,
    ):
        title, description = capitalize(match.group("t").strip(" ,")), match.group("d").strip()
    if not title:
        return Intent("empty_add", text=clause.text)
    pieces = [title] if keep_whole or description else _split_items(title)
    titles = [capitalize(clause.title(piece)) for piece in pieces]
    if description is not None:
        description = clause.title(description)
    return Intent("add", title="\n".join(titles), description=description, text=clause.text)


def _split_items(title: str) -> list[str]:
    """ "eggs and milk" -> two titles; "salt and pepper shakers" and long phrases stay whole."""
    lower = title.lower()
    if not re.search(r",|\band\b|&|\bplus\b", lower) or re.search(r"[{}\[\]<>]", lower):
        return [title]
    if any(compound in lower for compound in _COMPOUNDS):
        return [title]
    pieces = [
        piece.strip() for piece in re.split(r"\s*,\s*(?:and\s+|&\s+)?|\s+(?:and|&|plus)\s+", title) if piece.strip()
    ]
    if len(pieces) < 2 or any(len(piece.split()) > 5 for piece in pieces):
        return [title]
    # "buy eggs and milk": when the first piece starts with a verb and the others are bare nouns,
    # the verb carries over ("Buy eggs", "Buy milk").
    first_words = pieces[0].split()
    verb = first_words[0] if len(first_words) > 1 and first_words[0].lower() in _ERRAND_VERBS else ""
    titles = []
    for index, piece in enumerate(pieces):
        if index and verb and piece.split()[0].lower() not in _ERRAND_VERBS and len(piece.split()) <= 3:
            piece = f"{verb} {piece}"
        titles.append(capitalize(piece))
    return titles


_ERRAND_VERBS = {
    "buy",
    "get",
    "call",
    "email",
    "text",
    "pick",
    "clean",
    "wash",
    "pay",
    "book",
    "order",
    "fix",
    "visit",
    "send",
    "write",
    "read",
    "return",
    "feed",
    "walk",
    "water",
    "finish",
    "cook",
    "make",
    "bake",
    "prepare",
    "check",
    "renew",
    "cancel",
    "schedule",
    "grab",
    "collect",
    "file",
    "study",
    "practice",
    "review",
    "print",
}


_LIST_RULE = re.compile(
    r"^(?:(?:show|list|display|see|view|get|give|tell|read|print|fetch|pull up|bring up|open|check|review|recap|summarize|"
    r"let me see|let me know|can i see|may i see|i want to see|i'd like to see|i wanna see|lemme see|show me|what's|whats|wats|wat's|wat|what is|what are|"
    r"what|which|how many|how much|do i have|did i|have i|is there|are there|anything|any|got any|where are|what've|what have|tell me)\b.*|"
    r"(?:my\s+|all\s+(?:my\s+)?|the\s+)?(?:(?:pending|remaining|open|completed|done|finished|outstanding|current|incomplete|unfinished)\s+)?"
    r"(?:tasks|todos|to-dos|todo list|to-do list|to do list|task list|list|agenda|items)(?:\s+(?:please|pls))?|"
    r"(?:pending|remaining|completed|done|finished|outstanding|open|incomplete|unfinished)(?:\s+(?:ones|tasks|items|todos))?|"
    r"status|overview|summary|whats left|what's left|anything left|what's next|whats next)$",
    re.I,
)


def _read_list(clause: Clause) -> Intent | None:
    text = " ".join(fix_status_word(word) for word in clause.text.split(" "))
    lower = text.lower()
    if not _LIST_RULE.match(text):
        return None
    mentions_tasks = re.search(
        rf"\b{_LIST_NOUN}\b|\b(?:everything|all|finish|get done|got done|pending|remaining|left|open|outstanding|completed|complete|done|finished|incomplete|unfinished|accomplished|achieved|do today|to do|need to do|have to do|next|status|overview|summary|plate|agenda)\b",
        lower,
    )
    if not mentions_tasks:
        return None
    if re.match(r"^(?:what|how)\b.*\b(?:can|could)\s+you\b", lower):
        return None
    status = "all"
    if re.search(
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
    return Intent("list", status=status, text=text)


def _read_chat(clause: Clause) -> Intent | None:
    text = clause.text
    if re.match(
        r"^(?:undo|revert|roll back|rollback|take (?:that|it) back)(?:\s+(?:that|it|this|the last (?:change|action|one)|what you did|please))*$",
        text,
        re.I,
    ):
        return Intent("undo", text=text)
    if _CHAT_HELP.search(text):
        return Intent("help", text=text)
    if _CHAT_GREETING.match(text) and len(text.split()) <= 6:
        return Intent("greet", text=text)
    if _CHAT_THANKS.match(text) and len(text.split()) <= 6:
        return Intent("thanks", text=text)
    return None


_RULES = (_read_update, _read_complete, _read_delete, _read_list, _read_add)


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
    chat = _read_chat(Clause(raw.strip(" .!?,"), quoted)) or (_read_chat(clause) if text else None)
    if chat is not None:
        return chat
    return Intent("unknown", text=restore(text or raw.strip(), quoted))


# ---------------------------------------------------------------------------------------
# Messages

_SENTENCE_SPLIT = re.compile(r"(?<!\bno)(?<!\bnr)(?<!\bvs)(?<!\be\.g)(?<!\bi\.e)(?:[.!?;]+|\n+)\s+(?=\S)|\n+", re.I)
_CLAUSE_SPLIT = re.compile(
    r"(\s*,\s*(?:and\s+|then\s+|and then\s+|also\s+|plus\s+)?|\s+(?:and then|and also|then|and|also|plus|&)\s+)", re.I
)


_FINISHED_TALKING = re.compile(
    r"^(?:ok(?:ay)?,?\s+)?(?:i'?m |i am |all |we'?re )?(?:done|finished|all set|good)(?: for (?:now|today))?(?:,? thanks?(?: you)?)?[.! ]*$",
    re.I,
)


def read_message(text: str) -> list[Intent]:
    """Every intent in a user message, in order."""
    protected, quoted = protect_quotes(" ".join(text.translate(_TYPOGRAPHIC).split()))
    if _FINISHED_TALKING.match(protected):
        return [Intent("thanks", text=protected)]
    intents: list[Intent] = []
    for sentence in _SENTENCE_SPLIT.split(protected):
        if sentence.strip():
            intents.extend(_read_sentence(sentence.strip(), quoted))
    return _merge_adds(intents)


def _read_sentence(sentence: str, quoted: list[str]) -> list[Intent]:
    whole = read_clause(sentence, quoted)
    # An explicit title ("add a task: ...", "todo: ...", a quoted title) runs to the end of the
    # sentence: whatever it says is the task's text, not more commands.
    if whole.kind == "add" and _explicit_title(sentence):
        return [whole]
    segments = _CLAUSE_SPLIT.split(sentence)
    clauses: list[str] = [segments[0]]
    index = 1
    while index < len(segments):
        separator, segment = segments[index], segments[index + 1] if index + 1 < len(segments) else ""
        index += 2
        if _starts_command(segment, quoted, clauses[-1]):
            clauses.append(segment)
        else:
            clauses[-1] = clauses[-1] + separator + segment
    if len(clauses) == 1:
        return [whole]
    return [read_clause(clause, quoted) for clause in clauses]


def _explicit_title(sentence: str) -> bool:
    text = fix_typos(strip_filler(sentence))
    return bool(
        re.match(rf"^{_ADD_VERB}\s+{_ADD_NOUN}{_ADD_MARKER}", text, re.I)
        or re.match(r"^(?:new\s+)?(?:todo|to-do|to do|task|reminder|note)\s*(?::|-)\s*", text, re.I)
        or re.match(rf"^{_ADD_VERB}\s*:", text, re.I)
        or re.match(r"^(?:note to self|memo)\s*:", text, re.I)
    )


def _starts_command(segment: str, quoted: list[str], previous: str) -> bool:
    """Does this piece after "and"/"," start a new command (rather than continue a title or a list)?"""
    segment = segment.strip()
    if not segment:
        return False
    intent = read_clause(segment, quoted)
    if intent.kind in ("unknown", "greet", "thanks", "help", "uncomplete", "empty_add"):
        return intent.kind == "uncomplete"
    first = fix_word(strip_filler(segment).split(" ")[0]).lower()
    # A title-only piece ("milk") never splits; a piece opening with a command word does.
    if intent.kind == "add":
        previous_intent = read_clause(previous, quoted)
        return previous_intent.kind != "add" or bool(
            re.match(r"^(?:add|create|remind|remember|put|insert|also|new|todo|note)", first)
        )
    if intent.kind in ("list", "show"):
        return bool(re.match(r"^(?:show|list|display|what|which|how|give|tell|let|view|see|print|and)", first))
    if intent.kind == "complete" and re.match(r"^(?:i|we)$", first):
        return True
    return first in _COMMAND_STARTS or (
        intent.kind in ("complete", "delete") and bool(re.search(r"\b(?:is|are)\s+" + _STATUS_DONE, segment, re.I))
    )


_COMMAND_STARTS = {
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
    """One add intent per title (an add with several items was split into lines)."""
    merged: list[Intent] = []
    for intent in intents:
        if intent.kind == "add" and "\n" in intent.title:
            merged.extend(replace(intent, title=title) for title in intent.title.split("\n"))
        else:
            merged.append(intent)
    return merged
