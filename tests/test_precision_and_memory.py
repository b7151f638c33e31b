"""The GPU path's safety nets, checked without a GPU: reduced precision answers in the declared
dtype, a batch that runs out of memory is split so that only a request too big alone fails, and
GPU memory reaches /metrics and health (readings faked here: no GPU; benchmarks/gpu.py checks the
real thing on one)."""

from __future__ import annotations

import asyncio
import gc
import urllib.request
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from tritonclient.utils import InferenceServerException

from support import (
    CliServer,
    DeviceFault,
    Held,
    ServerThread,
    connection,
    health_status,
    write_model,
)
from torchwire.config import ModelConfig, TensorSpec
from torchwire.errors import (
    DeviceFailedError,
    ModelExecutionError,
    ModelOutOfMemoryError,
    UnavailableError,
)
from torchwire.runtime import Batcher, LoadedModel
from torchwire.runtime import model as model_module
from torchwire.runtime.exported import load_exported
from torchwire.runtime.gpu import GpuReading

MIB = 2**20


class Dense(nn.Module):
    """A small dense layer: what autocast changes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_answers_in_the_declared_fp32(tmp_path: Path, precision: str) -> None:
    dense = Dense().eval()
    write_model(
        tmp_path / "dense",
        dense,
        [16],
        extra=f'[[outputs]]\nname = "y"\ndtype = "FP32"\nshape = [8]\n'
        f'[instances]\nprecision = "{precision}"\n',
    )
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    with torch.inference_mode():
        expected = dense(torch.from_numpy(x)).numpy()
    with ServerThread(repository=tmp_path) as server:
        client = triton.InferenceServerClient(server.target)
        meta = client.get_model_metadata("dense")
        assert [(o.name, o.datatype) for o in meta.outputs] == [("y", "FP32")]
        tensor = triton.InferInput("x", [5, 16], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("dense", [tensor])
        client.close()
    answer = result.as_numpy("y")
    assert answer.dtype == np.float32 and answer.shape == (5, 8)
    np.testing.assert_allclose(answer, expected, atol=0.05)  # bf16 keeps 8 bits of mantissa
    assert not np.array_equal(answer, expected)  # it did run in reduced precision


# -- out of memory ------------------------------------------------------------------------------


class RunsOutAbove(Held):
    """``Held``, but a batch of more than ``limit`` items raises CUDA's out-of-memory error.
    Each call notes whether the input of the last batch that failed is still held by anything."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.failed_input_held: list[bool] = []
        self._failed: weakref.ref[torch.Tensor] | None = None

    def fail(self, x: torch.Tensor) -> None:
        if self._failed is not None:
            self.failed_input_held.append(self._failed() is not None)
        if x.shape[0] > self.limit:
            self._failed = weakref.ref(x)
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {x.shape[0]}.00 GiB. GPU 0 has a total "
                "capacity of 79.19 GiB of which 1.50 GiB is free."
            )


def test_a_batch_that_runs_out_of_memory_is_split_and_only_a_request_too_big_alone_fails() -> None:
    model = RunsOutAbove(limit=2)
    config = ModelConfig(inputs=[TensorSpec(name="x", dtype="FP32", shape=(1,))])
    batcher = Batcher(LoadedModel(model, config, Path("runs-out"), torch.device("cpu")), "m", 1)

    async def scenario() -> list[Any]:
        batcher.start(asyncio.get_running_loop())
        holder = batcher.submit([np.array([[-1.0]], np.float32)], 1)
        await asyncio.to_thread(model.entered.wait, 30)  # the model is busy: the rest queue
        sizes = [1, 1, 1, 1, 3]
        futures = [
            batcher.submit([np.full((n, 1), float(i), np.float32)], n) for i, n in enumerate(sizes)
        ]
        model.release.set()
        results = await asyncio.gather(holder, *futures, return_exceptions=True)
        await batcher.close(10)
        return results

    holder, *answers = asyncio.run(scenario())
    assert holder[0].tolist() == [[-2.0]]
    for i, answer in enumerate(answers[:4]):  # each its own rows, doubled
        assert answer[0].tolist() == [[2.0 * i]]
    refused = answers[4]
    assert isinstance(refused, ModelOutOfMemoryError) and refused.code == "RESOURCE_EXHAUSTED"
    assert refused.metadata == {"grpc-retry-pushback-ms": "-1"}  # gRPC clients: do not retry
    assert "out of memory on cpu computing 3 items: the model asked for 3.00 GiB" in str(refused)
    assert " free of " in str(refused)
    # One batch of 7 items, then halves of it: [1,1] ran; [1,1,3] -> [1] ran, [1,3] -> [1], [3].
    assert model.calls == [1, 7, 2, 5, 1, 4, 1, 3]
    # The halves run without the failed batch in memory: nothing (a traceback) keeps it.
    assert model.failed_input_held == [False] * 6
    assert batcher.stats.success_count == 5 and batcher.stats.fail_count == 1


