"""TaskService end to end: a real task_service process per backend (SQLite and PostgreSQL).

Every RPC's happy path, every input limit (INVALID_ARGUMENT naming the field, nothing
written), page tokens, tenant isolation and concurrent creates. Each test works as fresh
users (random ids), so tests share one process and one database per backend.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from tests.support import ServiceProcess, auth_metadata
from todo.v1 import task_pb2, task_pb2_grpc

TIMEOUT = 30  # seconds per RPC: generous, the machine is shared


class Tasks:
    """TaskService as one user: every call carries that user's token."""

    def __init__(self, stub: task_pb2_grpc.TaskServiceStub, user_id: str) -> None:
        self.stub, self.user_id, self.metadata = stub, user_id, auth_metadata(user_id)

    def _call(self, method: str, request: Any) -> Any:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=TIMEOUT)

    def create(self, title: str = "a task", description: str = "") -> Any:
        return self._call("CreateTask", task_pb2.CreateTaskRequest(title=title, description=description))

    def get(self, task_id: int) -> Any:
        return self._call("GetTask", task_pb2.GetTaskRequest(task_id=task_id))

    def page(self, status: str = "", page_size: int = 0, page_token: str = "") -> Any:
        request = task_pb2.ListTasksRequest(status=status, page_size=page_size, page_token=page_token)
        return self._call("ListTasks", request)

    def update(self, task_id: int, **fields: str) -> Any:
        return self._call("UpdateTask", task_pb2.UpdateTaskRequest(task_id=task_id, **fields))

    def complete(self, task_id: int, completed: bool | None = None) -> Any:
        request = task_pb2.SetTaskCompletedRequest(task_id=task_id)
        if completed is not None:
            request.completed = completed
        return self._call("SetTaskCompleted", request)

    def delete(self, task_id: int) -> Any:
        return self._call("DeleteTask", task_pb2.DeleteTaskRequest(task_id=task_id))

    async def ids(self, status: str = "all") -> list[int]:
        """Every task id of the user (all pages)."""
        found, token = [], ""
        while True:
            page = await self.page(status, page_size=100, page_token=token)
            found += [task.id for task in page.tasks]
            token = page.next_page_token
            if not token:
                return found


