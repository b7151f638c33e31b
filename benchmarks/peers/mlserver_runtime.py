"""A TorchScript runtime for Seldon MLServer, as its documentation writes custom runtimes.

Used by ``benchmarks/peers/run.py``, which writes each model's ``model-settings.json``
(``implementation: mlserver_runtime.TorchScriptRuntime``, ``parameters.uri`` the TorchScript file,
``max_batch_size`` and ``max_batch_time`` for MLServer's adaptive batching). Inputs and outputs go
through MLServer's own ``NumpyCodec``; the model runs under ``torch.inference_mode`` on CPU.
MLServer does not check shapes itself, so the runtime checks the per-item shape.
"""

from __future__ import annotations

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse


class TorchScriptRuntime(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        self._module = torch.jit.load(self.settings.parameters.uri, map_location="cpu").eval()
        self._input = self.settings.inputs[0]
        self._output = self.settings.outputs[0]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        array = NumpyCodec.decode_input(payload.inputs[0])
        if list(array.shape[1:]) != list(self._input.shape[1:]):
            raise MLServerError(
                f"input {self._input.name} should be [N, {self._input.shape[1:]}], got "
                f"{list(array.shape)}",
                status_code=400,
            )
        with torch.inference_mode():
            result = self._module(torch.from_numpy(array)).numpy()
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(self._output.name, result)],
        )
