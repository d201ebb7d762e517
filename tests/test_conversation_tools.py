"""The MCP-only conversation tools (agent_service/tools/conversations.py) with the official MCP
client, through real Envoy in front of the real services, on SQLite and PostgreSQL:
list_conversations, get_conversation_messages, create_task_from_message; their schemas and
annotations; and that another user's conversation or message is a plain "not found".
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from agent_service import tools
from agent_service.tools.conversations import TASK_TITLE_MAX
from tests.gateway_fixtures import Gateway, Reply, start_gateway
from tests.support import token

CONVERSATION_TOOLS = ("list_conversations", "get_conversation_messages", "create_task_from_message")
SCHEMA_KEYWORDS_MODELS_CHOKE_ON = {"maxLength", "minLength", "pattern", "format", "maxItems"}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gateway(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    database_url_factory: Callable[[str, str], str],
) -> Iterator[Gateway]:
    services = ["task", "conversation", "agent"]
    with start_gateway(tmp_path_factory, database_url_factory, request.param, services) as running:
        yield running


def new_user(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def mcp_session(gateway: Gateway, user_id: str) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token(user_id)}"}, timeout=30) as http,
        streamable_http_client(gateway.base_url + "/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def structured(result: CallToolResult) -> Any:
    assert not result.is_error, result
    assert json.loads(result.content[0].text) == result.structured_content  # type: ignore[union-attr]
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    assert result.is_error, result
    return result.content[0].text  # type: ignore[union-attr]


def ok(reply: Reply) -> Any:
    assert reply.status == 200, reply
    return reply.json()


def seed(gateway: Gateway, owner: str, *contents: str) -> int:
    """A conversation with these messages (user, assistant, user, ...) recorded over REST."""
    conversation = ok(gateway.call("POST", f"/api/{owner}/conversations", user=owner, body={"title": "Seeded"}))
    for index, content in enumerate(contents):
        role = "user" if index % 2 == 0 else "assistant"
        path = f"/api/{owner}/conversations/{conversation['id']}/messages"
        ok(gateway.call("POST", path, user=owner, body={"role": role, "content": content}))
    return int(conversation["id"])


def tasks_of(gateway: Gateway, owner: str) -> list[dict[str, Any]]:
    return list(ok(gateway.call("GET", f"/api/{owner}/tasks?status=all", user=owner))["tasks"])


def snapshot(gateway: Gateway, owner: str) -> dict[str, bytes]:
    paths = [f"/api/{owner}/conversations", f"/api/{owner}/history", f"/api/{owner}/tasks?status=all"]
    return {path: gateway.call("GET", path, user=owner).body for path in paths}


def keywords(schema: Any) -> set[str]:
    """Every key used anywhere in a JSON schema."""
    if isinstance(schema, dict):
        return set(schema) | {key for value in schema.values() for key in keywords(value)}
    if isinstance(schema, list):
        return {key for item in schema for key in keywords(item)}
    return set()


async def test_the_tools_are_offered_over_mcp_only_with_simple_schemas_and_annotations(gateway: Gateway) -> None:
    assert not set(CONVERSATION_TOOLS) & {tool.name for tool in tools.for_surface("chat")}
    async with mcp_session(gateway, new_user("schemas")) as session:
        listed = {tool.name: tool for tool in (await session.list_tools()).tools}
    for name in CONVERSATION_TOOLS:
        tool = listed[name]
        assert not keywords(tool.input_schema) & SCHEMA_KEYWORDS_MODELS_CHOKE_ON, (name, tool.input_schema)
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"
        assert tool.annotations is not None and tool.annotations.destructive_hint is False
    assert listed["create_task_from_message"].input_schema["required"] == ["conversation_id", "message_id"]
    assert listed["get_conversation_messages"].input_schema["required"] == ["conversation_id"]
    assert listed["list_conversations"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert listed["get_conversation_messages"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert listed["create_task_from_message"].annotations.read_only_hint is False  # type: ignore[union-attr]
    assert listed["create_task_from_message"].output_schema == listed["add_task"].output_schema


async def test_list_conversations_and_read_their_messages(gateway: Gateway) -> None:
    alice = new_user("alice")
    async with mcp_session(gateway, alice) as session:
        assert structured(await session.call_tool("list_conversations", {})) == {"conversations": []}
        first = seed(gateway, alice, "hello", "hi! what shall I do?")
        second = seed(gateway, alice, *(f"message {n}" for n in range(1, 26)))

        listed = structured(await session.call_tool("list_conversations", {}))["conversations"]
        assert [c["id"] for c in listed] == [second, first]  # latest activity first
        rest = ok(gateway.call("GET", f"/api/{alice}/conversations", user=alice))["conversations"]
        assert listed == [{key: c[key] for key in ("id", "title", "created_at", "updated_at")} for c in rest]

        read = structured(await session.call_tool("get_conversation_messages", {"conversation_id": first}))
        assert read["conversation_id"] == first
        assert [(m["id"], m["role"], m["content"]) for m in read["messages"]] == [
            (1, "user", "hello"),
            (2, "assistant", "hi! what shall I do?"),
        ]
        assert all(set(m) == {"id", "role", "content", "created_at"} for m in read["messages"])
        default = structured(await session.call_tool("get_conversation_messages", {"conversation_id": second}))
        assert [m["id"] for m in default["messages"]] == list(range(6, 26))  # the latest 20, oldest first
        three = await session.call_tool("get_conversation_messages", {"conversation_id": second, "limit": "3"})
        assert [m["content"] for m in structured(three)["messages"]] == ["message 23", "message 24", "message 25"]

        assert "limit" in error_text(
            await session.call_tool("get_conversation_messages", {"conversation_id": 1, "limit": 101})
        )
        assert "conversation_id" in error_text(await session.call_tool("get_conversation_messages", {}))
        missing = error_text(await session.call_tool("get_conversation_messages", {"conversation_id": 99}))
        assert missing == "conversation 99 not found"


async def test_create_task_from_message(gateway: Gateway) -> None:
    alice = new_user("alice")
    long_text = "Remember to renew the passport before the trip to Rome next spring, and also book the museum " * 3
    huge_text = "word " * 1600  # 8,000 characters: more than a task description may hold
    conversation = seed(
        gateway, alice, "  Buy   milk  ", "Noted.", long_text, "ok", huge_text, "ok", "Pay rent\nby friday"
    )
    async with mcp_session(gateway, alice) as session:
        short = structured(
            await session.call_tool("create_task_from_message", {"conversation_id": conversation, "message_id": 1})
        )
        assert {key: short[key] for key in ("task_id", "status", "title")} == {
            "task_id": 1,
            "status": "created",
            "title": "Buy milk",
        }
        long = structured(
            await session.call_tool("create_task_from_message", {"conversation_id": conversation, "message_id": 3})
        )
        named = structured(
            await session.call_tool(
                "create_task_from_message",
                {"conversation_id": conversation, "message_id": "2", "title": "Reply to the assistant"},
            )
        )
        huge = structured(
            await session.call_tool("create_task_from_message", {"conversation_id": conversation, "message_id": 5})
        )
        lines = structured(
            await session.call_tool("create_task_from_message", {"conversation_id": conversation, "message_id": 7})
        )

    assert long["title"].startswith("Remember to renew the passport") and long["title"].endswith("…")
    assert len(long["title"]) <= TASK_TITLE_MAX and " ".join(long["title"][:-1].split()) == long["title"][:-1]
    assert named["title"] == "Reply to the assistant"
    assert lines["title"] == "Pay rent"  # the first line
    by_id = {task["id"]: task for task in tasks_of(gateway, alice)}
    assert by_id[short["task_id"]]["description"] == "  Buy   milk  "  # the message text, as written
    assert by_id[long["task_id"]]["description"] == long_text
    assert by_id[named["task_id"]]["description"] == "Noted."
    assert by_id[lines["task_id"]]["description"] == "Pay rent\nby friday"
    cut = by_id[huge["task_id"]]["description"]
    assert len(cut) == 4000 and cut.endswith("…") and huge_text.startswith(cut[:-1])


async def test_mistakes_are_error_results_and_write_nothing(gateway: Gateway) -> None:
    alice = new_user("alice")
    conversation = seed(gateway, alice, "buy milk")
    async with mcp_session(gateway, alice) as session:
        for arguments, mentions in (
            ({"conversation_id": conversation}, "message_id"),
            ({"conversation_id": conversation, "message_id": 2}, f"message 2 not found in conversation {conversation}"),
            ({"conversation_id": 99, "message_id": 1}, "conversation 99 not found"),
            ({"conversation_id": conversation, "message_id": 1, "title": "x" * 256}, "title"),
            ({"conversation_id": conversation, "message_id": 0}, "message_id"),
            ({"conversation_id": conversation, "message_id": 1, "colour": "red"}, "colour"),
        ):
            assert mentions in error_text(await session.call_tool("create_task_from_message", arguments)), arguments
    assert tasks_of(gateway, alice) == []


async def test_another_users_conversations_and_messages_are_not_found(gateway: Gateway) -> None:
    alice, bob = new_user("alice"), new_user("bob")
    conversation = seed(gateway, alice, "secret plan: buy a boat", "Noted.")
    before = snapshot(gateway, alice)
    async with mcp_session(gateway, bob) as session:
        assert structured(await session.call_tool("list_conversations", {})) == {"conversations": []}
        missing = error_text(await session.call_tool("get_conversation_messages", {"conversation_id": 77}))
        for name, arguments in (
            ("get_conversation_messages", {"conversation_id": conversation}),
            ("create_task_from_message", {"conversation_id": conversation, "message_id": 1}),
            ("create_task_from_message", {"conversation_id": conversation, "message_id": 1, "title": "mine"}),
        ):
            refusal = error_text(await session.call_tool(name, arguments))
            assert refusal == missing.replace("77", str(conversation)), refusal
            assert "secret" not in refusal
        for name, arguments in (
            ("list_conversations", {}),
            ("get_conversation_messages", {"conversation_id": conversation}),
            ("create_task_from_message", {"conversation_id": conversation, "message_id": 1}),
        ):
            refusal = error_text(await session.call_tool(name, {**arguments, "user_id": alice}))
            assert "user_id must be the authenticated user" in refusal and "secret" not in refusal
    assert snapshot(gateway, alice) == before
    assert tasks_of(gateway, bob) == []
    assert ok(gateway.call("GET", f"/api/{bob}/conversations", user=bob))["conversations"] == []
