"""The gRPC ceiling: a bare grpc.aio server of the founding proto that answers without a model.

Predict parses the request with the founding proto's own generated classes and answers one float
per item (what recsys would), so it pays exactly the gRPC + protobuf cost of a request.
PredictStream answers every request the same way, one response per request.

    python benchmarks/servers/echo.py --port 50071 [--item-size 256] [--uvloop | --sync]

``--sync`` serves the same answers from grpc's thread-pool server (``grpc.server``) instead of
grpc.aio: is a front-end on it cheaper per message? (``benchmarks/cpu_by_thread.py --server
echo-sync``.)
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

# torchwire's copy of the founding proto: the same service, fields and bytes on the wire.
from torchwire._proto import modelservice_messages_pb2 as model_pb2
from torchwire._proto import modelservice_pb2_grpc as model_pb2_grpc


def _answer(pb2: Any, item_size: int) -> Callable[[Any], Any]:
    def answer(request: Any) -> Any:
        count = max(1, (len(request.inputs) or len(request.SerializeToString()) // 4) // item_size)
        return pb2.PredictResponse(outputs=[0.5] * count, processing_time_ms=0)

    return answer


def serve_sync(port: int, item_size: int) -> None:
    pb2, pb2_grpc = model_pb2, model_pb2_grpc
    answer = _answer(pb2, item_size)

    class Echo(pb2_grpc.ModelServiceServicer):
        def Predict(self, request, context):
            return answer(request)

        def PredictStream(self, requests, context):
            for request in requests:
                yield answer(request)

    # A thread per call in progress: enough for the benchmarks' 64 callers or streams.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=80))
    pb2_grpc.add_ModelServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"echo (sync) serving on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


async def serve(port: int, item_size: int) -> None:
    pb2, pb2_grpc = model_pb2, model_pb2_grpc
    answer = _answer(pb2, item_size)

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
    parser.add_argument("--sync", action="store_true", help="grpc.server (threads), not grpc.aio")
    args = parser.parse_args()
    if args.sync:
        serve_sync(args.port, args.item_size)
    elif args.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.port, args.item_size))
    else:
        asyncio.run(serve(args.port, args.item_size))


if __name__ == "__main__":
    main()
