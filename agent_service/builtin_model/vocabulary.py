"""Words that several intent rules share."""

from __future__ import annotations

STATUS_DONE = r"(?:done|complete|completed|finished|checked(?: off)?|ticked(?: off)?|resolved|closed|accomplished|taken care of|sorted|handled|dealt with|over with)"

ERRAND_VERBS = {
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
