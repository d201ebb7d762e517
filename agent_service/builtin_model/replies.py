"""The built-in model's sentences: confirmations, lists, questions, honest errors, help.

Lists are printed one task a line as "<task number>. <title>" (" (done)" when completed),
the same shape in every answer, because later turns read them back: "the second one" is
the second line of the last list the user saw.
"""

from __future__ import annotations

import re
from typing import Any

from agent_service.builtin_model.language import Intent, capitalize

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


_VERB = {"complete": "mark as complete", "delete": "delete", "update": "update", "show": "see"}


def chat(intent: Intent) -> str:
    if intent.kind == "greet":
        return GREETING
    if intent.kind == "thanks":
        return THANKS
    if intent.kind == "help":
        return HELP
    if intent.kind == "cancelled":
        return CANCELLED
    if intent.kind == "uncomplete":
        return "I can't mark a task as not done: I can only add, list, complete, update and delete tasks."
    if intent.kind == "empty_add":
        return 'What should the new task say? For example: "Add a task to buy groceries".'
    if intent.kind == "bulk_refused":
        return (
            "I didn't change all those tasks: to delete or complete all of them at once, ask for just that on its own."
        )
    if intent.kind == "undo":
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
            text = f"Task {task_id}: {task.get('title', '')} ({state})."
            if task.get("description"):
                text += f"\nDescription: {task['description']}"
            return text
    return f"I couldn't find task {task_id}."


def _line(task: dict[str, Any]) -> str:
    return f"{task.get('id')}. {task.get('title', '')}{' (done)' if task.get('completed') else ''}"


def _sentence_title(title: str) -> str:
    return title if re.search(r"[.!?]$", title) else title + "."


def outcome(event: Any) -> str:
    """One sentence about one tool call: what was done, or why it was not."""
    arguments = event.arguments
    if event.error is not None:
        return _failure(event.name, arguments, event.error)
    result = event.result if isinstance(event.result, dict) else {}
    task_id, title = result.get("task_id", arguments.get("task_id", "?")), str(result.get("title", ""))
    if event.name == "add_task":
        return f"Added task {task_id}: {_sentence_title(title)}"
    if event.name == "complete_task":
        return f"Marked task {task_id} as complete: {_sentence_title(title)}"
    if event.name == "delete_task":
        return f"Deleted task {task_id}: {_sentence_title(title)}"
    if event.name == "update_task":
        if "title" not in arguments and "description" in arguments:
            return f"Updated the description of task {task_id} ({title})."
        return f"Updated task {task_id}: {_sentence_title(title)}"
    return ""


def _failure(name: str, arguments: dict[str, Any], error: str) -> str:
    task_id = arguments.get("task_id")
    if "not found" in error.lower() or "no such" in error.lower() or "not_found" in error.lower():
        return f"I couldn't find task {task_id}." if task_id is not None else f"I couldn't find that task ({error})."
    if name == "add_task":
        return f"I couldn't add '{arguments.get('title', '')}': {error}."
    verb = {"complete_task": "complete", "delete_task": "delete", "update_task": "update"}.get(name, name)
    return f"I couldn't {verb} task {task_id}: {error}."


def listing(event: Any) -> str:
    """A list_tasks result as the answer shows it."""
    status = str(event.arguments.get("status", "all"))
    if event.error is not None:
        return f"I couldn't get your tasks: {event.error}."
    tasks = [task for task in event.result or [] if isinstance(task, dict)]
    adjective = {"pending": "pending ", "completed": "completed "}.get(status, "")
    if not tasks:
        return f"You have no {adjective}tasks."
    noun = "task" if len(tasks) == 1 else "tasks"
    header = f"You have {len(tasks)} {adjective}{noun}"
    if status == "all":
        done = sum(1 for task in tasks if task.get("completed"))
        if done:
            header += f" ({done} completed)"
    return header + ":\n" + "\n".join(_line(task) for task in tasks)
