"""Planning: due dates, priority, tags and the user's timezone.

"move X to monday", "push everything due today to tomorrow", "clear the due date of X",
"make it urgent", "tag X with errands", "I'm in Lisbon". Each is an update of the task(s)
named (or a timezone change). The model passes date phrases as the user wrote them: the task
service reads them; the answer echoes the date it returns. The same readers find the planning
words of a new task ("pay rent by friday, high priority #home").
"""

from __future__ import annotations

import re
import zoneinfo
from functools import lru_cache

from agent_service.builtin_model.dates import clears_due, due_of, is_due_phrase, split_due
from agent_service.builtin_model.meaning import Clause, Intent
from agent_service.builtin_model.references import parse_refs

# ---------------------------------------------------------------------------------------
# Priority

_PRIORITY_WORDS = (
    r"(?:(?:a\s+|an\s+)?(?:high|top|highest|low|lowest|medium|normal|no)[- ]priority|priority\s*(?::|=)?\s*(?:high|low|medium|none)|"
    r"urgent|important|asap|a priority|not urgent|not important|unimportant|less important|less urgent|"
    r"high|low|medium)"
)


def priority_of(words: str) -> str:
    """ "urgent" -> "high", "not important" -> "low", "normal priority" -> "medium"."""
    lower = words.lower()
    if re.search(r"\bno[- ]priority|\bnone\b", lower):
        return "none"
    if re.search(r"\bnot\b|\bun|\bless\b|\blow", lower):
        return "low"
    if re.search(r"\bmedium|\bnormal", lower):
        return "medium"
    return "high"


_PRIORITY_RULES = (
    rf"^(?:make|mark|set|flag|put|bump|raise|change|move)\s+(?P<ref>.+?)\s+(?:as\s+|to\s+|at\s+|up\s+to\s+|down\s+to\s+)?(?P<p>{_PRIORITY_WORDS})$",
    rf"^(?P<ref>.+?)\s+(?:is|are|'s)\s+(?:now\s+|really\s+|very\s+|super\s+|kind of\s+|pretty\s+)?(?P<p>{_PRIORITY_WORDS})(?:\s+now)?$",
    r"^(?:give|assign)\s+(?P<ref>.+?)\s+(?:a\s+)?(?P<p>(?:high|top|low|medium|normal)\s+priority)$",
    r"^(?:change|set|update|make)\s+(?:the\s+)?priority\s+(?:of|for|on)\s+(?P<ref>.+?)\s+(?:to\s+)?(?P<p>high|low|medium|none|normal|urgent)$",
)


def _read_priority(clause: Clause) -> Intent | None:
    text = clause.text
    if match := re.match(r"^(?:prioriti[sz]e|escalate)\s+(?P<ref>.+)$", text, re.I):
        return _update(clause, match.group("ref"), priority="high")
    if match := re.match(r"^(?:deprioriti[sz]e|de-prioriti[sz]e)\s+(?P<ref>.+)$", text, re.I):
        return _update(clause, match.group("ref"), priority="low")
    if match := re.match(
        r"^(?:remove|clear|drop|reset)\s+(?:the\s+)?priority\s+(?:from|of|on|for)\s+(?P<ref>.+)$", text, re.I
    ):
        return _update(clause, match.group("ref"), priority="none")
    for rule in _PRIORITY_RULES:
        if match := re.match(rule, text, re.I):
            return _update(clause, match.group("ref"), priority=priority_of(match.group("p")))
    return None


# ---------------------------------------------------------------------------------------
# Tags

# One way only to read a list of tags ("and" is never a tag), so matching stays linear.
_TAG = r"#?(?!and\b)[A-Za-z][\w-]{0,31}"
_TAG_LIST = rf"{_TAG}(?:(?:\s*,\s*|\s+)(?:and\s+)?{_TAG})*"


def tags_in(words: str) -> tuple[str, ...]:
    """ "#errands, home and Work" -> ("errands", "home", "work")."""
    names = re.findall(r"#?([A-Za-z][\w-]{0,31})", words)
    return tuple(
        dict.fromkeys(name.lower() for name in names if name.lower() not in ("and", "the", "a", "tag", "tags"))
    )


