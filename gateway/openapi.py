"""OpenAPI 3 for the REST API, generated from the descriptor set Envoy transcodes with.

Reads build/todo.pb (a FileDescriptorSet with source info), takes every RPC with a
`google.api.http` annotation and describes it as Envoy's gRPC-JSON transcoder serves it:
path parameters from the template, the rest of the request as query parameters (GET,
DELETE) or as the JSON body (`body: "*"`), responses in proto3 JSON with the transcoder's
print options (snake_case names, default values printed, int32 as numbers, Timestamp as an
RFC 3339 string, Struct as an object, Value as any JSON). Comments in the protos become
descriptions; the input limits of API.md come from LIMITS below. The one `servers` entry is
PUBLIC_BASE_URL (or --server-url), so the document names the gateway clients actually reach.

`http_bindings` and PATH_PARAM are shared with gateway/envoy_config.py, which routes exactly the
annotated RPCs and refuses path fields in query strings.

    python -m gateway.openapi [--descriptor build/todo.pb] [--out build/openapi.json] [--server-url URL]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pb2 import FieldDescriptorProto as FieldProto

from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR_SET = ROOT / "build" / "todo.pb"
OPENAPI_FILE = ROOT / "build" / "openapi.json"
SERVICES = ("todo.v1.TaskService", "todo.v1.ConversationService", "todo.v1.AgentService")

Schema = dict[str, Any]

# Request-side limits of the public contract (API.md), by field name.
NO_NUL_WITH_TEXT = r"^[^\u0000]*\S[^\u0000]*$"
LIMITS: dict[str, Schema] = {
    "title": {"minLength": 1, "maxLength": 255, "pattern": NO_NUL_WITH_TEXT},
    "description": {"maxLength": 4000, "pattern": r"^[^\u0000]*$"},
    "message": {"minLength": 1, "maxLength": 8000, "pattern": NO_NUL_WITH_TEXT},
    "page_size": {"minimum": 0, "maximum": 100},
    "task_id": {"minimum": 1},
    "conversation_id": {"minimum": 1},
    "status": {"enum": ["all", "pending", "completed"]},
    "idempotency_key": {"maxLength": 200},
}

SCALARS: dict[int, Schema] = {
    FieldProto.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldProto.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # proto3 JSON prints 64-bit integers as strings.
    FieldProto.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldProto.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldProto.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldProto.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldProto.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldProto.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldProto.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldProto.TYPE_BOOL: {"type": "boolean"},
    FieldProto.TYPE_STRING: {"type": "string"},
    FieldProto.TYPE_BYTES: {"type": "string", "format": "byte"},
}

WELL_KNOWN: dict[str, Schema] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    ".google.protobuf.Value": {"description": "Any JSON value."},
    ".google.protobuf.ListValue": {"type": "array", "items": {}},
    ".google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    ".google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
    ".google.rpc.Status": {"$ref": "#/components/schemas/Error"},
}

ERROR_SCHEMA: Schema = {
    "type": "object",
    "description": "A google.rpc.Status: the gRPC status code, a message naming the problem, details.",
    "required": ["code", "message", "details"],
    "properties": {
        "code": {"type": "integer", "format": "int32", "description": "gRPC status code (3 INVALID_ARGUMENT, ...)."},
        "message": {"type": "string"},
        "details": {"type": "array", "items": WELL_KNOWN[".google.protobuf.Any"]},
    },
}

ERROR_RESPONSES = {
    "400": "Invalid input: bad JSON, a wrong type, an unknown field or query parameter, a value out of range.",
    "401": "Missing or invalid bearer token (with `WWW-Authenticate: Bearer`).",
    "403": "The `{user_id}` in the path is not the token's user.",
    "404": "No such resource for this user (another user's is indistinguishable from a missing one).",
    "409": "Conflict (ALREADY_EXISTS or ABORTED).",
    "413": "The request body is larger than 1 MiB.",
    "429": "Too many requests (RESOURCE_EXHAUSTED).",
    "500": "Internal error (no details are disclosed).",
    "503": "A service is unavailable; try again.",
    "504": "A deadline was exceeded.",
}


class Descriptors:
    """Messages by full name (".todo.v1.Task") and comments by (file, source path)."""

    def __init__(self, descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
        self.files = list(descriptor_set.file)
        self.messages: dict[str, tuple[descriptor_pb2.DescriptorProto, str]] = {}
        self.comments: dict[str, str] = {}
        for file in self.files:
            self._index_comments(file)
            for index, message in enumerate(file.message_type):
                self._index_message(message, f".{file.package}" if file.package else "", f"{file.name}:4.{index}")

    def _index_comments(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        for location in file.source_code_info.location:
            text = _clean_comment(location.leading_comments or location.trailing_comments)
            if text:
                self.comments[f"{file.name}:{'.'.join(map(str, location.path))}"] = text

    def _index_message(self, message: descriptor_pb2.DescriptorProto, scope: str, source_path: str) -> None:
        full_name = f"{scope}.{message.name}"
        self.messages[full_name] = (message, source_path)
        for index, nested in enumerate(message.nested_type):
            self._index_message(nested, full_name, f"{source_path}.3.{index}")

    def message(self, full_name: str) -> descriptor_pb2.DescriptorProto:
        return self.messages[full_name][0]

    def field_comment(self, message_name: str, field_index: int) -> str:
        return self.comments.get(f"{self.messages[message_name][1]}.2.{field_index}", "")

    def methods(self) -> Iterator[tuple[str, descriptor_pb2.MethodDescriptorProto, str]]:
        """(service full name, method, comment) for every method of SERVICES."""
        for file in self.files:
            for service_index, service in enumerate(file.service):
                full_name = f"{file.package}.{service.name}"
                if full_name not in SERVICES:
                    continue
                for method_index, method in enumerate(service.method):
                    comment = self.comments.get(f"{file.name}:6.{service_index}.2.{method_index}", "")
                    yield full_name, method, comment


def _clean_comment(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines()).strip()


def _schema_name(full_name: str) -> str:
    return full_name.rsplit(".", 1)[1]


def _behaviors(field: FieldProto) -> list[int]:
    return list(field.options.Extensions[field_behavior_pb2.field_behavior])


def _is_repeated(field: FieldProto) -> bool:
    return bool(field.label == FieldProto.LABEL_REPEATED)


def _in_real_oneof(field: FieldProto) -> bool:
    return field.HasField("oneof_index") and not field.proto3_optional


class SchemaBuilder:
    """Component schemas for the messages the API returns, and inline schemas for requests."""

    def __init__(self, descriptors: Descriptors) -> None:
        self.descriptors = descriptors
        self.components: dict[str, Schema] = {"Error": ERROR_SCHEMA}

    def ref(self, full_name: str) -> Schema:
        """A $ref to the response schema of message `full_name`, building it on first use."""
        if full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[full_name])
        name = _schema_name(full_name)
        if name not in self.components:
            self.components[name] = {}  # placeholder: messages may refer to themselves
            self.components[name] = self.object_schema(full_name, exclude=(), request=False)
        return {"$ref": f"#/components/schemas/{name}"}

    def object_schema(self, full_name: str, exclude: Sequence[str], request: bool) -> Schema:
        message = self.descriptors.message(full_name)
        properties: dict[str, Schema] = {}
        required: list[str] = []
        for index, field in enumerate(message.field):
            if field.name in exclude:
                continue
            if request and field_behavior_pb2.OUTPUT_ONLY in _behaviors(field):
                continue
            property_schema = self.field_schema(field, request)
            field_comment = self.descriptors.field_comment(full_name, index)
            if field_comment and "$ref" not in property_schema:
                property_schema["description"] = field_comment
            properties[field.name] = property_schema
            if self._is_required(field, request):
                required.append(field.name)
        schema: Schema = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        oneofs = {field.oneof_index for field in message.field if _in_real_oneof(field)}
        if oneofs:  # e.g. ChatEvent: exactly one of its members is present
            schema["minProperties"] = 1
            schema["maxProperties"] = 1
        comment = self.descriptors.comments.get(self.descriptors.messages[full_name][1])
        if comment:
            schema["description"] = comment
        return schema

    def _is_required(self, field: FieldProto, request: bool) -> bool:
        if request:
            return field_behavior_pb2.REQUIRED in _behaviors(field)
        # Responses: the transcoder prints every non-optional scalar and list; of messages,
        # only timestamps are always set by our services.
        if field.proto3_optional or _in_real_oneof(field):
            return False
        if _is_repeated(field) or field.type != FieldProto.TYPE_MESSAGE:
            return True
        return field.type_name == ".google.protobuf.Timestamp"

    def field_schema(self, field: FieldProto, request: bool) -> Schema:
        if field.type == FieldProto.TYPE_MESSAGE:
            item = self.ref(field.type_name)
        elif field.type == FieldProto.TYPE_ENUM:
            item = {"type": "string"}
        else:
            item = dict(SCALARS[field.type])
            if request:
                item.update(LIMITS.get(field.name, {}))
        return {"type": "array", "items": item} if _is_repeated(field) else item


def load_descriptor_set(path: Path = DESCRIPTOR_SET) -> descriptor_pb2.FileDescriptorSet:
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `make protos`")
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


def _bindings(rule: http_pb2.HttpRule) -> Iterator[tuple[str, str, str]]:
    """(method, path template, body) for a rule and its additional bindings."""
    method = rule.WhichOneof("pattern")
    if method and method != "custom":
        yield method, getattr(rule, method), rule.body
    for extra in rule.additional_bindings:
        yield from _bindings(extra)


def http_bindings(method: descriptor_pb2.MethodDescriptorProto) -> list[tuple[str, str, str]]:
    """(HTTP method, path template, body) of each REST binding of `method`; [] for an internal RPC."""
    if not method.options.HasExtension(annotations_pb2.http):
        return []
    return list(_bindings(method.options.Extensions[annotations_pb2.http]))


PATH_PARAM = re.compile(r"\{([a-z0-9_.]+)(?:=[^}]*)?\}")


def _operation(
    builder: SchemaBuilder,
    service: str,
    method: descriptor_pb2.MethodDescriptorProto,
    comment: str,
    binding: tuple[str, str, str],
    operation_id: str,
) -> Schema:
    _, template, body = binding
    request_name = method.input_type
    path_fields = PATH_PARAM.findall(template)
    request = builder.descriptors.message(request_name)
    fields_by_name = {field.name: field for field in request.field}
    parameters = []
    for name in path_fields:
        schema = builder.field_schema(fields_by_name[name], request=True)
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    if not body:
        for index, field in enumerate(request.field):
            if field.name in path_fields or field.type == FieldProto.TYPE_MESSAGE:
                continue
            parameter = {"name": field.name, "in": "query", "required": False}
            parameter["schema"] = builder.field_schema(field, request=True)
            description = builder.descriptors.field_comment(request_name, index)
            if description:
                parameter["description"] = description
            parameters.append(parameter)
    short_service = service.rsplit(".", 1)[1]
    operation: Schema = {
        "operationId": operation_id,
        "tags": [short_service.removesuffix("Service")],
        "summary": (comment.splitlines() or [f"{short_service}.{method.name}"])[0],
        "description": f"{comment}\n\ngRPC: `{service}/{method.name}`".strip(),
        "parameters": parameters,
        "responses": _responses(builder, method),
    }
    if body:
        exclude = path_fields
        if body != "*":
            raise SystemExit(f"{method.name}: only body '*' is supported, not {body!r}")
        body_schema = builder.object_schema(request_name, exclude=exclude, request=True)
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
    if method.input_type == ".todo.v1.ChatRequest":
        operation["parameters"].append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "A repeated request with the same key returns the first answer and runs no tool twice.",
                "schema": {"type": "string", "maxLength": 200, "pattern": r"^[\x20-\x7e]*$"},
            }
        )
    return operation


def _responses(builder: SchemaBuilder, method: descriptor_pb2.MethodDescriptorProto) -> Schema:
    success_schema = builder.ref(method.output_type)
    if method.server_streaming:
        success = {
            "description": "A stream of server-sent events; each `data:` line holds one JSON object of this schema.",
            "content": {"text/event-stream": {"schema": success_schema}},
        }
    else:
        success = {"description": "OK", "content": {"application/json": {"schema": success_schema}}}
    responses: Schema = {"200": success}
    for status in ERROR_RESPONSES:
        responses[status] = {"$ref": f"#/components/responses/Error{status}"}
    return responses


def _probe(summary: str, description: str, ok_body: Schema) -> Schema:
    return {
        "get": {
            "operationId": summary,
            "tags": ["Operations"],
            "summary": description,
            "security": [],
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": ok_body}}},
                "503": {"$ref": "#/components/responses/Error503"},
            },
        }
    }


def build(descriptor_set: descriptor_pb2.FileDescriptorSet, server_url: str = "http://127.0.0.1:8080") -> Schema:
    descriptors = Descriptors(descriptor_set)
    builder = SchemaBuilder(descriptors)
    paths: dict[str, Schema] = {}
    for service, method, comment in descriptors.methods():
        # Internal RPCs (e.g. AppendMessage) have no binding: gRPC-only, and not served by the gateway.
        for index, binding in enumerate(http_bindings(method)):
            path = PATH_PARAM.sub(lambda match: "{" + match.group(1) + "}", binding[1])
            # operationIds are unique: additional bindings get their HTTP method as a suffix.
            operation_id = method.name if index == 0 else f"{method.name}{binding[0].capitalize()}"
            operation = _operation(builder, service, method, comment, binding, operation_id)
            paths.setdefault(path, {})[binding[0]] = operation
    status_schema = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    paths["/healthz"] = _probe("healthz", "Liveness: the gateway answers.", status_schema)
    paths["/readyz"] = _probe("readyz", "Readiness: every upstream service is SERVING by gRPC health.", status_schema)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Todo AI chatbot API",
            "version": "1.0.0",
            "description": (
                "REST over gRPC (Envoy's gRPC-JSON transcoder). JSON field names are snake_case; "
                "default values are always printed; timestamps are RFC 3339. Errors are "
                '`{"code", "message", "details"}` with the gRPC status code. Every `/api/` call needs '
                "`Authorization: Bearer <JWT>`; the path's `{user_id}` must be the token's `sub`."
            ),
        },
        "servers": [{"url": server_url}],
        "security": [{"bearerAuth": []}],
        "tags": [{"name": name} for name in ("Task", "Conversation", "Agent", "Operations")],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": builder.components,
            "responses": {
                f"Error{status}": {
                    "description": description,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    **({"headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}} if status == "401" else {}),
                }
                for status, description in ERROR_RESPONSES.items()
            },
        },
    }


def document_text(descriptor_set: descriptor_pb2.FileDescriptorSet, server_url: str) -> str:
    return json.dumps(build(descriptor_set, server_url), indent=2) + "\n"


def generate(descriptor_path: Path = DESCRIPTOR_SET, out: Path = OPENAPI_FILE, server_url: str | None = None) -> Path:
    """Write the document; its server is `server_url`, by default PUBLIC_BASE_URL."""
    server_url = server_url or Settings.load().public_base_url
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document_text(load_descriptor_set(descriptor_path), server_url))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the OpenAPI document from the descriptor set.")
    parser.add_argument("--descriptor", type=Path, default=DESCRIPTOR_SET)
    parser.add_argument("--out", type=Path, default=OPENAPI_FILE)
    parser.add_argument("--server-url", help="the gateway's public URL (default: PUBLIC_BASE_URL)")
    args = parser.parse_args(argv)
    print(f"wrote {generate(args.descriptor, args.out, args.server_url)}")


if __name__ == "__main__":
    main()
