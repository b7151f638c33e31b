"""KServe V2 REST inference bodies: JSON tensors, and Triton's binary tensor extension.

A request body is JSON, or (with an ``Inference-Header-Content-Length: N`` header) N bytes of JSON
followed by the binary data of the inputs whose ``parameters.binary_data_size`` says how many
bytes each takes, in input order. An output goes back as binary data when the request asks
(``parameters.binary_data`` on the output, or ``parameters.binary_data_output`` on the request),
else as a flat JSON ``data`` list in row-major order.
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from torchwire.errors import InvalidInputError
from torchwire.runtime import LoadedModel
from torchwire.runtime.arrays import Arrays
from torchwire.server.codecs.v2_codec import (
    ShmTarget,
    WireTensor,
    check_shm_outputs,
    decode_tensors,
    requested_outputs,
    shm_read,
    shm_target,
    wire_bytes,
    write_shm,
)
from torchwire.server.common.shm import Regions

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(slots=True)
class HttpInfer:
    """A decoded inference request."""

    id: str | None
    arrays: Arrays
    items: int
    selected: list[int]
    binary: list[bool]  # per selected output
    timeout_us: int | None
    shm: list[ShmTarget | None] = field(default_factory=list)  # per selected output


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _parameters(value: dict[str, Any], where: str) -> dict[str, Any]:
    return _object(value.get("parameters", {}), f"{where} 'parameters'")


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        shown = reprlib.repr(value)  # bounded, whatever its size or depth
        raise InvalidInputError(f"{where}: 'shape' must be a list of integers, got {shown}")
    return tuple(value)


def parse_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary data after it."""
    length = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInputError(
                f"{HEADER_LENGTH} is {header_length!r}; it must be the JSON header's length in "
                f"bytes, at most the body's {len(body)}"
            )
        length = int(header_length)
    try:
        header = _loads(body[:length])
    except RecursionError:
        raise InvalidInputError("the request body nests JSON too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, json's digit limit
        raise InvalidInputError(f"the request body is not valid JSON: {exc}") from None
    return _object(header, "the request body"), memoryview(body)[length:]


def _loads(data: bytes) -> Any:
    """JSON read by orjson, which holds the event loop 7x less than the json module on a tensor's
    data (8 vs 60 ms for a 3x224x224 image). What orjson refuses goes to the json module, which
    reads it as before (NaN, Infinity, 1e400) or says what is wrong with it. One difference:
    orjson reads an integer beyond 64 bits as the nearest float, where json kept it exact (no
    integer type takes it either way; a float type now does)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth limit exceeded" in str(exc):  # json would recurse past its limit too
            raise RecursionError from None
        return json.loads(data)


def decode(
    header: dict[str, Any], binary: memoryview, model: LoadedModel, regions: Regions | None = None
) -> HttpInfer:
    """A request's tensors for ``model`` (those in shared memory read from their region), and
    what it asks back.

    Raises:
        InvalidInputError: saying which field is wrong and what was expected.
    """
    arrays, items = decode_tensors(_inputs(header, binary, regions), model)
    selected, binary_outputs, shm = _outputs(header, model)
    check_shm_outputs(regions, shm)
    parameters = _parameters(header, "the request")
    timeout = parameters.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or timeout <= 0):
        raise InvalidInputError(f"parameters.timeout is in microseconds, > 0; got {timeout!r}")
    request_id = header.get("id")
    return HttpInfer(
        id=request_id if isinstance(request_id, str) else None,
        arrays=arrays,
        items=items,
        selected=selected,
        binary=binary_outputs,
        timeout_us=timeout,
        shm=shm,
    )


def _inputs(
    header: dict[str, Any], binary: memoryview, regions: Regions | None
) -> list[WireTensor]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError("the request needs 'inputs': a non-empty list of tensors")
    tensors, offset = [], 0
    for index, value in enumerate(inputs):
        tensor = _object(value, f"inputs[{index}]")
        name, datatype = tensor.get("name"), tensor.get("datatype")
        if not isinstance(name, str):
            raise InvalidInputError(f"inputs[{index}] needs a 'name' string")
        where = f"input '{name}'"
        if not isinstance(datatype, str):
            raise InvalidInputError(f"{where} needs a 'datatype' string, e.g. \"FP32\"")
        shape = _shape(tensor.get("shape"), where)
        parameters = _parameters(tensor, where)
        target = shm_target(parameters, where)
        size = parameters.get("binary_data_size")
        if target is not None:
            data = shm_read(regions, target, where).data
            tensors.append(WireTensor(name, datatype, shape, raw=data))
        elif size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInputError(
                    f"{where}: binary_data_size {size!r} does not fit the {len(binary) - offset}"
                    " bytes of binary data left"
                )
            tensors.append(WireTensor(name, datatype, shape, raw=binary[offset : offset + size]))
            offset += size
        elif "data" in tensor:
            tensors.append(WireTensor(name, datatype, shape, values=tensor["data"]))
        else:
            raise InvalidInputError(f"{where} has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise InvalidInputError(
            f"{len(binary) - offset} bytes of binary data follow the JSON header that no input "
            "claims (binary_data_size)"
        )
    return tensors


def _outputs(
    header: dict[str, Any], model: LoadedModel
) -> tuple[list[int], list[bool], list[ShmTarget | None]]:
    """The outputs to send (indexes), whether each goes as binary data, and the shared memory
    each goes into instead, if any."""
    binary_all = _parameters(header, "the request").get("binary_data_output") is True
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInputError("'outputs' must be a list of {\"name\": ...} objects")
    wanted, binary, shm = [], {}, {}
    for index, value in enumerate(outputs):
        output = _object(value, f"outputs[{index}]")
        name = output.get("name")
        if not isinstance(name, str):
            raise InvalidInputError(f"outputs[{index}] needs a 'name' string")
        wanted.append(name)
        parameters = _parameters(output, f"output '{name}'")
        flag = parameters.get("binary_data")
        binary[name] = binary_all if flag is None else flag is True
        shm[name] = shm_target(parameters, f"output '{name}'")
    selected = requested_outputs(wanted, model)
    names = [model.outputs[i].name for i in selected]
    return selected, [binary.get(n, binary_all) for n in names], [shm.get(n) for n in names]


def _strings(array: np.ndarray[Any, Any], name: str) -> list[str]:
    """A BYTES output as JSON strings, which must be UTF-8."""
    try:
        return [e if isinstance(e, str) else e.decode() for e in array.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidInputError(
            f"output '{name}' holds bytes that are not UTF-8 text, which JSON cannot carry: ask "
            "for it as binary data (its parameters.binary_data = true)"
        ) from None


def encode(
    request: HttpInfer,
    model: LoadedModel,
    name: str,
    version: int,
    outputs: Arrays,
    regions: Regions | None = None,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    described, blobs = [], []
    targets = request.shm or [None] * len(request.selected)
    for index, binary, target in zip(request.selected, request.binary, targets, strict=True):
        spec, array = model.outputs[index], outputs[index]
        entry: dict[str, Any] = {
            "name": spec.name,
            "datatype": spec.dtype,
            "shape": list(array.shape),
        }
        if target is not None:
            data = wire_bytes(array, spec.dtype)
            entry["parameters"] = write_shm(regions, target, data, f"output '{spec.name}'")
        elif binary:
            blob = wire_bytes(array, spec.dtype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif spec.dtype == "BYTES":
            entry["data"] = _strings(array, spec.name)
        else:
            entry["data"] = array.reshape(-1).tolist()
        described.append(entry)
    answer: dict[str, Any] = {"model_name": name, "model_version": str(version)}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = described
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