def _read_tags(clause: Clause) -> Intent | None:
    text = clause.text
    if match := re.match(
        r"^(?:untag|clear (?:the |all )?tags (?:of|from|on)|remove (?:all )?(?:the )?tags (?:from|of|on))\s+(?P<ref>.+)$",
        text,
        re.I,
    ):
        return _update(clause, match.group("ref"), clear_tags=True)
    if match := re.match(
        rf"^(?:remove|take off|take|drop|delete)\s+(?:the\s+)?(?:tags?\s+)?(?P<tags>{_TAG_LIST})\s+(?:tags?\s+|labels?\s+)?(?:from|off|of)\s+(?P<ref>.+)$",
        text,
        re.I,
    ):
        if re.search(r"\btags?\b|\blabels?\b|#", text, re.I):
            return _update(clause, match.group("ref"), tags_removed=tags_in(match.group("tags")))
    if match := re.match(
        rf"^(?:tag|label|mark)\s+(?P<ref>.+?)\s+(?:with\s+(?:the\s+)?(?:tags?\s+)?|as\s+|under\s+|:\s*)(?P<tags>{_TAG_LIST})$",
        text,
        re.I,
    ) or re.match(rf"^(?:tag|label)\s+(?P<ref>.+?)\s+(?P<tags>#{_TAG}(?:(?:\s*,\s*|\s+)#{_TAG})*)$", text, re.I):
        if (match.group("ref") and not text.lower().startswith("mark")) or "#" in match.group("tags"):
            return _update(clause, match.group("ref"), tags_added=tags_in(match.group("tags")))
    if match := re.match(
        rf"^(?:add|put|give|attach|apply|stick)\s+(?:the\s+|a\s+)?(?:(?:tags?|labels?)\s+(?P<tags>{_TAG_LIST})|(?P<tag>{_TAG})\s+(?:tag|label))\s+(?:to|on|onto)\s+(?P<ref>.+)$",
        text,
        re.I,
    ):
        return _update(clause, match.group("ref"), tags_added=tags_in(match.group("tags") or match.group("tag")))
    if match := re.match(r"^(?:tag|label)\s+(?P<ref>.+?)\s+(?P<tag>[A-Za-z][\w-]{0,31})$", text, re.I):
        return _update(clause, match.group("ref"), tags_added=tags_in(match.group("tag")))
    return None


# ---------------------------------------------------------------------------------------
# Due dates

_MOVE_VERBS = r"(?:move|push|postpone|reschedule|shift|bump|delay|defer|put off|push back|move back|push out|slide)"
_CONNECTORS = r"(?:to|until|till|til|for|by|on|back to|out to|over to|forward to|into)"


