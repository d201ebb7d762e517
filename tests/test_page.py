"""The chat page (`GET /`, gateway/page/) in a real headless Chromium, through the real stack.

Debian's `chromium` (/usr/bin/chromium, which .ci/run installs) driven by Playwright for Python;
never a browser downloaded by `playwright install`. Everything the page does goes over the public
REST API of the same origin, with the page's own strict Content-Security-Policy in force.

Two stacks: the built-in model (signing in, chatting, tasks, conversations, 401 and 429), and the
scripted Chat Completions server for what the built-in model cannot do on demand (a reply that
stalls mid-stream, so the test sees text arrive before the turn ends; a model outage, 503).
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from common.settings import Settings
from gateway import envoy_config
from tests import chat_server as model
from tests.chat_server import ChatServer
from tests.gateway_fixtures import Gateway, start_gateway

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 30_000  # a turn on a busy 2-core machine, with every service and Envoy on it
CHAT_PER_MINUTE = 5  # the built-in stack's chat budget per user: the 429 test spends it
LLM_TIMEOUT_SECONDS = 3

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str]
) -> Iterator[Gateway]:
    extra_env = {"RATE_LIMIT_CHAT_PER_MINUTE": str(CHAT_PER_MINUTE)}
    with start_gateway(tmp_path_factory, database_url_factory, "sqlite", extra_env=extra_env) as started:
        yield started


@pytest.fixture(scope="module")
def scripted_gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url_factory: Callable[[str, str], str], chat: ChatServer
) -> Iterator[Gateway]:
    extra_env = {
        "LLM_BASE_URL": chat.base_url,
        "LLM_API_KEY": "test-key",
        "LLM_TIMEOUT_SECONDS": str(LLM_TIMEOUT_SECONDS),
        "LLM_MAX_RETRIES": "0",
    }
    with start_gateway(tmp_path_factory, database_url_factory, "sqlite", extra_env=extra_env) as started:
        yield started


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@dataclass
class Tab:
    page: Page
    console_errors: list[str] = field(default_factory=list)

    def errors(self, *, allowed_statuses: tuple[int, ...] = ()) -> list[str]:
        """Console errors and uncaught exceptions, less the browser's own line for an expected HTTP error."""
        allowed = [f"status of {status}" for status in allowed_statuses]
        return [
            text
            for text in self.console_errors
            if not (text.startswith("Failed to load resource") and any(status in text for status in allowed))
        ]


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    opened = Tab(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            opened.console_errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: opened.console_errors.append(f"uncaught: {error}"))
    yield opened
    context.close()


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def sign_in_by_link(tab: Tab, gateway: Gateway, user: str) -> str:
    token = gateway.token(user)
    tab.page.goto(f"{gateway.base_url}/#token={token}")
    expect(tab.page.get_by_text(f"Signed in as {user}")).to_be_visible()
    return token


def send(page: Page, text: str) -> None:
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("button", name="Send").click()


def test_the_page_is_served_with_a_strict_policy(gateway: Gateway) -> None:
    for path, content_type in [("/", "text/html"), ("/app.js", "text/javascript"), ("/app.css", "text/css")]:
        reply = gateway.call("GET", path)
        assert reply.status == 200, (path, reply)
        assert reply.headers["content-type"].startswith(content_type)
        assert reply.headers["cache-control"] == "no-cache"
        policy = reply.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
        assert reply.headers["x-content-type-options"] == "nosniff"
    page = gateway.call("GET", "/").body.decode()
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the page loads nothing from elsewhere"
    assert "<script>" not in page and "style=" not in page, "no inline script or style (the CSP forbids them)"


@pytest.mark.parametrize("target", ["native", "docker"])
def test_the_rendered_config_carries_the_page_itself(target: str) -> None:
    """Inlined, so the Envoy container (which mounts only the gateway-config volume) serves it too."""
    config = envoy_config.render(Settings.load({}), target)  # type: ignore[arg-type]
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    served = {route["match"].get("path"): route for route in routes if "direct_response" in route}
    for path, file_name in [("/", "index.html"), ("/app.js", "app.js"), ("/app.css", "app.css")]:
        body = served[path]["direct_response"]["body"]["inline_string"]
        assert body == (envoy_config.PAGE_DIR / file_name).read_text(encoding="utf-8")
        assert len(body.encode()) < manager["route_config"]["max_direct_response_body_size_bytes"]


