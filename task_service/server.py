"""TaskService over gRPC: validate, scope by the caller, call the store, answer protos."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from common import db, validation
from common.auth import authorized_user
from common.errors import InvalidArgument, NotFound
from common.pagination import PageTokens, page_size
from common.settings import Settings
from task_service import activity, planning
from task_service.activity import Event
from task_service.models import TaskRow
from task_service.store import SORT_KEYS, TaskStore, sort_key
from todo.v1 import task_pb2, task_pb2_grpc

SERVICE_NAMES = [task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name]
MIGRATIONS = Path(__file__).parent / "migrations"
ACTIVITY_QUERY = "activity"


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def task_message(row: TaskRow) -> task_pb2.Task:
    task = task_pb2.Task(
        id=row.id,
        title=row.title,
        description=row.description,
        completed=row.completed,
        created_at=_timestamp(row.created_at),
        updated_at=_timestamp(row.updated_at),
        due_date=row.due_date,
        due_time=row.due_time,
        priority=row.priority,
        tags=row.tags,
    )
    if row.completed_at is not None:
        task.completed_at.CopyFrom(_timestamp(row.completed_at))
    return task


def event_message(event: Event) -> task_pb2.TaskEvent:
    message = task_pb2.TaskEvent(
        id=event.id,
        task_id=event.task_id,
        action=event.action,
        source=event.source,
        undone=event.undone,
        created_at=_timestamp(event.created_at),
    )
    if event.before is not None:
        message.before.CopyFrom(task_message(event.before))
    if event.after is not None:
        message.after.CopyFrom(task_message(event.after))
    return message


def _found(row: TaskRow | None, task_id: int) -> task_pb2.Task:
    # Another user's task and a missing one get the same answer.
    if row is None:
        raise NotFound(f"task {task_id} not found")
    return task_message(row)


def _tag_values(tags: Any) -> list[str]:
    """UpdateTaskRequest.tags (a ListValue: JSON `[...]`) as strings."""
    if any(value.WhichOneof("kind") != "string_value" for value in tags.values):
        raise InvalidArgument("tags must be a list of strings")
    return [value.string_value for value in tags.values]


def _position(value: Any, sort: str) -> list[Any] | None:
    """A page token's position for `sort`: the sort key of the last task shown."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != len(SORT_KEYS[sort]):
        raise InvalidArgument("page_token is invalid")
    if sort == "updated":
        try:
            datetime.fromisoformat(value[0])
        except (TypeError, ValueError) as error:
            raise InvalidArgument("page_token is invalid") from error
    return value