class AllocatesPerBatch(nn.Module):
    """Sums each item after allocating 1 byte for a batch of one item, 32 PiB for two: a real
    allocation failure of the host allocator (no machine has that much address space)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.zeros(int((x.shape[0] - 1) * 2**55 + 1), dtype=torch.uint8)
        return x.sum(dim=1, keepdim=True) + scratch[0]


def test_a_request_that_does_not_fit_alone_is_resource_exhausted_and_the_server_serves_on(
    tmp_path: Path,
) -> None:
    write_model(tmp_path / "big", AllocatesPerBatch(), [3])
    with ServerThread(repository=tmp_path) as server:
        client = triton.InferenceServerClient(server.target)

        def infer(rows: int) -> Any:
            tensor = triton.InferInput("x", [rows, 3], "FP32")
            tensor.set_data_from_numpy(np.ones((rows, 3), np.float32))
            return client.infer("big", [tensor]).as_numpy("output")

        with pytest.raises(InferenceServerException) as refused:
            infer(2)
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "out of memory on cpu computing 2 items: the model asked for 32.00 PiB" in (
            refused.value.message()
        )
        assert infer(1).tolist() == [[3.0]]  # still serving
        client.close()
        assert health_status(server.target) == "SERVING"


# -- GPU memory in metrics and health -----------------------------------------------------------


def test_gpu_memory_reaches_metrics_and_turns_health_not_serving_when_short(
    tmp_path: Path,
) -> None:
    write_model(tmp_path / "dense", Dense(), [16])
    gpu = {"free": 10_000 * MIB}

    def read_gpus() -> list[GpuReading]:  # what runtime.gpu reads from a real device
        return [
            GpuReading("cuda:0", 300 * MIB, 500 * MIB, 80_000 * MIB, gpu["free"], utilization=0.25)
        ]

    with ServerThread(
        repository=tmp_path, watchdog_interval_s=0, watchdog_min_gpu_available_mb=1000
    ) as server:
        watchdog = server.server.watchdog
        watchdog.read_gpus = read_gpus
        assert server.run(watchdog.check()) is True
        page = (
            urllib.request.urlopen(
                f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10
            )
            .read()
            .decode()
        )
        samples = {
            s.name: (s.labels, s.value)
            for family in text_string_to_metric_families(page)
            for s in family.samples
            if s.name.startswith("torchwire_gpu_")
        }
        cuda0 = {"device": "cuda:0"}
        assert samples == {
            "torchwire_gpu_memory_used_bytes": (cuda0, 300 * MIB),
            "torchwire_gpu_memory_reserved_bytes": (cuda0, 500 * MIB),
            "torchwire_gpu_memory_total_bytes": (cuda0, 80_000 * MIB),
            "torchwire_gpu_memory_free_bytes": (cuda0, 10_000 * MIB),
            "torchwire_gpu_utilization_ratio": (cuda0, 0.25),
        }
        # 700 MiB free + 200 MiB cached unused = 900 MiB available < 1000: NOT_SERVING ...
        gpu["free"] = 700 * MIB
        assert server.run(watchdog.check()) is False
        assert health_status(server.target) == "NOT_SERVING"
        # ... and back only above 1000 + the 256 MiB margin.
        gpu["free"] = 1000 * MIB
        assert server.run(watchdog.check()) is False
        gpu["free"] = 1100 * MIB
        assert server.run(watchdog.check()) is True
        assert health_status(server.target) == "SERVING"
        registry = server.server.metrics.registry
        assert (
            registry.get_sample_value(
                "torchwire_watchdog_transitions_total", {"state": "not_serving"}
            )
            == 1
        )


class MakesItsOwn(nn.Module):
    """Adds a tensor it creates itself (on the CPU, where it is exported) to its weighted input."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + torch.ones(3)


