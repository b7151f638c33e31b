"""The KServe V2 / Triton gRPC API (``inference.GRPCInferenceService``).

The messages and the service are those ``tritonclient`` ships (``tritonclient.grpc.service_pb2``),
so Triton's own clients work unchanged. Protocol adapter only: the same repository, batchers and
error table as the seed API. System shared memory with ``--allow-client-shm``; CUDA shared memory,
trace and log-settings RPCs answer UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.json_format import ParseDict
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from torchwire.errors import InvalidInputError, TorchwireError
from torchwire.runtime import Batcher
from torchwire.server.codecs.v2_codec import (
    InferRequest,
    parse_infer,
    stream_answer,
)
from torchwire.server.common.observe import Call
from torchwire.server.common.status import abort_with, unary_errors
from torchwire.server.plane import kserve
from torchwire.server.rpc.read_ahead import read_ahead
from torchwire.server.rpc.seed import call_deadline

log = logging.getLogger(__name__)
V2_SERVICE = "inference.GRPCInferenceService"


class V2Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, backend: kserve.Backend) -> None:
        self._backend = backend

    def handler(self) -> grpc.GenericRpcHandler:
        """Every method of the service, taking raw bytes that it parses itself: a malformed
        message is INVALID_ARGUMENT naming its type (gRPC's own parsing would answer UNKNOWN
        with a Python exception class). Inference reads and writes its tensors' bytes at the
        wire level (``v2_codec``), so its methods return serialized answers. Methods torchwire
        does not implement answer UNIMPLEMENTED."""
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        base = service_pb2_grpc.GRPCInferenceServiceServicer
        handlers = {}
        for method in service.methods:
            parse: Callable[[bytes], Any] = _parser(getattr(pb, method.input_type.name))
            serialize = getattr(pb, method.output_type.name).SerializeToString
            if method.input_type.name == "ModelInferRequest":
                parse, serialize = parse_infer, None
            implemented = getattr(type(self), method.name) is not getattr(base, method.name)
            implementation = getattr(self, method.name) if implemented else _unimplemented
            if method.client_streaming:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    _parsing_stream(implementation, parse), response_serializer=serialize
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _parsing(implementation, parse), response_serializer=serialize
                )
        return grpc.method_handlers_generic_handler(V2_SERVICE, handlers)

    def _check_control(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self._backend.access.check_control(metadata.get("authorization"), "grpc")

    def _model(self, name: str, version: str) -> Batcher:
        return kserve.find(self._backend.repository, name, version)

    # -- server and model state ----------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: object
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: object
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._backend.health.ready_to_serve)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: object
    ) -> pb.ModelReadyResponse:
        try:
            batcher = self._model(request.name, request.version)
        except TorchwireError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=batcher.available)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: object
    ) -> pb.ServerMetadataResponse:
        return ParseDict(kserve.server_metadata(), pb.ServerMetadataResponse())

    @unary_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        batcher = self._model(request.name, request.version)
        view = kserve.model_metadata(self._backend.repository, batcher)
        return ParseDict(view, pb.ModelMetadataResponse())

    @unary_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        view = kserve.model_config(self._model(request.name, request.version))
        return ParseDict({"config": view}, pb.ModelConfigResponse())

    @unary_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        view = kserve.model_statistics(self._backend.repository, request.name, request.version)
        return ParseDict(view, pb.ModelStatisticsResponse())

    # -- repository ------------------------------------------------------------------------------

    @unary_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        rows = await kserve.repository_index(self._backend.repository, request.ready)
        return ParseDict({"models": rows}, pb.RepositoryIndexResponse())

    @unary_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._check_control(context)
        kserve.check_load_parameters(request.parameters)
        await self._backend.control.load_model(kserve.check_model_name(request.model_name))
        return pb.RepositoryModelLoadResponse()

    @unary_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_control(context)
        await self._backend.control.unload(kserve.check_model_name(request.model_name))
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory ------------------------------------------------------------------

    @unary_errors
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._check_control(context)  # a region is the server user's memory: control's rights
        await self._backend.region_control.register_region(
            request.name, request.key, int(request.offset), int(request.byte_size)
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @unary_errors
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._check_control(context)
        await self._backend.region_control.unregister_region(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @unary_errors
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        self._check_control(context)
        regions = {r["name"]: r for r in self._backend.regions.status(request.name)}
        return ParseDict({"regions": regions}, pb.SystemSharedMemoryStatusResponse())

    # -- inference -------------------------------------------------------------------------------

    @unary_errors
    async def ModelInfer(self, request: InferRequest, context: grpc.aio.ServicerContext) -> bytes:
        with self._backend.observer.call("v2", context) as call:
            inference = self._backend.plane.v2(request, call, call_deadline(context))
            return b"".join(inference.encode(await inference.submit()))

    async def ModelStreamInfer(
        self, requests: AsyncIterable[InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Answers in request order; a bad request gets ``error_message``, the stream goes on."""
        deadline = call_deadline(context)

        def open_call() -> Call:
            return self._backend.observer.call("v2_stream", context)

        async with read_ahead(
            requests,
            open_call,
            lambda request, call: self._backend.plane.v2(request, call, deadline),
            stop_at_error=False,
        ) as entries:
            async for entry in entries:
                if entry.broken and not isinstance(entry.error, TorchwireError):
                    log.warning("V2 request stream broke: %s", entry.error)
                    return
                call = entry.call or open_call()  # a malformed message: answered as a request
                try:
                    if entry.error is not None:
                        raise entry.error
                    assert entry.inference is not None and entry.answer is not None
                    response = entry.inference.encode(await entry.answer)
                except TorchwireError as exc:
                    call.finish(exc)
                    message = entry.request.message if entry.request else pb.ModelInferRequest()
                    yield pb.ModelStreamInferResponse(
                        error_message=f"[{exc.code}] {exc}",
                        infer_response=pb.ModelInferResponse(
                            id=message.id, model_name=message.model_name
                        ),
                    ).SerializeToString()
                    continue
                call.finish()
                yield stream_answer(response)


def _parser(message: Any) -> Callable[[bytes], Any]:
    """``message``'s parser, refusing bytes that are not one as INVALID_ARGUMENT."""
    name = message.DESCRIPTOR.name

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            raise InvalidInputError(f"malformed {name}: {exc}") from None

    return parse


def _parsing(implementation: Any, parse: Callable[[bytes], Any]) -> Any:
    async def call(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = parse(data)
        except InvalidInputError as exc:
            await abort_with(context, exc)
        return await implementation(request, context)

    return call


def _parsing_stream(implementation: Any, parse: Callable[[bytes], Any]) -> Any:
    """A malformed message raises InvalidInputError out of the request iterator: the stream's
    reader says so in the stream, then ends it."""

    async def call(requests: AsyncIterable[bytes], context: grpc.aio.ServicerContext) -> Any:
        async def parsed() -> AsyncIterator[Any]:
            async for data in requests:
                yield parse(data)

        async for response in implementation(parsed(), context):
            yield response

    return call


async def _unimplemented(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not implemented by torchwire")