def _read_due(clause: Clause) -> Intent | None:
    text = clause.text
    clear = (
        r"^(?:clear|remove|delete|drop|unset|take off|take away|get rid of|erase|reset)\s+(?:the\s+)?(?:due\s+date|deadline|date|due|due\s+time)\s+"
        r"(?:of|for|on|from|off)\s+(?P<ref>.+)$",
        r"^(?P<ref>.+?)\s+(?:has|have|needs|should have|doesn't have|does not have)\s+(?:no|a)?\s*(?:due\s+date|deadline|date)"
        r"(?:\s+(?:anymore|any more|any longer))?$",
        r"^(?:unschedule|undate)\s+(?P<ref>.+)$",
        r"^(?:take|get)\s+(?:the\s+)?(?:due\s+date|deadline|date)\s+(?:off|off of|away from|out of|from)\s+(?P<ref>.+)$",
        r"^no\s+(?:due\s+date|deadline)\s+(?:for|on)\s+(?P<ref>.+)$",
    )
    for rule in clear:
        if match := re.match(rule, text, re.I):
            if re.search(r"\b(?:has|have|should have)\s+a\b", text, re.I) and not re.search(r"n't|\bnot\b", text, re.I):
                continue  # "X has a deadline" says nothing to clear
            return _update(clause, match.group("ref"), due="")
    explicit = (
        r"^(?:change|set|update|move|make|put)\s+(?:the\s+)?(?:due\s+date|deadline|date|due|due\s+time|time)\s+(?:of|for|on)\s+"
        r"(?P<ref>.+?)\s+(?:to|as|for|at)\s+(?P<due>.+)$",
        r"^(?P<ref>.+?)\s+(?:is|are|'s|should be|will be|needs to be|has to be)\s+(?:now\s+|actually\s+)?due\s+(?P<due>.+)$",
        r"^(?:make|set|mark)\s+(?P<ref>.+?)\s+(?:as\s+)?due\s+(?P<due>.+)$",
        r"^(?:give|set)\s+(?P<ref>.+?)\s+a\s+(?:due\s+date|deadline)\s+(?:of\s+|for\s+|on\s+)?(?P<due>.+)$",
        r"^(?:set|add)\s+(?:a\s+)?(?:due\s+date|deadline)\s+(?:of\s+|for\s+|on\s+)?(?P<due>.+?)\s+(?:for|on|to)\s+(?P<ref>.+)$",
        r"^(?:the\s+)?(?:due\s+date|deadline)\s+(?:of|for)\s+(?P<ref>.+?)\s+(?:is|should be)\s+(?:now\s+)?(?P<due>.+)$",
    )
    for rule in explicit:
        if match := re.match(rule, text, re.I):
            due = match.group("due")
            if clears_due(due):
                return _update(clause, match.group("ref"), due="")
            if is_due_phrase(due):
                return _update(clause, match.group("ref"), due=due_of(due))
    if match := re.match(rf"^{_MOVE_VERBS}\s+(?P<rest>.+)$", text, re.I):
        return _moved(clause, match.group("rest"))
    return None


def _moved(clause: Clause, rest: str) -> Intent | None:
    """ "X to monday" after a move verb: the reference, then the new date (the last place where
    what follows reads as a date)."""
    for match in re.finditer(rf"\s+(?:{_CONNECTORS}\s+)?(?=\S)", rest, re.I):
        due = rest[match.end() :]
        ref = rest[: match.start()]
        if ref and is_due_phrase(due):
            return _update(clause, ref, due=due_of(due))
    return None


# ---------------------------------------------------------------------------------------
# Timezone


@lru_cache(maxsize=1)
def _zones() -> dict[str, str]:
    """Place names -> IANA zones: every zone's city ("lisbon" -> Europe/Lisbon), its full name,
    and the common names people use for zones without a city of their own."""
    zones: dict[str, str] = {}
    for name in zoneinfo.available_timezones():
        if name.startswith(("Etc/", "SystemV/", "posix/", "right/")):
            continue
        zones[name.lower()] = name
        city = name.rsplit("/", 1)[-1].replace("_", " ").lower()
        zones.setdefault(city, name)
    zones.update(_ALIASES)
    return zones


