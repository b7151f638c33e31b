"""One model file loaded on its device, called on whole batches from an inference thread."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchwire.config import ModelConfig, TensorSpec
from torchwire.errors import ConfigError, InvalidInputError, ModelExecutionError
from torchwire.runtime.dtypes import DTYPE_BY_TORCH, TORCH_DTYPES, numpy_dtype

log = logging.getLogger(__name__)

Arrays = list[np.ndarray[Any, Any]]


def shape_matches(actual: Sequence[int], expected: Sequence[int]) -> bool:
    """Whether ``actual`` fits ``expected``, where -1 in ``expected`` matches any size."""
    return len(actual) == len(expected) and all(
        want in (-1, got) for got, want in zip(actual, expected, strict=True)
    )


def _last_line(exc: Exception) -> str:
    """The exception's own message, without the TorchScript traceback that torch.jit adds."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
        return lines[-1]  # e.g. "builtins.ValueError: poisoned input: 666"
    return f"{type(exc).__name__}: {' '.join(lines)}"


class LoadedModel:
    """A TorchScript or ``torch.export`` model with its signature, ready to run batches.

    Calls run under ``torch.inference_mode()`` in the calling thread (an inference thread of the
    batcher, never the event loop), with ``torch.autocast`` for fp16/bf16 precision.
    """

    def __init__(self, module: Any, config: ModelConfig, path: Path, device: torch.device) -> None:
        self.path = path
        self.config = config
        self.device = device
        self.inputs: list[TensorSpec] = list(config.inputs)
        self.outputs: list[TensorSpec] = list(config.outputs)
        # Elements per item of each input (-1: variable), read on every request's path.
        self._item_sizes = [
            -1 if -1 in spec.shape else int(np.prod(spec.shape, dtype=np.int64))
            for spec in self.inputs
        ]
        self._module = module
        self._pin = device.type == "cuda"
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            config.instances.precision
        )

    @classmethod
    def load(cls, path: Path, config: ModelConfig) -> LoadedModel:
        """Load ``path`` onto the configured device; raise ``ConfigError`` saying why not."""
        device = torch.device(config.instances.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{path}: device {device} requested but CUDA is not available")
        try:
            if config.format == "exported":
                module = torch.export.load(str(path)).module().to(device)
            else:
                module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
                module.eval()
        except Exception as exc:  # corrupt, truncated, wrong format: all say why
            raise ConfigError(f"{path}: cannot load {config.format} model: {exc}") from exc
        return cls(module, config, path, device)

    def item_size(self, index: int = 0) -> int:
        """Elements per item of input ``index`` (its shape must be fixed)."""
        size = self._item_sizes[index]
        if size < 0:
            spec = self.inputs[index]
            raise InvalidInputError(
                f"input '{spec.name}' has a variable shape {list(spec.shape)}; "
                "send it through the V2 API with an explicit shape"
            )
        return size

    def check_inputs(self, arrays: Sequence[np.ndarray[Any, Any]]) -> int:
        """Validate one request's arrays (batch dimension first); return its item count."""
        if len(arrays) != len(self.inputs):
            raise InvalidInputError(f"expected {len(self.inputs)} inputs, got {len(arrays)}")
        items = -1
        for array, spec in zip(arrays, self.inputs, strict=True):
            if array.ndim == 0 or not shape_matches(array.shape[1:], spec.shape):
                raise InvalidInputError(
                    f"input '{spec.name}': expected shape [N, {', '.join(map(str, spec.shape))}]"
                    f", got {list(array.shape)}"
                )
            if array.dtype != numpy_dtype(spec.dtype):
                raise InvalidInputError(
                    f"input '{spec.name}': expected {spec.dtype}, got numpy {array.dtype}"
                )
            if items not in (-1, array.shape[0]):
                raise InvalidInputError(
                    f"input '{spec.name}' has {array.shape[0]} items, the others {items}"
                )
            items = array.shape[0]
        if items == 0:
            raise InvalidInputError("a request must hold at least one item, got 0")
        return items

    def __call__(self, arrays: Sequence[np.ndarray[Any, Any]]) -> Arrays:
        """Run one batch; return one array per output, each with the batch dimension first."""
        with torch.inference_mode():
            return self._to_arrays(self._forward(arrays), arrays[0].shape[0])

    def warm_up(self) -> None:
        """Run one item of zeros; check the outputs against the config, or take them from it."""
        arrays = [
            np.zeros((1, *(1 if d == -1 else d for d in spec.shape)), dtype=numpy_dtype(spec.dtype))
            for spec in self.inputs
        ]
        try:
            with torch.inference_mode():
                outputs = self._forward(arrays)
        except ModelExecutionError as exc:
            raise ConfigError(f"{self.path}: warm-up run failed: {exc}") from exc
        found = [
            TensorSpec(name=name, dtype=DTYPE_BY_TORCH[t.dtype], shape=tuple(t.shape[1:]))
            for name, t in outputs
        ]
        if not self.outputs:
            self.outputs = found
            return
        for want, got in zip(self.outputs, found, strict=True):
            if want.dtype != got.dtype or not shape_matches(got.shape, want.shape):
                raise ConfigError(
                    f"{self.path}: output '{want.name}' should be {want.dtype}"
                    f"{list(want.shape)} per item, the model gives {got.dtype}{list(got.shape)}"
                )

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self._autocast_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self._autocast_dtype):
                yield

    def _to_tensor(self, array: np.ndarray[Any, Any], spec: TensorSpec) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self._pin:
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(TORCH_DTYPES[spec.dtype])

    def _forward(self, arrays: Sequence[np.ndarray[Any, Any]]) -> list[tuple[str, torch.Tensor]]:
        """Call the model (inside ``inference_mode``); name its outputs."""
        with self._autocast():
            tensors = [
                self._to_tensor(a, spec) for a, spec in zip(arrays, self.inputs, strict=True)
            ]
            try:
                result = self._module(*tensors)
            except Exception as exc:
                log.warning("%s raised on a batch of %d", self.path, len(arrays[0]), exc_info=exc)
                raise ModelExecutionError(f"model raised {_last_line(exc)}") from exc
        return self._named(result)

    def _named(self, result: Any) -> list[tuple[str, torch.Tensor]]:
        names = [spec.name for spec in self.outputs]
        if isinstance(result, torch.Tensor):
            tensors: list[torch.Tensor] = [result]
        elif isinstance(result, dict):
            keys = names or sorted(result)
            missing = [key for key in keys if key not in result]
            if missing:
                raise ModelExecutionError(f"model output lacks {missing}; it has {sorted(result)}")
            return [(key, result[key]) for key in keys]
        elif isinstance(result, (tuple, list)):
            tensors = list(result)
        else:
            raise ModelExecutionError(f"model returned {type(result).__name__}, not tensors")
        if names and len(names) != len(tensors):
            raise ModelExecutionError(f"model returned {len(tensors)} outputs, config has {names}")
        names = names or (
            ["output"] if len(tensors) == 1 else [f"output{i}" for i in range(len(tensors))]
        )
        return list(zip(names, tensors, strict=True))

    def _to_arrays(self, named: list[tuple[str, torch.Tensor]], batch: int) -> Arrays:
        arrays: Arrays = []
        for name, tensor in named:
            if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0 or tensor.shape[0] != batch:
                got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
                raise ModelExecutionError(
                    f"output '{name}' should have {batch} rows (one per item), got {got}"
                )
            tensor = tensor.detach()
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            if self.outputs and self.outputs[len(arrays)].dtype == "FP32":
                tensor = tensor.float()  # autocast may hand back fp16
            arrays.append(tensor.cpu().numpy())
        return arrays
