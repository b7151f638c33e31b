"""KServe V2 ``ModelInferRequest`` to the model's arrays, and its outputs to a response.

Inputs come as typed ``contents`` or as ``raw_input_contents`` (little-endian, one buffer per
input); outputs always go back as ``raw_output_contents``, which every V2 client reads. BF16 travels
as 2-byte ``ml_dtypes.bfloat16`` on the wire and as float32 inside torchwire (numpy has no
bfloat16): the model's device casts it. BYTES elements travel as Triton writes them: in raw
contents each is a 4-byte little-endian length and its bytes; typed, one ``bytes_contents`` entry
each; inside torchwire, a numpy object array of ``bytes``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from torchwire.errors import InvalidInputError
from torchwire.runtime import LoadedModel
from torchwire.runtime.arrays import Arrays, shape_matches
from torchwire.runtime.dtypes import SUPPORTED, numpy_dtype
from torchwire.server.codecs.wire import WireError, field_prefix, split_field
from torchwire.server.common.shm import Regions

MAX_ELEMENTS = 2**31
"""More elements than a gRPC message (2 GiB at most) can carry, whatever the datatype."""
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")


def wire_dtype(datatype: str) -> np.dtype[Any]:
    """The little-endian numpy dtype of ``datatype`` on the wire."""
    found: np.dtype[Any] = (
        np.dtype(ml_dtypes.bfloat16)
        if datatype == "BF16"
        else numpy_dtype(datatype).newbyteorder("<")
    )
    return found


def wire_bytes(array: np.ndarray[Any, Any], datatype: str) -> memoryview:
    """``array``'s bytes as V2 carries a tensor (little-endian, row-major), copied only if its
    dtype or layout differs; BYTES as length-prefixed elements."""
    if datatype == "BYTES":
        parts = []
        for element in array.reshape(-1):
            data = element.encode() if isinstance(element, str) else element
            if not isinstance(data, bytes):  # bytes(3) would be three NULs
                raise TypeError(f"a BYTES tensor holds a {type(element).__name__}")
            parts += [_LENGTH.pack(len(data)), data]
        return memoryview(b"".join(parts))
    wire = np.ascontiguousarray(array, dtype=wire_dtype(datatype))
    return wire.reshape(-1).view(np.uint8).data


@dataclass(frozen=True, slots=True)
class WireTensor:
    """One input tensor as a V2 request carries it, whatever the transport: little-endian
    ``raw`` bytes, or ``values`` (typed contents, JSON data; nested lists allowed)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    values: Any = None


_KINDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}


