"""A Python model: the class ``Model`` of a version's ``model.py``, served like any other format.

The contract (docs/models.md): ``setup(device)`` once at load, ``preprocess(request)``
per request, ``predict(inputs)`` on a batch, ``postprocess(answer)`` per request; only ``predict``
is required. ``preprocess`` and ``postprocess`` run on the step threads (``runtime.steps``), in
parallel and never on the event loop or the inference thread, so the model's device does not wait
for them; ``predict`` runs on the inference thread as every other format's batch does.

``model.py`` runs with the server's rights, as a TorchScript file or an AOTInductor package does.
Each load imports it afresh (a changed file is new code), as a package rooted at its version
directory, so that ``from . import helpers`` finds files beside it. Errors at load name the file
and line; later errors are per request (``preprocess``: INVALID_ARGUMENT) or per batch.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import logging
import sys
import threading
import traceback
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from torchwire.config import DType, ModelConfig, TensorSpec
from torchwire.errors import (
    ConfigError,
    InvalidInputError,
    ModelExecutionError,
    TorchwireError,
)
from torchwire.runtime.arrays import Arrays, shape_matches
from torchwire.runtime.dtypes import NUMPY_DTYPES, numpy_dtype
from torchwire.runtime.model import LoadedModel, is_accelerator_error, is_out_of_memory

log = logging.getLogger(__name__)

_LOADS = itertools.count(1)
_DTYPE_BY_NUMPY: dict[np.dtype[Any], DType] = {
    dtype: cast(DType, name) for name, dtype in NUMPY_DTYPES.items() if name != "BF16"
}
_FLOAT_KINDS = "f"
Tensors = dict[str, Any]


def _where(exc: BaseException, path: Path) -> str:
    """``file:line`` of the innermost frame of ``exc`` in ``path``'s directory (the model's own
    code, helpers included), else ``path`` itself."""
    found = str(path)
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in frames:
        if Path(frame.filename).parent == path.parent:
            found = f"{frame.filename}:{frame.lineno}"
    return found


def _shown(where: str) -> str:
    """``where`` as a client is told it: from the model's directory on (``vision/1/model.py:72``),
    not the server's paths."""
    parts = Path(where).parts
    return str(Path(*parts[-3:])) if len(parts) > 3 else where


