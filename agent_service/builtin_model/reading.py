"""Reading the words of a message: quotes, sentences, politeness, typos, plain forms.

Pure string helpers, no state, no knowledge of intents. Quoted text is swapped for
placeholders first (`protect_quotes`), so a quoted title is kept whole and no rule can read
a command inside it; `restore` puts it back. Typo repair touches only command verbs and
words such as "task": titles keep their own spelling.
"""

from __future__ import annotations

import re

# Quoted spans are swapped for placeholders made of private-use characters, so no rule
# (which all look for ASCII words) can match inside them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_QUOTED = re.compile(r"\"([^\"]+)\"|(?<![\w])'([^']+)'(?![\w])")
# Typographic quotes and dashes, as phones type them, read as their ASCII forms.
TYPOGRAPHIC = str.maketrans({0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"', 0x2013: "-", 0x2014: "-"})
_PLACEHOLDER = re.compile(_OPEN + r"(\d+)" + _CLOSE)
# A quoted span as the rules see it: one placeholder.
QUOTE_SLOT = _OPEN + r"\d+" + _CLOSE

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
    "lst": "list",
    "lsit": "list",
    "tasjs": "tasks",
    "taska": "tasks",
    "tassk": "tasks",
}
_STATUS_WORDS = ("completed", "complete", "finished", "pending", "remaining")

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
    r"^(?:hey there|hi there|hello there|please|pls|plz|pleas|plese|pleae|pleeze|kindly|hey|hi|hello|yo|ok|okay|ok so|so|also|and|then|and then|now|just|oh|um|uh|"
    r"well|alright|all right|right|great|cool|thanks|thank you|hmm|btw|by the way|actually|quick(?:ly)?|yes|yeah|yep|yup|sure|oops|sorry|wait|"
    r"basically|honestly|anyway|anyways|er|erm|like|so yeah|yeah so|ok so|okay so|alright so|right so|u+m+|u+h+|h+m+|e+r+m+|nah|naw|meh|no wait|wait no|no no|no sorry|sorry no|no(?=[\s,]+(?:i meant|i mean|wait|sorry|actually))|"
    r"i guess|i think|i suppose|i believe|it seems|(?:it )?turns out(?: that)?|come to think of it|"
    r"hey there|bot|assistant|todo bot|can i ask you to|i'd like you to|i would like you to|i want you to|"
    r"i need you to|go ahead and|help me|let's|lets|let us|"
    r"(?:could|can|would|will|could|would) you(?: please| kindly| maybe| possibly)?|"
    r"(?:could|can|would|will) u(?: please| pls)?|"
    r"would you mind|do you mind|mind|be so kind as to|"
    r"i(?:'d| would) (?:like|love|want) (?:you )?to(?=\s+(?:add|create|delete|remove|mark|complete|finish|see|view|show|list|change|rename|update|edit))|"
    r"i want to(?=\s+(?:add|create|delete|remove|mark|complete|finish|see|view|show|list|change|rename|update|edit|check))|"
    r"(?:can|could|may) i(?: please)?(?=\s+(?:add|create|delete|remove|mark|complete|see|view|show|list|change|rename|update|edit|get))|"
    r"i need to(?=\s+(?:add|create|delete|remove|mark|complete|see|view|show|list|change|rename|update|edit))|"
    r"time to(?=\s+(?:add|delete|remove|mark|complete))"
    r")(?:[\s,!:]+|$)",
    re.I,
)
_TRAILING = re.compile(
    r"(?:[\s,]+(?:please|pls|plz|(?:thanks|thank you|thx|ty)(?: so much| a lot| very much| a bunch| again| in advance)?|"
    r"for me|if you can|if you could|if possible|much appreciated|appreciate it|you're the best|"
    r"right now|now|then|real quick|quickly|ok|okay|cheers|i guess|i think|i suppose|or something|if that's ok|"
    r"if that's okay|if you don't mind|when you get a chance|whenever)|[\s.!?,;:]+|\s+:\))$",
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
# Sentences and clauses

# A full stop after an abbreviation ("Dr. Patel", "e.g.") does not end a sentence.
_ABBREVIATIONS = (
    "no",
    "nr",
    "vs",
    "e.g",
    "i.e",
    "dr",
    "mr",
    "mrs",
    "ms",
    "st",
    "prof",
    "jr",
    "sr",
    "mt",
    "ft",
    "etc",
    "approx",
)
SENTENCE_SPLIT = re.compile(
    "".join(rf"(?<!\b{re.escape(word)})" for word in _ABBREVIATIONS) + r"(?:[.!?;]+|\n+)\s+(?=\S)|\n+", re.I
)
# Separators between clauses; the last one is no word at all: a second "add" ("add eggs add
# bread"), which splits only where both sides read as adds.
CLAUSE_SPLIT = re.compile(
    r"(\s*,\s*(?:and\s+|then\s+|and then\s+|also\s+|plus\s+)?|\s+(?:and then|and also|then|and|also|plus|&)\s+|"
    r"\s+(?=add\s+\S))",
    re.I,
)


FINISHED_TALKING = re.compile(
    r"^(?:ok(?:ay)?,?\s+)?(?:i'?m |i am |all |we'?re )?(?:done|finished|all set|good)(?: for (?:now|today))?(?:,? thanks?(?: you)?)?[.! ]*$",
    re.I,
)