def _from_values(values: Any, dtype: np.dtype[Any], datatype: str, where: str) -> np.ndarray:
    """``values`` as a flat array of ``dtype``, refusing what would change them silently:
    strings, ragged lists, floats for an integer type, integers out of its range."""
    try:
        given = np.asarray(values)
    except ValueError:
        raise InvalidInputError(
            f"{where}: data is a ragged list; send one number per element"
        ) from None
    if given.dtype.kind not in "biuf":
        raise InvalidInputError(
            f"{where}: data holds {given.dtype.kind!r}-kind values, not numbers"
        )
    want = dtype.kind if dtype.kind != "V" else "f"  # bfloat16 is a float
    allowed = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}[want]
    if given.dtype.kind not in allowed:
        raise InvalidInputError(
            f"{where}: {datatype} takes {_KINDS[want]}, got {_KINDS[given.dtype.kind]}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        array = given.astype(dtype).reshape(-1)
    if want in "iu" and not np.array_equal(array, given.reshape(-1)):
        info = np.iinfo(dtype)
        raise InvalidInputError(
            f"{where}: values out of range for {datatype} ({info.min} to {info.max})"
        )
    return array


def _elements(values: Any, where: str) -> list[bytes]:
    """BYTES ``values`` (``bytes_contents``; JSON strings, nested lists allowed) as a flat list."""
    if isinstance(values, (bytes, str)):
        values = [values]
    flat: list[bytes] = []
    pending = [iter(values)]
    while pending:
        for value in pending[-1]:
            if isinstance(value, bytes):
                flat.append(value)
            elif isinstance(value, str):
                try:
                    flat.append(value.encode())
                except UnicodeEncodeError:  # a lone surrogate ("\ud800"): not text
                    raise InvalidInputError(
                        f"{where}: BYTES data holds a string that is not valid Unicode"
                    ) from None
            elif isinstance(value, list):
                pending.append(iter(value))
                break
            else:
                raise InvalidInputError(
                    f"{where}: BYTES data holds {type(value).__name__} values; send strings"
                )
        else:
            pending.pop()
    return flat


def _split_bytes(raw: bytes | memoryview, count: int, where: str) -> list[bytes]:
    """Raw BYTES contents: ``count`` elements, each a 4-byte little-endian length and its bytes,
    with nothing left over."""
    view, offset, found = memoryview(raw), 0, []
    for index in range(count):
        if offset + 4 > len(view):
            raise InvalidInputError(
                f"{where}: raw BYTES content ends at element {index} of {count}; each element "
                "is a 4-byte little-endian length followed by that many bytes"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInputError(
                f"{where}: raw BYTES element {index} claims {length} bytes; "
                f"{len(view) - offset} are left"
            )
        found.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise InvalidInputError(
            f"{where}: raw BYTES content has {len(view) - offset} bytes after its {count} elements"
        )
    return found


def _bytes_tensor(tensor: WireTensor, shape: tuple[int, ...], where: str) -> np.ndarray:
    count = math.prod(shape)
    if tensor.raw is not None:
        elements = _split_bytes(tensor.raw, count, where)
    else:
        elements = _elements(tensor.values, where)
        if len(elements) != count:
            raise InvalidInputError(
                f"{where}: data holds {len(elements)} values; shape {list(shape)} needs {count}"
            )
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array.reshape(shape)


def _tensor(tensor: WireTensor, model: LoadedModel) -> np.ndarray[Any, Any]:
    spec = next(s for s in model.inputs if s.name == tensor.name)
    where = f"input '{tensor.name}'"
    if tensor.datatype not in SUPPORTED:
        raise InvalidInputError(
            f"{where}: datatype {tensor.datatype!r} is not supported; supported: "
            f"{', '.join(SUPPORTED)}"
        )
    if tensor.datatype != spec.dtype:
        raise InvalidInputError(f"{where}: expected datatype {spec.dtype}, got {tensor.datatype}")
    shape = tensor.shape
    if len(shape) < 1 or any(d < 1 for d in shape) or not shape_matches(shape[1:], spec.shape):
        raise InvalidInputError(
            f"{where}: expected shape [N, {', '.join(map(str, spec.shape))}] (N >= 1, every "
            f"dimension >= 1), got {list(shape)[:8]}"
        )
    count = math.prod(shape)  # Python ints: no overflow
    if count > MAX_ELEMENTS:
        raise InvalidInputError(
            f"{where}: shape {list(shape)[:8]} holds {count} elements, more than any request "
            f"can carry ({MAX_ELEMENTS})"
        )
    if spec.dtype == "BYTES":
        return _bytes_tensor(tensor, shape, where)
    dtype = wire_dtype(spec.dtype)
    if tensor.raw is not None:
        if len(tensor.raw) != count * dtype.itemsize:
            raise InvalidInputError(
                f"{where}: raw content holds {len(tensor.raw)} bytes; shape {list(shape)} of "
                f"{spec.dtype} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(tensor.raw, dtype=dtype).reshape(shape)
    else:
        array = _from_values(tensor.values, dtype, spec.dtype, where)
        if array.size != count:
            raise InvalidInputError(
                f"{where}: data holds {array.size} values; shape {list(shape)} needs {count}"
            )
        array = array.reshape(shape)
    carrier = numpy_dtype(spec.dtype)
    return array if array.dtype == carrier else array.astype(carrier)


def decode_tensors(tensors: Sequence[WireTensor], model: LoadedModel) -> tuple[Arrays, int]:
    """The tensors, in the model's input order, and the request's item count.

    Raises:
        InvalidInputError: naming the input and what was expected and received.
    """
    names = [spec.name for spec in model.inputs]
    given = [tensor.name for tensor in tensors]
    unknown = sorted(set(given) - set(names))
    missing = [name for name in names if name not in given]
    if unknown or missing or len(given) != len(set(given)):
        raise InvalidInputError(
            f"model takes inputs {names}; got {given}"
            + (f" (unknown: {unknown})" if unknown else "")
            + (f" (missing: {missing})" if missing else "")
        )
    by_name = {tensor.name: tensor for tensor in tensors}
    arrays = [_tensor(by_name[name], model) for name in names]
    return arrays, model.check_inputs(arrays)


RAW_INPUT_CONTENTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A gRPC ``ModelInferRequest``: the message without its ``raw_input_contents``, and those
    buffers as views of the bytes received."""

    message: pb.ModelInferRequest
    raw: Sequence[bytes | memoryview] = ()


SPLIT_BYTES = 1 << 16
"""Messages from this size on have their tensor buffers lifted out before protobuf parses them;
below it, protobuf's copies cost less than reading the fields in Python (4 us either way at
64 KiB; at 600 KB, 33 us vs 4)."""


def parse_infer(data: bytes) -> InferRequest:
    """Read a serialized ``ModelInferRequest``. In a large one the tensor buffers are lifted out
    at the wire level (``wire.split_field``) and protobuf parses the rest, which is small: each
    buffer is then not copied before the batch is built (protobuf would copy it twice). Whatever
    that reader does not take (many small fields, groups, bytes that are not protobuf) protobuf
    reads whole, and it alone decides what is malformed."""
    try:
        split = split_field(data, RAW_INPUT_CONTENTS) if len(data) >= SPLIT_BYTES else None
    except WireError:
        split = None
    try:
        if split is not None:
            rest, raw = split
            return InferRequest(pb.ModelInferRequest.FromString(rest), raw)
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError as exc:
        raise InvalidInputError(f"malformed ModelInferRequest: {exc}") from None
    return InferRequest(message, message.raw_input_contents)


SHM_REGION = "shared_memory_region"
SHM_BYTE_SIZE = "shared_memory_byte_size"
SHM_OFFSET = "shared_memory_offset"


@dataclass(frozen=True, slots=True)
class ShmTarget:
    """Where a tensor's bytes are in a registered shared memory region."""

    region: str
    byte_size: int
    offset: int = 0


def _parameter(value: Any) -> Any:
    """A parameter's value: gRPC's ``InferParameter`` (its one set field) or a JSON value."""
    if hasattr(value, "WhichOneof"):
        chosen = value.WhichOneof("parameter_choice")
        return None if chosen is None else getattr(value, chosen)
    return value


def shm_target(parameters: Any, where: str) -> ShmTarget | None:
    """The shared memory a tensor's parameters name (gRPC or REST), or None."""
    if SHM_REGION not in parameters:
        return None
    region = _parameter(parameters[SHM_REGION])
    size = _parameter(parameters[SHM_BYTE_SIZE]) if SHM_BYTE_SIZE in parameters else None
    offset = _parameter(parameters[SHM_OFFSET]) if SHM_OFFSET in parameters else 0
    if not isinstance(region, str) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in (size, offset)
    ):
        raise InvalidInputError(
            f"{where}: {SHM_REGION} must be a string and {SHM_BYTE_SIZE} (with "
            f"{SHM_OFFSET}) integers"
        )
    assert isinstance(size, int) and isinstance(offset, int)
    return ShmTarget(region, size, offset)


def _regions_on(regions: Regions | None, target: ShmTarget, where: str) -> Regions:
    if regions is None or not regions.allowed:
        raise InvalidInputError(
            f"{where} names shared memory region {target.region!r}, but system shared memory "
            "is off on this server (--allow-client-shm)"
        )
    return regions


def shm_read(regions: Regions | None, target: ShmTarget, where: str) -> np.ndarray[Any, Any]:
    """The bytes ``target`` names (a copy: the client may change its memory meanwhile), or why
    they cannot be had."""
    found = _regions_on(regions, target, where)
    return found.read(target.region, target.offset, target.byte_size, where)


def output_targets(
    outputs: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor],
) -> dict[str, ShmTarget]:
    """The requested outputs that go into shared memory, by name (read once per request)."""
    return {
        o.name: target
        for o in outputs
        if SHM_REGION in o.parameters
        and (target := shm_target(o.parameters, f"output '{o.name}'")) is not None
    }