@pytest.fixture
async def new_user(task_service: ServiceProcess) -> AsyncIterator[Callable[[], Tasks]]:
    """new_user() -> a fresh user (no tasks yet) talking to the service."""
    async with grpc.aio.insecure_channel(task_service.address) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        yield lambda: Tasks(stub, f"user-{uuid.uuid4().hex[:12]}")


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def assert_invalid(error: grpc.aio.AioRpcError, field: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert field in error.details(), error.details()


def assert_not_found(error: grpc.aio.AioRpcError, task_id: int) -> None:
    assert error.code() == grpc.StatusCode.NOT_FOUND, error
    assert error.details() == f"task {task_id} not found"


# --- happy paths -----------------------------------------------------------------------


async def test_create_then_get(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    created = await alice.create("  Buy milk  ", "two litres")
    assert (created.id, created.title, created.description, created.completed) == (1, "Buy milk", "two litres", False)
    assert created.created_at.ToDatetime() == created.updated_at.ToDatetime()
    assert created.created_at.seconds > 0
    assert await alice.get(1) == created
    second = await alice.create("Call mom")
    assert (second.id, second.description) == (2, "")


async def test_list_filters_by_status(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    for number in range(1, 6):
        await alice.create(f"task {number}")
    await alice.complete(2)
    await alice.complete(4)
    assert await alice.ids() == [1, 2, 3, 4, 5]
    assert await alice.ids("all") == [1, 2, 3, 4, 5]
    assert await alice.ids("pending") == [1, 3, 5]
    assert await alice.ids("completed") == [2, 4]
    listed = await alice.page("completed")
    assert [(task.title, task.completed) for task in listed.tasks] == [("task 2", True), ("task 4", True)]
    assert listed.next_page_token == ""


async def test_list_pages_through_every_task_once(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    for number in range(1, 8):
        await alice.create(f"task {number}")
    for task_id in (1, 4, 6):
        await alice.complete(task_id)

    pages, token = [], ""
    while True:
        page = await alice.page("all", page_size=3, page_token=token)
        pages.append([task.id for task in page.tasks])
        token = page.next_page_token
        if not token:
            break
    assert pages == [[1, 2, 3], [4, 5, 6], [7]]

    first = await alice.page("pending", page_size=2)
    assert [task.id for task in first.tasks] == [2, 3]
    second = await alice.page("pending", page_size=2, page_token=first.next_page_token)
    assert [task.id for task in second.tasks] == [5, 7]
    assert second.next_page_token == ""  # exactly full last page: no empty extra page

    # A task created after a token was minted still shows up on the next page.
    mid = await alice.page("all", page_size=5)
    await alice.create("task 8")
    rest = await alice.page("all", page_size=5, page_token=mid.next_page_token)
    assert [task.id for task in rest.tasks] == [6, 7, 8]


async def test_page_size_zero_means_fifty(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    for number in range(51):
        await alice.create(f"task {number}")
    page = await alice.page(page_size=0)
    assert [task.id for task in page.tasks] == list(range(1, 51))
    assert page.next_page_token
    rest = await alice.page(page_token=page.next_page_token)
    assert [task.id for task in rest.tasks] == [51]
    maximum = await alice.page(page_size=100)
    assert len(maximum.tasks) == 51 and maximum.next_page_token == ""


async def test_update_changes_only_present_fields(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    created = await alice.create("Buy milk", "two litres")

    renamed = await alice.update(1, title="  Buy oat milk ")
    assert (renamed.title, renamed.description) == ("Buy oat milk", "two litres")
    assert renamed.created_at == created.created_at
    assert renamed.updated_at.ToDatetime() > created.updated_at.ToDatetime()

    described = await alice.update(1, description="one litre")
    assert (described.title, described.description) == ("Buy oat milk", "one litre")

    both = await alice.update(1, title="Buy bread", description="")  # present but empty: cleared
    assert (both.title, both.description) == ("Buy bread", "")

    untouched = await alice.update(1)  # nothing present: nothing changes
    assert untouched == both
    assert await alice.get(1) == both
    assert both.completed is False


async def test_set_completed_is_idempotent_and_defaults_to_true(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    await alice.create("Buy milk")

    done = await alice.complete(1)  # `completed` absent: true
    assert done.completed is True
    again = await alice.complete(1)  # never a toggle
    assert again.completed is True
    assert again.updated_at == done.updated_at  # nothing changed, nothing moved
    explicit = await alice.complete(1, True)
    assert explicit.completed is True

    reopened = await alice.complete(1, False)
    assert reopened.completed is False
    assert reopened.updated_at.ToDatetime() > done.updated_at.ToDatetime()
    assert (await alice.complete(1, False)).completed is False
    assert (await alice.get(1)).completed is False
    assert (reopened.title, reopened.id) == ("Buy milk", 1)


async def test_delete_returns_the_task_and_ids_are_never_reused(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    for title in ("one", "two", "three"):
        await alice.create(title, f"about {title}")
    await alice.complete(3)
    before = await alice.get(3)

    deleted = await alice.delete(3)
    assert deleted == before
    assert_not_found(await refused(alice.get(3)), 3)
    assert_not_found(await refused(alice.delete(3)), 3)
    assert_not_found(await refused(alice.update(3, title="x")), 3)
    assert_not_found(await refused(alice.complete(3)), 3)

    assert (await alice.create("four")).id == 4  # the highest id was deleted, still not reused
    await alice.delete(1)
    assert (await alice.create("five")).id == 5
    assert await alice.ids() == [2, 4, 5]


# --- input limits ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("title", "description", "field"),
    [
        ("", "", "title"),
        ("   \t\n ", "", "title"),
        ("x" * 256, "", "title"),
        ("  " + "x" * 256 + "  ", "", "title"),
        ("nul \x00 inside", "", "title"),
        ("fine", "d" * 4001, "description"),
        ("fine", "nul \x00 inside", "description"),
    ],
    ids=["empty", "whitespace", "256", "256-trimmed", "nul-title", "4001", "nul-description"],
)
async def test_create_refuses_bad_input_and_writes_nothing(
    new_user: Callable[[], Tasks], title: str, description: str, field: str
) -> None:
    alice = new_user()
    assert_invalid(await refused(alice.create(title, description)), field)
    assert await alice.ids() == []
    assert (await alice.create("valid")).id == 1  # the refused call took no task number


async def test_create_accepts_the_limits_and_stores_titles_trimmed(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    longest = "é" * 255  # characters, not bytes
    created = await alice.create(f"  {longest}\t ", "d" * 4000)
    assert created.title == longest
    assert len(created.description) == 4000
    assert (await alice.get(created.id)).title == longest
    emoji = "\U0001f6d2" * 255  # outside the BMP: still one character each
    assert (await alice.create(emoji)).title == emoji
    assert_invalid(await refused(alice.create(emoji + "\U0001f6d2")), "title")


async def test_update_refuses_bad_input_and_changes_nothing(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    original = await alice.create("Buy milk", "two litres")
    assert_invalid(await refused(alice.update(1, title="   ")), "title")
    assert_invalid(await refused(alice.update(1, title="x" * 256)), "title")
    assert_invalid(await refused(alice.update(1, title="ok", description="d" * 4001)), "description")
    assert_invalid(await refused(alice.update(1, description="d" * 4001)), "description")
    assert await alice.get(1) == original
    assert (await alice.update(1, title="y" * 255, description="d" * 4000)).title == "y" * 255


@pytest.mark.parametrize("page_size", [101, -1, 1000])
async def test_list_refuses_page_size_out_of_range(new_user: Callable[[], Tasks], page_size: int) -> None:
    assert_invalid(await refused(new_user().page(page_size=page_size)), "page_size")


@pytest.mark.parametrize("status", ["done", "open", "pending,completed", "true"])
async def test_list_refuses_unknown_status(new_user: Callable[[], Tasks], status: str) -> None:
    assert_invalid(await refused(new_user().page(status)), "status")


@pytest.mark.parametrize("task_id", [0, -1, -(2**31)])
async def test_every_rpc_refuses_a_non_positive_task_id(new_user: Callable[[], Tasks], task_id: int) -> None:
    alice = new_user()
    await alice.create("keep me")
    for call in (alice.get(task_id), alice.update(task_id, title="x"), alice.complete(task_id), alice.delete(task_id)):
        assert_invalid(await refused(call), "task_id")
    assert await alice.ids() == [1]
    assert (await alice.get(1)).title == "keep me"


# --- page tokens -----------------------------------------------------------------------


async def test_tampered_page_tokens_are_invalid_argument(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    for number in range(3):
        await alice.create(f"task {number}")
    token = (await alice.page(page_size=1)).next_page_token
    assert token

    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    for index in (2, len(raw) // 2, len(raw) - 1):  # flip a bit in the body, the middle, the MAC
        tampered = bytearray(raw)
        tampered[index] ^= 0x01
        forged = base64.urlsafe_b64encode(bytes(tampered)).decode().rstrip("=")
        assert_invalid(await refused(alice.page(page_size=1, page_token=forged)), "page_token")
    for garbage in ("x", "!!not base64!!", token[:-4], "é" * 10, base64.urlsafe_b64encode(b"{}" * 40).decode()):
        assert_invalid(await refused(alice.page(page_size=1, page_token=garbage)), "page_token")
    assert [task.id for task in (await alice.page(page_size=1, page_token=token)).tasks] == [2]


async def test_page_token_only_works_for_its_own_status(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    for number in range(4):
        await alice.create(f"task {number}")
    pending_token = (await alice.page("pending", page_size=1)).next_page_token
    assert_invalid(await refused(alice.page("completed", page_size=1, page_token=pending_token)), "page_token")
    assert_invalid(await refused(alice.page("all", page_size=1, page_token=pending_token)), "page_token")
    # The page size may change between pages; only the query must stay the same.
    assert [task.id for task in (await alice.page("pending", page_size=2, page_token=pending_token)).tasks] == [2, 3]


# --- tenant isolation ------------------------------------------------------------------


async def test_user_b_can_neither_see_nor_change_user_a_tasks(new_user: Callable[[], Tasks]) -> None:
    alice, bob, carol = new_user(), new_user(), new_user()
    await alice.create("alice 1", "private")
    await alice.create("alice 2")
    alice_before = [await alice.get(1), await alice.get(2)]

    for task_id in (1, 2):
        # The same answer as for a task that does not exist at all.
        assert_not_found(await refused(bob.get(task_id)), task_id)
        assert_not_found(await refused(bob.update(task_id, title="mine now")), task_id)
        assert_not_found(await refused(bob.update(task_id)), task_id)
        assert_not_found(await refused(bob.complete(task_id)), task_id)
        assert_not_found(await refused(bob.complete(task_id, False)), task_id)
        assert_not_found(await refused(bob.delete(task_id)), task_id)
        missing = await refused(carol.get(task_id))
        assert (missing.code(), missing.details()) == (grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
    for status in ("all", "pending", "completed"):
        assert await bob.ids(status) == []

    assert [await alice.get(1), await alice.get(2)] == alice_before
    bob_first = await bob.create("bob 1")
    assert bob_first.id == 1  # B's own numbering, unaffected by A's tasks
    assert (await bob.get(1)).title == "bob 1"
    assert (await alice.get(1)).title == "alice 1"
    await bob.delete(1)
    assert (await alice.get(1)) == alice_before[0]
    assert (await alice.create("alice 3")).id == 3


async def test_a_page_token_minted_for_a_is_invalid_for_b(new_user: Callable[[], Tasks]) -> None:
    alice, bob = new_user(), new_user()
    for number in range(3):
        await alice.create(f"alice {number}")
        await bob.create(f"bob {number}")
    alice_token = (await alice.page(page_size=1)).next_page_token
    assert_invalid(await refused(bob.page(page_size=1, page_token=alice_token)), "page_token")


# --- concurrency -----------------------------------------------------------------------


async def test_fifty_concurrent_creates_get_ids_one_to_fifty(new_user: Callable[[], Tasks]) -> None:
    alice, bob = new_user(), new_user()
    created = await asyncio.gather(
        *(alice.create(f"task {number}") for number in range(50)),
        *(bob.create(f"task {number}") for number in range(5)),  # another user at the same time
    )
    assert sorted(task.id for task in created[:50]) == list(range(1, 51))
    assert sorted(task.id for task in created[50:]) == [1, 2, 3, 4, 5]
    assert await alice.ids() == list(range(1, 51))
    titles = {task.id: task.title for task in (await alice.page(page_size=100)).tasks}
    assert sorted(titles.values()) == sorted(f"task {number}" for number in range(50))


# --- planning: the activity log and undo under concurrency, the source of a change --------------


async def test_concurrent_undos_each_revert_a_different_change(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    for number in range(8):
        await alice.create(f"task {number}")
    undo = task_pb2.UndoRequest()
    # The event counter's row lock serializes them: no two revert the same change, none is lost.
    reverts = await asyncio.gather(*(alice._call("Undo", undo) for _ in range(8)))
    assert sorted(event.task_id for event in reverts) == list(range(1, 9))
    assert {event.action for event in reverts} == {"deleted"}
    assert await alice.ids() == []
    assert_not_found_text = await refused(alice._call("Undo", undo))
    assert assert_not_found_text.code() == grpc.StatusCode.NOT_FOUND


async def test_changes_and_undos_at_once_keep_the_log_and_tasks_consistent(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    for number in range(6):
        await alice.create(f"task {number}")
    # Writes to several tasks and undos interleaved: no deadlock, every call answers. An undo
    # that runs first reverts a create, so a change of that task may rightly be NOT_FOUND.
    calls = [alice.update(task_id, title=f"renamed {task_id}") for task_id in range(1, 7)]
    calls += [alice.complete(task_id) for task_id in range(1, 7)]
    calls += [alice._call("Undo", task_pb2.UndoRequest()) for _ in range(4)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert all(
        isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.NOT_FOUND for error in refused
    ), refused
    assert all(not isinstance(outcome, BaseException) for outcome in outcomes[12:]), "every undo answers"
    events = (await alice._call("ListActivity", task_pb2.ListActivityRequest(page_size=100))).events
    assert [event.id for event in events] == list(range(len(events), 0, -1))  # dense, newest first
    assert len(events) == 6 + 12 - len(refused) + 4
    assert sum(event.undone for event in events) == 4
    # Replaying the surviving changes' "after" gives exactly the tasks there are now.
    state: dict[int, Any] = {}
    for event in reversed(events):
        if event.HasField("after"):
            state[event.task_id] = event.after
        else:
            state.pop(event.task_id, None)
    now = {task.id: task for task in (await alice.page(page_size=100)).tasks}
    assert now == state


@pytest.mark.parametrize(("sent", "recorded"), [("chat", "chat"), ("mcp", "mcp"), ("admin", "rest"), (None, "rest")])
async def test_the_source_of_a_change_comes_from_metadata(
    new_user: Callable[[], Tasks], sent: str | None, recorded: str
) -> None:
    alice = new_user()
    metadata = alice.metadata + ((("x-todo-source", sent),) if sent else ())
    await alice.stub.CreateTask(task_pb2.CreateTaskRequest(title="t"), metadata=metadata, timeout=TIMEOUT)
    [event] = (await alice._call("ListActivity", task_pb2.ListActivityRequest())).events
    assert (event.action, event.source) == ("created", recorded)


async def test_settings_and_tags_over_grpc(new_user: Callable[[], Tasks]) -> None:
    alice = new_user()
    assert (await alice._call("GetSettings", task_pb2.GetSettingsRequest())).timezone == "UTC"
    updated = await alice._call("UpdateSettings", task_pb2.UpdateSettingsRequest(timezone="Asia/Tokyo"))
    assert updated.timezone == "Asia/Tokyo"
    assert (await alice._call("GetSettings", task_pb2.GetSettingsRequest())).timezone == "Asia/Tokyo"
    assert_invalid(
        await refused(alice._call("UpdateSettings", task_pb2.UpdateSettingsRequest(timezone="x"))), "timezone"
    )
    created = await alice._call("CreateTask", task_pb2.CreateTaskRequest(title="t", tags=["A", "b"]))
    assert list(created.tags) == ["a", "b"]
    request = task_pb2.UpdateTaskRequest(task_id=created.id)
    request.tags.SetInParent()  # present and empty: clear the tags
    assert list((await alice._call("UpdateTask", request)).tags) == []
    request = task_pb2.UpdateTaskRequest(task_id=created.id)
    request.tags.append(3)
    assert_invalid(await refused(alice._call("UpdateTask", request)), "tags")
