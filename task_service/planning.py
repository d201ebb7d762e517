"""Planning: due phrases -> dates in the user's timezone, and the checks of every planning field
and list filter (each failure an InvalidArgument naming its field).

Phrases ("tomorrow", "next friday 5pm", "in 3 days", "dec 24") are read by dateparser, never
by patterns of our own, relative to the current wall-clock time in the user's zone and
preferring future dates ("friday" is the coming one). dateparser's first call loads its
language data (a few hundred ms), so `warm_up()` runs at service start; after that a call takes
about 1-2 ms, and an LRU cache keyed by the phrase and the local minute saves even that for
repeats (the result depends on nothing else).
"""

from __future__ import annotations

import functools
import json
import re
import zoneinfo
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta

from dateparser.date import DateDataParser  # imported once, at start: the import itself is slow

from common.errors import InvalidArgument
from task_service.models import TaskRow

PRIORITIES = ("none", "low", "medium", "high")
PRIORITY_RANK = {"high": 0, "medium": 1, "low": 2, "none": 3}  # sort=priority: high first
STATUS_FILTERS = ("all", "pending", "completed")
DUE_FILTERS = ("today", "overdue", "upcoming", "scheduled", "none")
SORTS = ("created", "due", "priority", "updated")
UPCOMING_DAYS = 7
MAX_TAGS = 10
TAG_MAX = 32
DUE_PHRASE_MAX = 100
QUERY_MAX = 200
DEFAULT_TIMEZONE = "UTC"
PHRASE_EXAMPLES = '"tomorrow", "next friday 5pm", "in 3 days", "dec 24" or "2026-12-24"'

# The formats of the due_date / due_time fields themselves (not phrases): checked before the
# calendar, so that "2026-02-30" is reported as an impossible date rather than unreadable.
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIME = re.compile(r"([0-9]{1,2}):([0-9]{2})")

# dateparser's timestamp and no-spaces parsers would read "1700000000" or "20261224" as dates.
_DATEPARSER_SETTINGS = {
    "PREFER_DATES_FROM": "future",
    "RETURN_TIME_AS_PERIOD": True,  # period "time" tells that the phrase named a time of day
    "PARSERS": ["relative-time", "custom-formats", "absolute-time"],
}
_TIMED_PERIODS = ("time", "part_of_day")  # "5pm", "noon", "tonight"


# --- fields ------------------------------------------------------------------------------


def due_date(value: str, field: str = "due_date") -> str:
    """ "YYYY-MM-DD" checked against the calendar, or "" (none)."""
    text = value.strip()
    if not text:
        return ""
    if not _ISO_DATE.fullmatch(text):
        raise InvalidArgument(f"{field} must be a date as YYYY-MM-DD, e.g. 2026-12-24")
    try:
        date.fromisoformat(text)
    except ValueError as error:
        raise InvalidArgument(f"{field}: {text} is not a real date") from error
    return text


def due_time(value: str) -> str:
    """ "HH:MM" (24 h; "9:30" is read as "09:30"), or "" (all day)."""
    text = value.strip()
    if not text:
        return ""
    match = _TIME.fullmatch(text)
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise InvalidArgument("due_time must be a time as HH:MM (24 h), e.g. 17:30")
    return f"{int(match[1]):02d}:{match[2]}"


def priority(value: str, field: str = "priority") -> str:
    """One of PRIORITIES (any case); "" means "none"."""
    text = value.strip().lower() or "none"
    if text not in PRIORITIES:
        raise InvalidArgument(f"{field} must be one of: {', '.join(PRIORITIES)}")
    return text


def tag(value: str, field: str = "tags") -> str:
    """One tag, lower-cased: 1..32 letters, digits, "-" or "_" (a leading "#" is dropped)."""
    text = value.strip().removeprefix("#")
    if not text or not all(char.isalpha() or char.isdecimal() or char in "-_" for char in text):
        raise InvalidArgument(f"{field}: {value[:40]!r} is not a tag (1..{TAG_MAX} letters, digits, - or _)")
    if len(text) > TAG_MAX:
        raise InvalidArgument(f"{field}: a tag is at most {TAG_MAX} characters")
    return text.lower()


def tags(values: list[str]) -> tuple[str, ...]:
    """Distinct tags in the order given (duplicates, after lower-casing, are dropped); at most 10."""
    distinct = list(dict.fromkeys(tag(value) for value in values))
    if len(distinct) > MAX_TAGS:
        raise InvalidArgument(f"tags: at most {MAX_TAGS} tags per task")
    return tuple(distinct)


# --- timezones -----------------------------------------------------------------------------


@functools.cache
def _zone_names() -> dict[str, str]:
    # From the tzdata package when the system has no zoneinfo (slim containers).
    return {name.casefold(): name for name in zoneinfo.available_timezones()}


def timezone(value: str) -> str:
    """An IANA zone name in its canonical spelling ("europe/paris" -> "Europe/Paris")."""
    name = _zone_names().get(value.strip().casefold())
    if name is None:
        raise InvalidArgument("timezone must be an IANA timezone name, e.g. America/Los_Angeles or UTC")
    return name


