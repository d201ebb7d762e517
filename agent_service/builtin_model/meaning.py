"""What reading a message yields: intents, and the references to tasks they carry."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent_service.builtin_model.reading import restore


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
    # For kind "all", a class of tasks: those whose titles match `words`, or those a
    # list_tasks filter picks ({"due": "today"}, {"tag": "errands"}), as (name, value) pairs.
    filters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Intent:
    # add | list | show | complete | delete | update | reopen | undo | timezone | help | greet |
    # thanks | empty_add | unknown | remark (words that ask for nothing: "it went well")
    kind: str
    title: str = ""
    description: str | None = None
    status: str = "all"
    refs: tuple[Ref, ...] = ()
    text: str = ""  # the clause as written (for unknown / follow-up questions)
    # Planning. For add: `title` keeps the date words (for tools without due dates) and
    # `plain_title` is the title without them, `due` the date phrase ("tomorrow at 6pm").
    # For update: `due` is the new phrase, "" to clear it; None means "not mentioned".
    plain_title: str = ""
    due: str | None = None
    priority: str | None = None  # none | low | medium | high
    tags_added: tuple[str, ...] = ()
    tags_removed: tuple[str, ...] = ()
    clear_tags: bool = False
    filters: tuple[tuple[str, str], ...] = ()  # for list: list_tasks filters (query, due, tag, priority, sort)
    timezone: str = ""  # for timezone: the IANA name ("" when the place is unknown)
    items: tuple[Intent, ...] = ()  # for an add of several tasks ("add eggs and milk"): one add each


ACTIONS = ("complete", "delete", "update", "show")


@dataclass
class Clause:
    text: str  # with quotes swapped for placeholders, filler stripped, verb typo fixed
    quoted: list[str] = field(default_factory=list)

    def title(self, raw: str) -> str:
        return restore(raw, self.quoted).strip()
