"""The seed API's requests as the model's arrays, and its outputs as a response.

Decoding is zero-copy: the request's floats (``inputs`` or ``raw_inputs``, read by
``seed_wire``) become the model's input array with ``np.frombuffer`` and a reshape, never a Python
loop per float. A model with several outputs answers each item's outputs one after the other, in
the config's order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from torchwire.errors import ITEM_SHAPE_METADATA, InvalidInputError
from torchwire.runtime import LoadedModel
from torchwire.runtime.arrays import Arrays
from torchwire.runtime.dtypes import numpy_dtype
from torchwire.server.codecs import seed_wire
from torchwire.server.codecs.seed_wire import FLOAT32_LE, SeedRequest


def decode_request(request: SeedRequest, model: LoadedModel) -> tuple[Arrays, int]:
    """The request's floats as the model's input arrays, and its item count.

    Raises:
        InvalidInputError: both ``inputs`` and ``raw_inputs``, a raw length that is not a
            multiple of 4, or a float count that is not a multiple of one item (the error then
            carries the item shape as trailing metadata).
    """
    if len(model.inputs) != 1:
        names = [spec.name for spec in model.inputs]
        raise InvalidInputError(
            f"the seed API serves single-input models; this one takes {names}: use the V2 API"
        )
    spec = model.inputs[0]
    if spec.dtype == "BYTES":
        raise InvalidInputError(
            f"the seed API carries floats; input '{spec.name}' is BYTES: use the V2 API"
        )
    raw = request.raw
    if raw:
        if request.floats.size:
            raise InvalidInputError("set either inputs or raw_inputs, not both")
        if len(raw) % 4:
            raise InvalidInputError(
                f"raw_inputs holds {len(raw)} bytes, not a multiple of 4 (little-endian float32)"
            )
        flat = np.frombuffer(raw, dtype=FLOAT32_LE)
    else:
        flat = request.floats
    per_item = model.item_size(0)
    if flat.size == 0 or flat.size % per_item:
        raise InvalidInputError(
            f"expected a multiple of {per_item} floats (input '{spec.name}' has shape "
            f"{list(spec.shape)} per item), got {flat.size}",
            metadata={ITEM_SHAPE_METADATA: ",".join(map(str, spec.shape))},
        )
    items = flat.size // per_item
    array = flat.reshape(items, *spec.shape)
    wanted = numpy_dtype(spec.dtype)
    if array.dtype != wanted:
        if wanted.kind in "biu":
            _check_exact(array, wanted, spec.name, spec.dtype)
        array = array.astype(wanted)
    return [array], items


def _check_exact(
    array: np.ndarray[Any, Any], dtype: np.dtype[Any], name: str, datatype: str
) -> None:
    """The seed API carries floats: those for an integer (or BOOL) input must be whole numbers
    within its range, not cast silently (1000 -> -24 for INT8, NaN -> 0)."""
    low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(array) | (array != np.trunc(array)) | (array < low) | (array > high)
    if bad.any():
        value = array.reshape(-1)[int(np.argmax(bad.reshape(-1)))]
        raise InvalidInputError(
            f"input '{name}' is {datatype}: every value must be a whole number from {low} to "
            f"{high}; got {value!r}"
        )


def _flatten(outputs: Arrays) -> np.ndarray[Any, Any]:
    if len(outputs) == 1:
        return outputs[0].reshape(-1)
    items = outputs[0].shape[0]
    return np.concatenate([out.reshape(items, -1).astype(np.float32) for out in outputs], axis=1)


def encode_response(outputs: Arrays, raw: bool, elapsed_s: float) -> bytes:
    """Serialized ``PredictResponse``: flattened outputs (``raw_outputs`` bytes when the request
    was raw) and the server time."""
    return seed_wire.encode_response(_flatten(outputs), raw, elapsed_s)
