"""The KServe V2 / Triton gRPC API (``inference.GRPCInferenceService``).

The messages and the service are those ``tritonclient`` ships (``tritonclient.grpc.service_pb2``),
so Triton's own clients work unchanged. Protocol adapter only: the same repository, batchers and
error table as the seed API. Shared-memory, trace and log-settings RPCs answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from torchwire import __version__
from torchwire.errors import InvalidInputError, ModelNotFoundError, TorchwireError
from torchwire.repository import ModelRepository
from torchwire.runtime import Batcher
from torchwire.runtime.model import Arrays
from torchwire.server.control import ModelControl
from torchwire.server.health import Health
from torchwire.server.observe import Call, Observer
from torchwire.server.seed import STREAM_WINDOW, call_deadline
from torchwire.server.status import unary_errors
from torchwire.server.v2_codec import decode_infer, encode_infer, requested_outputs

V2_SERVICE = "inference.GRPCInferenceService"
PLATFORMS = {"torchscript": "pytorch_libtorch", "exported": "pytorch_exported"}
EXTENSIONS = ["model_repository", "model_repository(unload_dependents)", "statistics"]


def check_model_name(name: str) -> str:
    """Refuse names that could point outside the repository."""
    if not name or "/" in name or "\\" in name or ".." in name or "\0" in name:
        raise InvalidInputError(
            f"invalid model name {name!r}: no '/', '\\\\', '..' or NUL, and not empty"
        )
    return name


def _duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=count, ns=ns)


@dataclass(slots=True)
class _Queued:
    request: pb.ModelInferRequest
    call: Call
    batcher: Batcher | None
    selected: list[int]
    answer: asyncio.Future[Arrays] | None
    error: Exception | None = None


class V2Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        repository: ModelRepository,
        observer: Observer,
        health: Health,
        control: ModelControl | None = None,
    ) -> None:
        self._repository = repository
        self._control: ModelControl = control or repository
        self._observer = observer
        self._health = health

    def _model(self, name: str, version: str) -> Batcher:
        """The version a V2 request names; V2 has no default model, so a name is required."""
        if not name:
            raise ModelNotFoundError("no model name given; V2 requests must name their model")
        return self._repository.get(name, version or None)

    # -- server and model state ----------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: object
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: object
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._health.ready_to_serve)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: object
    ) -> pb.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except TorchwireError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: object
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="torchwire", version=__version__, extensions=EXTENSIONS
        )

    @unary_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        batcher = self._model(request.name, request.version)
        model = batcher.model
        served = self._repository.models[batcher.name]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=batcher.name,
            versions=[str(v) for v in sorted(served.versions)],
            platform=PLATFORMS[model.config.format],
            inputs=[
                tensor(name=s.name, datatype=s.dtype, shape=[-1, *s.shape]) for s in model.inputs
            ],
            outputs=[
                tensor(name=s.name, datatype=s.dtype, shape=[-1, *s.shape]) for s in model.outputs
            ],
        )

    @unary_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        batcher = self._model(request.name, request.version)
        model = batcher.model
        config = model.config

        def dtype(name: str) -> int:
            return int(mc.DataType.Value(f"TYPE_{name}"))

        return pb.ModelConfigResponse(
            config=mc.ModelConfig(
                name=batcher.name,
                platform=PLATFORMS[config.format],
                max_batch_size=config.batching.max_batch_size,
                input=[mc.ModelInput(name=s.name, data_type=dtype(s.dtype), dims=list(s.shape))
                       for s in model.inputs],
                output=[mc.ModelOutput(name=s.name, data_type=dtype(s.dtype), dims=list(s.shape))
                        for s in model.outputs],
                dynamic_batching=mc.ModelDynamicBatching(
                    max_queue_delay_microseconds=int(config.batching.max_delay_ms * 1000)
                ),
                instance_group=[mc.ModelInstanceGroup(count=config.instances.count)],
            )
        )  # fmt: skip

    @unary_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            self._repository.get(request.name, request.version or None)  # NOT_FOUND if absent
        response = pb.ModelStatisticsResponse()
        for name, served in sorted(self._repository.models.items()):
            if request.name and name != request.name:
                continue
            for version, batcher in sorted(served.versions.items()):
                if request.version and str(version) != request.version:
                    continue
                s = batcher.stats
                response.model_stats.add(
                    name=name,
                    version=str(version),
                    last_inference=s.last_inference_ms,
                    inference_count=s.inference_count,
                    execution_count=s.execution_count,
                    inference_stats=pb.InferStatistics(
                        success=_duration(s.success_count, s.success_ns),
                        fail=_duration(s.fail_count, s.fail_ns),
                        queue=_duration(s.queue_count, s.queue_ns),
                        compute_infer=_duration(s.compute_count, s.compute_ns),
                    ),
                )
        return response

    # -- repository ------------------------------------------------------------------------------

    @unary_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        rows = await self._repository.index()
        return pb.RepositoryIndexResponse(
            models=[
                index(name=name, version=version, state=state, reason=reason)
                for name, version, state, reason in rows
                if not request.ready or state == "READY"
            ]
        )

    @unary_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await self._control.load_model(check_model_name(request.model_name))
        return pb.RepositoryModelLoadResponse()

    @unary_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._control.unload(check_model_name(request.model_name))
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------------------

    def _queue(self, request: pb.ModelInferRequest, call: Call, deadline: float | None) -> _Queued:
        batcher = self._model(request.model_name, request.model_version)
        call.target(batcher)
        arrays, call.items = decode_infer(request, batcher.model)
        selected = requested_outputs(request, batcher.model)
        return _Queued(
            request, call, batcher, selected, batcher.submit(arrays, call.items, deadline)
        )

    def _answer(self, queued: _Queued, outputs: Arrays) -> pb.ModelInferResponse:
        batcher = queued.batcher
        assert batcher is not None
        return encode_infer(
            queued.request, batcher.model, batcher.name, batcher.version, outputs, queued.selected
        )

    @unary_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        with self._observer.call("v2", context) as call:
            queued = self._queue(request, call, call_deadline(context))
            assert queued.answer is not None
            return self._answer(queued, await queued.answer)

    async def ModelStreamInfer(
        self, requests: AsyncIterable[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answers in request order; a bad request gets ``error_message``, the stream goes on."""
        pending: asyncio.Queue[_Queued | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
        reader = asyncio.create_task(self._read_stream(requests, context, pending))
        try:
            while (queued := await pending.get()) is not None:
                try:
                    if queued.error is not None:
                        raise queued.error
                    assert queued.answer is not None
                    response = self._answer(queued, await queued.answer)
                except TorchwireError as exc:
                    queued.call.finish(exc)
                    yield pb.ModelStreamInferResponse(
                        error_message=f"[{exc.code}] {exc}",
                        infer_response=pb.ModelInferResponse(
                            id=queued.request.id, model_name=queued.request.model_name
                        ),
                    )
                    continue
                queued.call.finish()
                yield pb.ModelStreamInferResponse(infer_response=response)
            await reader
        finally:
            reader.cancel()
            while not pending.empty():
                entry = pending.get_nowait()
                if entry is not None and entry.answer is not None:
                    entry.answer.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterable[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
        pending: asyncio.Queue[_Queued | None],
    ) -> None:
        deadline = call_deadline(context)
        async for request in requests:
            call = self._observer.call("v2_stream", context)
            try:
                queued = self._queue(request, call, deadline)
            except TorchwireError as exc:
                queued = _Queued(request, call, None, [], None, exc)
            await pending.put(queued)
        await pending.put(None)