def test_signed_in_by_link_a_streamed_reply_adds_a_task_to_the_list(gateway: Gateway, tab: Tab, tmp_path: Path) -> None:
    page, user = tab.page, new_user()
    token = sign_in_by_link(tab, gateway, user)

    assert "token" not in page.url, "the token was left in the address bar"
    assert page.evaluate("() => location.hash") == ""
    assert page.evaluate("() => sessionStorage.getItem('todo.token')") == token
    tasks = page.get_by_role("region", name="Tasks")
    expect(tasks).to_contain_text("No tasks yet")
    page.evaluate("() => { window.sameDocument = true; }")

    send(page, "add buy milk")

    log = page.get_by_role("region", name="Conversation")
    expect(log).to_contain_text("add buy milk")
    expect(log).to_contain_text("Added task 1: Buy milk.")
    expect(log.locator(".tool")).to_contain_text("add_task(title: Buy milk) → created #1 “Buy milk”")
    expect(tasks.get_by_text("Buy milk")).to_be_visible()
    expect(tasks).to_contain_text("1 pending")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert page.evaluate("() => window.sameDocument") is True, "the page reloaded"
    expect(
        page.get_by_role("navigation", name="Conversations").get_by_role("button", name="add buy milk")
    ).to_be_visible()
    page.screenshot(path=tmp_path / "page.png")
    assert (tmp_path / "page.png").stat().st_size > 0

    # Stored, as REST sees it.
    conversations = gateway.call("GET", f"/api/{user}/conversations", user=user).json()["conversations"]
    assert [conversation["id"] for conversation in conversations] == [1]
    # A reload keeps the session (sessionStorage), still without the token in the address.
    page.reload()
    expect(page.get_by_text(f"Signed in as {user}")).to_be_visible()
    expect(tasks.get_by_text("Buy milk")).to_be_visible()
    assert "token" not in page.url
    assert tab.errors() == []


def test_complete_and_delete_from_the_list_go_through_rest(gateway: Gateway, tab: Tab) -> None:
    page, user = tab.page, new_user()
    created = gateway.call(
        "POST",
        f"/api/{user}/tasks",
        user=user,
        body={"title": "Pay rent", "due_date": "2026-12-24", "priority": "high"},
    )
    assert created.status == 200, created
    assert gateway.call("POST", f"/api/{user}/tasks", user=user, body={"title": "Walk the dog"}).status == 200
    sign_in_by_link(tab, gateway, user)
    tasks = page.get_by_role("region", name="Tasks")
    expect(tasks).to_contain_text("2 pending")
    expect(tasks.locator("time[datetime='2026-12-24']")).to_contain_text("due")
    expect(tasks).to_contain_text("high priority")

    tasks.get_by_role("button", name="Complete task 1: Pay rent").click()

    expect(tasks.get_by_role("button", name="Reopen task 1: Pay rent")).to_be_visible()
    expect(tasks).to_contain_text("1 pending")
    assert gateway.call("GET", f"/api/{user}/tasks/1", user=user).json()["completed"] is True
    # Pending first: the open task is now above the completed one.
    expect(tasks.locator("li.task").first).to_contain_text("Walk the dog")

    tasks.get_by_role("button", name="Delete task 2: Walk the dog").click()

    expect(tasks.get_by_text("Walk the dog")).to_have_count(0)
    assert gateway.call("GET", f"/api/{user}/tasks/2", user=user).status == 404
    tasks.get_by_role("button", name="Reopen task 1: Pay rent").click()
    expect(tasks.get_by_role("button", name="Complete task 1: Pay rent")).to_be_visible()
    assert gateway.call("GET", f"/api/{user}/tasks/1", user=user).json()["completed"] is False
    assert tab.errors() == []


def test_a_failed_tool_is_shown_with_its_error(gateway: Gateway, tab: Tab) -> None:
    page, user = tab.page, new_user()
    sign_in_by_link(tab, gateway, user)

    send(page, "complete task 9")

    log = page.get_by_role("region", name="Conversation")
    expect(log.locator(".tool.failed")).to_contain_text("complete_task(task_id: 9) ✗ task 9 not found")
    expect(log).to_contain_text("I couldn't find task 9.")
    assert tab.errors() == []