_ALIASES = {
    **dict.fromkeys(
        [
            "pacific",
            "pst",
            "pdt",
            "pt",
            "west coast",
            "california",
            "san francisco",
            "sf",
            "seattle",
            "portland",
            "la",
            "san diego",
            "las vegas",
        ],
        "America/Los_Angeles",
    ),
    **dict.fromkeys(
        [
            "eastern",
            "est",
            "edt",
            "et",
            "east coast",
            "nyc",
            "boston",
            "washington",
            "dc",
            "washington dc",
            "miami",
            "atlanta",
            "philadelphia",
            "new york city",
        ],
        "America/New_York",
    ),
    **dict.fromkeys(["central", "cst", "cdt", "texas", "dallas", "houston", "austin"], "America/Chicago"),
    **dict.fromkeys(["mountain", "mst", "mdt", "colorado", "salt lake city"], "America/Denver"),
    **dict.fromkeys(["uk", "england", "britain", "great britain", "scotland", "wales", "gmt", "bst"], "Europe/London"),
    **dict.fromkeys(["utc", "zulu", "universal"], "UTC"),
    "portugal": "Europe/Lisbon",
    "porto": "Europe/Lisbon",
    "spain": "Europe/Madrid",
    "barcelona": "Europe/Madrid",
    "france": "Europe/Paris",
    "germany": "Europe/Berlin",
    "munich": "Europe/Berlin",
    "italy": "Europe/Rome",
    "milan": "Europe/Rome",
    "netherlands": "Europe/Amsterdam",
    "holland": "Europe/Amsterdam",
    "ireland": "Europe/Dublin",
    "poland": "Europe/Warsaw",
    "greece": "Europe/Athens",
    "switzerland": "Europe/Zurich",
    "cet": "Europe/Paris",
    "japan": "Asia/Tokyo",
    "osaka": "Asia/Tokyo",
    "india": "Asia/Kolkata",
    "mumbai": "Asia/Kolkata",
    "delhi": "Asia/Kolkata",
    "new delhi": "Asia/Kolkata",
    "bangalore": "Asia/Kolkata",
    "ist": "Asia/Kolkata",
    "china": "Asia/Shanghai",
    "beijing": "Asia/Shanghai",
    "korea": "Asia/Seoul",
    "south korea": "Asia/Seoul",
    "australia": "Australia/Sydney",
    "brazil": "America/Sao_Paulo",
    "rio": "America/Sao_Paulo",
    "mexico": "America/Mexico_City",
    "canada": "America/Toronto",
    "montreal": "America/Toronto",
    "israel": "Asia/Jerusalem",
    "tel aviv": "Asia/Jerusalem",
    "uae": "Asia/Dubai",
    "egypt": "Africa/Cairo",
    "nigeria": "Africa/Lagos",
    "kenya": "Africa/Nairobi",
    "south africa": "Africa/Johannesburg",
    "cape town": "Africa/Johannesburg",
    "new zealand": "Pacific/Auckland",
    "hawaii": "Pacific/Honolulu",
    "alaska": "America/Anchorage",
    "arizona": "America/Phoenix",
    "singapore": "Asia/Singapore",
}


def zone_of(place: str) -> str:
    """The IANA zone of a place or zone name ("" when unknown)."""
    key = re.sub(r"\s+", " ", place.lower().strip(" .!?,")).removeprefix("the ")
    key = re.sub(r"\s+(?:time|time ?zone|standard time|daylight time)$", "", key)
    return _zones().get(key, "") or _zones().get(key.replace(" ", "_"), "")


def _read_timezone(clause: Clause) -> Intent | None:
    text = clause.text.strip(" .!")
    explicit = (
        r"^(?:my|our)\s+(?:time\s*zone|tz)\s+(?:is|=|:|should be)\s*(?P<place>.+)$",
        r"^(?:set|change|switch|update|make|put)\s+(?:my\s+|the\s+|our\s+)?(?:time\s*zone|tz)\s+(?:to|as|=|:)?\s*(?P<place>.+)$",
        r"^(?:use|switch to|go by)\s+(?P<place>.+?)\s+time(?:\s*zone)?$",
        r"^(?:i'?m|i am|we'?re|we are)\s+on\s+(?P<place>.+?)\s+time$",
        r"^(?:time\s*zone|tz)\s*(?::|=|is)?\s*(?P<place>.+)$",
    )
    for rule in explicit:
        if match := re.match(rule, text, re.I):
            place = match.group("place")
            return Intent("timezone", timezone=zone_of(place), text=place)
    implied = (
        r"^(?:i'?m|i am|we'?re|we are)\s+(?:currently\s+|now\s+|actually\s+)?(?:in|based in|living in|staying in|located in)\s+"
        r"(?P<place>.+?)(?:\s+(?:now|right now|these days|this week|at the moment|for now|for a while|currently))?$",
        r"^(?:i|we)\s+(?:live|am based|'m based|moved|relocated|just moved|have moved|'ve moved|am moving|'m moving|work|"
        r"am staying|'m staying|am now)\s+(?:in|to)\s+(?P<place>.+?)(?:\s+now)?$",
    )
    for rule in implied:
        if (match := re.match(rule, text, re.I)) and (zone := zone_of(match.group("place"))):
            return Intent("timezone", timezone=zone, text=match.group("place"))
    return None


# ---------------------------------------------------------------------------------------
# Reading a clause


