"""One model file loaded on its device, called on whole batches from an inference thread.

The requests of a batch are concatenated by ``torch.cat``, which copies with the intra-op threads
and holds the GIL once per input rather than once per request (the event loop needs it meanwhile).
On a GPU each inference thread has its own CUDA stream (from a pool, reused across reloads: each
stream keeps a cuBLAS workspace) and its own pinned staging buffer per input, sized for a full
batch: the requests are concatenated straight into pinned memory, copied to the device without
blocking, and the outputs copied back on the same stream, so that two instances overlap their
copies with each other's compute and no batch pays for a pinned allocation.

Running out of memory (CUDA's or the host allocator's) raises ``ModelOutOfMemoryError``, which the
batcher answers by splitting the batch; what was cached by the allocator is released first. A CUDA
error after which the device no longer computes raises ``DeviceFailedError``: the process must
start again.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import psutil
import torch

from torchwire.compat.torch_internals import quiet_readonly_arrays
from torchwire.config import DType, ModelConfig, TensorSpec
from torchwire.errors import (
    DEVICE_FAILED,
    RETRY_PUSHBACK_METADATA,
    ConfigError,
    DeviceFailedError,
    InvalidInputError,
    ModelExecutionError,
    ModelOutOfMemoryError,
    exception_chain,
)
from torchwire.runtime.arrays import Arrays, shape_matches
from torchwire.runtime.dtypes import DTYPE_BY_TORCH, TORCH_DTYPES, numpy_dtype
from torchwire.runtime.exported import load_aoti, load_exported

log = logging.getLogger(__name__)

_FLOATS = frozenset({"FP16", "BF16", "FP32", "FP64"})


class _StreamPool:
    """CUDA streams handed to inference threads and given back when their model is released:
    torch keeps a cuBLAS workspace per stream for the life of the process, so a stream per new
    thread (every reload starts threads) would leak device memory."""

    def __init__(self) -> None:
        self._free: dict[str, list[torch.cuda.Stream]] = {}
        self._lock = threading.Lock()

    def take(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            free = self._free.setdefault(str(device), [])
            if free:
                return free.pop()
        return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def give(self, device: torch.device, streams: Sequence[torch.cuda.Stream]) -> None:
        with self._lock:
            self._free.setdefault(str(device), []).extend(streams)


_STREAMS = _StreamPool()


@dataclass(slots=True, eq=False)
class _Lane:
    """One inference thread's CUDA stream and pinned staging buffers (by input name). The model
    holds every lane until it is released, not only the thread: a lane outlives its thread when
    the device fails (see ``_FAILED_DEVICES``). (So each thread that ever runs the model keeps
    a full batch of pinned memory until then: the server's threads are fixed.)"""

    stream: torch.cuda.Stream
    staging: dict[str, torch.Tensor] = field(default_factory=dict)
    # Buffers replaced by larger ones, kept until the stream is synchronised: the host allocator
    # that frees one records events on that stream, which aborts if the device failed meanwhile.
    retired: list[torch.Tensor] = field(default_factory=list)


def _last_line(exc: Exception) -> str:
    """The exception's own message, without the TorchScript traceback that torch.jit adds."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
        return lines[-1]  # e.g. "builtins.ValueError: poisoned input: 666"
    return f"{type(exc).__name__}: {' '.join(lines)}"


_CUDA_ERROR = re.compile(r'CUDA error: [^\n"]+')
_ASKED = (
    re.compile(r"[Tt]ried to allocate ([\d.]+ [KMGTP]?i?B)"),  # CUDA: "Tried to allocate 2.00 GiB"
    re.compile(r"you tried to allocate (\d+) bytes"),  # the host allocator
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (TorchScript may wrap the torch type)."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or any(
        marker in text for marker in ("out of memory", "can't allocate memory", "ALLOC_FAILED")
    )


_ACCELERATOR_ERRORS = (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()
_FAILED_DEVICES: dict[torch.device, list[object]] = {}
"""Devices found failed in this process (a CUDA context is the whole process's): no model runs
on them again. Each keeps what this process held on it, never freed: CUDA's allocators throw
from a destructor when they free memory of a failed context, which aborts the process (SIGABRT
instead of exit code 4, the batch's callers left unanswered: docs/design-notes.md)."""


def is_accelerator_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error of the device (CUDA's), not of the model's code (torch 2.8
    and later raise ``AcceleratorError``; TorchScript wraps it, keeping CUDA's words)."""
    return isinstance(exc, _ACCELERATOR_ERRORS) or "CUDA error: " in str(exc)


def _device_error(exc: Exception) -> str:
    """CUDA's own words of a device error ("CUDA error: device-side assert triggered"), without
    its advice on debugging or TorchScript's traceback (the last: the code quoted before it may
    hold the same words)."""
    found = _CUDA_ERROR.findall(str(exc))
    return found[-1] if found else _last_line(exc)


def _leave_failed_device() -> None:
    """At the interpreter's exit, once a GPU failed: leave before its teardown frees what
    ``_FAILED_DEVICES`` keeps (an abort), with the exit code that says the device failed (the
    server leaves so itself; this covers any other process: a check, a script)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(DEVICE_FAILED)


def _tracebacks(exc: BaseException) -> list[TracebackType]:
    """The tracebacks of ``exc`` and of the exceptions it was raised from: their frames hold
    the failed call's tensors (callers drop the exceptions' own references to them)."""
    return [e.__traceback__ for e in exception_chain(exc) if e.__traceback__ is not None]


def _bytes(size: int) -> str:
    """``size`` in the largest binary unit under which it is at least 1, e.g. '2.00 GiB'."""
    units, value = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"], float(size)
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.2f} {units[0]}"


def _asked(exc: BaseException) -> str:
    """The size of the allocation that failed, as the message says it, or 'more'."""
    for pattern in _ASKED:
        if match := pattern.search(str(exc)):
            size = match.group(1)
            return _bytes(int(size)) if size.isdigit() else size
    return "more"


class LoadedModel:
    """A TorchScript, ``torch.export`` or AOTInductor model with its signature, ready to run
    batches (``PythonModel``, a ``model.py``, is one too).

    Calls run under ``torch.inference_mode()`` in the calling thread (an inference thread of the
    batcher, never the event loop), with ``torch.autocast`` for fp16/bf16 precision.
    """

    prepares = False
    """Whether each request goes through ``prepare`` before it is queued (on a step thread)."""
    finishes = False
    """Whether each request's rows go through ``finish`` before they are answered."""

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
        self._cuda = device.type == "cuda"
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            config.instances.precision
        )
        self._per_thread = threading.local()  # .lane: this thread's _Lane, on a GPU
        self._lanes: list[_Lane] = []  # every thread's; their streams taken from _STREAMS
        self._lanes_lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, config: ModelConfig) -> LoadedModel:
        """Load ``path`` onto the configured device; raise ``ConfigError`` saying why not."""
        quiet_readonly_arrays()
        if config.format == "python":
            from torchwire.runtime.python_model import PythonModel  # it builds on this class

            return PythonModel.load(path, config)
        device = torch.device(config.instances.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{path}: device {device} requested but CUDA is not available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        try:
            if config.format == "exported":
                module = load_exported(path, device)  # ConfigError if it would unpickle objects
            elif config.format == "aoti":
                module = load_aoti(path, device)
            else:
                module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
                module.eval()
        except ConfigError:
            raise
        except Exception as exc:  # corrupt, truncated, wrong format: all say why
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{path}: cannot load {config.format} model: {first}") from exc
        return cls(module, config, path, device)

    def signature(self) -> str:
        """Inputs -> outputs, as the start-up banner and ``repo check`` show them."""

        def tensors(specs: list[TensorSpec]) -> str:
            return ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in specs)

        return f"{tensors(self.inputs)} -> {tensors(self.outputs)}"

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

    def prepare(self, arrays: Sequence[np.ndarray[Any, Any]], items: int) -> Arrays:
        """One request's arrays as ``run_batch`` takes them (``prepares``: a Python model's
        ``preprocess``)."""
        return list(arrays)

    def finish(self, outputs: Arrays) -> Arrays:
        """One request's rows as the client gets them (``finishes``: ``postprocess``)."""
        return outputs

    def sample(self, items: int) -> Arrays:
        """A batch of ``items`` items of zeros (variable dimensions at 1), to time calls."""
        return [
            np.zeros((items, *(1 if d == -1 else d for d in spec.shape)), numpy_dtype(spec.dtype))
            for spec in self.inputs
        ]

    def __call__(self, arrays: Sequence[np.ndarray[Any, Any]]) -> Arrays:
        """Run one batch; return one array per output, each with the batch dimension first."""
        return self.run_batch([arrays])

    def run_batch(self, requests: Sequence[Sequence[np.ndarray[Any, Any]]]) -> Arrays:
        """Run the requests (each a list of input arrays) as one batch, their rows in order;
        return one array per output, each with the batch dimension first.

        Raises:
            ModelOutOfMemoryError: an allocation failed (the allocator cache is released).
            DeviceFailedError: the device failed and no longer computes (CUDA's sticky errors).
            ModelExecutionError: the model raised, or its outputs do not fit the batch.
        """
        rows = sum(int(request[0].shape[0]) for request in requests)
        padded = self._padded(rows)
        # On every batch's path: plain try and with statements, no generator-based context
        # managers (each costs a few microseconds, as much as a small model's call).
        try:
            with torch.inference_mode():
                if not self._cuda:
                    return self._run(requests, rows, padded)
                with self._on_stream():
                    return self._run(requests, rows, padded)
        except Exception as exc:
            failed = self._batch_error(exc, padded)
            if failed is None or failed is exc:
                raise
            raise failed from exc

    @property
    def device_failed(self) -> bool:
        """Whether this model's device was found failed (by any model on it)."""
        return self.device in _FAILED_DEVICES

    def release(self) -> None:
        """Drop the module (the version is retired; its threads have ended), give its streams
        back to the pool and its cached device memory back to the device. On a failed device
        nothing is dropped (see ``_FAILED_DEVICES``). (A model released while another finds
        the device failed may still free on it: a narrow window, left open.)"""
        if self.device_failed:
            _FAILED_DEVICES[self.device].append(self)
            return
        module, self._module = self._module, None
        if self.config.format == "exported" and module is not None:
            # An exported module refers to itself (bound methods, its graph): dropping it frees
            # nothing until a full garbage collection. Emptying every submodule frees it now.
            for part in list(module.modules()):
                part.__dict__.clear()
        self._per_thread = threading.local()
        with self._lanes_lock:
            lanes, self._lanes = self._lanes, []
        _STREAMS.give(self.device, [lane.stream for lane in lanes])
        self.release_cache()

    def _failed_device(self, exc: Exception) -> DeviceFailedError | None:
        """``exc`` as ``DeviceFailedError`` if it is a device error and the device no longer
        computes (or was found failed already); else None. The failed call's frames (its
        tensors) are kept."""
        if not is_accelerator_error(exc):
            return None
        seen_before = self.device_failed
        if not seen_before and self._device_works():
            return None
        _FAILED_DEVICES.setdefault(self.device, []).extend(_tracebacks(exc))
        if self._cuda and not seen_before:
            atexit.register(_leave_failed_device)
        return DeviceFailedError(f"{self.device} failed: {_device_error(exc)}", seen_before)

    def _device_works(self) -> bool:
        """After a device error: whether the device still computes. Some CUDA errors stick to
        the process (a device-side assert, an illegal address) and fail every later call; others
        (a bad launch) fail only theirs. A model on the CPU that raises one used a device this
        process cannot check: taken as failed."""
        if not self._cuda:
            return False
        try:
            torch.cuda.synchronize(self.device)
            return bool((torch.ones(1, device=self.device) + 1).item() == 2)
        except torch.OutOfMemoryError:
            return True  # full, not failed
        except Exception:
            return False

    def release_cache(self) -> None:
        """Return the CUDA allocator's unused cached blocks to the device (after an OOM, an
        unload); nothing on CPU."""
        if self._cuda:
            torch.cuda.empty_cache()

    def warm_up(self) -> None:
        """Run one item of zeros; check the outputs against the config, or take them from it.
        A model with variable input dimensions runs again with those dimensions at 2: an output
        dimension that follows them is variable (-1) too, not the first run's size. Batches
        padded (``[batching] pad_to``) run at the first size; on a GPU at every size too, which
        checks that each fits in memory and compiles what TorchScript specialises by shape."""
        found = self._warm_run(1)
        if any(-1 in spec.shape for spec in self.inputs):
            again = self._warm_run(2)
            found = [
                TensorSpec(
                    name=one.name,
                    dtype=one.dtype,
                    shape=tuple(
                        d if d == e else -1 for d, e in zip(one.shape, two.shape, strict=True)
                    ),
                )
                if len(one.shape) == len(two.shape)
                else one
                for one, two in zip(found, again, strict=True)
            ]
        self.outputs = self.outputs or found
        for want, got in zip(self.outputs, found, strict=True):
            if want.dtype != got.dtype or not shape_matches(got.shape, want.shape):
                raise ConfigError(
                    f"{self.path}: output '{want.name}' should be {want.dtype}"
                    f"{list(want.shape)} per item, the model gives {got.dtype}{list(got.shape)}"
                )
        if self._cuda:
            for size in self.config.batching.pad_to[1:]:
                self._warm_run(1, size)

    def _warm_run(self, size: int, items: int = 0) -> list[TensorSpec]:
        """One item of zeros, variable dimensions at ``size``, padded to ``items`` (default: as
        a batch of one is): the outputs the client gets."""
        arrays = [
            np.zeros(
                (1, *(size if d == -1 else d for d in spec.shape)), dtype=numpy_dtype(spec.dtype)
            )
            for spec in self.inputs
        ]
        items = items or self._padded(1)
        try:
            with torch.inference_mode(), self._on_stream(keep=False):
                inputs = [
                    self._batch_input([a], spec, items)
                    for a, spec in zip(arrays, self.inputs, strict=True)
                ]
                outputs = self._forward(inputs)
        except Exception as exc:
            failed = self._batch_error(exc, items)
            if failed is None:
                raise
            if isinstance(failed, DeviceFailedError):  # the process must restart, not refuse
                raise failed from exc
            raise ConfigError(f"{self.path}: warm-up run failed: {failed}") from exc
        # What the client will receive: under reduced precision, outputs in their declared dtype.
        return [
            TensorSpec(name=name, dtype=self._answer_dtype(i, t.dtype), shape=tuple(t.shape[1:]))
            for i, (name, t) in enumerate(outputs)
        ]

    # -- internals ---------------------------------------------------------------------------

    def _batch_error(self, exc: Exception, items: int) -> ModelExecutionError | None:
        """What ``exc``, raised anywhere in a call on ``items`` items (staging, copies, the
        model, the wait for them), amounts to: ``ModelOutOfMemoryError`` for a failed
        allocation, ``DeviceFailedError`` for a device that no longer computes, a
        ``ModelExecutionError`` for another device error (or ``exc`` itself if it is one
        already); None for anything else (a bug: raise it as it is)."""
        if isinstance(exc, ModelExecutionError):
            return exc
        if is_out_of_memory(exc):
            return self._out_of_memory(exc, items)
        if is_accelerator_error(exc):
            failed = self._failed_device(exc)
            return failed or ModelExecutionError(f"model raised {_device_error(exc)}")
        return None

    @contextlib.contextmanager
    def _on_stream(self, keep: bool = True) -> Iterator[None]:
        """On a GPU: this thread's own CUDA stream, synchronised on the way out (so that its
        staging buffers are free again, whatever happened); ``keep=False`` gives it back then
        (a thread that runs the model once: the warm-up)."""
        if not self._cuda:
            yield
            return
        local = self._per_thread
        lane: _Lane | None = getattr(local, "lane", None)
        if lane is None:
            lane = local.lane = _Lane(_STREAMS.take(self.device))
            with self._lanes_lock:
                self._lanes.append(lane)
        try:
            with torch.cuda.stream(lane.stream):
                yield
        finally:
            local.lane = lane if keep else None
            lane.stream.synchronize()  # raises on a failed device: the lane stays the model's
            lane.retired.clear()
            if not keep:
                with self._lanes_lock:
                    self._lanes.remove(lane)
                _STREAMS.give(self.device, [lane.stream])

    def _padded(self, rows: int) -> int:
        """The items a batch of ``rows`` is run at: the smallest ``[batching] pad_to`` size that
        holds it, else ``rows``."""
        return next((size for size in self.config.batching.pad_to if size >= rows), rows)

    def _run(
        self, requests: Sequence[Sequence[np.ndarray[Any, Any]]], rows: int, padded: int
    ) -> Arrays:
        """``run_batch``'s work, inside inference mode (and this thread's CUDA stream)."""
        inputs = [
            self._batch_input([request[i] for request in requests], spec, padded)
            for i, spec in enumerate(self.inputs)
        ]
        outputs = self._to_arrays(self._forward(inputs), padded)
        return outputs if padded == rows else [output[:rows] for output in outputs]

    def _batch_input(
        self, parts: list[np.ndarray[Any, Any]], spec: TensorSpec, padded: int = 0
    ) -> torch.Tensor:
        """One input of the batch on the model's device, in the declared dtype, with items of
        zeros after the requests' up to ``padded`` items."""
        dtype = TORCH_DTYPES[spec.dtype]
        rows = sum(part.shape[0] for part in parts)
        if not self._cuda:
            if padded > rows:
                parts = [*parts, np.zeros((padded - rows, *parts[0].shape[1:]), parts[0].dtype)]
            part = parts[0]
            if len(parts) == 1 and part.flags.writeable:
                tensor = torch.from_numpy(part)  # no copy
            elif len(parts) == 1 and part.nbytes < PARALLEL_COPY_BYTES:
                # A read-only frombuffer() view of a message: copied, the model may write into
                # its input. (Larger ones are copied by torch.cat, without the GIL.)
                tensor = torch.from_numpy(part.copy())
            else:
                tensor = _concatenate(parts)
            return tensor if tensor.dtype == dtype else tensor.to(dtype)
        host = _concatenate(parts, self._staging(spec, parts[0], rows))
        if padded <= rows:
            return host.to(self.device, non_blocking=True).to(dtype)
        # The padding is zeroed on the device: nothing to write or copy for it on the host.
        tensor = torch.empty((padded, *host.shape[1:]), dtype=host.dtype, device=self.device)
        tensor[:rows].copy_(host, non_blocking=True)
        tensor[rows:].zero_()
        return tensor.to(dtype)

    def _staging(self, spec: TensorSpec, like: np.ndarray[Any, Any], rows: int) -> torch.Tensor:
        """This thread's pinned buffer for input ``spec``, as ``rows`` items shaped like
        ``like``; it grows to at least a full batch at once (a pinned allocation is slow)."""
        item = like[0].nbytes
        lane: _Lane = self._per_thread.lane
        buffer = lane.staging.get(spec.name)
        if buffer is None or buffer.numel() < rows * item:
            if buffer is not None:
                lane.retired.append(buffer)
            size = max(rows, self.config.batching.max_batch_size) * item
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            lane.staging[spec.name] = buffer
        dtype = torch.from_numpy(like[:0]).dtype
        return buffer[: rows * item].view(dtype).view(rows, *like.shape[1:])

    def _forward(self, inputs: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """Call the model (inside ``inference_mode``); name its outputs."""
        try:
            if self._autocast_dtype is None:
                result = self._module(*inputs)
            else:
                with torch.autocast(self.device.type, dtype=self._autocast_dtype):
                    result = self._module(*inputs)
        except Exception as exc:
            if is_out_of_memory(exc) or is_accelerator_error(exc):
                raise  # run_batch (or _warm_run) says what it amounts to
            log.warning("%s raised on a batch of %d", self.path, len(inputs[0]), exc_info=exc)
            raise ModelExecutionError(f"model raised {_last_line(exc)}") from exc
        return self._named(result)

    def _out_of_memory(self, exc: Exception, items: int) -> ModelOutOfMemoryError:
        """Release the allocator's cache, then say what was asked for and what is free."""
        self.release_cache()
        if self._cuda:
            free, total = torch.cuda.mem_get_info(self.device)
        else:
            memory = psutil.virtual_memory()
            free, total = memory.available, memory.total
        first = _last_line(exc).split(". ")[0]  # CUDA's message goes on for a paragraph
        log.warning("%s ran out of memory on %d items: %s", self.path, items, first)
        return ModelOutOfMemoryError(
            f"out of memory on {self.device} computing {items} items: the model asked for "
            f"{_asked(exc)}, {_bytes(free)} free of {_bytes(total)}",
            metadata={RETRY_PUSHBACK_METADATA: "-1"},  # retrying would not make it fit
        )

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

    def _answer_dtype(self, index: int, dtype: torch.dtype) -> DType:
        """The dtype output ``index`` reaches the client in: under fp16/bf16 a floating output
        is cast back to its declared floating dtype; otherwise it is what the model gives."""
        found = DTYPE_BY_TORCH[dtype]
        if self._autocast_dtype is None or index >= len(self.outputs):
            return found
        declared = self.outputs[index].dtype
        return declared if found in _FLOATS and declared in _FLOATS else found

    def _to_arrays(self, named: list[tuple[str, torch.Tensor]], batch: int) -> Arrays:
        tensors: list[torch.Tensor] = []
        for index, (name, tensor) in enumerate(named):
            if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0 or tensor.shape[0] != batch:
                got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
                raise ModelExecutionError(
                    f"output '{name}' should have {batch} rows (one per item), got {got}"
                )
            answer = TORCH_DTYPES[self._answer_dtype(index, tensor.dtype)]
            if answer == torch.bfloat16:
                answer = torch.float32  # numpy has no bfloat16: BF16 travels as FP32
            if tensor.requires_grad:  # a parameter returned as is: inference_mode does not
                tensor = tensor.detach()
            if tensor.dtype != answer:
                tensor = tensor.to(answer)  # cast on the device, before the copy
            tensors.append(tensor)
        if self._cuda:
            # Copied blocking, into pageable memory: the pinned memory of a non-blocking copy
            # would go with the answer, and freeing it on a failed device aborts the process.
            tensors = [t.cpu() for t in tensors]
        return [tensor.numpy() for tensor in tensors]


PARALLEL_COPY_BYTES = 1 << 20
"""Batches larger than this are concatenated by ``torch.cat`` (intra-op threads, one GIL release);
smaller ones by numpy, which costs less per request (docs/design-notes.md, "Concatenation")."""


def _concatenate(
    parts: list[np.ndarray[Any, Any]], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The requests' rows in one tensor (``out`` when given)."""
    if sum(part.nbytes for part in parts) < PARALLEL_COPY_BYTES:
        if out is None:
            return torch.from_numpy(np.concatenate(parts))
        np.concatenate(parts, out=out.numpy())
        return out
    tensors = [torch.from_numpy(part) for part in parts]
    return torch.cat(tensors) if out is None else torch.cat(tensors, out=out)
