"""Hostile input through the real gateway: every attack gets a clear 4xx and writes nothing.

The whole stack (task, conversation and agent services on PostgreSQL, Envoy in front) runs
as real processes; every request goes over HTTP to Envoy. Each refusal test asserts:
- the exact HTTP status (413 from Envoy for bodies > 1 MiB, 431 for header floods, 400 for
  malformed JSON, wrong types and out-of-range values, 401 for bad tokens, 403 for another
  user's path);
- a JSON `{"code", "message", "details"}` body (google.rpc.Status), with the message naming the
  field where the services produce it;
- that nothing was written: the caller's tasks and conversations are byte-identical before
  and after.

Decisions (also in the README's error section): NUL (U+0000) is refused with 400 (PostgreSQL
text cannot hold it); every other control character and any HTML are stored exactly as given
and come back escaped by JSON alone. Headers above Envoy's limit are 431 even when they hold
a bearer token; request headers gRPC cannot carry as metadata are dropped by the gateway.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import grpc
import pytest

from tests.gateway_fixtures import NO_RATE_LIMITS, Gateway, Reply, collect, start_gateway
from tests.support import auth_metadata

USER = "hostile-alice"
OTHER = "hostile-bob"
KIB = 1024

# Per-user rate limits would turn a long run of refused writes into 429s; they are tested elsewhere.


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str]
) -> Iterator[Gateway]:
    with start_gateway(tmp_path_factory, database_url_factory, "postgres", extra_env=NO_RATE_LIMITS) as started:
        seed(started)
        yield started


def seed(gateway: Gateway) -> None:
    """Both users get tasks and a conversation, so that 'nothing changed' compares real data."""
    for user in (USER, OTHER):
        for title in ("first", "second", "third"):
            created = gateway.call("POST", f"/api/{user}/tasks", user=user, body={"title": title, "description": "d"})
            assert created.status == 200, created
        chat = gateway.call("POST", f"/api/{user}/chat", user=user, body={"message": "hello"}, timeout=60)
        assert chat.status == 200, chat


def snapshot(gateway: Gateway, user: str = USER) -> dict[str, Any]:
    """Everything `user` has: every task (all pages), every conversation and its messages."""
    tasks = collect(gateway, user, f"/api/{user}/tasks?status=all", "tasks")
    conversations = collect(gateway, user, f"/api/{user}/conversations", "conversations")
    messages = {
        conversation["id"]: collect(
            gateway, user, f"/api/{user}/conversations/{conversation['id']}/messages", "messages"
        )
        for conversation in conversations
    }
    return {"tasks": tasks, "conversations": conversations, "messages": messages}


def assert_error(reply: Reply, status: int, *, naming: str | None = None) -> dict[str, Any]:
    """`reply` is `status` with a google.rpc.Status JSON body (naming `naming`, if given)."""
    assert reply.status == status, reply
    assert reply.headers.get_content_type() == "application/json", reply.headers
    body = reply.json()
    assert set(body) == {"code", "message", "details"}, body
    assert isinstance(body["code"], int) and body["code"] != 0, body
    assert isinstance(body["message"], str) and body["message"], body
    assert "Traceback" not in body["message"] and "Exception" not in body["message"], body
    if naming is not None:
        assert naming in body["message"], body
    return body


@pytest.fixture
def unchanged(gateway: Gateway) -> Iterator[None]:
    """The test must leave both users' data exactly as it found it."""
    before = {user: snapshot(gateway, user) for user in (USER, OTHER)}
    yield
    after = {user: snapshot(gateway, user) for user in (USER, OTHER)}
    assert after == before


def raw_post(gateway: Gateway, path: str, raw: bytes, **kwargs: Any) -> Reply:
    return gateway.call("POST", path, user=USER, raw=raw, **kwargs)


# --- bodies ------------------------------------------------------------------------------------


