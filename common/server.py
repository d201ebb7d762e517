"""One server bootstrap for every gRPC service.

`main(...)` configures logging, builds a grpc.aio server with the one interceptor (auth, error
mapping, access log, RPC metrics, trace span: common/interceptor.py), the standard health
service and reflection, lets the service register its servicer, and serves until SIGTERM/SIGINT.
Beside it: Prometheus metrics on the service's metrics port and, when OTEL_EXPORTER_OTLP_ENDPOINT
is set, tracing (common/metrics.py, common/tracing.py). On a signal it first reports NOT_SERVING
(so load balancers and /readyz stop sending work), then gives in-flight calls
`GRPC_SHUTDOWN_GRACE_SECONDS` to finish. Once serving, what startup built is frozen out of the
garbage collector's full collections (they held the event loop for 100-350 ms).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import metrics, ratelimit, tracing
from common.auth import TokenVerifier
from common.interceptor import CallInterceptor
from common.logs import configure_logging
from common.settings import Settings, port_of

log = logging.getLogger("server")

# A service's setup: given the server and settings, register servicers and yield while serving.
# Work before the `yield` runs at start (migrations, pools); after it, at shutdown.
Lifespan = Callable[[grpc.aio.Server, Settings], AbstractAsyncContextManager[None]]

# Public requests are capped at 1 MiB by the gateway; internal ones can be larger (an assistant
# message storing several list_tasks results), so the services accept up to this.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def interceptor(settings: Settings, record_metrics: bool = True) -> CallInterceptor:
    """The server's one interceptor; `record_metrics` when the service serves its metrics."""
    return CallInterceptor(TokenVerifier(settings), record_metrics)


def records_metrics(name: str, settings: Settings) -> bool:
    """Whether the service records RPC metrics: when it serves them (a metrics port of 0 is off,
    and then nothing is recorded per call)."""
    return metrics.metrics_port(name, settings) > 0


def build_server(settings: Settings, record_metrics: bool = True) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=[interceptor(settings, record_metrics)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_metadata_size", 16 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )


async def serve(name: str, service_names: list[str], address: str, lifespan: Lifespan, settings: Settings) -> None:
    """Serve `service_names` on the port of `address` until a shutdown signal."""
    tracing.configure(name, settings)
    server = build_server(settings, records_metrics(name, settings))
    ratelimit.configure(settings)
    metrics_server = metrics.serve_http(name, settings)
    if metrics_server is not None:
        log.info("metrics", extra={"service": name, "address": metrics_server.address})
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with lifespan(server, settings):
        bind = f"{settings.grpc_bind_host}:{port_of(address)}"
        if server.add_insecure_port(bind) == 0:
            raise SystemExit(f"{name}: cannot listen on {bind}")
        await server.start()
        _freeze_startup_objects()
        await _set_serving(health_servicer, service_names, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening", extra={"service": name, "address": bind})
        await stop.wait()
        log.info("shutting down", extra={"service": name, "grace_s": settings.grpc_shutdown_grace_seconds})
        await _set_serving(health_servicer, service_names, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(settings.grpc_shutdown_grace_seconds)
        await ratelimit.close()
    if metrics_server is not None:
        metrics_server.stop()
    tracing.shutdown()
    log.info("stopped", extra={"service": name})


def _freeze_startup_objects() -> None:
    """Takes what startup built (modules, protos, SQLAlchemy's tables, the SDK's types: some 200,000
    objects in agent_service) out of the cycle collector's reach. Its full collections walk every
    tracked object and hold the event loop meanwhile: 100-350 ms each, a few times a minute under
    load, in every process; after this, a few ms (bench/NOTES.md). Garbage of startup is collected
    first, so none of it is kept for good."""
    gc.collect()
    gc.freeze()


async def _set_serving(servicer: health.aio.HealthServicer, names: list[str], status: int) -> None:
    for service_name in ["", *names]:  # "" is the whole server, what probes ask by default
        await servicer.set(service_name, status)


def main(name: str, service_names: list[str], address_of: Callable[[Settings], str], lifespan: Lifespan) -> None:
    """Entry point of a service's `__main__`."""
    settings = Settings.load()
    configure_logging(name, settings.log_level, settings.log_format)
    asyncio.run(serve(name, service_names, address_of(settings), lifespan, settings))
