"""Finding due-date phrases in the user's words ("by friday", "tomorrow at 6pm", "dec 24").

The model never computes a date: it has no clock. It finds the phrase and passes it in the
tool's `due` argument; task_service reads it in the user's timezone and the tool result
carries the absolute date, which the answer echoes.
"""

from __future__ import annotations

import re

_WEEKDAY = r"(?:mon|tues?|wed(?:nes)?|thu(?:rs?)?|fri|sat(?:ur)?|sun)(?:day)?s?"
_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
    r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_ORDINAL_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_NUMBER = r"(?:\d+|a|an|one|two|three|four|five|six|seven|eight|nine|ten|a couple of|a few)"
_DAY = (
    r"(?:today|tonight|tomorrow|tmrw|tmr|tomorow|tommorow|tommorrow|the day after tomorrow|"
    rf"(?:this|next|coming|this coming|on)?\s*{_WEEKDAY}(?:\s+(?:morning|afternoon|evening|night))?|"
    r"(?:this|next)\s+(?:week(?:end)?|month|year)|the weekend|weekend|"
    r"(?:the\s+)?end of (?:the\s+)?(?:day|week|month|year)|eod|eow|"
    rf"in\s+{_NUMBER}\s+(?:days?|weeks?|months?|hours?)|{_NUMBER}\s+(?:days?|weeks?)\s+from\s+(?:now|today)|"
    rf"{_MONTH}\.?\s+{_ORDINAL_DAY}(?:,?\s+\d{{4}})?|(?:the\s+)?{_ORDINAL_DAY}\s+(?:of\s+)?{_MONTH}(?:\s+\d{{4}})?|"
    r"\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}(?:/\d{2,4})?|the\s+\d{1,2}(?:st|nd|rd|th)|"
    r"(?:this|tomorrow)\s+(?:morning|afternoon|evening|night))"
)
_TIME = r"(?:\d{1,2}(?::\d{2})?\s*(?:am|pm|a\.m\.|p\.m\.)|\d{1,2}:\d{2}|noon|midday|midnight)"
_AT_TIME = rf"(?:(?:at|@|by|around)\s+)?{_TIME}"
# A whole due phrase: a day with an optional time, or a time with an optional day.
_PHRASE = rf"(?:{_DAY}(?:\s+(?:at\s+|@\s*|by\s+|around\s+)?{_TIME})?|{_AT_TIME}(?:\s+(?:on\s+)?{_DAY})?)"
# "for Saturday" stays in the title: "book a table for Saturday" is about the table.
_LEAD = r"(?:(?:due|by|on|before|until|no later than)\s+(?:on\s+|by\s+)?)"

_TRAILING_DUE = re.compile(rf"(?:^|[\s,]+)(?P<lead>{_LEAD})?(?P<due>{_PHRASE})\s*$", re.I)
# At the start only unmistakable days count: "tomorrow, call mom"; "Sunday roast" is a title.
_LEADING_DAY = rf"(?:today|tonight|tomorrow|tmrw|(?:this|next|on)\s+{_WEEKDAY}|next week|this weekend)"
_LEADING_DUE = re.compile(rf"^(?P<lead>{_LEAD})?(?P<due>{_LEADING_DAY}(?:\s+at\s+{_TIME})?)[\s,]+(?=\S)", re.I)
_WHOLE = re.compile(rf"^(?:{_LEAD})?(?P<due>{_PHRASE})$", re.I)
_CLEARS = re.compile(
    r"^(?:no (?:due )?date|no deadline|none|nothing|never|no due|someday|whenever|undated|unscheduled|no time)$", re.I
)


# Phrases the task service's reader (dateparser) does not know, said the way it does.
_PLAINER = (
    (re.compile(r"^(?:this\s+|the\s+)?weekend$", re.I), "saturday"),
    (re.compile(r"^next\s+weekend$", re.I), "next saturday"),
    (re.compile(r"^(?:the\s+)?end of (?:the\s+|this\s+)?week$|^eow$", re.I), "friday"),
    (re.compile(r"^(?:the\s+)?end of (?:the\s+)?day$|^eod$", re.I), "today"),
)


def plainer(due: str) -> str:
    """ "this weekend" -> "saturday": the same day in words the task service reads."""
    return next((words for pattern, words in _PLAINER if pattern.match(due.strip())), due)


def is_due_phrase(text: str) -> bool:
    """Is the whole text a due phrase ("tomorrow", "next friday at 5pm", "by dec 24")?"""
    return bool(_WHOLE.match(text.strip(" .!?,")))


def due_of(text: str) -> str:
    """The due phrase as passed to the tool: the text without a leading "by"/"on"/"due"."""
    match = _WHOLE.match(text.strip(" .!?,"))
    return match.group("due") if match else text.strip()


def clears_due(text: str) -> bool:
    return bool(_CLEARS.match(text.strip(" .!?,")))


def split_trailing_due(title: str) -> tuple[str, str]:
    """A due phrase said after a comma at the end ("buy a gift for anna, due dec 24"): it holds
    for the whole request, before the title is split into items."""
    match = _TRAILING_DUE.search(title)
    if match and "," in title[match.start() : match.start("due")] and title[: match.start()].strip():
        return title[: match.start()].rstrip(" ,"), re.sub(r"^(?:at|@)\s*", "", match.group("due"), flags=re.I)
    return title, ""


def split_due(title: str) -> tuple[str, str]:
    """A title and the due phrase at its end or start: "call mom tomorrow at 6pm" ->
    ("call mom", "tomorrow at 6pm"); ("", "") parts when there is none. A phrase that would
    leave no title is not a due date: "add tomorrow" adds a task called "Tomorrow"."""
    if match := _TRAILING_DUE.search(title):
        rest = title[: match.start()].rstrip(" ,")
        # "Team meeting at 10" has no am/pm: a bare number is not read as a time
        if (
            rest
            and _has_words(rest)
            and not re.search(r"\b(?:for|of|from|since|every|each|to|until|till|than)$", rest, re.I)
        ):
            return rest, re.sub(r"^(?:at|@)\s*", "", match.group("due"), flags=re.I)
    if match := _LEADING_DUE.match(title):
        rest = title[match.end() :].strip()
        if rest and _has_words(rest):
            return rest, re.sub(r"^on\s+", "", match.group("due"), flags=re.I)
    return title, ""


def _has_words(text: str) -> bool:
    return bool(re.search(r"[A-Za-z]{2}", text)) and not re.fullmatch(
        r"(?:a|an|the|to|and|at|on|by)", text.strip(), re.I
    )
