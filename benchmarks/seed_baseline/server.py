"""The founding document's server, as written, as a benchmark baseline.

Faithful to the text of ``../shared/seed/``: ``torch.jit.load`` + ``eval()``; ``Predict`` builds
``torch.tensor(request.inputs)`` from a Python list, enters ``torch.no_grad()`` on the event-loop
thread (so the executor thread computes with autograd), awaits ``run_in_executor`` on a new
``ThreadPoolExecutor`` per request obtained through ``asyncio.get_event_loop()``, and answers
``outputs.tolist()`` with an integer ``processing_time_ms``; ``PredictStream`` collects 32 requests
and answers each batch with one response. Only two changes: the input is reshaped to the model's
per-item shape instead of the hard-coded (-1, 3, 224, 224), and ``tolist()`` of the 2-D output is
flattened (as written it gives nested lists that ``repeated float`` rejects). The Prometheus
``@LATENCY_HIST.time()`` decorator on ``async def Predict`` is left out: as written it makes every
call fail with UNKNOWN, which would measure nothing.

    python benchmarks/seed_baseline/server.py --model PATH.pt --shape 256 --port 50072
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

# torchwire's copy of the founding proto: the same service, fields and bytes on the wire.
from torchwire._proto import modelservice_messages_pb2 as model_pb2
from torchwire._proto import modelservice_pb2_grpc as model_pb2_grpc


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, model_path: str, shape: tuple[int, ...]) -> None:
        self.model = torch.jit.load(model_path)
        self.model.eval()
        self.shape = shape

    async def _async_inference(self, inputs: torch.Tensor) -> torch.Tensor:
        loop = asyncio.get_event_loop()
        with ThreadPoolExecutor() as executor:
            return await loop.run_in_executor(executor, self.model, inputs)

    async def Predict(self, request, context):
        start_time = time.time()
        inputs = torch.tensor(request.inputs).reshape(-1, *self.shape)
        with torch.no_grad():
            outputs = await self._async_inference(inputs)
        return model_pb2.PredictResponse(
            outputs=outputs.flatten().tolist(),
            processing_time_ms=int((time.time() - start_time) * 1000),
        )

    async def _process_batch(self, batch):
        inputs = torch.cat([torch.tensor(r.inputs).reshape(-1, *self.shape) for r in batch])
        with torch.no_grad():
            outputs = await self._async_inference(inputs)
        return model_pb2.PredictResponse(outputs=outputs.flatten().tolist())

    async def PredictStream(self, request_iterator, context):
        batch = []
        async for request in request_iterator:
            batch.append(request)
            if len(batch) >= 32:
                yield await self._process_batch(batch)
                batch = []
        if batch:
            yield await self._process_batch(batch)


async def serve(model: str, shape: tuple[int, ...], port: int) -> None:
    server = grpc.aio.server()
    model_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(model, shape), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"seed baseline serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", required=True, help="per item, e.g. 256 or 3,224,224")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))
    asyncio.run(serve(args.model, shape, args.port))


if __name__ == "__main__":
    main()