def test_an_exported_model_moves_whole_to_its_device_and_its_weights_go_when_unloaded(
    tmp_path: Path,
) -> None:
    path = tmp_path / "model.pt2"
    batch = {"x": {0: torch.export.Dim("batch")}}
    program = torch.export.export(MakesItsOwn(), (torch.zeros(2, 3),), dynamic_shapes=batch)
    torch.export.save(program, str(path))
    # "meta" stands in for a GPU: a tensor left on the CPU does not mix with it.
    with pytest.raises(RuntimeError, match="not on the expected device"):
        torch.export.load(str(path)).module().to("meta")(torch.zeros(2, 3, device="meta"))
    on_meta = load_exported(path, torch.device("meta"))
    assert on_meta(torch.zeros(2, 3, device="meta")).device.type == "meta"

    module = load_exported(path, torch.device("cpu"))
    weights = [weakref.ref(tensor) for tensor in module.parameters()]
    config = ModelConfig(format="exported", inputs=[TensorSpec(name="x", dtype="FP32", shape=(3,))])
    model = LoadedModel(module, config, path, torch.device("cpu"))
    del module
    model.warm_up()
    assert model([np.ones((1, 3), np.float32)])[0].tolist() == [[3.0, 3.0, 3.0]]
    gc.disable()  # the module refers to itself: only a garbage collection would free it
    try:
        model.release()
        assert weights and all(weight() is None for weight in weights)
    finally:
        gc.enable()


# -- a device that fails for good ---------------------------------------------------------------


class DeviceFailsOn(Held):
    """``Held``, but a batch holding -3 raises CUDA's error after a device-side assert (on the
    CPU nothing can check the device: torchwire takes it as failed for good)."""

    failed_on: weakref.ref[torch.Tensor] | None = None

    def fail(self, x: torch.Tensor) -> None:
        if bool((x == -3).any()):
            self.failed_on = weakref.ref(x)
            raise torch.AcceleratorError("CUDA error: device-side assert triggered\nCUDA kernel...")


