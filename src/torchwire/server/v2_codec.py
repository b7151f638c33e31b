"""KServe V2 ``ModelInferRequest`` to the model's arrays, and its outputs to a response.

Inputs come as typed ``contents`` or as ``raw_input_contents`` (little-endian, one buffer per
input); outputs always go back as ``raw_output_contents``, which every V2 client reads. BF16 travels
as 2-byte ``ml_dtypes.bfloat16`` on the wire and as float32 inside torchwire (numpy has no
bfloat16): the model's device casts it.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from torchwire.errors import InvalidInputError
from torchwire.runtime import LoadedModel
from torchwire.runtime.dtypes import SUPPORTED, numpy_dtype
from torchwire.runtime.model import Arrays, shape_matches

CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def wire_dtype(datatype: str) -> np.dtype[Any]:
    """The little-endian numpy dtype of ``datatype`` on the wire."""
    found: np.dtype[Any] = (
        np.dtype(ml_dtypes.bfloat16)
        if datatype == "BF16"
        else numpy_dtype(datatype).newbyteorder("<")
    )
    return found


def _tensor(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, model: LoadedModel
) -> np.ndarray[Any, Any]:
    spec = next(s for s in model.inputs if s.name == tensor.name)
    where = f"input '{tensor.name}'"
    if tensor.datatype not in SUPPORTED:
        raise InvalidInputError(
            f"{where}: datatype {tensor.datatype!r} is not supported; supported: "
            f"{', '.join(SUPPORTED)}"
        )
    if tensor.datatype != spec.dtype:
        raise InvalidInputError(f"{where}: expected datatype {spec.dtype}, got {tensor.datatype}")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) < 1 or shape[0] < 1 or not shape_matches(shape[1:], spec.shape):
        raise InvalidInputError(
            f"{where}: expected shape [N, {', '.join(map(str, spec.shape))}] (N >= 1), "
            f"got {list(shape)}"
        )
    count = int(np.prod(shape, dtype=np.int64))
    dtype = wire_dtype(spec.dtype)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInputError(
                f"{where}: raw content holds {len(raw)} bytes; shape {list(shape)} of "
                f"{spec.dtype} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    else:
        field = CONTENTS_FIELDS.get(spec.dtype)
        if field is None:
            raise InvalidInputError(f"{where}: {spec.dtype} must be sent in raw_input_contents")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise InvalidInputError(
                f"{where}: contents hold {len(values)} values; shape {list(shape)} needs {count}"
            )
        array = np.array(values, dtype=dtype).reshape(shape)
    carrier = numpy_dtype(spec.dtype)
    return array if array.dtype == carrier else array.astype(carrier)


def decode_infer(request: pb.ModelInferRequest, model: LoadedModel) -> tuple[Arrays, int]:
    """The request's tensors, in the model's input order, and its item count.

    Raises:
        InvalidInputError: naming the input and what was expected and received.
    """
    names = [spec.name for spec in model.inputs]
    given = [tensor.name for tensor in request.inputs]
    unknown = sorted(set(given) - set(names))
    missing = [name for name in names if name not in given]
    if unknown or missing or len(given) != len(set(given)):
        raise InvalidInputError(
            f"model takes inputs {names}; got {given}"
            + (f" (unknown: {unknown})" if unknown else "")
            + (f" (missing: {missing})" if missing else "")
        )
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents holds {len(raw)} buffers for {len(request.inputs)} inputs"
        )
    by_name = {tensor.name: i for i, tensor in enumerate(request.inputs)}
    arrays = [
        _tensor(request.inputs[by_name[name]], raw[by_name[name]] if raw else None, model)
        for name in names
    ]
    return arrays, model.check_inputs(arrays)


def requested_outputs(request: pb.ModelInferRequest, model: LoadedModel) -> list[int]:
    """Indexes of the outputs to send: those requested, or all."""
    names = [spec.name for spec in model.outputs]
    if not request.outputs:
        return list(range(len(names)))
    wanted = [output.name for output in request.outputs]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise InvalidInputError(f"unknown outputs {unknown}; the model has {names}")
    return [names.index(name) for name in wanted]


def encode_infer(
    request: pb.ModelInferRequest,
    model: LoadedModel,
    name: str,
    version: int,
    outputs: Arrays,
    selected: list[int],
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=name, model_version=str(version), id=request.id)
    for index in selected:
        spec, array = model.outputs[index], outputs[index]
        wire = np.ascontiguousarray(array, dtype=wire_dtype(spec.dtype))
        response.outputs.add(name=spec.name, datatype=spec.dtype, shape=list(array.shape))
        response.raw_output_contents.append(wire.tobytes())
    return response
