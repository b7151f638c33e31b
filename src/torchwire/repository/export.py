"""``torchwire export``: an ``nn.Module`` and the shape of its inputs, written as a model of a
repository in any format torchwire serves, then loaded back and checked against the module.

- ``torchscript``: ``torch.jit.script`` (``torch.jit.trace`` on the example where scripting fails).
- ``exported``: ``torch.export`` with the batch dimension dynamic, saved as ``model.pt2``.
- ``aoti``: the same program compiled by AOTInductor (needs a C++ compiler here; none to serve).
- ``python``: a ``model.py`` that builds the module with the given factory and loads its weights
  from ``weights.pt`` beside it (plain tensors, read with ``weights_only=True``).

The check loads the written file as the server would (``LoadedModel``), runs its warm-up, and
compares its answers to the module's on random inputs at 1 and 3 items.
"""

from __future__ import annotations

import importlib
import inspect
import math
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from torchwire.compat.torch_internals import aoti_compile_and_package
from torchwire.config import DType, ModelConfig, TensorSpec, load_model_config, parse_shape
from torchwire.errors import ConfigError
from torchwire.repository.sources import MODEL_FILES
from torchwire.runtime import LoadedModel
from torchwire.runtime.dtypes import DTYPE_BY_TORCH, TORCH_DTYPES

Format = Literal["torchscript", "exported", "aoti", "python"]
FORMATS: tuple[Format, ...] = ("torchscript", "exported", "aoti", "python")
MAX_BATCH = 4096
"""The largest batch an exported program accepts (its dynamic dimension's bound)."""


@dataclass(frozen=True)
class Exported:
    """What ``export_model`` wrote and how its answers compared with the module's."""

    path: Path
    config: Path
    max_abs_diff: float
    signature: str


def load_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """``package.module:name`` as a callable returning the module (a module object is wrapped)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"expected MODULE:NAME (e.g. my_models:build), got {spec!r}")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {spec}: {exc}") from None
    if isinstance(found, torch.nn.Module):
        return lambda: found
    if not callable(found):
        raise ConfigError(f"{spec} is neither an nn.Module nor a callable that returns one")
    return found  # type: ignore[no-any-return]


def _example(specs: list[TensorSpec], items: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        shape = (items, *(3 if d == -1 else d for d in spec.shape))
        dtype = TORCH_DTYPES[spec.dtype]
        if dtype.is_floating_point:
            tensors.append(torch.rand(shape, generator=generator).to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.randint(0, 2, shape, generator=generator).bool())
        else:
            tensors.append(torch.randint(0, 100, shape, generator=generator).to(dtype))
    return tensors


def _outputs(module: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        result = module(*inputs)
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in result):
        return list(result)
    raise ConfigError(
        f"the module returned {type(result).__name__}; export takes modules that return a tensor "
        "or a tuple of tensors (write a Python model for anything else)"
    )


def _config_text(fmt: Format, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str:
    def tensors(kind: str, specs: list[TensorSpec]) -> str:
        return "".join(
            f'\n[[{kind}]]\nname = "{s.name}"\ndtype = "{s.dtype}"\nshape = {list(s.shape)}\n'
            for s in specs
        )

    return f'format = "{fmt}"\n' + tensors("inputs", inputs) + tensors("outputs", outputs)


PYTHON_MODEL = '''\
"""Written by torchwire export: {factory} with its weights from weights.pt."""

from pathlib import Path

import torch

from {module} import {name} as _factory


class Model:
    def setup(self, device):
        self.net = _factory()
        weights = torch.load(Path(__file__).parent / "weights.pt", weights_only=True)
        self.net.load_state_dict(weights)
        self.net.eval().to(device)

    def predict(self, inputs):
        result = self.net({arguments})
        if isinstance(result, torch.Tensor):
            result = (result,)
        return dict(zip({outputs!r}, result, strict=True))
'''


def _write(
    fmt: Format,
    module: torch.nn.Module,
    example: list[torch.Tensor],
    inputs: list[TensorSpec],
    outputs: list[str],
    target: Path,
    factory: str | None,
) -> None:
    if fmt == "torchscript":
        try:
            scripted = torch.jit.script(module)
        except Exception:  # control flow script cannot read: trace the example instead
            scripted = torch.jit.trace(module, tuple(example))  # type: ignore[no-untyped-call]
        scripted.save(str(target))  # type: ignore[no-untyped-call]
        return
    if fmt == "python":
        if factory is None or ":" not in factory:
            raise ConfigError("the python format needs the factory as MODULE:NAME (--module)")
        module_name, _, name = factory.partition(":")
        torch.save(module.state_dict(), target.with_name("weights.pt"))
        arguments = ", ".join(f'inputs["{spec.name}"]' for spec in inputs)
        source = PYTHON_MODEL.format(
            factory=factory, module=module_name, name=name, arguments=arguments, outputs=outputs
        )
        target.write_text(textwrap.dedent(source))
        return
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    parameters = list(inspect.signature(module.forward).parameters)  # dynamic_shapes' keys
    dynamic = {name: {0: batch} for name in parameters[: len(example)]}
    program = torch.export.export(module, tuple(example), dynamic_shapes=dynamic)
    if fmt == "exported":
        torch.export.save(program, str(target))
    else:
        aoti_compile_and_package(program, target)


def export_model(
    module: torch.nn.Module,
    inputs: list[TensorSpec],
    fmt: Format,
    directory: Path,
    version: int = 1,
    factory: str | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Exported:
    """Write ``module`` as version ``version`` of the model in ``directory`` (its config.toml
    too, unless one is there already, which must then agree), load it back as the server would,
    and check its answers against the module's; raise ``ConfigError`` saying what differs.

    Args:
        inputs: the module's inputs in call order, per item (without the batch dimension).
        factory: ``package.module:name`` that builds the module (the python format imports it).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    module = module.eval()
    example = _example(inputs, 2, seed=0)  # 2 items: a batch of 1 would fix the dimension
    found = _outputs(module, example)
    names = ["output"] if len(found) == 1 else [f"output{i}" for i in range(len(found))]
    outputs = [
        TensorSpec(name=name, dtype=_dtype(t.dtype), shape=tuple(t.shape[1:]))
        for name, t in zip(names, found, strict=True)
    ]
    config_path = directory / "config.toml"
    version_dir = directory / str(version)
    if version_dir.exists():
        raise ConfigError(f"{version_dir} exists already; choose another --version")
    if config_path.exists():
        config = load_model_config(config_path)
        if config.format != fmt:
            raise ConfigError(f"{config_path} says format = {config.format!r}, not {fmt!r}")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        config_path.write_text(_config_text(fmt, inputs, outputs))
        config = load_model_config(config_path)
    version_dir.mkdir(parents=True)
    target = version_dir / MODEL_FILES[fmt]
    try:
        _write(fmt, module, example, inputs, [o.name for o in config.outputs], target, factory)
        difference, signature = check_export(module, config, target, rtol, atol)
    except BaseException:
        shutil.rmtree(version_dir, ignore_errors=True)
        raise
    return Exported(target, config_path, difference, signature)