def _said(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _defined_at(function: Any, path: Path) -> str:
    """``file:line`` where ``function`` is defined (for errors about what it returned)."""
    try:
        return f"{path}:{inspect.getsourcelines(function)[1]}"
    except (OSError, TypeError):
        return str(path)


_PACKAGE = "torchwire_models"


def _import(path: Path) -> Any:
    """``path`` imported as a new package rooted at its directory (``torchwire_models.mN``:
    each load its own, so that a changed file is new code)."""
    if _PACKAGE not in sys.modules:  # the parent that relative imports resolve through
        parent = types.ModuleType(_PACKAGE, "Python models loaded by torchwire")
        parent.__path__ = []
        sys.modules[_PACKAGE] = parent
    name = f"{_PACKAGE}.m{next(_LOADS)}"
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)]
    )
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        _forget(name)
        raise ConfigError(f"{exc.filename or path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except BaseException as exc:  # SystemExit from an import too: the server must go on
        _forget(name)
        raise ConfigError(f"{_where(exc, path)}: importing it raised {_said(exc)}") from exc
    return module


def _forget(name: str) -> None:
    """Drop the module ``name`` and the modules it imported from beside it."""
    for key in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
        del sys.modules[key]


class PythonModel(LoadedModel):
    """``model.py``'s ``Model`` behind the ``LoadedModel`` interface the batcher uses.

    The arrays the batcher queues and batches are the preprocessed ones (in the order of the
    names ``preprocess`` gave on the warm-up); ``run_batch`` stacks them (numbers as tensors on
    the model's device, BYTES as numpy object arrays), calls ``predict`` and returns its outputs
    as arrays, one row per item: the declared outputs, or ``predict``'s own for ``finish``.
    """

    def __init__(self, instance: Any, config: ModelConfig, path: Path, device: torch.device):
        super().__init__(instance, config, path, device)
        self._instance = instance
        self._module_name = type(instance).__module__
        self._pre: Callable[[Tensors], Tensors] | None = getattr(instance, "preprocess", None)
        self._post: Callable[[Tensors], Tensors] | None = getattr(instance, "postprocess", None)
        self.prepares = self._pre is not None
        self.finishes = self._post is not None
        predict = instance.predict
        if config.compile.mode != "off":
            predict = torch.compile(
                predict,
                mode=None if config.compile.mode == "default" else config.compile.mode,
                dynamic=config.compile.dynamic,
                fullgraph=config.compile.fullgraph,
            )
        self._predict: Callable[[Tensors], Any] = predict
        self._predict_at = _defined_at(type(instance).predict, path)
        self._pre_at = _defined_at(type(instance).preprocess, path) if self._pre else str(path)
        self._post_at = _defined_at(type(instance).postprocess, path) if self._post else str(path)
        # Fixed by the warm-up: the names preprocess gives and predict gives, in their order.
        self._prepared: list[str] = [spec.name for spec in config.inputs]
        self._predicted: list[str] = [spec.name for spec in config.outputs]
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, config: ModelConfig) -> PythonModel:
        """Import ``path``, make its ``Model`` and set it up on the configured device; raise
        ``ConfigError`` naming the file and line of what failed."""
        device = torch.device(config.instances.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{path}: device {device} requested but CUDA is not available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        module = _import(path)
        try:
            model_class = getattr(module, "Model", None)
            if not inspect.isclass(model_class) or not callable(
                getattr(model_class, "predict", None)
            ):
                raise ConfigError(
                    f"{path}: defines no class Model with a predict(self, inputs) method"
                )
            try:
                instance = model_class()
                setup = getattr(instance, "setup", None)
                if setup is not None:
                    with torch.no_grad():  # not inference_mode: setup may build and change tensors
                        setup(device)
            except Exception as exc:
                step = "setup" if "instance" in locals() else "Model()"
                raise ConfigError(f"{_where(exc, path)}: {step} raised {_said(exc)}") from exc
            return cls(instance, config, path, device)
        except BaseException:
            _forget(module.__name__)
            raise

    # -- per request, on the step threads ------------------------------------------------------

    def prepare(self, arrays: Sequence[np.ndarray[Any, Any]], items: int) -> Arrays:
        """One request's arrays through ``preprocess``, in the order ``run_batch`` takes.

        Raises:
            InvalidInputError: ``preprocess`` raised (the request is refused, naming the line).
            ModelExecutionError: it returned something other than one row per item.
        """
        request = dict(zip((spec.name for spec in self.inputs), arrays, strict=True))
        if self._pre is None:
            return list(arrays)
        try:
            result = self._pre(request)
        except Exception as exc:
            if is_out_of_memory(exc) or is_accelerator_error(exc):  # the device's, not the input's
                raise ModelExecutionError(f"preprocess raised {_said(exc)}") from None
            raise InvalidInputError(
                f"preprocess refused the request ({_shown(_where(exc, self.path))}): {_said(exc)}"
            ) from None
        where = f"{_shown(self._pre_at)} (preprocess)"
        arrays = self._rows(result, self._prepared, items, where, on_device=True)
        if self._cuda and any(isinstance(a, torch.Tensor) for a in arrays):
            # Made on this step thread's stream: done before predict reads them on another.
            torch.cuda.current_stream(self.device).synchronize()
        return arrays

    def finish(self, outputs: Arrays) -> Arrays:
        """One request's rows of ``predict``'s outputs through ``postprocess``, checked against
        the declared outputs."""
        if self._post is None:
            return outputs
        items = int(outputs[0].shape[0]) if outputs else 0
        try:
            result = self._post(dict(zip(self._predicted, outputs, strict=True)))
        except Exception as exc:
            log.warning("%s: postprocess raised", self.path, exc_info=exc)
            raise ModelExecutionError(
                f"postprocess raised ({_shown(_where(exc, self.path))}): {_said(exc)}"
            ) from None
        where = f"{_shown(self._post_at)} (postprocess)"
        return self._declared(self._rows(result, self._declared_names(), items, where), where)

    # -- per batch, on the inference thread -----------------------------------------------------

    def _run(
        self, requests: Sequence[Sequence[np.ndarray[Any, Any]]], rows: int, padded: int
    ) -> Arrays:
        inputs: Tensors = {}
        for index, name in enumerate(self._prepared):
            parts = [request[index] for request in requests]
            inputs[name] = self._stacked(name, parts, padded)
        try:
            if self._autocast_dtype is None:
                result = self._predict(inputs)
            else:
                with torch.autocast(self.device.type, dtype=self._autocast_dtype):
                    result = self._predict(inputs)
        except Exception as exc:
            if is_out_of_memory(exc) or is_accelerator_error(exc):
                raise  # run_batch says what it amounts to
            log.warning("%s raised on a batch of %d", self.path, padded, exc_info=exc)
            raise ModelExecutionError(
                f"predict raised ({_shown(_where(exc, self.path))}): {_said(exc)}"
            ) from None
        where = f"{_shown(self._predict_at)} (predict)"
        names = self._predicted if self._post else self._declared_names()
        outputs = self._rows(result, names, padded, where)
        if padded != rows:
            outputs = [output[:rows] for output in outputs]
        return outputs if self._post else self._declared(outputs, where)

    def _stacked(self, name: str, parts: list[Any], padded: int) -> Any:
        """One input of the batch: numbers as a tensor on the device (padded with zeros),
        anything else (BYTES) as one numpy array with the last item repeated as padding."""
        first = parts[0]
        if isinstance(first, torch.Tensor):
            tensor = first if len(parts) == 1 else torch.cat(parts)
            if padded > tensor.shape[0]:
                pad = tensor.new_zeros((padded - tensor.shape[0], *tensor.shape[1:]))
                tensor = torch.cat([tensor, pad])
            return tensor.to(self.device, non_blocking=True)
        dtype = _DTYPE_BY_NUMPY.get(first.dtype)
        if dtype is None or dtype == "BYTES":
            array = first if len(parts) == 1 else np.concatenate(parts)
            if padded > array.shape[0]:
                array = np.concatenate([array, np.repeat(array[-1:], padded - array.shape[0], 0)])
            return array
        spec = TensorSpec.model_construct(name=name, dtype=dtype, shape=first.shape[1:])
        return self._batch_input(parts, spec, padded)

    # -- warm-up and timing ----------------------------------------------------------------------

    def sample(self, items: int) -> Arrays:
        """A prepared batch of ``items`` items for timing: the warm-up request, repeated."""
        one = self.prepare(self._example(), 1)
        return [
            torch.cat([part] * items)
            if isinstance(part, torch.Tensor)
            else np.repeat(part, items, 0)
            for part in one
        ]

    def warm_up(self) -> None:
        """Run ``Model.example()`` (or an item of zeros; BYTES: empty) through every step; what
        comes back must be the declared outputs. Fixes the names of ``preprocess``'s and
        ``predict``'s results. A failure is a ``ConfigError`` naming the file and line."""
        request = self._example()
        try:
            if self._pre is not None:
                with torch.inference_mode():
                    found = self._pre(
                        dict(zip((s.name for s in self.inputs), request, strict=True))
                    )
                if not isinstance(found, dict) or not found:
                    raise ConfigError(
                        f"{self._pre_at}: preprocess must return a dict of arrays or tensors, "
                        f"got {type(found).__name__}"
                    )
                self._prepared = [str(name) for name in found]
            prepared = self.prepare(request, 1)
            if self._post is not None:
                with torch.inference_mode(), self._on_stream(keep=False):
                    found = self._predict(
                        {
                            n: self._stacked(n, [a], 1)
                            for n, a in zip(self._prepared, prepared, strict=True)
                        }
                    )
                if not isinstance(found, dict) or not found:
                    raise ConfigError(
                        f"{self._predict_at}: predict must return a dict of tensors, got "
                        f"{type(found).__name__}"
                    )
                self._predicted = [str(name) for name in found]
            for size in self.config.batching.pad_to[1:] if self._cuda else []:
                self.run_batch([self.prepare(request, 1)] * size)
            self.finish(self.run_batch([prepared]))
        except ConfigError:
            raise
        except TorchwireError as exc:
            raise ConfigError(f"{self.path}: warm-up request failed: {exc}{self._hint()}") from None
        except Exception as exc:
            raise ConfigError(
                f"{_where(exc, self.path)}: warm-up raised {_said(exc)}{self._hint()}"
            ) from exc

    def _hint(self) -> str:
        if getattr(self._instance, "example", None) is not None:
            return ""
        return (
            " (the warm-up request is one item of zeros, empty for BYTES: define "
            "Model.example() to return a real one)"
        )

    def _example(self) -> Arrays:
        """One request of one item: ``Model.example()``, else zeros (empty BYTES)."""
        example = getattr(self._instance, "example", None)
        if example is None:
            return [
                np.full((1, *(1 if d == -1 else d for d in s.shape)), b"", dtype=object)
                if s.dtype == "BYTES"
                else np.zeros((1, *(1 if d == -1 else d for d in s.shape)), numpy_dtype(s.dtype))
                for s in self.inputs
            ]
        given = example()
        where = _defined_at(type(self._instance).example, self.path)
        if not isinstance(given, dict) or set(given) != {s.name for s in self.inputs}:
            raise ConfigError(
                f"{where}: example() must return a dict of the inputs "
                f"{[s.name for s in self.inputs]} (one request), got {type(given).__name__}"
                + (f" with {sorted(given)}" if isinstance(given, dict) else "")
            )
        arrays = [np.asarray(given[s.name], dtype=numpy_dtype(s.dtype)) for s in self.inputs]
        try:
            self.check_inputs(arrays)
        except InvalidInputError as exc:
            raise ConfigError(f"{where}: example(): {exc}") from None
        return arrays

    def release(self) -> None:
        super().release()
        self._instance = self._predict = self._pre = self._post = None  # type: ignore[assignment]
        _forget(self._module_name)

    # -- checks -------------------------------------------------------------------------------

    def _declared_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def _rows(
        self, result: Any, names: list[str], items: int, where: str, on_device: bool = False
    ) -> Arrays:
        """``result`` (a dict) as arrays in the order of ``names``, each with ``items`` rows;
        tensors as numpy arrays, except those on a device with ``on_device`` (preprocess may
        put its tensors on the model's device itself)."""
        if not isinstance(result, dict):
            raise ModelExecutionError(f"{where}: must return a dict, got {type(result).__name__}")
        if set(result) != set(names):
            raise ModelExecutionError(f"{where}: returned {sorted(result)}; expected {names}")
        arrays = []
        for name in names:
            value = result[name]
            if isinstance(value, torch.Tensor):
                value = value.detach()
                if value.device.type == "cpu":
                    value = _numpy(value)
                elif not on_device:
                    value = _numpy(value.cpu())
            elif not isinstance(value, np.ndarray):
                value = np.asarray(value)
            if value.ndim == 0 or value.shape[0] != items:
                raise ModelExecutionError(
                    f"{where}: '{name}' must have {items} rows (one per item), got shape "
                    f"{list(value.shape)}"
                )
            arrays.append(value)
        return arrays

    def _declared(self, arrays: Arrays, where: str) -> Arrays:
        """The outputs checked against (and floats cast to) their declared dtype and shape."""
        checked = []
        for spec, array in zip(self.outputs, arrays, strict=True):
            want = numpy_dtype(spec.dtype)
            if spec.dtype == "BYTES":
                if array.dtype.kind == "S":
                    array = array.astype(object)
                if array.dtype != want or not all(
                    isinstance(e, (bytes, str)) for e in array.reshape(-1)
                ):
                    raise ModelExecutionError(
                        f"{where}: output '{spec.name}' is BYTES: give a numpy object array of "
                        f"bytes or str, got {array.dtype}"
                        + (" holding other objects" if array.dtype == want else "")
                    )
            elif array.dtype != want:
                if array.dtype.kind != _FLOAT_KINDS or want.kind != _FLOAT_KINDS:
                    raise ModelExecutionError(
                        f"{where}: output '{spec.name}' should be {spec.dtype}, got {array.dtype}"
                    )
                array = array.astype(want)
            if not shape_matches(array.shape[1:], spec.shape):
                raise ModelExecutionError(
                    f"{where}: output '{spec.name}' should be {spec.dtype}{list(spec.shape)} per "
                    f"item, got {list(array.shape[1:])} (shape {list(array.shape)})"
                )
            checked.append(array)
        return checked


def _numpy(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()