def test_conversations_can_be_switched_and_a_new_one_started(gateway: Gateway, tab: Tab) -> None:
    page, user = tab.page, new_user()
    for message in ("add buy milk", "add walk the dog"):
        reply = gateway.call("POST", f"/api/{user}/chat", user=user, body={"message": message}, timeout=60)
        assert reply.status == 200, reply
    sign_in_by_link(tab, gateway, user)
    conversations = page.get_by_role("navigation", name="Conversations")
    log = page.get_by_role("region", name="Conversation")

    messages = log.locator("article.message")

    conversations.get_by_role("button", name="add buy milk").click()

    expect(messages).to_have_count(2)
    expect(messages.last).to_contain_text("Added task 1: Buy milk.")
    assert "dog" not in " ".join(messages.all_inner_texts())
    expect(conversations.get_by_role("button", name="add buy milk")).to_have_attribute("aria-current", "true")

    conversations.get_by_role("button", name="add walk the dog").click()

    expect(messages.last).to_contain_text("Added task 2: Walk the dog.")
    expect(messages).to_have_count(2)
    assert "milk" not in " ".join(messages.all_inner_texts())
    send(page, "what is pending?")  # continues conversation 2
    expect(messages.last).to_contain_text("You have 2 pending tasks")
    stored = gateway.call("GET", f"/api/{user}/conversations/2/messages", user=user).json()["messages"]
    assert [message["content"] for message in stored][2] == "what is pending?"

    page.get_by_role("button", name="New", exact=True).click()

    expect(messages).to_have_count(0)
    send(page, "add call mom")
    expect(messages.last).to_contain_text("Added task 3: Call mom.")
    expect(conversations.get_by_role("list").get_by_role("button")).to_have_count(3)
    assert len(gateway.call("GET", f"/api/{user}/conversations", user=user).json()["conversations"]) == 3
    assert tab.errors() == []


def test_a_bad_token_is_a_clear_message_not_a_blank_page(gateway: Gateway, tab: Tab) -> None:
    page, user = tab.page, new_user()
    alert = page.get_by_role("alert")

    page.goto(f"{gateway.base_url}/#token={gateway.token(user, secret='not-the-secret-' + 'y' * 32)}")

    expect(alert).to_contain_text("Your token was refused (invalid or expired token)")
    expect(page.get_by_role("textbox", name="Token")).to_be_visible()
    assert "token=" not in page.url

    page.goto(f"{gateway.base_url}/#token=not-a-jwt")
    expect(alert).to_contain_text("That token can't be used: it is not a JWT")
    assert "token=" not in page.url

    # A pasted good token signs in.
    page.get_by_role("textbox", name="Token").fill(gateway.token(user))
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text(f"Signed in as {user}")).to_be_visible()
    expect(alert).to_be_hidden()
    expect(page.get_by_role("region", name="Tasks")).to_contain_text("No tasks yet")
    assert tab.errors(allowed_statuses=(401,)) == []


def test_a_rate_limited_turn_says_when_to_retry(gateway: Gateway, tab: Tab) -> None:
    page, user = tab.page, new_user()
    for _ in range(CHAT_PER_MINUTE):
        reply = gateway.call("POST", f"/api/{user}/chat", user=user, body={"message": "hello"}, timeout=60)
        assert reply.status == 200, reply
    limited = gateway.call("POST", f"/api/{user}/chat", user=user, body={"message": "hello"})
    assert limited.status == 429 and int(limited.headers["retry-after"]) > 0, limited
    sign_in_by_link(tab, gateway, user)

    send(page, "add buy milk")

    expect(page.get_by_role("alert")).to_have_text(re.compile(r"Too many requests.*Try again in \d+ s\."))
    expect(page.get_by_role("region", name="Conversation").locator("article.failed")).to_contain_text(
        "Too many requests"
    )
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert tab.errors(allowed_statuses=(429,)) == []


def test_the_reply_shows_while_it_streams_and_a_stalled_turn_says_why(
    scripted_gateway: Gateway, chat: ChatServer, tab: Tab
) -> None:
    page, user, key = tab.page, new_user(), uuid.uuid4().hex
    chat.script(key, model.stall("Thinking it over", 30))
    sign_in_by_link(tab, scripted_gateway, user)

    send(page, f"hi [[{key}]]")

    log = page.get_by_role("region", name="Conversation")
    # The first words are on the page while the turn is still running (the model went silent).
    expect(log.locator("article.assistant[data-state='streaming']")).to_contain_text("Thinking it over")
    expect(page.get_by_role("button", name="Send")).to_be_disabled()
    # Then the agent gives up on the model: the stream's last event is an error, shown as such.
    expect(log.locator("article.assistant[data-state='failed']")).to_contain_text("That took too long")
    expect(page.get_by_role("alert")).to_contain_text("That took too long")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert tab.errors() == []


def test_a_model_outage_is_a_503_message(scripted_gateway: Gateway, chat: ChatServer, tab: Tab) -> None:
    page, user, key = tab.page, new_user(), uuid.uuid4().hex
    chat.script(key, then=model.error(500, {"retry-after-ms": "10"}))
    sign_in_by_link(tab, scripted_gateway, user)

    send(page, f"hi [[{key}]]")

    expect(page.get_by_role("alert")).to_contain_text(
        "The service is unavailable right now (the model is unavailable; try again later)"
    )
    expect(page.get_by_role("textbox", name="Message")).to_be_editable()
    assert tab.errors(allowed_statuses=(503,)) == []