def check_shm_outputs(regions: Regions | None, targets: Iterable[ShmTarget | None]) -> None:
    """Before the model runs: every output region named exists and holds what is named."""
    for target in targets:
        if target is not None:
            where = f"the output in {target.region!r}"
            _regions_on(regions, target, where).check(
                target.region, target.offset, target.byte_size, where
            )


def decode_infer(
    request: InferRequest, model: LoadedModel, regions: Regions | None = None
) -> tuple[Arrays, int]:
    """A gRPC ``ModelInferRequest``'s tensors (see ``decode_tensors``), those in shared memory
    read from their region."""
    raw, inputs = request.raw, request.message.inputs
    targets = [shm_target(t.parameters, f"input '{t.name}'") for t in inputs]
    plain = sum(target is None for target in targets)
    if raw and len(raw) != plain:
        raise InvalidInputError(
            f"raw_input_contents holds {len(raw)} buffers for {plain} inputs not in shared memory"
        )
    raw_left = iter(raw)
    tensors = []
    for tensor, target in zip(inputs, targets, strict=True):
        if target is not None:
            data = shm_read(regions, target, f"input '{tensor.name}'").data
            shape = tuple(int(d) for d in tensor.shape)
            tensors.append(WireTensor(tensor.name, tensor.datatype, shape, data, None))
            continue
        values = None
        if raw and tensor.HasField("contents"):
            raise InvalidInputError(
                f"input '{tensor.name}' has typed contents while the request carries "
                "raw_input_contents: send one or the other"
            )
        if not raw:
            field = CONTENTS_FIELDS.get(tensor.datatype)
            if field is None:
                raise InvalidInputError(
                    f"input '{tensor.name}': {tensor.datatype} must be sent in raw_input_contents"
                )
            values = getattr(tensor.contents, field)
        tensors.append(
            WireTensor(
                tensor.name,
                tensor.datatype,
                tuple(int(d) for d in tensor.shape),
                next(raw_left) if raw else None,
                values,
            )
        )
    return decode_tensors(tensors, model)