class TaskServicer(task_pb2_grpc.TaskServiceServicer):
    def __init__(self, store: TaskStore, page_tokens: PageTokens) -> None:
        self._store = store
        self._page_tokens = page_tokens

    async def CreateTask(self, request: task_pb2.CreateTaskRequest, context: grpc.aio.ServicerContext) -> task_pb2.Task:
        user_id = authorized_user(request.user_id)
        title = validation.title(request.title)
        description = validation.description(request.description)
        zone = await self._store.timezone(user_id) if request.due.strip() else planning.DEFAULT_TIMEZONE
        due_date, due_time = planning.due_change(
            request.due or None, request.due_date or None, request.due_time or None, zone
        )
        change = planning.Change(
            title=title,
            description=description,
            due_date=due_date,
            due_time=due_time,
            priority=planning.priority(request.priority),
            tags=planning.tags(list(request.tags)),
        )
        return task_message(
            await self._store.create(user_id, change, activity.source_of(context.invocation_metadata()))
        )

    async def GetTask(self, request: task_pb2.GetTaskRequest, context: grpc.aio.ServicerContext) -> task_pb2.Task:
        user_id = authorized_user(request.user_id)
        task_id = validation.positive_id(request.task_id, "task_id")
        return _found(await self._store.get(user_id, task_id), task_id)

    async def ListTasks(
        self, request: task_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListTasksResponse:
        user_id = authorized_user(request.user_id)
        query = planning.list_query(request.status, request.q, request.tag, request.priority, request.due, request.sort)
        limit = page_size(request.page_size)
        after = _position(self._page_tokens.decode(user_id, query.key(), request.page_token), query.sort)
        zone = await self._store.timezone(user_id) if query.needs_today else planning.DEFAULT_TIMEZONE
        today = planning.today(zone).isoformat()
        # One extra row tells whether another page follows.
        rows = await self._store.list(user_id, query, today, after, limit + 1)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = self._page_tokens.encode(user_id, query.key(), sort_key(rows[-1], query.sort))
        return task_pb2.ListTasksResponse(tasks=[task_message(row) for row in rows], next_page_token=next_token)

    async def UpdateTask(self, request: task_pb2.UpdateTaskRequest, context: grpc.aio.ServicerContext) -> task_pb2.Task:
        user_id = authorized_user(request.user_id)
        task_id = validation.positive_id(request.task_id, "task_id")
        change = await self._update_change(user_id, request)
        source = activity.source_of(context.invocation_metadata())
        return task_message(await self._store.update(user_id, task_id, change, source))

    async def _update_change(self, user_id: str, request: task_pb2.UpdateTaskRequest) -> planning.Change:
        """Only the fields present in the request, each validated."""
        phrase = request.due if request.HasField("due") else None
        zone = await self._store.timezone(user_id) if phrase and phrase.strip() else planning.DEFAULT_TIMEZONE
        due_date, due_time = planning.due_change(
            phrase,
            request.due_date if request.HasField("due_date") else None,
            request.due_time if request.HasField("due_time") else None,
            zone,
        )
        return planning.Change(
            title=validation.title(request.title) if request.HasField("title") else None,
            description=validation.description(request.description) if request.HasField("description") else None,
            due_date=due_date,
            due_time=due_time,
            priority=planning.priority(request.priority) if request.HasField("priority") else None,
            tags=planning.tags(_tag_values(request.tags)) if request.HasField("tags") else None,
        )

    async def SetTaskCompleted(
        self, request: task_pb2.SetTaskCompletedRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.Task:
        user_id = authorized_user(request.user_id)
        task_id = validation.positive_id(request.task_id, "task_id")
        completed = request.completed if request.HasField("completed") else True
        source = activity.source_of(context.invocation_metadata())
        return task_message(await self._store.set_completed(user_id, task_id, completed, source))

    async def DeleteTask(self, request: task_pb2.DeleteTaskRequest, context: grpc.aio.ServicerContext) -> task_pb2.Task:
        user_id = authorized_user(request.user_id)
        task_id = validation.positive_id(request.task_id, "task_id")
        source = activity.source_of(context.invocation_metadata())
        return task_message(await self._store.delete(user_id, task_id, source))

    async def GetSettings(
        self, request: task_pb2.GetSettingsRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.UserSettings:
        user_id = authorized_user(request.user_id)
        return task_pb2.UserSettings(timezone=await self._store.timezone(user_id))

    async def UpdateSettings(
        self, request: task_pb2.UpdateSettingsRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.UserSettings:
        user_id = authorized_user(request.user_id)
        if not request.HasField("timezone"):
            return task_pb2.UserSettings(timezone=await self._store.timezone(user_id))
        timezone = await self._store.set_timezone(user_id, planning.timezone(request.timezone))
        return task_pb2.UserSettings(timezone=timezone)

    async def ListActivity(
        self, request: task_pb2.ListActivityRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListActivityResponse:
        user_id = authorized_user(request.user_id)
        limit = page_size(request.page_size)
        before_id = self._page_tokens.decode(user_id, ACTIVITY_QUERY, request.page_token)
        if before_id is not None and not isinstance(before_id, int):
            raise InvalidArgument("page_token is invalid")
        events = await self._store.events(user_id, before_id, limit + 1)
        next_token = ""
        if len(events) > limit:
            events = events[:limit]
            next_token = self._page_tokens.encode(user_id, ACTIVITY_QUERY, events[-1].id)
        return task_pb2.ListActivityResponse(events=[event_message(e) for e in events], next_page_token=next_token)

    async def Undo(self, request: task_pb2.UndoRequest, context: grpc.aio.ServicerContext) -> task_pb2.TaskEvent:
        user_id = authorized_user(request.user_id)
        source = activity.source_of(context.invocation_metadata())
        return event_message(await self._store.undo(user_id, source))


@asynccontextmanager
async def lifespan(server: grpc.aio.Server, settings: Settings) -> AsyncIterator[None]:
    planning.warm_up()  # dateparser's first call is slow: pay it before serving, not in a request
    async with db.migrated_engine(MIGRATIONS, settings.database_url("task"), settings.database_pool_size) as engine:
        task_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(TaskStore(engine), PageTokens(settings)), server)
        yield
