"""Input limits of the public contract (API.md), shared by every service."""

from __future__ import annotations

from common.errors import InvalidArgument

TITLE_MAX = 255
DESCRIPTION_MAX = 4000
MESSAGE_MAX = 8000


def _no_nul(value: str, field: str) -> None:
    # PostgreSQL text cannot hold NUL: refuse it here as bad input, not later as INTERNAL.
    if "\x00" in value:
        raise InvalidArgument(f"{field} must not contain NUL characters")


def title(value: str, field: str = "title") -> str:
    """A title trimmed and checked: 1..255 characters after trimming."""
    trimmed = value.strip()
    _no_nul(trimmed, field)
    if not trimmed:
        raise InvalidArgument(f"{field} must not be empty")
    if len(trimmed) > TITLE_MAX:
        raise InvalidArgument(f"{field} must be at most {TITLE_MAX} characters")
    return trimmed


def description(value: str) -> str:
    _no_nul(value, "description")
    if len(value) > DESCRIPTION_MAX:
        raise InvalidArgument(f"description must be at most {DESCRIPTION_MAX} characters")
    return value


def message_text(value: str, field: str = "message") -> str:
    _no_nul(value, field)
    if not value.strip():
        raise InvalidArgument(f"{field} must not be empty")
    if len(value) > MESSAGE_MAX:
        raise InvalidArgument(f"{field} must be at most {MESSAGE_MAX} characters")
    return value


def positive_id(value: int, field: str) -> int:
    if value <= 0:
        raise InvalidArgument(f"{field} must be a positive number")
    return value