def read_plan(clause: Clause) -> Intent | None:
    """A planning change to tasks, or a timezone; None when the clause is none of them."""
    return _read_timezone(clause) or _read_due(clause) or _read_priority(clause) or _read_tags(clause)


def _update(
    clause: Clause,
    ref_text: str,
    due: str | None = None,
    priority: str | None = None,
    tags_added: tuple[str, ...] = (),
    tags_removed: tuple[str, ...] = (),
    clear_tags: bool = False,
) -> Intent | None:
    if re.match(r"^(?:which|what|how|any|are|do|does|show|list)\b", ref_text.strip(), re.I):
        return None  # "which tasks have no due date" asks for a list
    refs = parse_refs(ref_text, clause.quoted)
    if not refs or (refs[0].kind == "title" and re.fullmatch(r"(?:i|we|you|me|us)", refs[0].words, re.I)):
        return None
    return Intent(
        "update",
        refs=refs,
        due=due,
        priority=priority,
        tags_added=tags_added,
        tags_removed=tags_removed,
        clear_tags=clear_tags,
        text=clause.text,
    )


# ---------------------------------------------------------------------------------------
# The planning words of a new task

_ADD_PRIORITY_END = re.compile(
    r"[\s,;(-]+(?:(?:it's|its|it is|this is|that's|mark(?:ed)?(?: it)?(?: as)?|as|with|at|make it|set(?: it)? to)\s+)?"
    r"(?P<p>(?:a\s+)?(?:high|top|low|medium|normal)[- ]priority|priority\s*(?::|=)?\s*(?:high|low|medium)|urgent|asap|important|"
    r"super urgent|very important|not urgent)\)?[!.]*$",
    re.I,
)
_ADD_PRIORITY_START = re.compile(
    r"^(?P<p>(?:high|top|low|medium)[- ]priority|urgent|important|asap)\s*(?::|-|,|!)\s*(?=\S)", re.I
)
_ADD_TAGS_END = re.compile(
    rf"[\s,;(-]+(?:tagged|tag(?:ged)? (?:as|with)|with (?:the )?tags?|tags?\s*:|labell?ed)\s+(?P<tags>{_TAG_LIST})\)?$",
    re.I,
)
# Tags written as hashtags at the end ("buy milk #errands #home"); one inside the title
# ("prepare #q3 review") is part of it.
_HASHTAGS_END = re.compile(r"(?:\s+#[A-Za-z][\w-]{0,31})+\s*$")


def priority_and_tags(title: str) -> tuple[str, str | None, tuple[str, ...]]:
    """A new task's title without the priority and tags said with it ("pay rent, urgent #home")."""
    priority: str | None = None
    tags: tuple[str, ...] = ()
    for _ in range(2):  # either order: "#home, urgent" or "urgent #home"
        if (match := _ADD_PRIORITY_END.search(title)) and title[: match.start()].strip():
            priority, title = priority_of(match.group("p")), title[: match.start()]
        elif match := _ADD_PRIORITY_START.match(title):
            priority, title = priority_of(match.group("p")), title[match.end() :]
        if match := _ADD_TAGS_END.search(title):
            tags, title = (*tags, *tags_in(match.group("tags"))), title[: match.start()]
        if (match := _HASHTAGS_END.search(title)) and title[: match.start()].strip():
            tags, title = (*tags, *tags_in(match.group(0))), title[: match.start()]
    return title.strip(" ,;-"), priority, tuple(dict.fromkeys(tags))


def add_planning(title: str, priority: str | None = None, tags: tuple[str, ...] = ()) -> Intent:
    """A new task's title without its planning words: Intent(title=the title with its date
    words, plain_title=without them, due, priority, tags_added). Quoted text is never read
    (it is still a placeholder here)."""
    title, own_priority, own_tags = priority_and_tags(title)
    plain, due = split_due(title)
    return Intent(
        "add",
        title=title,
        plain_title=plain.strip(" ,;-"),
        due=due or None,
        priority=own_priority or priority,
        tags_added=tuple(dict.fromkeys([*tags, *own_tags])),
    )
