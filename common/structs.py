"""google.protobuf Struct/Value <-> plain Python values, for the JSON that tool calls and
metadata carry.

json_format.ParseDict/MessageToDict walk any message generically and cost two to three times
more than these direct conversions (bench/NOTES.md); a chat turn converts every tool call of
its history window several times. Numbers: a Struct holds doubles, so whole numbers come back
as ints (a task id is 3 again, not 3.0); NaN and infinities, which JSON cannot hold, are refused
with ValueError, as json_format refuses them.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import struct_pb2

WHOLE_NUMBER_LIMIT = 2**53  # doubles hold every integer up to this exactly


def from_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return _number(value.number_value)
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or nothing set


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: from_value(item) for key, item in struct.fields.items()}


def to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def set_struct(field: struct_pb2.Struct, data: dict[str, Any]) -> None:
    """Fill a message's Struct field with `data`, marking it set even when `data` is empty."""
    field.SetInParent()
    field.update(data)


def to_value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, int | float):
        value.number_value = data
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, dict):
        value.struct_value.SetInParent()  # set even when empty: {} is not null
        value.struct_value.update(data)
    elif isinstance(data, list | tuple):
        value.list_value.SetInParent()  # [] is not null either
        value.list_value.extend(data)
    else:
        raise ValueError(f"not a JSON value: {type(data).__name__}")
    return value


def _number(number: float) -> int | float:
    if not math.isfinite(number):
        raise ValueError(f"{number} is not a JSON number")
    if number.is_integer() and abs(number) < WHOLE_NUMBER_LIMIT:
        return int(number)
    return number
