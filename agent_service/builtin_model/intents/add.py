"""Add: "add X", "remind me to X", "I need to X", "todo: X", a bare errand; several items at once.

Text is data: after an explicit title marker ("add a task: ...", "todo: ...", a quoted
title) the rest of the sentence is the title, whatever it says.
"""

from __future__ import annotations

import re
from dataclasses import replace

from lemminflect import getAllLemmas

from agent_service.builtin_model.dates import split_trailing_due
from agent_service.builtin_model.intents.plan import add_planning, priority_and_tags
from agent_service.builtin_model.meaning import Clause, Intent
from agent_service.builtin_model.reading import capitalize, fix_typos, is_only_quote, strip_filler
from agent_service.builtin_model.vocabulary import ERRAND_VERBS

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

ADD_VERB = (
    r"(?:add|create|insert|include|put down|put|jot down|jot|write down|note down|pencil in|log|enter|type in|append|"
    r"schedule|plan|set|make|new|save|record|note|stick|throw|slap|toss|pop)"
)
ADD_NOUN = (
    r"(?:(?:a|an|the|one|another|some|new|my|more|one more|a new|an extra|extra|two|three|four|five|\d+|a few|few|these|the following|following)\s+)*(?:new\s+)?"
    r"(?:(?:todo|to-do|to do|task)\s+(?=items?\b|entry\b|reminders?\b))?"
    r"(?:tasks?|todos?|to-?dos?|to do|items?|reminders?|entry|entries|notes?|things?|errands?|chores?)\b"
)
_WHEN = r"(?:tomorrow|today|tonight|later|this (?:morning|afternoon|evening|week|weekend)|next week|next month|(?:on )?\w+day)"
ADD_MARKER = r"(?:\s*(?::|-|=)\s*|\s+(?:called|named|titled|that says|saying|which says|with the title|with title|reading|labeled|labelled)\s*:?\s*)"
_LIST_TAIL = re.compile(
    r"\s+(?:to|on|in|onto|into|for)\s+(?:my|the|our)\s+(?:(?:todo|to-do|to do|task|tasks|shopping|grocery|groceries|daily|work)\s+)*"
    r"(?:list|tasks|todos|to-dos|tasks list|agenda)(?:\s+(?:too|as well|also))?$",
    re.I,
)


def read_add(clause: Clause) -> Intent | None:
    text = clause.text
    # "remind me to X", "don't let me forget to X", "note to self: X"
    if match := re.match(
        r"^(?:remind me|pls remind me|remember|remember me|don't let me forget|do not let me forget|dont let me forget|"
        r"don't forget|dont forget|do not forget|never forget|make sure i|make sure to|make sure that i|note to self|memo|"
        r"i must not forget|i can't forget|i cannot forget|i shouldn't forget|i should not forget|(?:i\s+)?need to remember|"
        r"i have to remember|i must remember|i want to remember|help me remember|i gotta remember|i need a reminder|"
        r"i should remember|(?:just\s+)?(?:a\s+)?(?:quick\s+|little\s+|friendly\s+)?reminder(?:\s+for\s+(?:me|myself))?)"
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
    # "todo: X", "new task - X", "task: X", "another one: X"
    if match := re.match(
        r"^(?:(?:new|another|one more)\s+)?(?:todo|to-do|to do|task|reminder|item|note)\s*(?::|-|=)\s*(?P<t>.+)$"
        r"|^(?:a\s+)?(?:new|another|one more)(?:\s+one)?\s*(?::|-|=)\s*(?P<t2>.+)$",
        text,
        re.I,
    ):
        return _add_intent(_clean_title(match.group("t") or match.group("t2")), clause, keep_whole=True)
    if match := re.match(
        r"^(?:new\s+)?(?:todo|to-do|reminder)\s+(?P<t>(?!list\b|lists\b|items?\b)[^\d\s].*)$", text, re.I
    ):
        return _add_intent(_clean_title(match.group("t")), clause, keep_whole=True)
    if match := re.match(rf"^(?P<verb>{ADD_VERB})\b\s*(?P<rest>.*)$", text, re.I):
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
        and (words[0].lower() in ERRAND_VERBS or _imperative(words))
        and words[0].lower() not in ("check", "finish", "cancel", "make", "review", "get")
    ):
        return _add_intent(_clean_title(text), clause, keep_whole=False)
    return None