def requested_outputs(wanted: Sequence[str], model: LoadedModel) -> list[int]:
    """Indexes of the outputs to send: those named in ``wanted``, or all."""
    names = [spec.name for spec in model.outputs]
    if not wanted:
        return list(range(len(names)))
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise InvalidInputError(f"unknown outputs {unknown}; the model has {names}")
    return [names.index(name) for name in wanted]


RAW_OUTPUT_CONTENTS = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
INFER_RESPONSE = pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number

Encoded = list[bytes | memoryview]
"""A serialized message as parts (bytes, or flat byte views), joined once where it is sent."""


def write_shm(
    regions: Regions | None, target: ShmTarget, data: memoryview, where: str
) -> dict[str, Any]:
    """Write an output's bytes into the region ``target`` names; return the parameters that
    say where they are."""
    _regions_on(regions, target, where).write(
        target.region, target.offset, target.byte_size, data, where
    )
    found: dict[str, Any] = {SHM_REGION: target.region, SHM_BYTE_SIZE: len(data)}
    if target.offset:
        found[SHM_OFFSET] = target.offset
    return found


def encode_infer(
    request: pb.ModelInferRequest,
    model: LoadedModel,
    name: str,
    version: int,
    outputs: Arrays,
    selected: list[int],
    regions: Regions | None = None,
    targets: Mapping[str, ShmTarget] | None = None,
) -> Encoded:
    """A serialized ``ModelInferResponse``. Protobuf writes the small part; each output's bytes
    follow as ``raw_output_contents`` straight from its array (protobuf would copy them twice),
    or go into the shared memory its request names (an empty entry then keeps the others at
    their index, as tritonclient reads them); ``targets``: ``output_targets`` of the request."""
    response = pb.ModelInferResponse(model_name=name, model_version=str(version), id=request.id)
    targets = targets or {}
    plain = any(targets.get(model.outputs[i].name) is None for i in selected)
    buffers: list[memoryview] = []
    for index in selected:
        spec, array = model.outputs[index], outputs[index]
        output = response.outputs.add(name=spec.name, datatype=spec.dtype, shape=list(array.shape))
        data = wire_bytes(array, spec.dtype)
        target = targets.get(spec.name)
        if target is None:
            buffers.append(data)
            continue
        written = write_shm(regions, target, data, f"output '{spec.name}'")
        output.parameters[SHM_REGION].string_param = written[SHM_REGION]
        output.parameters[SHM_BYTE_SIZE].int64_param = written[SHM_BYTE_SIZE]
        if SHM_OFFSET in written:
            output.parameters[SHM_OFFSET].int64_param = written[SHM_OFFSET]
        if plain:
            buffers.append(memoryview(b""))
    parts: Encoded = [response.SerializeToString()]
    for buffer in buffers:
        parts += [field_prefix(RAW_OUTPUT_CONTENTS, len(buffer)), buffer]
    return parts


def stream_answer(response: Encoded) -> bytes:
    """A serialized ``ModelStreamInferResponse`` carrying ``response``."""
    size = sum(len(part) for part in response)
    return b"".join([field_prefix(INFER_RESPONSE, size), *response])
