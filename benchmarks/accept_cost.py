"""What a call costs a bare grpc.aio server (uvloop) when answered, and when taken from gRPC's core
and dropped without a handler: the floor for shedding load inside the process (issue 12).

    .venv/bin/python benchmarks/accept_cost.py [--calls 3000] [--rounds 2]

``echo``: a unary handler returns the request. ``drop``: 64 tasks take calls with grpc.aio's
private ``AioServer._request_call()`` (what its own accept loop calls) and let them go at once;
the core cancels them (the client sees CANCELLED at once). A caller that has given up already
would see nothing of it. Server CPU per call from /proc, the two kinds in turns, a burst of
50 calls every 20 ms from this process.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections import Counter

import grpc
import psutil
from common import free_port

from torchwire.compat import grpc_aio

METHOD = "/Probe/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(port: int, kind: str) -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("Probe", {"Echo": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    tasks: list[asyncio.Task[None]] = []
    if kind == "drop":
        core = grpc_aio.accept_loop(server)
        assert core is not None, "this grpcio's accept loop is not the one compat knows"

        async def take_and_drop() -> None:
            while True:
                try:
                    await grpc_aio.request_call(core)  # the call is released with its state
                except Exception:
                    return

        tasks = [asyncio.create_task(take_and_drop()) for _ in range(64)]
    await server.wait_for_termination()  # the tasks stay referenced until then
    del tasks


def measure(kind: str, calls: int) -> tuple[float, Counter[str]]:
    port = free_port()
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
    process = subprocess.Popen(command)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            call = channel.unary_unary(METHOD)
            server = psutil.Process(process.pid)
            before = server.cpu_times()
            futures = []
            for index in range(calls):
                futures.append(call.future(b"x" * 100, timeout=1.0))
                if index % 50 == 49:
                    time.sleep(0.02)
            outcomes: Counter[str] = Counter()
            for future in futures:
                try:
                    future.result()
                    outcomes["OK"] += 1
                except grpc.RpcError as exc:
                    outcomes[exc.code().name] += 1
            after = server.cpu_times()
        spent = after.user + after.system - before.user - before.system
        return spent / calls, outcomes
    finally:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", choices=("echo", "drop"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(args.port, args.serve))
        return
    for _ in range(args.rounds):
        for kind in ("echo", "drop"):
            seconds, outcomes = measure(kind, args.calls)
            print(f"{kind}: {seconds * 1e6:.0f} us server CPU per call; {dict(outcomes)}")


if __name__ == "__main__":
    main()
