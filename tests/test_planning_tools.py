"""The planning side of the task tools (agent_service/tools/tasks.py) against a real task_service.

`tools.execute` as the chat agent and the MCP server call it: due phrases resolved to absolute
dates in the user's timezone, priority and tags, the list filters, task_ids with a result per
task, reopen_task, undo_last_change, set_timezone, the surface recorded in the activity log,
and the schemas kept simple for grammar-constrained model servers (issue 13).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest

from agent_service import tools
from agent_service.tools.base import Surface
from common.auth import Caller
from tests.support import ServiceProcess, auth_metadata, free_port, running, token
from todo.v1 import task_pb2, task_pb2_grpc

RESULT_KEYS = {"task_id", "status", "title", "due_date", "due_time", "priority", "tags"}
# JSON-schema keywords that grammar-constrained servers choke on (llama.cpp: maxLength) or that
# make grammars large; none may appear in an input schema sent to a model.
FORBIDDEN_KEYWORDS = {"maxLength", "minLength", "pattern", "format", "maxItems", "minItems", "oneOf", "anyOf"}


@pytest.fixture
async def as_user(task_service: ServiceProcess) -> AsyncIterator[Callable[..., Any]]:
    """as_user(surface="chat") -> run(name, arguments) for a fresh user, via tools.execute."""
    async with grpc.aio.insecure_channel(task_service.address) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)

        def make(surface: Surface = "chat", user_id: str = "") -> Any:
            user_id = user_id or f"user-{uuid.uuid4().hex[:8]}"
            context = tools.ToolContext(Caller(user_id, token(user_id)), stub, source=surface)

            async def run(name: str, arguments: dict[str, Any] | str | None = None) -> Any:
                return await tools.execute(name, arguments or {}, context)

            run.user_id = user_id  # type: ignore[attr-defined]
            run.stub = stub  # type: ignore[attr-defined]
            return run

        yield make


async def refused(run: Any, name: str, arguments: dict[str, Any]) -> str:
    with pytest.raises(tools.ToolError) as caught:
        await run(name, arguments)
    return str(caught.value)


async def activity(run: Any) -> list[task_pb2.TaskEvent]:
    reply = await run.stub.ListActivity(task_pb2.ListActivityRequest(), metadata=auth_metadata(run.user_id))
    return list(reply.events)


def coming(weekday: int, zone: str) -> str:
    today = datetime.now(ZoneInfo(zone)).date()
    return (today + timedelta(days=(weekday - today.weekday()) % 7 or 7)).isoformat()


async def test_add_task_resolves_next_friday_to_an_absolute_date(as_user: Callable[..., Any]) -> None:
    run = as_user()
    assert await run("set_timezone", {"timezone": "asia/kolkata"}) == {"status": "updated", "timezone": "Asia/Kolkata"}
    expected = {coming(4, "Asia/Kolkata")}
    result = await run("add_task", {"title": "x", "due": "next friday"})
    expected.add(coming(4, "Asia/Kolkata"))  # the day may have turned during the call
    assert set(result) == RESULT_KEYS
    assert result["due_date"] in expected and result["due_time"] == ""
    assert result == {
        "task_id": 1,
        "status": "created",
        "title": "x",
        "due_date": result["due_date"],
        "due_time": "",
        "priority": "none",
        "tags": [],
    }
    timed = await run("add_task", {"title": "y", "due": "next friday 5pm", "priority": "High", "tags": ["Work"]})
    assert (timed["due_time"], timed["priority"], timed["tags"]) == ("17:00", "high", ["work"])


async def test_update_task_moves_clears_and_retags(as_user: Callable[..., Any]) -> None:
    run = as_user()
    await run("add_task", {"title": "Meeting", "due": "2026-12-24 10:30", "tags": "work, team"})
    moved = await run("update_task", {"task_id": 1, "due": "tomorrow"})
    tomorrow = (datetime.now(ZoneInfo("UTC")).date() + timedelta(days=1)).isoformat()
    assert (moved["status"], moved["due_date"], moved["due_time"], moved["tags"]) == (
        "updated",
        tomorrow,
        "10:30",
        ["work", "team"],
    )
    cleared = await run("update_task", {"task_id": 1, "due": "", "tags": []})
    assert (cleared["due_date"], cleared["due_time"], cleared["tags"]) == ("", "", [])
    assert (await run("update_task", {"task_id": 1, "priority": "low"}))["priority"] == "low"
    kept = await run("update_task", {"task_id": 1, "title": "Team meeting", "priority": ""})  # "": not given
    assert (kept["title"], kept["priority"]) == ("Team meeting", "low")
    assert "something to change" in await refused(run, "update_task", {"task_id": 1})
    assert "due" in await refused(run, "update_task", {"task_id": 1, "due": "when pigs fly"})
    assert "priority" in await refused(run, "update_task", {"task_id": 1, "priority": "urgent"})
    assert "tags" in await refused(run, "update_task", {"task_id": 1, "tags": ["two words"]})


async def test_list_tasks_filters_and_items_carry_the_new_fields(as_user: Callable[..., Any]) -> None:
    run = as_user()
    await run("add_task", {"title": "Pay rent", "due": "today", "priority": "high", "tags": ["home"]})
    await run("add_task", {"title": "Read book"})
    await run("add_task", {"title": "Old bill", "due": "2020-01-01"})
    await run("complete_task", {"task_id": 2})
    items = await run("list_tasks", {"sort": "due"})
    assert [item["id"] for item in items] == [3, 1, 2]
    keys = {"id", "title", "description", "completed", "created_at", "due_date", "due_time", "priority", "tags"}
    assert [set(item) for item in items] == [keys, keys, keys | {"completed_at"}]
    assert items[1]["priority"] == "high" and items[1]["tags"] == ["home"]
    assert [i["id"] for i in await run("list_tasks", {"due": "today"})] == [1]
    assert [i["id"] for i in await run("list_tasks", {"due": "overdue"})] == [3]
    assert [i["id"] for i in await run("list_tasks", {"query": "RENT", "tag": "home", "priority": "high"})] == [1]
    assert [i["id"] for i in await run("list_tasks", {"status": "completed", "due": "none"})] == [2]
    assert [i["id"] for i in await run("list_tasks", {"sort": "priority", "due": ""})] == [1, 2, 3]
    assert "sort" in await refused(run, "list_tasks", {"sort": "alphabetical"})


async def test_complete_and_delete_take_task_ids_with_a_result_per_task(as_user: Callable[..., Any]) -> None:
    run = as_user()
    for title in ("one", "two", "three"):
        await run("add_task", {"title": title})
    done = await run("complete_task", {"task_ids": [1, "3", 9]})
    assert done["results"][0] == {"task_id": 1, "status": "completed", "title": "one", **blank()}
    assert done["results"][1]["task_id"] == 3 and done["results"][1]["status"] == "completed"
    assert done["results"][2] == {"task_id": 9, "error": "task 9 not found"}  # an entry, not a failed call
    single = await run("complete_task", {"task_id": 2})
    assert single == {"task_id": 2, "status": "completed", "title": "two", **blank()}  # task_id alone: one result
    gone = await run("delete_task", {"task_ids": "2, 3"})
    assert [entry["status"] for entry in gone["results"]] == ["deleted", "deleted"]
    assert [i["id"] for i in await run("list_tasks", {})] == [1]
    assert "task_ids" in await refused(run, "delete_task", {"task_ids": list(range(1, 52))})
    assert "task_ids" in await refused(run, "delete_task", {"task_ids": []})
    assert "task_id" in await refused(run, "complete_task", {})
    reopened = await run("reopen_task", {"task_id": 1})
    assert reopened == {"task_id": 1, "status": "reopened", "title": "one", **blank()}


def blank() -> dict[str, Any]:
    return {"due_date": "", "due_time": "", "priority": "none", "tags": []}


async def test_undo_last_change_walks_back_and_says_what_it_did(as_user: Callable[..., Any]) -> None:
    run = as_user()
    await run("add_task", {"title": "Milk", "tags": ["shop"]})
    await run("delete_task", {"task_id": 1})
    restored = await run("undo_last_change")
    assert restored == {"task_id": 1, "status": "restored", "title": "Milk", **blank(), "tags": ["shop"]}
    assert [i["id"] for i in await run("list_tasks")] == [1]
    removed = await run("undo_last_change", "")
    assert (removed["status"], removed["task_id"], removed["title"]) == ("deleted", 1, "Milk")
    assert "nothing to undo" in await refused(run, "undo_last_change", {})
    assert "timezone" in await refused(run, "set_timezone", {"timezone": "Mars/Olympus"})


@pytest.mark.parametrize("surface", ["chat", "mcp"])
async def test_the_activity_log_records_the_surface(as_user: Callable[..., Any], surface: Surface) -> None:
    run = as_user(surface)
    await run("add_task", {"title": "From a tool"})
    await run("complete_task", {"task_ids": [1]})
    await run("reopen_task", {"task_id": 1})
    await run("update_task", {"task_id": 1, "due": "tomorrow"})
    await run("delete_task", {"task_id": 1})
    await run("undo_last_change")
    events = await activity(run)
    assert [(e.action, e.source) for e in events] == [
        ("restored", surface),
        ("deleted", surface),
        ("updated", surface),
        ("reopened", surface),
        ("completed", surface),
        ("created", surface),
    ]
    assert [e.undone for e in events] == [False, True, False, False, False, False]


async def test_a_spent_write_budget_stops_a_bulk_call(
    base_env: dict[str, str], database_url_factory: Callable[[str, str], str], log_dir: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {
        **base_env,
        "TASK_SERVICE_ADDR": address,
        "TASK_DATABASE_URL": database_url_factory("sqlite", "bulk_budget"),
        "RATE_LIMIT_WRITES_PER_MINUTE": "3",
    }
    with running("task_service", env, address, log_dir):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            context = tools.ToolContext(Caller("bulk", token("bulk")), stub)
            for title in ("one", "two"):
                await tools.execute("add_task", {"title": title}, context)
            result = await tools.execute("complete_task", {"task_ids": [1, 2, 5, 6]}, context)
    first, *refused_entries = result["results"]
    assert first["status"] == "completed"
    assert [entry["task_id"] for entry in refused_entries] == [2, 5, 6]
    assert all("rate limit" in entry["error"] for entry in refused_entries), refused_entries


def walk(schema: Any) -> list[str]:
    """Every key of a JSON schema, at any depth (property names included)."""
    if isinstance(schema, dict):
        return [key for key, value in schema.items() for key in [key, *walk(value)]]
    if isinstance(schema, list):
        return [key for item in schema for key in walk(item)]
    return []


def test_input_schemas_stay_simple_and_every_tool_has_annotations() -> None:
    names = [tool.name for tool in tools.for_surface("chat")]
    assert names == [
        "add_task",
        "list_tasks",
        "complete_task",
        "delete_task",
        "update_task",
        "reopen_task",
        "undo_last_change",
        "set_timezone",
    ]
    assert set(names) <= {tool.name for tool in tools.for_surface("mcp")}  # MCP has conversation tools too
    for tool in tools.for_surface("chat"):
        assert not FORBIDDEN_KEYWORDS & set(walk(tool.input_schema)), tool.name
        assert tool.openai_schema()["function"]["parameters"] == tool.input_schema
        hints = tool.annotations
        assert set(hints) >= {"title", "read_only_hint", "destructive_hint", "idempotent_hint"}, tool.name
    by_name = {tool.name: tool.annotations for tool in tools.for_surface("chat")}
    assert by_name["list_tasks"]["read_only_hint"] is True
    assert [name for name, hints in by_name.items() if hints["read_only_hint"]] == ["list_tasks"]
    assert by_name["delete_task"]["destructive_hint"] is True
    assert by_name["undo_last_change"]["destructive_hint"] is True
    assert by_name["add_task"]["destructive_hint"] is False and by_name["add_task"]["idempotent_hint"] is False