def local_now(zone: str, now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(zoneinfo.ZoneInfo(zone))


def today(zone: str, now: datetime | None = None) -> date:
    """The user's today: "today", "overdue" and "upcoming" are days of their calendar."""
    return local_now(zone, now).date()


# --- due phrases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Due:
    """What a due phrase resolved to: a date ("" clears it) and, if the phrase named one, a time."""

    date: str
    time: str | None = None


def read_due(phrase: str, zone: str, now: datetime | None = None) -> Due:
    """The phrase read in `zone` at `now`; InvalidArgument naming `due` if it can't be read."""
    text = " ".join(phrase.split())
    if not text:
        return Due("")
    if len(text) > DUE_PHRASE_MAX:
        raise InvalidArgument(f"due must be at most {DUE_PHRASE_MAX} characters")
    if _ISO_DATE.fullmatch(text):
        return Due(due_date(text, "due"))
    # A bare number is no date ("3" would become some 3rd, a big one a timestamp).
    parsed = None if text.isdecimal() else _parse(text.casefold(), _relative_base(zone, now))
    if parsed is None:
        raise InvalidArgument(f"due: can't read {text[:60]!r} as a date; try {PHRASE_EXAMPLES}")
    return parsed


def _relative_base(zone: str, now: datetime | None) -> datetime:
    # Naive wall-clock time of the user, to the minute. The 30 s keep dateparser from taking a
    # named time equal to the current one ("10am" at 10:00) for no time at all.
    return local_now(zone, now).replace(tzinfo=None, second=30, microsecond=0)


@functools.lru_cache(maxsize=4096)
def _parse(text: str, base: datetime) -> Due | None:
    try:
        parser = DateDataParser(languages=["en"], settings={**_DATEPARSER_SETTINGS, "RELATIVE_BASE": base})
        data = parser.get_date_data(text)
    except Exception:  # dateparser can raise on odd input (overflows, bad ranges): unreadable
        return None
    moment = data.date_obj
    if moment is None:
        return None
    named_time = f"{moment.hour:02d}:{moment.minute:02d}" if data.period in _TIMED_PERIODS else None
    return Due(moment.date().isoformat(), named_time)


def warm_up() -> None:
    """Load dateparser's language data now, not in the first user's request."""
    read_due("next friday 5pm", DEFAULT_TIMEZONE)
    _zone_names()


# --- applying a change ---------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """The fields a create or update sets (None: not given), validated but not yet applied.

    Dates meet the task here: a task moved to another day keeps its time unless the change
    names one, clearing the date clears the time, and a time needs a date.
    """

    title: str | None = None
    description: str | None = None
    due_date: str | None = None
    due_time: str | None = None
    priority: str | None = None
    tags: tuple[str, ...] | None = None

    def apply(self, task: TaskRow) -> TaskRow:
        new_date = task.due_date if self.due_date is None else self.due_date
        if self.due_time is not None:
            new_time = self.due_time
        elif self.due_date == "":
            new_time = ""
        else:
            new_time = task.due_time
        if new_time and not new_date:
            raise InvalidArgument("due_time needs a due date (give due_date or due too)")
        return TaskRow(
            id=task.id,
            title=task.title if self.title is None else self.title,
            description=task.description if self.description is None else self.description,
            completed=task.completed,
            created_at=task.created_at,
            updated_at=task.updated_at,
            due_date=new_date,
            due_time=new_time,
            priority=task.priority if self.priority is None else self.priority,
            tags=task.tags if self.tags is None else self.tags,
            completed_at=task.completed_at,
        )


def due_change(
    phrase: str | None, date_field: str | None, time_field: str | None, zone: str
) -> tuple[str | None, str | None]:
    """(due_date, due_time) of a Change from the request's `due`, `due_date` and `due_time`."""
    if phrase is not None and date_field is not None:
        raise InvalidArgument("due: give either due (a phrase) or due_date, not both")
    new_date = None if date_field is None else due_date(date_field)
    new_time = None
    if phrase is not None:
        resolved = read_due(phrase, zone)
        new_date, new_time = resolved.date, resolved.time
    if time_field is not None:
        new_time = due_time(time_field)
    return new_date, new_time


# --- listing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListQuery:
    """A task list's filters and order, validated. `key()` binds page tokens to all of it."""

    status: str = "all"
    words: tuple[str, ...] = ()
    tag: str = ""
    priority: str = ""
    due: str = ""
    sort: str = "created"

    def key(self) -> str:
        return "tasks:" + json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def needs_today(self) -> bool:
        return self.due in ("today", "overdue", "upcoming")


def list_query(status: str, q: str, tag_filter: str, priority_filter: str, due: str, sort: str) -> ListQuery:
    return ListQuery(
        status=_choice(status, STATUS_FILTERS, "status") or "all",
        words=search_words(q),
        tag=tag(tag_filter, "tag") if tag_filter.strip() else "",
        priority=priority(priority_filter) if priority_filter.strip() else "",
        due=_choice(due, DUE_FILTERS, "due"),
        sort=_choice(sort, SORTS, "sort") or "created",
    )


def _choice(value: str, allowed: tuple[str, ...], field: str) -> str:
    text = value.strip().lower()
    if text and text not in allowed:
        raise InvalidArgument(f"{field} must be one of: {', '.join(allowed)}")
    return text


def search_words(q: str) -> tuple[str, ...]:
    if "\x00" in q:
        raise InvalidArgument("q must not contain NUL characters")
    if len(q) > QUERY_MAX:
        raise InvalidArgument(f"q must be at most {QUERY_MAX} characters")
    return tuple(dict.fromkeys(word.casefold() for word in q.split()))


def search_text(title: str, description: str) -> str:
    """What `q` matches against (models.tasks.search_text)."""
    return title.casefold() + "\n" + description.casefold()


def upcoming_window(day: date) -> tuple[str, str]:
    """ "upcoming": tomorrow through UPCOMING_DAYS days from today, as due_date bounds."""
    return (day + timedelta(days=1)).isoformat(), (day + timedelta(days=UPCOMING_DAYS)).isoformat()