# Verbs that order the assistant about the list, never errands themselves ("undo that").
_COMMAND_VERBS = {
    "undo",
    "mark",
    "show",
    "list",
    "delete",
    "remove",
    "rename",
    "change",
    "update",
    "complete",
    "tell",
    "give",
    "let",
    "help",
    "find",
    "search",
    "look",
    "move",
    "push",
    "tag",
    "set",
    "put",
    "clear",
    "take",
    "bring",
    "restore",
    "revert",
    "edit",
    "add",
    "create",
    "tick",
    "cross",
    "uncheck",
    "reopen",
    "forget",
    "ignore",
    "repeat",
    "say",
}
_DETERMINERS = {"the", "a", "an", "my", "our", "your", "his", "her", "their", "some", "this", "that", "these", "those"}


def _imperative(words: list[str]) -> bool:
    """ "submit the expense report": a verb in its plain form followed by a determiner, the
    shape of an errand ("lunch with jake" is not: a phrase like that is offered, not added)."""
    verb = words[0].lower()
    if verb in _COMMAND_VERBS:
        return False
    return words[1].lower() in _DETERMINERS and verb in getAllLemmas(verb, upos="VERB").get("VERB", ())


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
    if match := re.match(rf"^({ADD_NOUN})\s+for\s+(?P<when>{_WHEN})\s*:\s*(?P<t>.+)$", rest, re.I):
        rest, when = f"{match.group(1)}: {match.group('t')}", match.group("when")
    return rest, listed_items, when


def _read_add_object(verb: str, rest: str, clause: Clause) -> Intent | None:
    """What follows an add verb: "a task to X", "task: X", "X to my list", "eggs and milk"..."""
    rest, listed_items, when = _strip_add_frame(rest)
    has_noun = False
    if match := re.match(rf"^{ADD_NOUN}(?P<after>.*)$", rest, re.I):
        has_noun, rest = True, match.group("after")
    explicit = has_noun and (bool(re.match(ADD_MARKER, rest, re.I)) or is_only_quote(rest.strip()))
    if not has_noun and re.match(r"^\s*:\s*", rest):
        explicit = True
    if has_noun or rest.lstrip().startswith(":"):
        rest = re.sub(r"^" + ADD_MARKER, " ", rest, flags=re.I)
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
    # priority and tags said at the end hold for every item: "add eggs and milk, urgent"
    title, priority, tags = priority_and_tags(title)
    undated, due = split_trailing_due(title)  # ", due dec 24" holds for every item too
    pieces = [title] if keep_whole or description else _split_items(undated if due else title)
    if description is not None:
        description = clause.title(description)
    items = tuple(_item(piece, clause, description, priority, tags) for piece in pieces)
    if due:
        items = tuple(
            replace(item, plain_title=item.plain_title, title=f"{item.title}, {due}", due=item.due or due)
            for item in items
        )
    if len(items) == 1:
        return items[0]
    return Intent("add", title=items[0].title, items=items, text=clause.text)


def _item(piece: str, clause: Clause, description: str | None, priority: str | None, tags: tuple[str, ...]) -> Intent:
    """One new task: its title, and the due date, priority and tags said with it."""
    planned = add_planning(piece, priority, tags)
    return replace(
        planned,
        title=capitalize(clause.title(planned.title)) or capitalize(clause.title(piece)),
        plain_title=capitalize(clause.title(planned.plain_title)),
        description=description,
        text=clause.text,
    )


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
    verb = first_words[0] if len(first_words) > 1 and first_words[0].lower() in ERRAND_VERBS else ""
    titles = []
    for index, piece in enumerate(pieces):
        own_verb = piece.split()[0].lower() in ERRAND_VERBS or (len(piece.split()) > 1 and _imperative(piece.split()))
        if index and verb and not own_verb and len(piece.split()) <= 3:
            piece = f"{verb} {piece}"
        titles.append(capitalize(piece))
    return titles


def explicit_title(sentence: str) -> bool:
    """Does the sentence give its title explicitly ("add a task: ...", "todo: ...")? Then the
    title runs to the end of the sentence: whatever it says is the task's text."""
    text = fix_typos(strip_filler(sentence))
    return bool(
        re.match(rf"^{ADD_VERB}\s+{ADD_NOUN}{ADD_MARKER}", text, re.I)
        or re.match(r"^(?:new\s+)?(?:todo|to-do|to do|task|reminder|note)\s*(?::|-)\s*", text, re.I)
        or re.match(rf"^{ADD_VERB}\s*:", text, re.I)
        or re.match(r"^(?:note to self|memo)\s*:", text, re.I)
    )
