"""ChatKit's custom-backend protocol at POST /chatkit, built on the official `openai-chatkit` SDK.

A ChatKit frontend (the web component, `api: {url: "<gateway>/chatkit", domainKey, fetch}`)
sends one JSON request per action; the SDK's `ChatKitServer.process` parses it with its own
pydantic request types and answers JSON or server-sent events of its own event types. This
module supplies what the SDK leaves to a backend:

- the Store: conversation_service over gRPC (agent_service/chatkit_store.py: threads are the
  user's conversations, `thr_<id>`, items their messages);
- `respond()`: our own chat turn, `Agent.turn` with a ChatRequest for the thread's
  conversation (the code path of Chat and ChatStream: same tools, limits, Idempotency-Key and
  storage). Text deltas stream into an assistant message item; tool calls become a workflow item
  (one task per call, with its arguments and result); after a turn whose tools changed tasks a
  `client_effect` named `tasks_changed` tells the page to refresh its task list. A new thread is
  titled by conversation_service after its first message, and the title is sent
  (`thread.updated`) when the turn ends. A failed turn is an `error` event with its message;
- the HTTP endpoint (ChatKitApp): the bearer token as for /mcp (the app's bearer middleware,
  agent_service/mcp_auth.py, has verified it; no token or a refused one: 401; the verifier's
  upstream down: 503 with Retry-After), the request parsed once up front so that a malformed
  body is 400 (never the SDK's validation error as a 500), the thread checked to be the
  caller's (404 otherwise, before anything streams), the chat rate limit spent for a request
  that runs a turn (429 with Retry-After), then the SDK.

Each message is stored exactly once: the turn stores the user's message (first, as for Chat)
and the answer; the Store's add_thread_item, which the SDK calls for both, stores nothing.
Not supported (400): attachments, transcription, custom actions, client tool outputs and
structured input (this backend never asks for them).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime
from typing import Any

import grpc
from chatkit.errors import CustomStreamError
from chatkit.server import ChatKitServer, NonStreamingResult, StreamingResult
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageContentPartAdded,
    AssistantMessageContentPartDone,
    AssistantMessageContentPartTextDelta,
    AssistantMessageItem,
    AttachmentsCreateReq,
    AttachmentsDeleteReq,
    ChatKitReq,
    ClientEffectEvent,
    ErrorEvent,
    InputTranscribeReq,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemUpdatedEvent,
    ThreadMetadata,
    ThreadsAddClientToolOutputReq,
    ThreadsAddStructuredInputReq,
    ThreadsAddUserMessageReq,
    ThreadsCreateReq,
    ThreadsCustomActionReq,
    ThreadsRetryAfterItemReq,
    ThreadsSyncCustomActionReq,
    ThreadStreamEvent,
    UserMessageInput,
    UserMessageItem,
    Workflow,
    WorkflowItem,
    WorkflowTaskAdded,
)
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from agent_service import tools
from agent_service.agent import Agent, Delta, Done, Failed, ToolRun, upstream
from agent_service.chatkit_store import (
    NOT_SUPPORTED,
    Context,
    ConversationStore,
    conversation_of,
    thread_id_of,
    workflow_of,
)
from agent_service.chatkit_store import task_of as workflow_task
from agent_service.mcp_auth import CHATKIT_PATH
from common import audit, metrics, ratelimit, validation
from common.auth import Caller, bearer_token, reset_caller, set_caller
from common.clients import caller_metadata
from common.errors import InvalidArgument, ResourceExhausted, ServiceError, Unauthenticated, status_for
from common.logs import request_id_var
from todo.v1 import agent_pb2, conversation_pb2, conversation_pb2_grpc

log = logging.getLogger("agent_service.chatkit")

MAX_BODY_BYTES = 1024 * 1024  # the gateway's cap too
RPC_TIMEOUT_SECONDS = 10.0
RETRY_AFTER_SECONDS = "5"
TASKS_CHANGED = "tasks_changed"
REQUESTS = TypeAdapter[ChatKitReq](ChatKitReq)
# Requests that run a chat turn: they spend the caller's chat budget, as Chat does.
TURNS = (ThreadsCreateReq, ThreadsAddUserMessageReq, ThreadsRetryAfterItemReq)
UNSUPPORTED = (
    AttachmentsCreateReq,
    AttachmentsDeleteReq,
    InputTranscribeReq,
    ThreadsCustomActionReq,
    ThreadsSyncCustomActionReq,
    ThreadsAddClientToolOutputReq,
    ThreadsAddStructuredInputReq,
)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def user_text(item: UserMessageItem | UserMessageInput) -> str:
    """What the user wrote: the text parts (a tag as its text), after the quoted text if any."""
    text = "".join(part.text for part in item.content)  # input_text, and input_tag as its text
    if item.quoted_text:
        quoted = "\n".join(f"> {line}" for line in item.quoted_text.splitlines())
        text = f"{quoted}\n\n{text}"
    return text


def changed_tasks(calls: list[Any]) -> list[str]:
    """The tools of a turn that changed something (succeeded and are not read-only)."""
    names = [call.name for call in calls if not call.HasField("error") and tools.is_write(call.name)]
    return list(dict.fromkeys(names))


class TurnItems:
    """A turn's events as ChatKit items: text into an assistant message, tool calls into a
    workflow; each closed when the other kind starts and at the end."""

    def __init__(self, server: TodoChatKitServer, thread: ThreadMetadata, context: Context) -> None:
        self._server, self._thread, self._context = server, thread, context
        self.message: AssistantMessageItem | None = None
        self.workflow: WorkflowItem | None = None
        self._calls: list[conversation_pb2.ToolCall] = []  # those of the open workflow

    def _id(self, kind: Any) -> str:
        return self._server.store.generate_item_id(kind, self._thread, self._context)

    def text(self, delta: str) -> list[ThreadStreamEvent]:
        events = self._close_workflow()
        if self.message is None:
            self.message = AssistantMessageItem(
                id=self._id("message"), thread_id=self._thread.id, created_at=datetime.now(), content=[]
            )
            events.append(ThreadItemAddedEvent(item=self.message.model_copy(deep=True)))
            self.message.content.append(AssistantMessageContent(text=""))
            events.append(
                ThreadItemUpdatedEvent(
                    item_id=self.message.id,
                    update=AssistantMessageContentPartAdded(content_index=0, content=AssistantMessageContent(text="")),
                )
            )
        self.message.content[0].text += delta
        events.append(
            ThreadItemUpdatedEvent(
                item_id=self.message.id, update=AssistantMessageContentPartTextDelta(content_index=0, delta=delta)
            )
        )
        return events

    def tool(self, call: conversation_pb2.ToolCall) -> list[ThreadStreamEvent]:
        events = self._close_message()
        if self.workflow is None:
            self.workflow = WorkflowItem(
                id=self._id("workflow"),
                thread_id=self._thread.id,
                created_at=datetime.now(),
                workflow=Workflow(type="custom", tasks=[]),
            )
            events.append(ThreadItemAddedEvent(item=self.workflow.model_copy(deep=True)))
        task = workflow_task(call)
        self.workflow.workflow.tasks.append(task)
        self._calls.append(call)
        index = len(self.workflow.workflow.tasks) - 1
        events.append(
            ThreadItemUpdatedEvent(item_id=self.workflow.id, update=WorkflowTaskAdded(task_index=index, task=task))
        )
        return events

    def close(self) -> list[ThreadStreamEvent]:
        return [*self._close_workflow(), *self._close_message()]

    def _close_message(self) -> list[ThreadStreamEvent]:
        if self.message is None:
            return []
        message, self.message = self.message, None
        return [
            ThreadItemUpdatedEvent(
                item_id=message.id,
                update=AssistantMessageContentPartDone(content_index=0, content=message.content[0].model_copy()),
            ),
            ThreadItemDoneEvent(item=message),
        ]

    def _close_workflow(self) -> list[ThreadStreamEvent]:
        if self.workflow is None:
            return []
        workflow, self.workflow = self.workflow, None
        workflow.workflow = workflow_of(self._calls)
        self._calls = []
        return [ThreadItemDoneEvent(item=workflow)]


class TodoChatKitServer(ChatKitServer[Context]):
    """The SDK's server with our Store and our agent's turn as `respond`."""

    store: ConversationStore

    def __init__(self, agent: Agent, store: ConversationStore) -> None:
        super().__init__(store)
        self._agent = agent

    async def respond(
        self, thread: ThreadMetadata, input_user_message: UserMessageItem | None, context: Context
    ) -> AsyncIterator[ThreadStreamEvent]:
        if input_user_message is None:  # only after client tool outputs, which this backend never asks for
            return
        request = agent_pb2.ChatRequest(
            conversation_id=conversation_of(thread.id), message=user_text(input_user_message)
        )
        items = TurnItems(self, thread, context)
        ran: list[conversation_pb2.ToolCall] = []
        failed: Failed | None = None
        try:
            async with aclosing(self._agent.turn(request, context.idempotency_key)) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        for update in items.text(event.text):
                            yield update
                    elif isinstance(event, ToolRun):
                        ran.append(event.call)
                        for update in items.tool(event.call):
                            yield update
                    elif isinstance(event, Failed):
                        failed = event
                        break
                    elif isinstance(event, Done):
                        break
        except (ServiceError, grpc.aio.AioRpcError) as error:  # checks before the turn started
            mapped = status_for(error) or (grpc.StatusCode.INTERNAL, "internal error")
            failed = Failed(*mapped)
        for update in items.close():
            yield update
        changed = changed_tasks(ran)
        if changed:
            yield ClientEffectEvent(name=TASKS_CHANGED, data={"tools": changed})
        if failed is not None:
            raise CustomStreamError(failed.message, allow_retry=failed.code in RETRYABLE)
        if thread.title is None:
            # conversation_service named it after the first message; the SDK sends and saves it.
            await self._title(thread, context)

    async def _title(self, thread: ThreadMetadata, context: Context) -> None:
        context.threads.pop(thread.id, None)
        try:
            fresh = await self.store.load_thread(thread.id, context)
        except (ServiceError, grpc.aio.AioRpcError) as error:
            log.warning("could not read the new thread's title", extra={"error": repr(error)[:200]})
            return
        thread.title = fresh.title


def error_response(code: grpc.StatusCode, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error with the REST API's body shape (google.rpc.Status as JSON)."""
    status = HTTP_STATUS.get(code, 500)
    body = {"code": code.value[0], "message": message, "details": []}
    return JSONResponse(body, status_code=status, headers=headers)


