"""The floor under every hop: CPU of one grpc.aio unary call with nothing of ours in it.

A server and a channel in this process on loopback, a handler that returns a constant, calls
one after another. Prints CPU (user and system) per call, wall time per call and context
switches per call, from getrusage. Run: `python -m bench.grpc_floor [CALLS]` (default 4,000).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time

import grpc

WARM_UP_CALLS = 300


async def _constant(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok"


async def measure(calls: int) -> dict[str, float]:
    server = grpc.aio.server()
    handlers = {"Call": grpc.unary_unary_rpc_method_handler(_constant)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("floor.v1.Floor", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/floor.v1.Floor/Call")
            for _ in range(WARM_UP_CALLS):
                await call(b"", timeout=10)
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(calls):
                await call(b"", timeout=10)
            after, ended = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    finally:
        await server.stop(0)
    return {
        "user_us": (after.ru_utime - before.ru_utime) / calls * 1e6,
        "system_us": (after.ru_stime - before.ru_stime) / calls * 1e6,
        "wall_us": (ended - started) / calls * 1e6,
        "switches": (after.ru_nvcsw - before.ru_nvcsw + after.ru_nivcsw - before.ru_nivcsw) / calls,
    }


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    result = asyncio.run(measure(calls))
    print(
        f"{calls} calls: CPU {result['user_us'] + result['system_us']:.0f} µs per call "
        f"(user {result['user_us']:.0f}, system {result['system_us']:.0f}), wall {result['wall_us']:.0f} µs, "
        f"{result['switches']:.1f} context switches per call"
    )


if __name__ == "__main__":
    main()
