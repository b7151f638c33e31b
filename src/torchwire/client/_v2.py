"""The KServe V2 API on the client side: request bytes, answers as arrays (one input/output).

A V2 request names its input and datatype, so the client asks ``ModelMetadata`` once per model
and version (``Spec``). Only the first input and first output are used here; for models with
several, Triton's own client works against torchwire unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from torchwire.errors import TorchwireError

SERVICE = "/inference.GRPCInferenceService"
INFER = f"{SERVICE}/ModelInfer"
STREAM = f"{SERVICE}/ModelStreamInfer"
METADATA = f"{SERVICE}/ModelMetadata"

NDArray = np.ndarray[Any, Any]


def _pb() -> Any:
    from tritonclient.grpc import service_pb2  # imported on first V2 use only

    return service_pb2


def wire_dtype(datatype: str) -> np.dtype[Any]:
    if datatype == "BF16":
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    names = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT8": "i1", "INT16": "<i2",
             "INT32": "<i4", "INT64": "<i8", "UINT8": "u1", "BOOL": "?"}  # fmt: skip
    if datatype not in names:
        raise TorchwireError(f"datatype {datatype} is not supported by this client", "UNKNOWN")
    return np.dtype(names[datatype])


@dataclass(frozen=True)
class Spec:
    """A model's first input, as its metadata describes it."""

    input_name: str
    datatype: str
    item_shape: tuple[int, ...]


def metadata_request(model: str, version: int | str | None) -> bytes:
    request = _pb().ModelMetadataRequest(name=model, version=str(version or ""))
    data: bytes = request.SerializeToString()
    return data


def parse_metadata(data: bytes) -> Spec:
    response = _pb().ModelMetadataResponse.FromString(data)
    first = response.inputs[0]
    return Spec(first.name, first.datatype, tuple(int(d) for d in first.shape[1:]))


def encode_infer(
    model: str, array: NDArray, version: int | str | None, spec: Spec, request_id: str = ""
) -> bytes:
    pb = _pb()
    data = np.ascontiguousarray(array, dtype=wire_dtype(spec.datatype))
    if data.ndim == len(spec.item_shape):  # one item without its batch dimension
        data = data[None]
    request = pb.ModelInferRequest(
        model_name=model, model_version=str(version or ""), id=request_id
    )
    request.inputs.add(name=spec.input_name, datatype=spec.datatype, shape=list(data.shape))
    request.raw_input_contents.append(data.tobytes())
    body: bytes = request.SerializeToString()
    return body


def _first_output(response: Any) -> NDArray:
    output = response.outputs[0]
    flat = np.frombuffer(response.raw_output_contents[0], dtype=wire_dtype(output.datatype))
    return flat.reshape(tuple(output.shape))


def decode_infer(data: bytes) -> NDArray:
    return _first_output(_pb().ModelInferResponse.FromString(data))


def decode_stream(data: bytes) -> NDArray:
    """One ``ModelStreamInferResponse``; an in-stream error raises (its status is in the text)."""
    response = _pb().ModelStreamInferResponse.FromString(data)
    if response.error_message:
        message = response.error_message
        code = message[1 : message.index("]")] if message.startswith("[") else "UNKNOWN"
        raise TorchwireError(message, code)
    return _first_output(response.infer_response)
