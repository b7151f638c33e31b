"""Datatype names (KServe V2 / Triton spelling) and their numpy and torch counterparts."""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch

from torchwire.config import DType

TORCH_DTYPES: dict[DType, torch.dtype] = {
    "FP32": torch.float32,
    "FP64": torch.float64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}
# numpy has no bfloat16: BF16 tensors travel as FP32 arrays and are cast on the model's device.
# BYTES (no torch dtype) are numpy object arrays of ``bytes``, for Python models only.
NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    **{
        name: np.dtype(np.float32 if name == "BF16" else torch.empty(0, dtype=dtype).numpy().dtype)
        for name, dtype in TORCH_DTYPES.items()
    },
    "BYTES": np.dtype(object),
}
DTYPE_BY_TORCH: dict[torch.dtype, DType] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
SUPPORTED: tuple[str, ...] = get_args(DType)


def numpy_dtype(name: str) -> np.dtype[np.generic]:
    """The numpy dtype that carries tensors of datatype ``name``."""
    return NUMPY_DTYPES[name]
