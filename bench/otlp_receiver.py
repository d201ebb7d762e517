"""An OTLP/gRPC trace receiver for the tracing phase (a separate process): it answers every
ExportTraceServiceRequest with an empty response, keeps nothing but counts, and says them.

Built like tests/test_tracing.py's receiver (opentelemetry-proto's TraceService on a threaded grpc
server), without keeping the spans. Counts per `service.name`: exports, spans, and SERVER spans
(one per RPC a service handled, or per request for the gateway).

Run: `python -m bench.otlp_receiver --port 0` prints `PORT <n>` once listening; on SIGUSR1 it
prints one JSON line of the counts so far, on SIGTERM the final counts, then exits.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections import Counter
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

SERVER = trace_pb2.Span.SPAN_KIND_SERVER


class CountingReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.exports: Counter[str] = Counter()
        self.spans: Counter[str] = Counter()
        self.server_spans: Counter[str] = Counter()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans: Counter[str] = Counter()
        server: Counter[str] = Counter()
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), "?"
            )
            for scope_spans in resource_spans.scope_spans:
                spans[service] += len(scope_spans.spans)
                server[service] += sum(1 for span in scope_spans.spans if span.kind == SERVER)
        with self._lock:
            self.exports.update(spans.keys())
            self.spans.update(spans)
            self.server_spans.update(server)
        return trace_service_pb2.ExportTraceServiceResponse()

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {
                "exports": dict(self.exports),
                "spans": dict(self.spans),
                "server_spans": dict(self.server_spans),
            }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    wanted = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)  # before grpc's threads start: they inherit the mask
    receiver = CountingReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"PORT {port}", flush=True)
    while True:
        received = signal.sigwait(wanted)
        if received != signal.SIGUSR1:
            server.stop(2).wait()  # exports under way finish first
        sys.stdout.write(json.dumps(receiver.counts()) + "\n")
        sys.stdout.flush()
        if received != signal.SIGUSR1:
            return


if __name__ == "__main__":
    main()