def unauthenticated(message: str) -> JSONResponse:
    return error_response(
        grpc.StatusCode.UNAUTHENTICATED, message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
    )


def mapped_error(error: BaseException) -> JSONResponse:
    mapped = status_for(error)
    if mapped is None:
        log.error("chatkit request failed", exc_info=error)
        return error_response(grpc.StatusCode.INTERNAL, "internal error")
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if mapped[0] == grpc.StatusCode.UNAVAILABLE else None
    return error_response(mapped[0], mapped[1], headers)


def validation_message(error: ValidationError) -> str:
    errors = error.errors()
    where = ".".join(str(part) for part in errors[0]["loc"]) if errors else ""
    what = errors[0]["msg"] if errors else "invalid"
    return f"not a valid ChatKit request: {where + ': ' if where else ''}{what}"[:500]


def sse(event: ThreadStreamEvent) -> bytes:
    return b"data: " + event.model_dump_json(by_alias=True, exclude_none=True).encode() + b"\n\n"


class ChatKitApp:
    """The ASGI endpoint of POST /chatkit (mounted in agent_service/mcp_server.py's app)."""

    def __init__(self, agent: Agent, conversation_channel: grpc.aio.Channel) -> None:
        self._conversations = conversation_pb2_grpc.ConversationServiceStub(conversation_channel)
        self.store = ConversationStore(self._conversations)
        self.server = TodoChatKitServer(agent, self.store)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        caller = self._caller(scope)
        if isinstance(caller, Response):
            await caller(scope, receive, send)
            return
        caller_token = set_caller(caller)
        request_token = request_id_var.set(caller.request_id)
        operation, status = "", 500
        try:
            response, operation = await self._handle(Request(scope, receive), caller)
            status = response.status_code
            await response(scope, receive, send)  # a turn's whole stream
        finally:
            log.info(
                "chatkit request",
                extra={
                    "op": operation,
                    "user_id": caller.user_id,
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
            request_id_var.reset(request_token)
            reset_caller(caller_token)

    def _caller(self, scope: Scope) -> Caller | Response:
        """The caller the bearer middleware verified (mcp_auth's verifier), or a 401."""
        headers = Headers(scope=scope)
        values = headers.getlist("authorization")
        request_id = headers.get("x-request-id", "") or uuid.uuid4().hex
        user = scope.get("user")
        try:
            if len(values) > 1:
                raise Unauthenticated("send one authorization header")
            token = bearer_token(values[0] if values else None)
            if not isinstance(user, AuthenticatedUser) or user.access_token.token.strip() != token:
                raise Unauthenticated("invalid or expired token")
        except Unauthenticated as error:
            audit.record("auth_refused", surface="chatkit", method=CHATKIT_PATH, user=None, reason=error.reason)
            return unauthenticated(error.message)
        subject = user.access_token.subject or user.access_token.client_id
        return Caller(user_id=subject, token=token, request_id=request_id)

    async def _handle(self, request: Request, caller: Caller) -> tuple[Response, str]:
        try:
            body = await read_body(request)
        except TooLarge as error:
            return JSONResponse({"code": 3, "message": error.message, "details": []}, status_code=413), ""
        except ClientDisconnect:
            return Response(status_code=400), ""
        try:
            parsed = REQUESTS.validate_json(body)
        except ValidationError as error:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, validation_message(error)), ""
        operation = parsed.type
        if isinstance(parsed, UNSUPPORTED):
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, f"{operation} is not supported here"), operation
        key = request.headers.get("idempotency-key", "")
        context = Context(caller=caller, idempotency_key=key)
        try:
            await self._prepare(parsed, context)
            result = await self.server.process(body, context)
        except ChatBudgetSpent as error:
            return error_response(error.code, error.message, {"Retry-After": str(error.retry_after)}), operation
        except (ServiceError, grpc.aio.AioRpcError) as error:
            return mapped_error(error), operation
        except ValidationError as error:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, validation_message(error)), operation
        if isinstance(result, NonStreamingResult):
            return Response(result.json, media_type="application/json"), operation
        return (
            StreamingResponse(
                guarded(result),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            ),
            operation,
        )

    async def _prepare(self, parsed: Any, context: Context) -> None:
        """Before the SDK runs: the request must be sound, its thread the caller's, the budget there."""
        if isinstance(parsed, ThreadsCreateReq | ThreadsAddUserMessageReq):
            if parsed.params.input.attachments:
                raise InvalidArgument(NOT_SUPPORTED)
            validation.message_text(user_text(parsed.params.input))  # empty or too long: 400, nothing stored
        thread_id = getattr(getattr(parsed, "params", None), "thread_id", None)
        if isinstance(thread_id, str):
            await self.store.load_thread(thread_id, context)  # NOT_FOUND for another user's thread
        if isinstance(parsed, TURNS):
            await charge_chat(context.caller)
        if isinstance(parsed, ThreadsCreateReq):
            context.new_conversation_id = await self._new_conversation(context)

    async def _new_conversation(self, context: Context) -> int:
        """The conversation of a new thread, made as a first chat turn makes it (untitled: named
        after the first message; with an Idempotency-Key, a retry gets the same one)."""
        key = context.idempotency_key.strip()
        if len(key) > 200 or not key.isprintable():
            raise InvalidArgument("idempotency_key must be at most 200 printable characters")
        with upstream("conversation service"):
            created = await self._conversations.CreateConversation(
                conversation_pb2.CreateConversationRequest(request_id=key),
                metadata=caller_metadata(context.caller),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        thread_id = thread_id_of(created.id)
        context.titles[thread_id] = created.title
        return int(created.id)


async def charge_chat(caller: Caller) -> None:
    """One unit of the caller's chat budget (RATE_LIMIT_CHAT_PER_MINUTE), as a Chat call spends."""
    wait_seconds = await ratelimit.limiter().check("chat", caller.user_id)
    if wait_seconds <= 0:
        return
    retry_after = max(1, math.ceil(wait_seconds))
    metrics.rate_limited("chat")
    audit.record("rate_limited", surface="chatkit", method=CHATKIT_PATH, user=caller.user_id, reason="chat")
    raise ChatBudgetSpent(retry_after)


class ChatBudgetSpent(ResourceExhausted):
    """429 with Retry-After: the caller's chat budget is spent for now."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate limit exceeded for chat; retry after {retry_after} s")
        self.retry_after = retry_after


async def read_body(request: Request) -> bytes:
    """The request body, at most MAX_BODY_BYTES (413 past it, after reading no more than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TooLarge("the request body is too large")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_BODY_BYTES:
            raise TooLarge("the request body is too large")
    return bytes(body)


class TooLarge(InvalidArgument):
    """413: more than MAX_BODY_BYTES."""


async def guarded(result: StreamingResult) -> AsyncIterator[bytes]:
    """The SDK's event stream; an error past the first byte (the status is sent) is a last error event."""
    try:
        async for chunk in result:
            yield chunk
    except Exception as error:
        mapped = status_for(error)
        message = mapped[1] if mapped is not None else "internal error"
        if mapped is None:
            log.error("chatkit stream failed", exc_info=error)
        yield sse(ErrorEvent(code="custom", message=message, allow_retry=mapped is not None and mapped[0] in RETRYABLE))
