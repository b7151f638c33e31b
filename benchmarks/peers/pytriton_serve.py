"""The demo's two TorchScript models served by PyTriton (NVIDIA Triton from Python).

Run by ``benchmarks/peers/run.py`` in PyTriton's own virtualenv:
``python pytriton_serve.py REPOSITORY GRPC_PORT HTTP_PORT METRICS_PORT``.

Each model is bound with ``@batch`` and Triton's dynamic batcher, with the same largest batch and
queue delay as torchwire's demo configuration (recsys 64 and 2 ms, resnet18 4 and 5 ms), as
PyTriton's documentation shows (``ModelConfig(max_batch_size=..., batcher=DynamicBatcher(
max_queue_delay_microseconds=...))``). The models run under ``torch.inference_mode`` on CPU with
torch's default threads. SIGTERM stops Triton (PyTriton ignores it otherwise).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MODELS = {  # name: (input, shape, output, shape, max batch, max queue delay in us)
    "recsys": ("features", (256,), "score", (1,), 64, 2000),
    "resnet18": ("image", (3, 224, 224), "logits", (1000,), 4, 5000),
}


def infer_function(path: Path, input_name: str, output_name: str) -> Any:
    module = torch.jit.load(str(path), map_location="cpu").eval()

    @batch  # type: ignore[misc]
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            result = module(torch.from_numpy(inputs[input_name]))
        return {output_name: result.numpy()}

    return infer


def main() -> None:
    repository, grpc_port, http_port, metrics_port = Path(sys.argv[1]), *map(int, sys.argv[2:5])
    config = TritonConfig(
        grpc_address="127.0.0.1", grpc_port=grpc_port, http_address="127.0.0.1",
        http_port=http_port, metrics_port=metrics_port, exit_on_error=True,
    )  # fmt: skip
    with Triton(config=config) as triton:
        for name, (input_name, in_shape, output_name, out_shape, size, delay) in MODELS.items():
            triton.bind(
                model_name=name,
                infer_func=infer_function(repository / name / "1" / "model.pt", input_name,
                                          output_name),
                inputs=[Tensor(name=input_name, dtype=np.float32, shape=in_shape)],
                outputs=[Tensor(name=output_name, dtype=np.float32, shape=out_shape)],
                config=ModelConfig(
                    max_batch_size=size,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=delay),
                ),
                strict=True,
            )  # fmt: skip
        signal.signal(signal.SIGTERM, lambda *_: triton.stop())
        triton.serve()


if __name__ == "__main__":
    main()
