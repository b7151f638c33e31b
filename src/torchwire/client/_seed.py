"""The seed API on the client side: request bytes, answers as arrays, errors as exceptions.

Shared by ``AsyncClient`` and ``Client``: both send pre-serialized bytes, so each request is
serialized once, by protobuf's C code, with the floats as one ``raw_inputs`` buffer by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from torchwire._proto.modelservice_messages_pb2 import PredictRequest, PredictResponse
from torchwire.errors import ITEM_SHAPE_METADATA, TorchwireError, error_for_status

PREDICT = "/ModelService/Predict"
PREDICT_STREAM = "/ModelService/PredictStream"
FLOAT32_LE = np.dtype("<f4")

NDArray = np.ndarray[Any, Any]


def encode_request(
    model: str, array: NDArray, version: int | str | None = None, raw: bool = True
) -> bytes:
    """One serialized ``PredictRequest`` holding every item of ``array`` (float32)."""
    metadata = {"model": model} if model else {}
    if version is not None:
        metadata["version"] = str(version)
    floats = np.ascontiguousarray(array, dtype=FLOAT32_LE)
    if raw:
        request = PredictRequest(raw_inputs=floats.tobytes(), metadata=metadata)
    else:
        request = PredictRequest(inputs=floats.ravel().tolist(), metadata=metadata)
    data: bytes = request.SerializeToString()
    return data


def decode_response(data: bytes, items: int | None) -> NDArray:
    """The answer's floats: ``(items, -1)`` when the request had a batch dimension, else flat."""
    response = PredictResponse.FromString(data)
    if response.raw_outputs:
        flat = np.frombuffer(response.raw_outputs, dtype=FLOAT32_LE)
    else:
        flat = np.array(response.outputs, dtype=np.float32)
    return flat if items is None else flat.reshape(items, -1)


def items_of(array: NDArray) -> int | None:
    """Items in a request: the first dimension of an array of 2 or more dimensions."""
    return int(array.shape[0]) if array.ndim >= 2 else None


def error_from(error: grpc.RpcError) -> TorchwireError:
    """The torchwire exception for a failed call, carrying its status code and trailers."""
    code: grpc.StatusCode = error.code()
    details = error.details() or code.name
    exc = error_for_status(code.name, details)
    trailers = error.trailing_metadata() or ()
    exc.metadata = {key: value for key, value in trailers if isinstance(value, str)}
    return exc


def item_shape_from(error: TorchwireError) -> tuple[int, ...]:
    """The per-item shape a server announced when it rejected an empty request."""
    shape = error.metadata.get(ITEM_SHAPE_METADATA)
    if error.code != "INVALID_ARGUMENT" or shape is None:
        raise error
    return tuple(int(dim) for dim in shape.split(",") if dim)


def spread(targets: str | Sequence[str], pool_size: int) -> list[str]:
    """The target of each channel of the pool: targets in turn, at least one channel each."""
    listed = [targets] if isinstance(targets, str) else list(targets)
    if not listed:
        raise ValueError("give at least one target, e.g. 'localhost:50051'")
    count = max(pool_size, len(listed))
    return [listed[i % len(listed)] for i in range(count)]