def check_export(
    module: torch.nn.Module, config: ModelConfig, path: Path, rtol: float, atol: float
) -> tuple[float, str]:
    """Load ``path`` as the server would, warm it up, and compare it with ``module`` at 1 and 3
    items; return the largest absolute difference and the loaded model's signature."""
    model = LoadedModel.load(path, config)
    try:
        model.warm_up()
        largest = 0.0
        for items in (1, 3):
            example = _example(list(config.inputs), items, seed=items)
            want = _outputs(module, example)
            got = model.run_batch([[t.numpy() for t in example]])
            for spec, expected, answer in zip(config.outputs, want, got, strict=True):
                expected_np = (
                    expected.float().numpy() if expected.is_floating_point() else expected.numpy()
                )
                if not np.allclose(answer, expected_np, rtol=rtol, atol=atol):
                    diff = float(np.max(np.abs(answer.astype(np.float64) - expected_np)))
                    raise ConfigError(
                        f"{path}: output '{spec.name}' at {items} items differs from the module's "
                        f"by up to {diff:g} (allowed: rtol {rtol}, atol {atol})"
                    )
                if answer.size:
                    largest = max(
                        largest,
                        float(np.max(np.abs(answer.astype(np.float64) - expected_np))),
                    )
        return (largest if math.isfinite(largest) else 0.0), model.signature()
    finally:
        model.release()


def _dtype(dtype: torch.dtype) -> DType:
    try:
        return DTYPE_BY_TORCH[dtype]
    except KeyError:
        raise ConfigError(f"the module returns {dtype}, which no V2 datatype carries") from None


def parse_input(text: str) -> TensorSpec:
    """``name:DTYPE:3,224,224`` (or ``name:3,224,224`` for FP32) as a ``TensorSpec``."""
    parts = text.split(":")
    if len(parts) == 2:
        parts = [parts[0], "FP32", parts[1]]
    if len(parts) != 3:
        raise ConfigError(f"expected NAME[:DTYPE]:SHAPE such as image:FP32:3,224,224, got {text!r}")
    try:
        return TensorSpec(name=parts[0], dtype=parts[1].upper(), shape=parse_shape(parts[2]))
    except ValueError as exc:
        raise ConfigError(f"--input {text!r}: {exc}") from None


def describe(result: Exported) -> str:
    return (
        f"wrote {result.path} ({result.signature}); config {result.config}; answers match the "
        f"module's (largest difference {result.max_abs_diff:.3g})"
    )


__all__ = ["FORMATS", "Exported", "describe", "export_model", "load_factory", "parse_input"]
