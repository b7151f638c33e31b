"""``torchwire export``: a user's nn.Module written in each format, loaded back, checked, served."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from support import TORCHWIRE
from torchwire.config import ModelConfig, TensorSpec, load_model_config
from torchwire.errors import ConfigError
from torchwire.repository.check import check_repository
from torchwire.repository.demo import compiler_found
from torchwire.repository.export import FORMATS, export_model
from torchwire.runtime import LoadedModel


class Ranker(nn.Module):
    """Two inputs of different dtypes, two outputs: what a ranking head looks like."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.dense = nn.Linear(16, 2)

    def forward(
        self, features: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([features, self.embed(ids).mean(dim=1)], dim=1)
        logits = self.dense(x)
        return torch.sigmoid(logits), logits.argmax(dim=1, keepdim=True)


def build() -> nn.Module:
    torch.manual_seed(0)
    return Ranker()


INPUTS = [
    TensorSpec(name="features", shape=(8,)),
    TensorSpec(name="ids", dtype="INT64", shape=(3,)),
]


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param(
            fmt,
            marks=pytest.mark.skipif(
                fmt == "aoti" and compiler_found() is None,
                reason="no C++ compiler: AOTInductor cannot build (CI installs g++)",
            ),
        )
        for fmt in FORMATS
    ],
)
def test_each_format_is_written_loaded_back_and_agrees_with_the_module(
    tmp_path: Path, fmt: str
) -> None:
    result = export_model(build(), INPUTS, fmt, tmp_path / "ranker", factory="test_export:build")  # type: ignore[arg-type]
    assert result.max_abs_diff <= 1e-5
    assert result.signature == "features FP32[8], ids INT64[3] -> output0 FP32[2], output1 INT64[1]"
    (row,) = check_repository(tmp_path)
    assert row.ok, row.detail
    # And it answers a batch of 5 as the module does.
    model = LoadedModel.load(result.path, _config(tmp_path))
    model.warm_up()
    features = np.random.default_rng(1).random((5, 8), dtype=np.float32)
    ids = np.arange(15, dtype=np.int64).reshape(5, 3)
    got = model.run_batch([[features, ids]])
    with torch.inference_mode():
        want = build().eval()(torch.from_numpy(features), torch.from_numpy(ids))
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1], want[1].numpy())
    model.release()


def _config(root: Path) -> ModelConfig:
    return load_model_config(root / "ranker" / "config.toml")


def test_the_command_writes_a_second_version_beside_the_first(tmp_path: Path) -> None:
    args = [TORCHWIRE, "export", str(tmp_path / "ranker"), "--module", "test_export:build"]
    args += ["--input", "features:8", "--input", "ids:INT64:3"]
    env = {"PYTHONPATH": str(Path(__file__).parent), "PATH": "/usr/bin:/bin"}
    for version in (1, 2):
        done = subprocess.run(
            [*args, "--version", str(version)], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert f"ranker/{version}/model.pt" in done.stdout and "answers match" in done.stdout
    again = subprocess.run(
        [*args, "--version", "2"], capture_output=True, text=True, env=env, timeout=120
    )
    assert again.returncode != 0 and "exists already" in again.stderr
    assert [row.version for row in check_repository(tmp_path)] == ["2"]  # policy: latest


def test_a_module_that_returns_a_dict_is_sent_to_the_python_format(tmp_path: Path) -> None:
    class Named(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": x}

    with pytest.raises(ConfigError, match="write a Python model"):
        export_model(Named(), [TensorSpec(name="x", shape=(2,))], "torchscript", tmp_path / "m")
    assert not (tmp_path / "m" / "1").exists()
