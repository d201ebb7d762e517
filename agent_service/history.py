"""Stored messages <-> Chat Completions messages, and tool calls <-> ToolCall protos.

The model sees each earlier turn as it happened: the user's message; the assistant's tool
calls (ids `call_<message id>_<i>`) each followed by its result (or `{"error": ...}`); then
the assistant's text. That is what lets a model (the built-in one included) resolve
"delete it" or "the second one" from an earlier turn.

Protobuf's Struct/Value hold every number as a double; numbers that are whole come back as
ints, so a task id is `3` again, not `3.0`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from common import structs
from todo.v1 import conversation_pb2


def model_messages(
    system_prompt: str, earlier: Iterable[conversation_pb2.Message], user_text: str
) -> list[dict[str, Any]]:
    """The messages of one model request: system prompt, earlier turns, the new user message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}]
    for stored in earlier:
        messages.extend(stored_message(stored))
    messages.append({"role": "user", "content": user_text})
    return messages


def stored_message(stored: conversation_pb2.Message) -> list[dict[str, Any]]:
    """One stored message as the Chat Completions messages it stands for."""
    if stored.role != "assistant":
        return [{"role": "user", "content": stored.content}]
    messages: list[dict[str, Any]] = []
    if stored.tool_calls:
        ids = [f"call_{stored.id}_{index}" for index in range(len(stored.tool_calls))]
        messages.append(
            {
                "role": "assistant",
                # A string, never null: llama.cpp's server (and others) reject a null content.
                "content": "",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": json.dumps(arguments_of(call))},
                    }
                    for call_id, call in zip(ids, stored.tool_calls, strict=True)
                ],
            }
        )
        messages.extend(
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(outcome_of(call))}
            for call_id, call in zip(ids, stored.tool_calls, strict=True)
        )
    messages.append({"role": "assistant", "content": stored.content})
    return messages


def arguments_of(call: conversation_pb2.ToolCall) -> dict[str, Any]:
    return structs.from_struct(call.arguments)


def outcome_of(call: conversation_pb2.ToolCall) -> Any:
    """What the model was told the tool returned: its result, or {"error": ...}."""
    if call.HasField("error"):
        return {"error": call.error}
    if not call.HasField("result"):
        return None
    return structs.from_value(call.result)


def tool_call(
    name: str, arguments: dict[str, Any], result: Any = None, error: str | None = None
) -> conversation_pb2.ToolCall:
    """A ToolCall proto: the arguments the model sent and the result or error it got back."""
    call = conversation_pb2.ToolCall(name=name)
    structs.set_struct(call.arguments, _json_safe(arguments))
    if error is not None:
        call.error = error
    else:
        call.result.CopyFrom(structs.to_value(_json_safe(result)))
    return call


def plain(value: Any) -> Any:
    """A value read back from Struct/Value with whole numbers as ints again."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def _json_safe(value: Any) -> Any:
    # Round-trip through JSON so anything odd a model sent (big ints, nested types) fits a Struct.
    return json.loads(json.dumps(value, default=str))
