"""The gRPC ceiling: a bare grpc.aio server of the founding proto that answers without a model.

Predict parses the request with the founding proto's own generated classes and answers one float
per item (what recsys would), so it pays exactly the gRPC + protobuf cost of a request.
PredictStream answers every request the same way, one response per request.

    python benchmarks/servers/echo.py --port 50071 [--item-size 256] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support import compile_seed_client


async def serve(port: int, item_size: int) -> None:
    pb2, pb2_grpc = compile_seed_client(Path(tempfile.mkdtemp(prefix="echo-proto-")))

    def answer(request: object) -> object:
        count = max(1, (len(request.inputs) or len(request.SerializeToString()) // 4) // item_size)
        return pb2.PredictResponse(outputs=[0.5] * count, processing_time_ms=0)

    class Echo(pb2_grpc.ModelServiceServicer):
        async def Predict(self, request, context):
            return answer(request)

        async def PredictStream(self, requests, context):
            async for request in requests:
                yield answer(request)

    server = grpc.aio.server()
    pb2_grpc.add_ModelServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--item-size", type=int, default=256)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.port, args.item_size))
    else:
        asyncio.run(serve(args.port, args.item_size))


if __name__ == "__main__":
    main()
