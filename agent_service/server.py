"""AgentService over gRPC (Chat and ChatStream share one turn), and the service's lifespan.

The lifespan opens the channels to task_service and conversation_service, builds the model
client, and serves the MCP tools over HTTP (agent_service/mcp_server.py) next to the gRPC
server until shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

import grpc
from google.rpc import status_pb2

from agent_service import mcp_server
from agent_service.agent import Agent, Delta, Done, Event, Failed, ToolRun, TurnFailed
from agent_service.llm import ModelClient
from common.clients import channel
from common.settings import Settings
from todo.v1 import agent_pb2, agent_pb2_grpc, conversation_pb2_grpc, task_pb2_grpc

log = logging.getLogger("agent_service")

SERVICE_NAMES = [agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name]
MCP_STOP_SECONDS = 10.0


def idempotency_header(context: grpc.aio.ServicerContext) -> str:
    """The `idempotency-key` metadata (Envoy forwards the REST header as it)."""
    for key, value in context.invocation_metadata() or ():
        if key == "idempotency-key":
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return ""


def chat_event(event: Event) -> agent_pb2.ChatEvent:
    if isinstance(event, Delta):
        return agent_pb2.ChatEvent(delta=event.text)
    if isinstance(event, ToolRun):
        return agent_pb2.ChatEvent(tool_call=event.call)
    if isinstance(event, Done):
        return agent_pb2.ChatEvent(done=event.response)
    return agent_pb2.ChatEvent(error=status_pb2.Status(code=event.code.value[0], message=event.message))


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def Chat(self, request: agent_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> agent_pb2.ChatResponse:
        async with aclosing(self._agent.turn(request, idempotency_header(context))) as events:
            async for event in events:
                if isinstance(event, Done):
                    return event.response
                if isinstance(event, Failed):
                    raise TurnFailed(event.code, event.message)
        raise TurnFailed(grpc.StatusCode.INTERNAL, "the turn ended without an answer")

    async def ChatStream(
        self, request: agent_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.ChatEvent]:
        # Checks before the turn starts (auth, path user, message, conversation) fail as a
        # status; from then on, a failure is the stream's last event.
        async with aclosing(self._agent.turn(request, idempotency_header(context))) as events:
            async for event in events:
                yield chat_event(event)


@asynccontextmanager
async def lifespan(server: grpc.aio.Server, settings: Settings) -> AsyncIterator[None]:
    task_channel = channel(settings.task_service_addr)
    conversation_channel = channel(settings.conversation_service_addr)
    model = ModelClient(settings)
    agent = Agent(
        settings,
        task_pb2_grpc.TaskServiceStub(task_channel),
        conversation_pb2_grpc.ConversationServiceStub(conversation_channel),
        model,
    )
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(agent), server)
    mcp_stop = asyncio.Event()
    mcp = start_mcp(settings, task_channel, conversation_channel, mcp_stop, agent)
    try:
        yield
    finally:
        mcp_stop.set()
        await stop_mcp(mcp)
        await agent.close()
        await model.close()
        await task_channel.close()
        await conversation_channel.close()


def start_mcp(
    settings: Settings,
    task_channel: grpc.aio.Channel,
    conversation_channel: grpc.aio.Channel,
    stop: asyncio.Event,
    agent: Agent | None = None,
) -> asyncio.Task[None]:
    """MCP (and, with the agent, ChatKit at /chatkit) over HTTP on AGENT_HTTP_HOST:AGENT_HTTP_PORT,
    as a task beside the gRPC server."""
    serving = mcp_server.serve_http(settings, task_channel, conversation_channel, stop, agent)
    task = asyncio.create_task(serving, name="mcp")
    task.add_done_callback(_report_mcp_exit)
    return task


def _report_mcp_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the MCP server stopped", exc_info=task.exception())


async def stop_mcp(task: asyncio.Task[None]) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(task), MCP_STOP_SECONDS)
    except TimeoutError:
        task.cancel()
    except Exception:  # already reported by _report_mcp_exit
        pass
