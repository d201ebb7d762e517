"""TaskService over gRPC: validate, scope by the caller, call the store, answer protos."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from common import db, validation
from common.auth import authorized_user
from common.errors import InvalidArgument, NotFound
from common.pagination import PageTokens, page_size
from common.ratelimit import rate_limited
from common.settings import Settings
from task_service.store import STATUS_FILTERS, TaskRow, TaskStore
from todo.v1 import task_pb2, task_pb2_grpc

SERVICE_NAMES = [task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name]
MIGRATIONS = Path(__file__).parent / "migrations"


def task_message(row: TaskRow) -> task_pb2.Task:
    created_at, updated_at = Timestamp(), Timestamp()
    created_at.FromDatetime(row.created_at)
    updated_at.FromDatetime(row.updated_at)
    return task_pb2.Task(
        id=row.id,
        title=row.title,
        description=row.description,
        completed=row.completed,
        created_at=created_at,
        updated_at=updated_at,
    )


def _found(row: TaskRow | None, task_id: int) -> task_pb2.Task:
    # Another user's task and a missing one get the same answer.
    if row is None:
        raise NotFound(f"task {task_id} not found")
    return task_message(row)


class TaskServicer(task_pb2_grpc.TaskServiceServicer):
    def __init__(self, store: TaskStore, page_tokens: PageTokens) -> None:
        self._store = store
        self._page_tokens = page_tokens

    @rate_limited("writes")
    async def CreateTask(self, request: task_pb2.CreateTaskRequest, context: grpc.aio.ServicerContext) -> task_pb2.Task:
        user_id = authorized_user(request.user_id)
        title = validation.title(request.title)
        description = validation.description(request.description)
        return task_message(await self._store.create(user_id, title, description))

    async def GetTask(self, request: task_pb2.GetTaskRequest, context: grpc.aio.ServicerContext) -> task_pb2.Task:
        user_id = authorized_user(request.user_id)
        task_id = validation.positive_id(request.task_id, "task_id")
        return _found(await self._store.get(user_id, task_id), task_id)

    async def ListTasks(
        self, request: task_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListTasksResponse:
        user_id = authorized_user(request.user_id)
        status = request.status.strip().lower() or "all"
        if status not in STATUS_FILTERS:
            raise InvalidArgument("status must be one of: all, pending, completed")
        limit = page_size(request.page_size)
        after_id = self._page_tokens.decode(user_id, f"tasks:{status}", request.page_token) or 0
        if not isinstance(after_id, int):
            raise InvalidArgument("page_token is invalid")
        # One extra row tells whether another page follows.
        rows = await self._store.list(user_id, status, after_id, limit + 1)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = self._page_tokens.encode(user_id, f"tasks:{status}", rows[-1].id)
        return task_pb2.ListTasksResponse(tasks=[task_message(row) for row in rows], next_page_token=next_token)

    @rate_limited("writes")
    async def UpdateTask(self, request: task_pb2.UpdateTaskRequest, context: grpc.aio.ServicerContext) -> task_pb2.Task:
        user_id = authorized_user(request.user_id)
        task_id = validation.positive_id(request.task_id, "task_id")
        changes = {}
        if request.HasField("title"):
            changes["title"] = validation.title(request.title)
        if request.HasField("description"):
            changes["description"] = validation.description(request.description)
        return _found(await self._store.update(user_id, task_id, changes), task_id)

    @rate_limited("writes")
    async def SetTaskCompleted(
        self, request: task_pb2.SetTaskCompletedRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.Task:
        user_id = authorized_user(request.user_id)
        task_id = validation.positive_id(request.task_id, "task_id")
        completed = request.completed if request.HasField("completed") else True
        return _found(await self._store.set_completed(user_id, task_id, completed), task_id)

    @rate_limited("writes")
    async def DeleteTask(self, request: task_pb2.DeleteTaskRequest, context: grpc.aio.ServicerContext) -> task_pb2.Task:
        user_id = authorized_user(request.user_id)
        task_id = validation.positive_id(request.task_id, "task_id")
        return _found(await self._store.delete(user_id, task_id), task_id)


@asynccontextmanager
async def lifespan(server: grpc.aio.Server, settings: Settings) -> AsyncIterator[None]:
    async with db.migrated_engine(MIGRATIONS, settings.database_url("task"), settings.database_pool_size) as engine:
        task_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(TaskStore(engine), PageTokens(settings)), server)
        yield
