"""Structured logging: one JSON object per line, with the current request id and trace id."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from common import tracing

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Attributes every LogRecord has; anything else was passed through `extra=` and is logged.
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        trace_id = tracing.current_trace_id()  # "" unless tracing is on and a span is current
        if trace_id:
            entry["trace_id"] = trace_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One line per statement from SQLAlchemy or per request from httpx would drown ours.
    for noisy in ("sqlalchemy.engine", "httpx", "httpx2", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("grpc._cython.cygrpc").addFilter(_drop_grpc_decode_errors)


def _drop_grpc_decode_errors(record: logging.LogRecord) -> bool:
    """grpc logs "Invalid encoding on b'...'" with a traceback each time it decodes a metadata
    value that is not UTF-8 (twice per call when a handler reads the metadata too), quoting the
    raw bytes, which may be a token. The interceptor refuses such values in the headers we read
    (INVALID_ARGUMENT) and its access line records the call, so these records are dropped."""
    return not str(record.msg).startswith("Invalid encoding on")
