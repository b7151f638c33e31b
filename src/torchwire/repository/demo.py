"""The built-in demo repository, built from code (fixed seed, no download) into a cache directory.

- ``recsys``: FP32[256] -> FP32[1], an MLP 256-512-256-1 with a sigmoid.
- ``resnet18``: FP32[3,224,224] -> FP32[1000], ResNet-18 in pure torch with random weights.
- ``vision``: BYTES[1] (a JPEG or PNG) -> INT64[5] classes, FP32[5] scores: the same ResNet-18 as
  a Python model (``vision_model.py``) that decodes and resizes the image in ``preprocess``.
- ``recsys-aoti``: ``recsys`` as an AOTInductor package, built only where a C++ compiler is
  found (it compiles for about 20 s on 2 cores).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from torchwire.compat.torch_internals import aoti_compile_and_package

log = logging.getLogger(__name__)

# Bump when the demo models or their configs change: a new cache directory is then built.
DEMO_REVISION = 5

RECSYS_CONFIG = """\
format = "torchscript"

[[inputs]]
name = "features"
dtype = "FP32"
shape = [256]

[[outputs]]
name = "score"
dtype = "FP32"
shape = [1]

# Batches of up to 64 amortise the per-call overhead; the request rate, not the model, is the
# bottleneck, so one intra-op thread leaves the other cores to serving (docs/design-notes.md).
[batching]
max_batch_size = 64
max_delay_ms = 2.0
max_queue = 1024

[instances]
threads = 1
"""

RESNET18_CONFIG = """\
format = "torchscript"

[[inputs]]
name = "image"
dtype = "FP32"
shape = [3, 224, 224]

[[outputs]]
name = "logits"
dtype = "FP32"
shape = [1000]

# Compute-bound: larger batches than 4 only add latency, and the model gets every core.
[batching]
max_batch_size = 4
max_delay_ms = 5.0
max_queue = 64
"""


VISION_CONFIG = """\
format = "python"

# An encoded JPEG or PNG per item; model.py decodes it (preprocess) and runs ResNet-18 (predict).
[[inputs]]
name = "image"
dtype = "BYTES"
shape = [1]

[[outputs]]
name = "classes"
dtype = "INT64"
shape = [5]

[[outputs]]
name = "scores"
dtype = "FP32"
shape = [5]

# Decoding and ResNet-18 together peak at batch 8 (docs/models.md, "Measured").
[batching]
max_batch_size = 8
max_delay_ms = 5.0
max_queue = 64
"""


class RecSys(nn.Module):
    """A ranking head: 256 features to a click probability."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 1)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        score: torch.Tensor = torch.sigmoid(self.layers(features))
        return score


class _BasicBlock(nn.Module):
    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        out: torch.Tensor = self.relu(y + self.downsample(x))
        return out


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2015) as torchvision builds it, without torchvision."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        widths, blocks, inp = (64, 128, 256, 512), [], 64
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks += [_BasicBlock(inp, width, stride), _BasicBlock(width, width, 1)]
            inp = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.pool(self.blocks(self.stem(image)))
        logits: torch.Tensor = self.fc(torch.flatten(features, 1))
        return logits


def _save(module: nn.Module, directory: Path, config: str) -> None:
    (directory / "1").mkdir(parents=True)
    (directory / "config.toml").write_text(config)
    scripted = torch.jit.script(module.eval())
    scripted.save(str(directory / "1" / "model.pt"))  # type: ignore[no-untyped-call]


def _save_vision(directory: Path) -> None:
    """``vision``: the Python model beside the weights of ``resnet18`` (the same network)."""
    (directory / "1").mkdir(parents=True)
    (directory / "config.toml").write_text(VISION_CONFIG)
    shutil.copyfile(Path(__file__).with_name("vision_model.py"), directory / "1" / "model.py")
    torch.manual_seed(0)
    torch.save(ResNet18().eval().state_dict(), directory / "1" / "resnet18.pt")


def _save_aoti(directory: Path) -> None:
    """``recsys-aoti``: ``recsys`` exported with a dynamic batch and compiled by AOTInductor."""
    torch.manual_seed(0)
    module = RecSys().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        module, (torch.zeros(2, 256),), dynamic_shapes={"features": {0: batch}}
    )
    (directory / "1").mkdir(parents=True)
    aoti_compile_and_package(program, directory / "1" / "model.pt2")
    (directory / "config.toml").write_text(
        RECSYS_CONFIG.replace('format = "torchscript"', 'format = "aoti"')
    )


def compiler_found() -> str | None:
    """The C++ compiler AOTInductor would use ($CXX, else c++ or g++ on the PATH), if any."""
    return next(
        (
            found
            for name in (os.environ.get("CXX"), "c++", "g++")
            if name and (found := shutil.which(name))
        ),
        None,
    )


def build_demo_repository(target: Path) -> None:
    """Write the demo models into ``target`` (which must not exist)."""
    torch.manual_seed(0)
    _save(RecSys(), target / "recsys", RECSYS_CONFIG)
    torch.manual_seed(0)
    _save(ResNet18(), target / "resnet18", RESNET18_CONFIG)
    _save_vision(target / "vision")
    if compiler_found() is None:
        log.warning("no C++ compiler found (c++, g++ or $CXX): the demo has no recsys-aoti")
        return
    _save_aoti(target / "recsys-aoti")


def ensure_demo_repository(cache_dir: Path) -> Path:
    """Return the demo repository under ``cache_dir``, building it once (atomically) if needed."""
    root = cache_dir / f"demo-r{DEMO_REVISION}"
    if root.is_dir():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("building the demo repository in %s (once)", root)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=cache_dir))
    try:
        build_demo_repository(staging / "repo")
        try:
            os.rename(staging / "repo", root)  # atomic: a concurrent start sees all or nothing
        except OSError:
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
