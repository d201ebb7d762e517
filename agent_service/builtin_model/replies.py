"""The built-in model's sentences: confirmations, lists, questions, honest errors, help.

Lists are printed one task a line as "<task number>. <title>" (" (done)" when completed),
the same shape in every answer, because later turns read them back: "the second one" is
the second line of the last list the user saw.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from agent_service.builtin_model.meaning import Intent
from agent_service.builtin_model.reading import capitalize

WHICH_ONE = "Which one do you want to"

HELP = (
    "I'm your todo assistant. I can add tasks, show your list (all, pending or completed), "
    "mark tasks as complete, rename or update them, and delete them. Try: "
    '"Add a task to buy groceries", "What\'s pending?", "Mark task 3 as complete" or "Delete the meeting task".'
)
GREETING = "Hi! " + HELP
THANKS = "You're welcome! Anything else for your list?"
CANCELLED = "OK, I left your tasks as they are."
SMALL_TALK = {HELP, GREETING, THANKS}

CONFIRM_ADDS = re.compile(r"^Add these (?P<count>\d+) tasks\?", re.M)
SHOULD_I_ADD = re.compile(r'^Should I add "(?P<title>.+)" as a task\? ', re.M)
SAY_YES = 'Say "yes" to add it.'
_NOT_A_TITLE = re.compile(
    r"^(?:what|who|whom|why|how|when|where|which|whose|is|are|am|was|were|do|does|did|can|could|will|would|should|shall|"
    r"tell|i|i'm|im|you|your|you're|it|it's|that|this|there|please|hi|hello|hey|no|yes|ok|okay|lol|haha|hmm)\b",
    re.I,
)


def looks_like_a_title(text: str) -> bool:
    """A short phrase such as "Groceries" or "Dentist on Friday": maybe a task, so offer to add it."""
    words = text.split()
    return (
        1 <= len(words) <= 6
        and "?" not in text
        and not _NOT_A_TITLE.match(text)
        and bool(re.search(r"[A-Za-z]{3}", text))
    )


_VERB = {
    "complete": "mark as complete",
    "delete": "delete",
    "update": "update",
    "show": "see",
    "reopen": "mark as not done",
}


def chat(intent: Intent) -> str:
    if intent.kind == "greet":
        return GREETING
    if intent.kind == "thanks":
        return THANKS
    if intent.kind == "help":
        return HELP
    if intent.kind == "cancelled":
        return CANCELLED
    if intent.kind == "reopen":
        return "I can't mark a task as not done: I can only add, list, complete, update and delete tasks."
    if intent.kind == "timezone":
        return (
            f"I don't know the time zone of '{intent.text}'. Tell me a city (\"I'm in Lisbon\") "
            'or a zone name ("Europe/Lisbon").'
        )
    if intent.kind == "no_planning":
        return "I can't set due dates, priorities or tags with the tools I have here."
    if intent.kind == "empty_add":
        return 'What should the new task say? For example: "Add a task to buy groceries".'
    if intent.kind == "bulk_refused":
        return (
            "I didn't change all those tasks: to delete or complete all of them at once, ask for just that on its own."
        )
    if intent.kind == "undo":  # only without an undo tool
        return "I can't undo earlier changes, but I can add, complete, update or delete tasks: just tell me what to change."
    if intent.kind == "unknown" and looks_like_a_title(intent.text):
        return f'Should I add "{capitalize(intent.text)}" as a task? {SAY_YES}'
    if intent.kind == "unknown":
        shown = intent.text if len(intent.text) <= 60 else intent.text[:57] + "..."
        return f'I\'m not sure what you mean by "{shown}". ' + HELP.replace("I'm your todo assistant. ", "")
    return ""


def which_task() -> str:
    return "Which task do you mean (its number, or some words from its title)?"


def no_task_called(words: str) -> str:
    return f"You have no task called '{words}'."


def no_position(position: int, size: int) -> str:
    if size == 0:
        return "That list is empty, so there's no task to pick."
    place = "last" if position == -1 else f"#{position}" if position > 0 else "that"
    return f"There's no {place} task in that list: it has {size} task{'s' if size != 1 else ''}."


def nothing_to(kind: str, status: str) -> str:
    adjective = {"pending": "pending ", "completed": "completed "}.get(status, "")
    return f"You have no {adjective}tasks to {_VERB.get(kind, kind)}."


def which_one(words: str, tasks: list[dict[str, Any]], intent: Intent) -> str:
    lines = "\n".join(_line(task) for task in tasks)
    return (
        f"I found {len(tasks)} tasks matching '{words}':\n{lines}\n{WHICH_ONE} {_VERB.get(intent.kind, intent.kind)}?"
    )


def update_what(task_id: int) -> str:
    return f"What should I change task {task_id} to? For example: \"Change task {task_id} to 'Call mom tonight'\"."


def lookup_failed(error: str) -> str:
    return f"I couldn't look up your tasks right now ({error}), so I didn't change anything."


def show(task_id: int, tasks: list[dict[str, Any]]) -> str:
    for task in tasks:
        if int(task.get("id", 0)) == task_id:
            state = "completed" if task.get("completed") else "pending"
            details = "".join(f", {detail}" for detail in planning_details(task))
            text = f"Task {task_id}: {task.get('title', '')} ({state}{details})."
            if task.get("description"):
                text += f"\nDescription: {task['description']}"
            return text
    return f"I couldn't find task {task_id}."


def _line(task: dict[str, Any]) -> str:
    details = planning_details(task)
    return f"{task.get('id')}. {task.get('title', '')}{' (done)' if task.get('completed') else ''}" + (
        f" [{'; '.join(details)}]" if details else ""
    )


def _sentence_title(title: str) -> str:
    return title if re.search(r"[.!?]$", title) else title + "."


def outcome(event: Any) -> str:
    """One sentence about one tool call: what was done, or why it was not."""
    arguments = event.arguments
    if event.error is not None:
        return _failure(event.name, arguments, event.error)
    result = event.result if isinstance(event.result, dict) else {}
    task_id, title = result.get("task_id", arguments.get("task_id", "?")), str(result.get("title", ""))
    if isinstance(result.get("results"), list):
        return _batch_outcome(event.name, result["results"])
    details = planning_details(result)
    if event.name == "add_task":
        return f"Added task {task_id}: {_with_details(title, details)}"
    if event.name == "complete_task":
        return f"Marked task {task_id} as complete: {_sentence_title(title)}"
    if event.name == "delete_task":
        return f"Deleted task {task_id}: {_sentence_title(title)}"
    if event.name == "update_task":
        return _update_outcome(task_id, title, arguments, result)
    if event.name == "reopen_task":
        return f"Marked task {task_id} as not done: {_sentence_title(title)}"
    if event.name == "undo_last_change":
        return _undo_outcome(result)
    if event.name == "set_timezone":
        return f"Your timezone is now {result.get('timezone', arguments.get('timezone', ''))}."
    return ""


def _update_outcome(task_id: Any, title: str, arguments: dict[str, Any], result: dict[str, Any]) -> str:
    changed = set(arguments) - {"task_id"}
    if changed == {"description"}:
        return f"Updated the description of task {task_id} ({title})."
    if changed == {"due"}:
        due = due_text(result)
        return f"Moved task {task_id} ({title}) to {due}." if due else f"Task {task_id} ({title}) has no due date now."
    if changed == {"priority"}:
        priority = str(result.get("priority", arguments["priority"]))
        if priority == "none":
            return f"Task {task_id} ({title}) has no priority now."
        return f"Set task {task_id} ({title}) to {priority} priority."
    if changed == {"tags"}:
        tags = result.get("tags", arguments["tags"]) or []
        if not tags:
            return f"Task {task_id} ({title}) has no tags now."
        return f"Task {task_id} ({title}) is tagged {', '.join(str(tag) for tag in tags)} now."
    return f"Updated task {task_id}: {_with_details(title, planning_details(result))}"


def _undo_outcome(result: dict[str, Any]) -> str:
    task_id, title = result.get("task_id"), result.get("title", "")
    if task_id is None:
        return "I undid your last change."
    status = str(result.get("status", "")).lower()
    if status in ("deleted", "removed"):
        return f"Undone: task {task_id} ({title}) is removed again."
    if status in ("restored", "created"):
        return f"Undone: task {task_id} ({title}) is back."
    return f"Undone: task {task_id} is back to how it was ({title})."


def _batch_outcome(name: str, results: list[Any]) -> str:
    done = [r for r in results if isinstance(r, dict) and "error" not in r]
    failed = [r for r in results if isinstance(r, dict) and "error" in r]
    verb = {"complete_task": "Marked as complete", "delete_task": "Deleted"}.get(name, "Changed")
    numbers = ", ".join(str(r.get("task_id")) for r in done)
    text = f"{verb}: {len(done)} task{'s' if len(done) != 1 else ''} ({numbers})." if done else ""
    if failed:
        missing = ", ".join(str(r.get("task_id")) for r in failed)
        text += f" I couldn't change task{'s' if len(failed) != 1 else ''} {missing}."
    return text.strip()


_WEEKDAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def due_text(task: dict[str, Any]) -> str:
    """The due date a tool returned, as the answer shows it: "Fri 2026-12-04" (" at 18:00")."""
    due_date = str(task.get("due_date") or "")
    if not due_date:
        return ""
    try:
        text = f"{_WEEKDAY_NAMES[dt.date.fromisoformat(due_date).weekday()]} {due_date}"
    except ValueError:
        text = due_date
    if task.get("due_time"):
        text += f" at {task['due_time']}"
    return text


def planning_details(task: dict[str, Any]) -> list[str]:
    """Due date, priority and tags of a task, when set."""
    details = []
    if due := due_text(task):
        details.append(f"due {due}")
    if task.get("priority") and task.get("priority") != "none":
        details.append(f"{task['priority']} priority")
    if tags := task.get("tags"):
        details.append("tagged " + ", ".join(str(tag) for tag in tags))
    return details


def _with_details(title: str, details: list[str]) -> str:
    if not details:
        return _sentence_title(title)
    return f"{title.rstrip('.')} ({'; '.join(details)})."


def kept_date_in_title(due: str) -> str:
    return f'(I couldn\'t read "{due}" as a date, so I kept it in the title.)'


def confirm_adds(titles: list[str], limit: int) -> str:
    """The question before adding many tasks at once."""
    preview = ", ".join(f'"{title}"' for title in titles[:3])
    more = f" and {len(titles) - 3} more" if len(titles) > 3 else ""
    if len(titles) > limit:
        return (
            f"Add these {limit} tasks? Your message lists {len(titles)} ({preview}{more}); I add at most {limit} "
            f'at a time, so I\'d add the first {limit}. Say "yes" to add them.'
        )
    return f'Add these {len(titles)} tasks? {preview}{more}. Say "yes" to add them.'


def _failure(name: str, arguments: dict[str, Any], error: str) -> str:
    task_id = arguments.get("task_id")
    if name == "undo_last_change":
        return (
            "There's nothing to undo."
            if "nothing" in error.lower() or "not found" in error.lower()
            else (f"I couldn't undo: {error}.")
        )
    if name == "set_timezone":
        return f"I couldn't set your timezone to {arguments.get('timezone', '')}: {error}."
    if "not found" in error.lower() or "no such" in error.lower() or "not_found" in error.lower():
        return f"I couldn't find task {task_id}." if task_id is not None else f"I couldn't find that task ({error})."
    if name == "add_task":
        return f"I couldn't add '{arguments.get('title', '')}': {error}."
    verb = {"complete_task": "complete", "delete_task": "delete", "update_task": "update", "reopen_task": "reopen"}.get(
        name, name
    )
    return f"I couldn't {verb} task {task_id}: {error}."


def listing(event: Any) -> str:
    """A list_tasks result as the answer shows it."""
    if event.error is not None:
        return f"I couldn't get your tasks: {event.error}."
    tasks = [task for task in event.result or [] if isinstance(task, dict)]
    return list_block(event.arguments, tasks)


_DUE_VIEWS = {
    "today": "due today",
    "overdue": "overdue",
    "upcoming": "coming up in the next 7 days",
    "week": "due this week",
    "scheduled": "with a due date",
    "none": "without a due date",
}


def list_block(arguments: dict[str, Any], tasks: list[dict[str, Any]]) -> str:
    """A list as the answer shows it: a header naming the filter, then one task a line."""
    status = str(arguments.get("status", "all"))
    adjective = {"pending": "pending ", "completed": "completed "}.get(status, "")
    due = str(arguments.get("due", ""))
    if due == "overdue":
        adjective = "overdue "
    qualifiers = [] if due in ("", "overdue") else [_DUE_VIEWS.get(due, f"due {due}")]
    if arguments.get("tag"):
        qualifiers.append(f"tagged {arguments['tag']}")
    if arguments.get("priority"):
        adjective += f"{arguments['priority']}-priority "
    if arguments.get("query"):
        qualifiers.append(f"matching '{arguments['query']}'")
    tail = (" " + " and ".join(qualifiers)) if qualifiers else ""
    if not tasks:
        return f"You have no {adjective}tasks{tail}."
    noun = "task" if len(tasks) == 1 else "tasks"
    header = f"You have {len(tasks)} {adjective}{noun}{tail}"
    if status == "all" and not due:
        done = sum(1 for task in tasks if task.get("completed"))
        if done:
            header += f" ({done} completed)"
    return header + ":\n" + "\n".join(_line(task) for task in tasks)