@pytest.fixture
def no_failed_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Devices found failed are the process's: here, the test's alone (the CPU is one)."""
    monkeypatch.setattr(model_module, "_FAILED_DEVICES", {})


def _scenario(batcher: Batcher, model: DeviceFailsOn) -> list[Any]:
    """One held request, then 1, -3 and 2 queued behind it (one batch); their answers."""

    async def scenario() -> list[Any]:
        batcher.start(asyncio.get_running_loop())
        holder = batcher.submit([np.array([[-1.0]], np.float32)], 1)
        await asyncio.to_thread(model.entered.wait, 30)  # the model is busy: the rest queue
        batch = [batcher.submit([np.array([[v]], np.float32)], 1) for v in (1.0, -3.0, 2.0)]
        model.release.set()
        answers = await asyncio.gather(holder, *batch, return_exceptions=True)
        await batcher.close(10)
        return answers

    return asyncio.run(scenario())


def _on_cpu(model: nn.Module) -> LoadedModel:
    config = ModelConfig(inputs=[TensorSpec(name="x", dtype="FP32", shape=(1,))])
    return LoadedModel(model, config, Path("fails"), torch.device("cpu"))


def test_a_failed_device_fails_its_batch_once_then_refuses_every_request(
    no_failed_device: None,
) -> None:
    model, other = DeviceFailsOn(), DeviceFailsOn()
    failures: list[DeviceFailedError] = []
    batcher = Batcher(_on_cpu(model), "m", 1, on_device_failure=failures.append)
    beside = Batcher(_on_cpu(other), "other", 1, on_device_failure=failures.append)

    held, *answers = _scenario(batcher, model)
    assert held[0].tolist() == [[-2.0]]
    # The batch it failed on: the same error for each, not split (each half would fail too).
    assert model.calls == [1, 3]
    assert all(isinstance(answer, DeviceFailedError) for answer in answers)
    assert str(answers[0]) == "cpu failed: CUDA error: device-side assert triggered"
    assert answers[0].code == "INTERNAL"  # not retried: this request may be the cause
    assert failures == [answers[0]]  # the server is told, once
    # Nothing on the failed device is freed (CUDA's allocators would abort the process): not
    # the failed batch, not the model that closing the batcher released.
    assert model.failed_on is not None and model.failed_on() is not None
    assert batcher.model._module is model

    async def later() -> UnavailableError:  # this model, and another on the same device
        for refusing in (batcher, beside):
            refusing.start(asyncio.get_running_loop())
            with pytest.raises(UnavailableError) as refused:
                refusing.submit([np.array([[1.0]], np.float32)], 1)
            assert await refusing.close(10)  # stopping goes on, whatever the device says
        return refused.value

    refused = asyncio.run(later())
    assert refused.code == "UNAVAILABLE" and "its device cpu failed" in str(refused)
    assert "this server restarts, retry" in str(refused) and other.calls == []
    # The model beside it, which never ran, is kept too when closing releases it.
    assert beside.model._module is other
    assert beside.model in model_module._FAILED_DEVICES[torch.device("cpu")]


def test_a_device_error_after_which_the_device_computes_fails_only_its_request(
    no_failed_device: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one-element sum that checks a GPU after a device error passes (no GPU here).
    monkeypatch.setattr(LoadedModel, "_device_works", lambda self: True)
    model, failures = DeviceFailsOn(), []
    batcher = Batcher(_on_cpu(model), "m", 1, on_device_failure=failures.append)
    held, one, poisoned, two = _scenario(batcher, model)
    assert (held[0].tolist(), one[0].tolist(), two[0].tolist()) == ([[-2.0]], [[2.0]], [[4.0]])
    assert type(poisoned) is ModelExecutionError and poisoned.code == "INTERNAL"
    assert str(poisoned) == "model raised CUDA error: device-side assert triggered"
    assert model.calls == [1, 3, 1, 2, 1, 1] and failures == []  # split, as any model error


@pytest.mark.parametrize("found_by", ["a request", "a new version's warm-up"])
def test_a_server_whose_device_fails_stops_with_exit_code_4(
    tmp_path: Path, seed: SimpleNamespace, found_by: str
) -> None:
    directory = write_model(tmp_path / "repo" / "fault", DeviceFault(), [2])
    server = CliServer("--port", "0", "--repository", str(tmp_path / "repo"))
    try:
        target = server.wait_ready()
        with connection(target) as channel:
            stub = seed.grpc.ModelServiceStub(channel)
            assert list(
                stub.Predict(seed.pb2.PredictRequest(inputs=[1, 2]), timeout=30).outputs
            ) == [3.0]
            if found_by == "a request":
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Predict(seed.pb2.PredictRequest(inputs=[-3, 2]), timeout=30)
                assert caught.value.code() == grpc.StatusCode.INTERNAL
                assert "device-side assert triggered" in str(caught.value.details())
            else:  # hot reload: a version whose warm-up trips the device
                (directory / "2").mkdir()
                torch.jit.script(DeviceFault(trigger=0.0)).save(str(directory / "2" / "model.pt"))
            assert server.process.wait(60) == 4
        server.wait_for("stopping this process to start again with a working device")
    finally:
        server.close()