def test_a_body_over_one_mebibyte_is_413_from_the_gateway(gateway: Gateway, unchanged: None) -> None:
    body = json.dumps({"title": "big", "description": "x" * (2 * KIB * KIB)}).encode()
    assert_error(raw_post(gateway, f"/api/{USER}/tasks", body), 413)


def test_a_2_mib_chat_message_is_413(gateway: Gateway, unchanged: None) -> None:
    body = json.dumps({"message": "x" * (2 * KIB * KIB)}).encode()
    assert_error(raw_post(gateway, f"/api/{USER}/chat", body), 413)


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", f"/api/{USER}/tasks", {"title": "t" * 100_000}, "title"),
        ("POST", f"/api/{USER}/tasks", {"title": "t" * 256}, "title"),
        ("POST", f"/api/{USER}/tasks", {"title": "ok", "description": "d" * 4001}, "description"),
        ("PUT", f"/api/{USER}/tasks/1", {"title": "t" * 100_000}, "title"),
        ("PATCH", f"/api/{USER}/tasks/1", {"description": "d" * 100_000}, "description"),
        ("POST", f"/api/{USER}/chat", {"message": "m" * 8001}, "message"),
        ("POST", f"/api/{USER}/chat/stream", {"message": "m" * 100_000}, "message"),
    ],
)
def test_an_oversized_field_is_400_naming_it(
    gateway: Gateway, unchanged: None, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    assert_error(gateway.call(method, path, user=USER, body=body), 400, naming=field)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 10_000,
        b'{"title": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"title": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}",
    ],
    ids=["10000-open-brackets", "10000-nested-arrays-in-a-field", "5000-nested-objects"],
)
def test_deeply_nested_json_is_400(gateway: Gateway, unchanged: None, raw: bytes) -> None:
    assert_error(raw_post(gateway, f"/api/{USER}/tasks", raw), 400)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"title": "ab\xff\xfecd"}',  # bytes that are never UTF-8
        b'{"title": "ab\xed\xa0\x80cd"}',  # a UTF-16 surrogate encoded as UTF-8
        b'{"title": "ab\xc0\xafcd"}',  # an overlong encoding of "/"
        b'{"title": "ab\\ud800cd"}',  # a lone surrogate as a JSON escape
        b'{"title": "unterminated',
        b"",
        b"null",
        b'"a string"',
        b'{"title": 42}',
        b'{"title": ["a"]}',
        b'{"title": {"a": 1}}',
        b'{"title": "ok", "description": false}',
    ],
    ids=[
        "invalid-utf8",
        "utf8-surrogate",
        "overlong-utf8",
        "lone-surrogate-escape",
        "truncated",
        "empty-body",
        "null-body",
        "string-body",
        "number-title",
        "array-title",
        "object-title",
        "bool-description",
    ],
)
def test_malformed_task_bodies_are_400(gateway: Gateway, unchanged: None, raw: bytes) -> None:
    assert_error(raw_post(gateway, f"/api/{USER}/tasks", raw), 400)


