"""`torchwire serve` as a user types it: real processes, real signals, real clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from support import TORCHWIRE, CliServer, Scale, health_status, in_process


def _predict(target: str, seed: SimpleNamespace, inputs: Any, **metadata: str) -> Any:
    with grpc.insecure_channel(target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        request = seed.pb2.PredictRequest(inputs=list(inputs), metadata=metadata)
        return stub.Predict(request, timeout=30)


def test_serve_with_no_arguments_serves_the_demo_repository(
    cli_servers: list[CliServer], seed: SimpleNamespace, cache_dir: Path, demo_repo: Path
) -> None:
    # Only the environment points at the test's cache and a free port: the command has no flags.
    env = {"TORCHWIRE_CACHE_DIR": str(cache_dir), "TORCHWIRE_PORT": "0"}
    server = CliServer(env=env)
    cli_servers.append(server)
    server.process.args = [TORCHWIRE, "serve"]
    target = server.wait_ready()
    assert health_status(target) == "SERVING"
    assert health_status(target, "ModelService") == "SERVING"
    x = np.random.default_rng(5).standard_normal((1, 256), dtype=np.float32)
    answer = _predict(target, seed, x.ravel())
    expected = in_process(demo_repo / "recsys" / "1" / "model.pt")(x).ravel()
    np.testing.assert_allclose(answer.outputs, expected, rtol=1e-5, atol=1e-6)
    assert "recsys" in server.output and "resnet18" in server.output
    assert server.stop() == 0


def test_serve_one_model_file_with_input_shape_flag(
    cli_servers: list[CliServer], seed: SimpleNamespace, tmp_path: Path
) -> None:
    path = tmp_path / "double.pt"
    torch.jit.script(Scale(2.0)).save(str(path))
    server = CliServer("--model", str(path), "--input-shape", "2,3", "--port", "0")
    cli_servers.append(server)
    target = server.wait_ready()
    answer = _predict(target, seed, range(12), model="double")  # two items of 2x3
    assert list(answer.outputs) == [2.0 * i for i in range(12)]
    assert server.stop(signal.SIGINT) == 0


def test_serve_one_model_file_with_config_beside_it(
    cli_servers: list[CliServer], seed: SimpleNamespace, tmp_path: Path
) -> None:
    path = tmp_path / "triple.pt"
    torch.jit.script(Scale(3.0)).save(str(path))
    (tmp_path / "config.toml").write_text('[[inputs]]\nname = "x"\nshape = [2]\n')
    server = CliServer("--model", str(path), env={"TORCHWIRE_PORT": "0"})
    cli_servers.append(server)
    target = server.wait_ready()
    assert list(_predict(target, seed, [1, 2]).outputs) == [3.0, 6.0]
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "eighty"], "port: Input should be a valid integer"),
        (["--model", "/nonexistent/model.pt"], "/nonexistent/model.pt: no such model file"),
        (
            ["--log-level", "loud"],
            "log_level: Input should be 'debug', 'info', 'warning' or 'error'",
        ),
    ],
)
def test_bad_flags_exit_with_a_message_saying_what_is_wrong(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [TORCHWIRE, "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TORCHWIRE_CACHE_DIR": str(tmp_path), "TORCHWIRE_METRICS_PORT": "0"},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_a_bad_model_config_names_the_file_and_key(tmp_path: Path) -> None:
    model_dir = tmp_path / "repo" / "broken"
    (model_dir / "1").mkdir(parents=True)
    torch.jit.script(Scale(1.0)).save(str(model_dir / "1" / "model.pt"))
    (model_dir / "config.toml").write_text(
        '[[inputs]]\nname = "x"\nshape = [2]\n[batching]\nmax_batch_size = "lots"\n'
    )
    result = subprocess.run(
        [TORCHWIRE, "serve", "--repository", str(tmp_path / "repo"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{model_dir / 'config.toml'}: invalid configuration" in result.stderr
    assert "batching.max_batch_size: Input should be a valid integer" in result.stderr


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(
    cli_servers: list[CliServer], seed: SimpleNamespace, test_repo: Path
) -> None:
    server = CliServer(
        "--repository",
        str(test_repo),
        "--port",
        "0",
        "--grace-period-s",
        "30",
        "--shutdown-delay-s",
        "1",
    )
    cli_servers.append(server)
    target = server.wait_ready()
    url = server.metrics_url()
    with grpc.insecure_channel(target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        slow = [
            stub.Predict.future(
                seed.pb2.PredictRequest(inputs=[4000, i, 0, 0], metadata={"model": "busy"}),
                timeout=60,
            )
            for i in range(3)
        ]
        # All three calls reached the server (each computes for about a second).
        deadline = time.monotonic() + 30
        while 'torchwire_inflight_requests{model="busy"} 3.0' not in _scrape(url):
            assert time.monotonic() < deadline, "the three calls never reached the model"
            time.sleep(0.05)  # polling /metrics
        server.process.send_signal(signal.SIGTERM)
        # Shutting down: health says so during the shutdown delay, then new calls are refused ...
        deadline = time.monotonic() + 10
        while health_status(target) != "NOT_SERVING":
            assert time.monotonic() < deadline, "health never went NOT_SERVING"
        deadline = time.monotonic() + 10
        while True:
            try:
                stub.Predict(seed.pb2.PredictRequest(inputs=[1, 1, 1, 1]), timeout=10)
            except grpc.RpcError as refused:
                assert refused.code() == grpc.StatusCode.UNAVAILABLE
                break
            assert time.monotonic() < deadline, "new calls still accepted after the delay"
            time.sleep(0.05)
        # ... while the calls in flight complete with their answers.
        try:
            answers = [list(call.result(timeout=60).outputs) for call in slow]
        except grpc.RpcError as exc:
            server.process.wait(60)
            raise AssertionError(f"{exc}; the server said:\n{server.output}") from None
    assert answers == [[4000.0 + i] for i in range(3)]
    assert server.process.wait(60) == 0
    assert "SIGTERM received: shutting down" in server.output


def test_a_hung_model_call_does_not_hold_up_the_exit_and_the_exit_code_says_so(
    cli_servers: list[CliServer], seed: SimpleNamespace, test_repo: Path
) -> None:
    server = CliServer("--repository", str(test_repo), "--port", "0", "--grace-period-s", "1")
    cli_servers.append(server)
    target = server.wait_ready()
    url = server.metrics_url()
    with grpc.insecure_channel(target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        hung = stub.Predict.future(  # ten million rounds of matrix products: hours
            seed.pb2.PredictRequest(inputs=[1e7, 0, 0, 0], metadata={"model": "busy"}),
            timeout=600,
        )
        deadline = time.monotonic() + 30
        while 'torchwire_inflight_requests{model="busy"} 1.0' not in _scrape(url):
            assert time.monotonic() < deadline, "the call never reached the model"
            time.sleep(0.05)  # polling /metrics
        server.process.send_signal(signal.SIGTERM)
        # Exits after the grace period (1 s) and the threads' 2 s, not after the model call.
        assert server.process.wait(20) == 3
        with pytest.raises(grpc.RpcError):
            hung.result(timeout=10)
    assert "still busy after 2.0 s: abandoned" in server.output


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def test_the_server_process_runs_with_its_gil_switch_interval() -> None:
    from torchwire.config import ServerSettings
    from torchwire.server.process.lifecycle import run_in_loop

    before = sys.getswitchinterval()

    async def main() -> int:
        return round(sys.getswitchinterval() * 1e6)  # microseconds

    try:
        assert run_in_loop(ServerSettings(gil_switch_interval_ms=0.25), main) == 250
        assert run_in_loop(ServerSettings(), main) == 500  # the default: 0.5 ms, not Python's 5
    finally:
        sys.setswitchinterval(before)


def test_a_sighup_while_the_server_starts_does_not_kill_it(
    cli_servers: list[CliServer], tmp_path: Path, seed: SimpleNamespace
) -> None:
    from support import write_model

    write_model(tmp_path / "scale", Scale(2.0), [4])
    server = CliServer("--repository", str(tmp_path), "--port", "0")
    cli_servers.append(server)
    status = Path(f"/proc/{server.process.pid}/status")

    def sighup_ignored() -> bool:  # the earliest moment the server can take a SIGHUP
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        return bool(int(fields["SigIgn"].strip(), 16) & (1 << (signal.SIGHUP - 1)))

    deadline = time.monotonic() + 60
    while not sighup_ignored():
        assert server.process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    hups = 0
    while not server.lines or "torchwire serving on" not in server.output:
        assert server.process.poll() is None, f"killed by SIGHUP number {hups}:\n{server.output}"
        server.process.send_signal(signal.SIGHUP)  # all through start-up: torch, models, bind
        hups += 1
        time.sleep(0.05)
    target = server.wait_ready()
    assert hups >= 3
    assert list(_predict(target, seed, [1, 2, 3, 4], model="scale").outputs) == [2, 4, 6, 8]


def test_malloc_arenas_are_capped_where_glibc_allows() -> None:
    from torchwire.config import ServerSettings
    from torchwire.native import cap_malloc_arenas

    assert ServerSettings().malloc_arenas == 2  # what `serve` applies before its threads start
    assert cap_malloc_arenas(2) is True  # this machine's libc is glibc: mallopt took it
    assert cap_malloc_arenas(0) is False  # 0: glibc's own default, nothing called


FAULTS_PER_CALL = """
import resource, sys
import numpy as np
from torchwire.native import keep_freed_memory
keep_freed_memory(int(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):  # a call's activations: 43 MB in buffers of several sizes, then freed
    held = [np.ones(mb << 18, np.float32) for mb in (12, 3, 6, 1, 12, 6, 3)]
    del held
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_kept_for_reuse_not_faulted_in_again_at_every_call() -> None:
    def faults(keep_mb: int, **env: str) -> int:
        command = [sys.executable, "-c", FAULTS_PER_CALL, str(keep_mb)]
        run = subprocess.run(
            command, env={**os.environ, **env}, capture_output=True, text=True, check=True
        )
        return int(run.stdout)

    pages_per_call = (43 << 20) // 4096
    assert faults(0) > 4 * pages_per_call  # glibc's moving thresholds: fresh pages, call after call
    assert faults(256) < pages_per_call  # kept: the first call's pages serve the others
    # A threshold the environment sets is left as it is.
    assert faults(256, MALLOC_TRIM_THRESHOLD_="0") > 4 * pages_per_call


def test_serving_torchscript_models_does_not_import_torch_dynamo(
    demo_repo: Path, tmp_path: Path
) -> None:
    # torch.export's archive reader pulls in torch._dynamo: 1.4 s of a 4.4 s start-up here, for
    # a check that only .pt2 models need. The server imports it only when it meets one.
    for name in ("recsys", "resnet18"):  # the demo's TorchScript models
        (tmp_path / name).symlink_to(demo_repo / name)
    code = (
        "import sys, asyncio\n"
        "from torchwire.config import ServerSettings\n"
        "from torchwire.server.process.app import Server\n"
        "async def main():\n"
        f"    server = Server(ServerSettings(repository={str(tmp_path)!r}, port=0, http_port=0,\n"
        "                                   metrics_port=0, host='127.0.0.1'))\n"
        "    await server.start()\n"
        "    await server.stop(0)\n"
        "asyncio.run(main())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "False"
