"""The built-in local model: an offline, deterministic, OpenAI-compatible Chat Completions server.

`create_app()` is the ASGI app the agent talks to (through the same `openai` SDK code path as
any other model); `respond(messages)` is its logic as a plain function.
"""

from agent_service.builtin_model.app import MODEL_NAME, create_app
from agent_service.builtin_model.brain import Call, Reply, respond

__all__ = ["MODEL_NAME", "Call", "Reply", "create_app", "respond"]