def test_malformed_chat_body_is_400(gateway: Gateway, unchanged: None) -> None:
    assert_error(raw_post(gateway, f"/api/{USER}/chat", b'{"message": "hi\xff"}'), 400)
    assert_error(raw_post(gateway, f"/api/{USER}/chat", b'{"message": "hi", "conversation_id": "one"}'), 400)


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", f"/api/{USER}/tasks", {"title": "a\u0000b"}, "title"),
        ("POST", f"/api/{USER}/tasks", {"title": "ok", "description": "a\u0000"}, "description"),
        ("PUT", f"/api/{USER}/tasks/1", {"title": "\u0000"}, "title"),
        ("PATCH", f"/api/{USER}/tasks/1", {"description": "x\u0000y"}, "description"),
        ("POST", f"/api/{USER}/chat", {"message": "add \u0000"}, "message"),
    ],
)
def test_nul_characters_are_400(
    gateway: Gateway, unchanged: None, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    assert_error(gateway.call(method, path, user=USER, body=body), 400, naming=field)


def test_control_characters_and_html_round_trip_exactly(gateway: Gateway) -> None:
    title = "<script>alert(1)</script> \u0001\u001f\u007f\u0085\t\u2028 <b>&amp;</b> ' \" \\ é 🎉"
    description = "</textarea><img src=x onerror=alert(1)>\r\n\u200b\ufeff\u001b[31m"
    created = gateway.call("POST", f"/api/{USER}/tasks", user=USER, body={"title": title, "description": description})
    assert created.status == 200, created
    task = created.json()
    try:
        # Stored as given (titles are trimmed of surrounding whitespace only; these have none).
        assert (task["title"], task["description"]) == (title, description)
        # JSON is the only escaping: no HTML entity encoding, no raw '<' a browser could sniff.
        assert b"<script>" not in created.body and b"&lt;" not in created.body
        fetched = gateway.call("GET", f"/api/{USER}/tasks/{task['id']}", user=USER)
        assert fetched.status == 200 and fetched.json() == task, fetched
    finally:
        deleted = gateway.call("DELETE", f"/api/{USER}/tasks/{task['id']}", user=USER)
        assert deleted.status == 200, deleted


# --- headers and tokens ------------------------------------------------------------------------


def test_200_headers_are_431(gateway: Gateway, unchanged: None) -> None:
    flood = {f"x-flood-{index}": "v" for index in range(200)}
    reply = gateway.call("POST", f"/api/{USER}/tasks", user=USER, body={"title": "flood"}, headers=flood)
    assert_error(reply, 431)


def test_a_100_kib_header_is_431(gateway: Gateway, unchanged: None) -> None:
    reply = gateway.call(
        "POST", f"/api/{USER}/tasks", user=USER, body={"title": "big header"}, headers={"x-big": "a" * 100 * KIB}
    )
    assert_error(reply, 431)


def test_a_100_kib_bearer_token_is_refused_by_the_gateway(gateway: Gateway, unchanged: None) -> None:
    # Above Envoy's header limit the token is never read: 431, like any other oversized header.
    reply = gateway.call("POST", f"/api/{USER}/tasks", bearer="a" * 100 * KIB, body={"title": "t"})
    assert_error(reply, 431)


@pytest.mark.parametrize(
    ("size", "status"), [(1 * KIB, 401), (4 * KIB, 401), (9 * KIB, 431), (18 * KIB, 431), (40 * KIB, 431)]
)
def test_a_long_bogus_bearer_token_is_401_or_431_never_429(
    gateway: Gateway, unchanged: None, size: int, status: int
) -> None:
    """Headers within the gateway's 8 KiB reach the service: a bad token is 401. Larger ones are
    431 from Envoy, never 429 (gRPC's own metadata limit, RESOURCE_EXHAUSTED, would invite retries)."""
    for _ in range(3):  # gRPC used to refuse between its soft and hard metadata limits at random
        reply = gateway.call("POST", f"/api/{USER}/tasks", bearer="b" * size, body={"title": "t"})
        assert_error(reply, status)
        if status == 401:
            assert reply.headers["WWW-Authenticate"].startswith("Bearer"), reply.headers


@pytest.mark.parametrize(
    "headers",
    [
        {"6`!+o": "x"},  # a valid HTTP token, not a valid gRPC metadata key
        {"x-trace-bin": "!!! not base64 !!!"},
        {"grpc-timeout": "garbage"},
        {"grpc-timeout": "1n"},
        {"x-value": "caf\u00e9"},
    ],
    ids=["backtick-name", "bin-not-base64", "grpc-timeout-garbage", "grpc-timeout-1ns", "latin1-value"],
)
def test_headers_grpc_cannot_carry_do_not_break_requests(
    gateway: Gateway, unchanged: None, headers: dict[str, str]
) -> None:
    """Odd but legal HTTP headers must not reach gRPC as metadata (grpc-core fails the call: 500)."""
    reply = gateway.call("GET", f"/api/{USER}/tasks", user=USER, headers=headers)
    assert reply.status == 200, reply
    refused = gateway.call("POST", f"/api/{USER}/tasks", user=USER, body={"title": ""}, headers=headers)
    assert_error(refused, 400, naming="title")


def test_a_header_name_that_is_not_http_is_400_from_the_gateway(gateway: Gateway, unchanged: None) -> None:
    reply = gateway.call("POST", f"/api/{USER}/tasks", user=USER, body={"title": "x"}, headers={"x-odd{name}": "x"})
    assert_error(reply, 400)


# --- paths and query parameters ----------------------------------------------------------------


def test_a_page_token_from_another_user_is_400(gateway: Gateway, unchanged: None) -> None:
    first_page = gateway.call("GET", f"/api/{OTHER}/tasks?page_size=1", user=OTHER)
    other_token = first_page.json()["next_page_token"]
    assert other_token, first_page
    reply = gateway.call("GET", f"/api/{USER}/tasks?page_size=1&page_token={other_token}", user=USER)
    assert_error(reply, 400, naming="page_token")


def test_a_page_token_of_another_listing_is_400(gateway: Gateway) -> None:
    chat = gateway.call("POST", f"/api/{USER}/chat", user=USER, body={"message": "hi again"}, timeout=60)
    assert chat.status == 200, chat  # a second conversation, so the listing has a next page
    before = snapshot(gateway)
    conversations = gateway.call("GET", f"/api/{USER}/conversations?page_size=1", user=USER)
    conversation_token = conversations.json()["next_page_token"]
    assert conversation_token, conversations
    reply = gateway.call("GET", f"/api/{USER}/tasks?page_size=1&page_token={conversation_token}", user=USER)
    assert_error(reply, 400, naming="page_token")
    assert snapshot(gateway) == before


@pytest.mark.parametrize(
    "query",
    [
        "page_token=%FF",
        "page_token=%C0%AF",
        "page_token=not-a-token",
        "page_token=" + "A" * 4000,
        "status=%FF%FE",
        "status=done",
        "page_size=-1",
        "page_size=101",
        "page_size=abc",
        "page_size=99999999999",
        "unknown_parameter=1",
    ],
)
def test_bad_query_parameters_are_400(gateway: Gateway, unchanged: None, query: str) -> None:
    assert_error(gateway.call("GET", f"/api/{USER}/tasks?{query}", user=USER), 400)


@pytest.mark.parametrize(
    "user_segment",
    [
        quote(f"{USER}/x", safe=""),
        quote(f"{USER}/../{OTHER}", safe=""),
        quote(f"../{OTHER}", safe=""),
        f"{USER}%20",
        USER.upper(),
        "u" * 5000,
        quote(OTHER, safe=""),
    ],
    ids=["slash", "dot-dot-other", "dot-dot", "space", "uppercase", "5000-chars", "other-user"],
)
def test_a_path_user_that_is_not_the_caller_is_403(gateway: Gateway, unchanged: None, user_segment: str) -> None:
    for method, suffix, body in [
        ("GET", "/tasks", None),
        ("POST", "/tasks", {"title": "x"}),
        ("DELETE", "/tasks/1", None),
        ("GET", "/conversations", None),
        ("POST", "/chat", {"message": "list my tasks"}),
    ]:
        assert_error(gateway.call(method, f"/api/{user_segment}{suffix}", user=USER, body=body), 403)


@pytest.mark.parametrize(
    ("user_segment", "status"), [("%2e%2e", 404), (f"{USER}%00", 400)], ids=["encoded-dots", "nul"]
)
def test_a_path_user_that_envoy_normalizes_away_is_refused_at_the_edge(
    gateway: Gateway, unchanged: None, user_segment: str, status: int
) -> None:
    """Envoy normalizes the path first (normalize_path): `/api/%2e%2e/tasks` is `/tasks`, which
    is no route (404); a NUL cannot be normalized (400). Nothing reaches a service."""
    for method, suffix, body in [
        ("GET", "/tasks", None),
        ("POST", "/tasks", {"title": "x"}),
        ("DELETE", "/tasks/1", None),
    ]:
        assert_error(gateway.call(method, f"/api/{user_segment}{suffix}", user=USER, body=body), status)


@pytest.mark.parametrize("user_segment", ["%FF%FE", "%C0%AF", "ab%ED%A0%80"], ids=["ff-fe", "overlong", "surrogate"])
def test_a_path_user_that_is_not_utf8_is_400(gateway: Gateway, unchanged: None, user_segment: str) -> None:
    for method, suffix, body in [
        ("GET", "/tasks", None),
        ("POST", "/tasks", {"title": "x"}),
        ("GET", "/conversations/1", None),
        ("POST", "/chat", {"message": "hi"}),
    ]:
        assert_error(gateway.call(method, f"/api/{user_segment}{suffix}", user=USER, body=body), 400)


BAD_IDS = ["abc", "1.5", "1e3", "0x10", "%201", "1;2", "2147483648", "99999999999999999999", "-1", "0", "-2147483648"]


@pytest.mark.parametrize("task_id", BAD_IDS)
def test_a_bad_task_id_is_400_on_every_operation(gateway: Gateway, unchanged: None, task_id: str) -> None:
    path = f"/api/{USER}/tasks/{task_id}"
    for method, suffix, body in [
        ("GET", "", None),
        ("PUT", "", {"title": "x"}),
        ("PATCH", "", {"title": "x"}),
        ("PATCH", "/complete", {"completed": True}),
        ("DELETE", "", None),
    ]:
        assert_error(gateway.call(method, path + suffix, user=USER, body=body), 400, naming="task_id")


@pytest.mark.parametrize("conversation_id", BAD_IDS)
def test_a_bad_conversation_id_is_400(gateway: Gateway, unchanged: None, conversation_id: str) -> None:
    path = f"/api/{USER}/conversations/{conversation_id}"
    for method, suffix in [("GET", ""), ("GET", "/messages"), ("DELETE", "")]:
        assert_error(gateway.call(method, path + suffix, user=USER), 400, naming="conversation_id")


def test_a_bad_conversation_id_in_a_chat_body_is_400(gateway: Gateway, unchanged: None) -> None:
    for conversation_id in (-1, 2**31, "x", 1.5):
        body = {"message": "hi", "conversation_id": conversation_id}
        reply = gateway.call("POST", f"/api/{USER}/chat", user=USER, body=body)
        assert_error(reply, 400)


def test_a_missing_conversation_in_a_chat_body_is_404(gateway: Gateway, unchanged: None) -> None:
    other_conversation = collect(gateway, OTHER, f"/api/{OTHER}/conversations", "conversations")[0]["id"]
    mine = {
        conversation["id"] for conversation in collect(gateway, USER, f"/api/{USER}/conversations", "conversations")
    }
    missing = max(mine | {other_conversation}) + 1000  # absent for both users
    body = {"message": "delete task 1", "conversation_id": missing}
    assert_error(gateway.call("POST", f"/api/{USER}/chat", user=USER, body=body), 404)


# --- native gRPC -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"\x0a\x02\xff\xfe", b"\x12\x03a\xc0\xaf", b"\x0a\x05\x01\x02"],
    ids=["user-id-not-utf8", "title-overlong-utf8", "truncated-field"],
)
def test_a_grpc_request_that_is_not_a_valid_message_is_invalid_argument(
    gateway: Gateway, unchanged: None, payload: bytes
) -> None:
    """Raw bytes straight to task_service: INVALID_ARGUMENT from our interceptor, not grpc's UNKNOWN."""
    with grpc.insecure_channel(gateway.env["TASK_SERVICE_ADDR"]) as channel:
        create = channel.unary_unary("/todo.v1.TaskService/CreateTask")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as refused:
            create(payload, metadata=auth_metadata(USER), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
