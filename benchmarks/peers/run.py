"""torchwire side by side with Seldon MLServer and NVIDIA Triton (PyTriton): same models, same
load, one run, each server alone on the machine.

    .venv/bin/python benchmarks/peers/run.py [--quick] [--cache DIR] [--out benchmarks/results]

Each peer is installed by this script into its own virtualenv under ``--cache`` (default
``~/.cache/torchwire/peers``), pinned: ``mlserver==1.7.1`` (with ``uvloop==0.21.0``: 1.7.1 leaves
uvloop unpinned and its inference worker crash-loops on 0.23) and ``nvidia-pytriton==0.7.0``,
which bundles the real ``tritonserver``; ``torch==2.13.0`` CPU in each. All three serve the demo
repository's two TorchScript files (``recsys``, ``resnet18``) under the same names, input and
output names and dtypes, with their own batching on, configured as each one's documentation shows
and with the same largest batch and delay as torchwire's demo configs:

- torchwire: ``torchwire serve --repository DEMO``, defaults (recsys: batches of up to 64, 2 ms,
  one intra-op thread; resnet18: up to 4, 5 ms).
- MLServer: a custom ``MLModel`` (``mlserver_runtime.py``) with MLServer's ``NumpyCodec``, adaptive
  batching ``max_batch_size`` 64 / ``max_batch_time`` 0.002 s (resnet18 4 / 0.005 s), default
  settings otherwise (one inference worker process).
- PyTriton: ``@batch`` with a ``DynamicBatcher`` (``pytriton_serve.py``): ``max_batch_size`` 64,
  ``max_queue_delay_microseconds`` 2000 (resnet18 4 / 5000).

The load generator is ``torchwire bench``'s, KServe V2 over gRPC with raw tensors, for all three;
a closed loop driven by ``tritonclient.grpc.aio`` cross-checks it once per server. Per server:
recsys highest open-loop QPS at P99 < 50 ms, recsys P50/P99 at
concurrency 1, resnet18 images/s at concurrency 8 and 32, server CPU seconds per 1,000 answers
(recsys, closed loop, every process of the server from /proc), RSS of the whole process tree
with both models loaded, seconds from start to both models answering, and the answers' largest
difference from the in-process model. For torchwire, its V2 path against its seed API: both
climbed rate by rate in turns, and server CPU per answer at a fixed rate.
Every server is measured once per round, in turn, for ``--rounds`` rounds (2), and each figure is
its best round. Writes ``peers.json``, ``peers.md`` and ``peers.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import ROOT, SHAPES, free_port, run_with_server_cpu  # noqa: E402

from torchwire.bench import LoadConfig, run_load, sweep  # noqa: E402
from torchwire.bench.report import sweep_summary  # noqa: E402
from torchwire.repository import ensure_demo_repository  # noqa: E402

NAMES = {"recsys": ("features", "score"), "resnet18": ("image", "logits")}
BATCHING = {"recsys": (64, 2.0), "resnet18": (4, 5.0)}  # largest batch, delay ms: the demo's
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class Peer:
    name: str
    version: str
    packages: tuple[str, ...]


PEERS = {
    "MLServer": Peer("mlserver", "1.7.1", ("mlserver==1.7.1", "uvloop==0.21.0", TORCH)),
    "PyTriton": Peer("pytriton", "0.7.0", ("nvidia-pytriton==0.7.0", TORCH)),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- installing the peers --------------------------------------------------------------------------


def environment(peer: Peer, cache: Path) -> Path:
    """The peer's virtualenv under ``cache``, created and installed on first use."""
    key = hashlib.sha256(" ".join(peer.packages).encode()).hexdigest()[:10]
    home = cache / f"{peer.name}-{peer.version}-{key}"
    if (home / "installed").exists():
        return home
    log(f"installing {' '.join(peer.packages)} into {home} (once)")
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--clear",
                    str(home)], check=True)  # fmt: skip
    subprocess.run(
        [str(home / "bin" / "python"), "-m", "pip", "install", "--quiet", *peer.packages],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (home / "installed").write_text(" ".join(peer.packages) + "\n")
    return home


def mlserver_config(demo: Path, folder: Path, ports: dict[str, int]) -> None:
    settings = {"host": "127.0.0.1", "grpc_port": ports["grpc"], "http_port": ports["http"],
                "metrics_port": ports["metrics"]}  # fmt: skip
    (folder / "settings.json").write_text(json.dumps(settings))
    for model, (input_name, output_name) in NAMES.items():
        size, delay_ms = BATCHING[model]
        out = (1,) if model == "recsys" else (1000,)
        model_settings = {
            "name": model,
            "implementation": "mlserver_runtime.TorchScriptRuntime",
            "max_batch_size": size,
            "max_batch_time": delay_ms / 1000,
            "inputs": [{"name": input_name, "datatype": "FP32", "shape": [-1, *SHAPES[model]]}],
            "outputs": [{"name": output_name, "datatype": "FP32", "shape": [-1, *out]}],
            "parameters": {"uri": str(demo / model / "1" / "model.pt"), "version": "1"},
        }
        (folder / model).mkdir()
        (folder / model / "model-settings.json").write_text(json.dumps(model_settings))


# -- running one server ----------------------------------------------------------------------------


@dataclass
class Running:
    target: str
    process: psutil.Process
    ready_s: float


def wait_answering(target: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Until both models answer a V2 request."""
    deadline = time.monotonic() + timeout
    client = triton_grpc.InferenceServerClient(target)
    try:
        while True:
            try:
                for model in NAMES:
                    infer(client, model, np.zeros((1, *SHAPES[model]), np.float32))
                return
            except Exception:
                if process.poll() is not None:
                    raise RuntimeError(f"the server on {target} exited") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server on {target} did not answer") from None
                time.sleep(0.2)
    finally:
        client.close()


def infer(client: triton_grpc.InferenceServerClient, model: str, array: np.ndarray) -> np.ndarray:
    input_name, output_name = NAMES[model]
    tensor = triton_grpc.InferInput(input_name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    answer = client.infer(model, [tensor], client_timeout=30)
    return np.asarray(answer.as_numpy(output_name))


@contextlib.contextmanager
def serve(kind: str, demo: Path, cache: Path) -> Iterator[Running]:
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as scratch:
        if kind == "torchwire":
            command = [
                sys.executable, "-m", "torchwire", "serve", "--repository", str(demo), "--host",
                "127.0.0.1", "--port", str(ports["grpc"]), "--http-port", "0", "--metrics-port",
                "0", "--log-level", "warning",
            ]  # fmt: skip
        elif kind == "MLServer":
            home = environment(PEERS[kind], cache)
            mlserver_config(demo, Path(scratch), ports)
            command = [str(home / "bin" / "mlserver"), "start", scratch]
            env["PYTHONPATH"] = str(HERE)  # mlserver_runtime
        else:
            home = environment(PEERS[kind], cache)
            python = home / "bin" / "python"
            command = [str(python), str(HERE / "pytriton_serve.py"), str(demo),
                       *(str(ports[k]) for k in ("grpc", "http", "metrics"))]  # fmt: skip
            # Triton's python-backend stub must load this interpreter's libpython, not the
            # system's (else: "RLock ... _recursion_count" at model load).
            libdir = subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}"
        started = time.monotonic()
        with open(Path(scratch) / "server.log", "wb") as server_log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=server_log,
                start_new_session=True,
            )  # fmt: skip
        target = f"127.0.0.1:{ports['grpc']}"
        try:
            wait_answering(target, process, timeout=300)
            yield Running(target, psutil.Process(process.pid), time.monotonic() - started)
        except Exception:
            sys.stderr.write((Path(scratch) / "server.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL the whole session (peers leave children: tritonserver, workers)."""
    process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# -- measuring -------------------------------------------------------------------------------------


def load(target: str, model: str, **kwargs: Any) -> LoadConfig:
    base: dict[str, Any] = {"duration_s": 5.0, "warmup_s": 1.0, "channels": 2, "protocol": "v2",
                            "input_name": NAMES[model][0], "timeout_s": 10.0}  # fmt: skip
    return LoadConfig(target=target, model=model, shape=SHAPES[model], **{**base, **kwargs})


def closed(config: LoadConfig, process: psutil.Process | None = None) -> dict[str, Any]:
    if process is None:
        return run_load(config, 1, progress=False).summary()
    result, cpu_s = run_with_server_cpu(config, 1, process)
    summary = result.summary()
    if result.ok:
        summary["server_cpu_s_per_1000"] = round(cpu_s * 1000, 3)
    return summary


def best_rate(config: LoadConfig) -> dict[str, Any]:
    """The highest open-loop rate with P99 < 50 ms."""
    steps = sweep(config, 50.0, 1, start_rate=150.0, growth=1.35, progress=False)
    return sweep_summary(steps)


def paired(v2: LoadConfig, seed: LoadConfig, process: psutil.Process) -> dict[str, Any]:
    """V2 against the seed API on one server, each step run for both back to back (in turns):
    the highest open-loop rate with P99 < 50 ms (rates rising by 6 %, two failed steps in a row
    end a climb), and server CPU per answer at 1,500 requests/s (twice each)."""
    configs = {"v2": v2, "seed": seed}
    best: dict[str, float] = dict.fromkeys(configs, 0.0)
    misses = dict.fromkeys(configs, 0)
    rate, turn = 1200.0, 0
    while any(m < 2 for m in misses.values()) and rate < 50_000:
        for name in list(configs)[:: 1 if turn % 2 == 0 else -1]:
            if misses[name] >= 2:
                continue
            result = run_load(replace(configs[name], rate=rate), 1, progress=False)
            if result.error_count == 0 and result.summary()["p99_ms"] < 50.0:
                best[name], misses[name] = max(best[name], result.qps), 0
            else:
                misses[name] += 1
        rate, turn = rate * 1.06, turn + 1
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    for turn in range(4):
        name = ("v2", "seed")[turn % 2]
        config = replace(configs[name], rate=1500.0, warmup_s=0.5)
        cpu[name].append(round(run_with_server_cpu(config, 1, process)[1] * 1e6))
    return {
        "qps": {name: round(value, 1) for name, value in best.items()},
        "ratio": round(best["v2"] / best["seed"], 2) if best["seed"] else None,
        "cpu_us_at_1500": cpu,
    }


def correctness(target: str, demo: Path) -> float:
    """The largest difference between the server's answers and the in-process model's."""
    worst = 0.0
    client = triton_grpc.InferenceServerClient(target)
    rng = np.random.default_rng(7)
    try:
        for model in NAMES:
            array = rng.standard_normal((3, *SHAPES[model])).astype(np.float32)
            module = torch.jit.load(str(demo / model / "1" / "model.pt")).eval()
            with torch.inference_mode():
                expected = module(torch.from_numpy(array)).numpy()
            worst = max(worst, float(np.abs(infer(client, model, array) - expected).max()))
    finally:
        client.close()
    return worst


def tritonclient_closed(target: str, concurrency: int, seconds: float) -> float:
    """recsys QPS with ``tritonclient.grpc.aio``, closed loop, in this process."""

    async def main() -> float:
        client = triton_aio.InferenceServerClient(target)
        tensor = triton_aio.InferInput("features", [1, 256], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 256), np.float32))
        done = 0

        async def caller(until: float) -> None:
            nonlocal done
            while time.monotonic() < until:
                await client.infer("recsys", [tensor], client_timeout=10)
                done += 1

        await asyncio.gather(*(caller(time.monotonic() + 1) for _ in range(concurrency)))
        done, start = 0, time.monotonic()
        await asyncio.gather(*(caller(start + seconds) for _ in range(concurrency)))
        rate = done / (time.monotonic() - start)
        await client.close()
        return rate

    return round(asyncio.run(main()), 1)


def rss_mb(process: psutil.Process) -> float:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return round(total / 2**20, 1)


def measure(kind: str, demo: Path, cache: Path, quick: bool, first: bool) -> dict[str, Any]:
    """One round of every figure for one server, started for it and stopped after."""
    seconds = 3.0 if quick else 6.0
    with serve(kind, demo, cache) as server:
        target, process = server.target, server.process
        row: dict[str, Any] = {"ready_s": round(server.ready_s, 1)}
        log(f"{kind}: answering after {server.ready_s:.1f} s")
        row["max_abs_diff"] = correctness(target, demo)
        for model, c in (("recsys", 32), ("resnet18", 8)):  # first batches of each size: slower
            run_load(load(target, model, concurrency=c, duration_s=2.0), 1, progress=False)
        row["recsys_c32"] = closed(load(target, "recsys", concurrency=32, duration_s=seconds),
                                   process)  # fmt: skip
        row["recsys_c1"] = closed(load(target, "recsys", concurrency=1, duration_s=seconds))
        step_s = 2.0 if quick else 3.0
        v2 = load(target, "recsys", duration_s=step_s)
        seed = load(target, "recsys", protocol="seed", input_name="", duration_s=step_s)
        row["recsys_sweep"] = best_rate(v2)
        if kind == "torchwire" and first:  # the server's V2 and seed paths, step by step in turns
            row["v2_vs_seed"] = paired(v2, seed, process)
        for c in (8, 32):
            row[f"resnet18_c{c}"] = closed(
                load(target, "resnet18", concurrency=c, duration_s=2 * seconds)
            )
        row["rss_mb"] = rss_mb(process)
        row["tritonclient_recsys_c32"] = tritonclient_closed(target, 32, seconds)
        log(f"{kind}: {json.dumps(row)[:400]}")
        return row


# -- reporting -------------------------------------------------------------------------------------

ROWS = [  # label, how to read it from a server's row, higher is better
    ("recsys QPS at P99 < 50 ms (open loop)", lambda r: r["recsys_sweep"]["qps"], True),
    ("recsys P50 ms at c=1", lambda r: r["recsys_c1"]["p50_ms"], False),
    ("recsys P99 ms at c=1", lambda r: r["recsys_c1"]["p99_ms"], False),
    ("recsys QPS at c=32 (closed loop)", lambda r: r["recsys_c32"]["qps"], True),
    ("recsys QPS at c=32, tritonclient.aio", lambda r: r["tritonclient_recsys_c32"], True),
    ("server CPU s per 1,000 answers (recsys)",
     lambda r: r["recsys_c32"]["server_cpu_s_per_1000"], False),
    ("resnet18 images/s at c=8", lambda r: r["resnet18_c8"]["qps"], True),
    ("resnet18 images/s at c=32", lambda r: r["resnet18_c32"]["qps"], True),
    ("RSS MB, both models loaded (all processes)", lambda r: r["rss_mb"], False),
    ("seconds from start to answering", lambda r: r["ready_s"], False),
    ("largest |answer - in-process model|", lambda r: r["max_abs_diff"], False),
]  # fmt: skip


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if value < 0.01:
        return f"{value:.1e}"
    return f"{value:,.2f}" if value < 10 else f"{value:,.0f}"


def best(rounds: list[dict[str, Any]], read: Any, higher: bool) -> float:
    """A figure's best value over a server's rounds."""
    values = [read(row) for row in rounds]
    return max(values) if higher else min(values)


def markdown(r: dict[str, Any]) -> str:
    m, servers = r["machine"], r["rounds"]
    names = list(servers)
    lines = [
        "# torchwire, MLServer and PyTriton side by side (benchmarks/peers/run.py)",
        "",
        f"{m['when']}; {m['cpus']} cores; Python {m['python']}; torch {m['torch']} in every "
        f"server; {', '.join(f'{k} {v}' for k, v in m['versions'].items())}. Each server alone, "
        "the load generator (`torchwire bench`, KServe V2 gRPC, raw tensors, one process) on the "
        f"same host. The best of {len(servers['torchwire'])} rounds (every server once per round, "
        "in turn), each figure on its own.",
        "",
        "| | " + " | ".join(names) + " | torchwire vs best peer |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for label, read, higher in ROWS:
        values = [best(servers[n], read, higher) for n in names]
        ours, peers = values[0], values[1:]
        top = max(peers) if higher else min(peers)
        ahead = ours >= top if higher else ours <= top
        if ours == top:
            verdict = "equal"
        else:
            ratio = ours / top if higher else top / ours
            verdict = f"{ratio:.2f}x ({'ahead' if ahead else 'behind'})"
        cells = [f"**{fmt(v)}**" if v == (max(values) if higher else min(values)) else fmt(v)
                 for v in values]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {verdict} |")
    pair = servers["torchwire"][0]["v2_vs_seed"]
    cpu = {name: sum(v) / len(v) for name, v in pair["cpu_us_at_1500"].items()}
    lines += [
        "",
        f"torchwire's V2 path against its seed API on the same server, each rate run for both "
        f"back to back: highest QPS at P99 < 50 ms V2 {pair['qps']['v2']:,.0f}, seed "
        f"{pair['qps']['seed']:,.0f} ({pair['ratio']}x); server CPU per answer at 1,500/s "
        f"V2 {cpu['v2']:.0f} us, seed {cpu['seed']:.0f} us (runs: {pair['cpu_us_at_1500']}). "
        "Each round's recsys QPS at P99 < 50 ms: "
        + "; ".join(f"{n} {[row['recsys_sweep']['qps'] for row in servers[n]]}" for n in names)
        + ".",
        "",
        "Ratios: higher is better for QPS and images/s (torchwire / best peer), lower is better "
        "for latency, CPU, RSS and start time (best peer / torchwire); above 1.00x means "
        "torchwire is ahead.",
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = r["rounds"]
    panels = [ROWS[0], ROWS[1], ROWS[5], ROWS[6]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (label, read, higher) in zip(axes, panels, strict=True):
        values = [best(servers[n], read, higher) for n in servers]
        ax.bar(list(servers), values, color=["#2b6cb0", "#888888", "#76b900"][: len(values)])
        ax.set_title(label, fontsize=9)
        for i, v in enumerate(values):
            ax.text(i, v, fmt(v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"torchwire vs MLServer vs PyTriton, {r['machine']['cpus']} cores, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/torchwire/peers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all servers (2)")
    parser.add_argument("--only", nargs="*", default=["torchwire", *PEERS], help="servers to run")
    args = parser.parse_args()
    demo = ensure_demo_repository(Path(tempfile.gettempdir()) / "torchwire-bench-cache")
    for name in args.only:  # install first, so that no server runs beside an install
        if name in PEERS:
            environment(PEERS[name], args.cache)
    results: dict[str, Any] = {
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "versions": {n: p.version for n, p in PEERS.items()},
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "platform": sysconfig.get_platform(),
        },
        "rounds": {name: [] for name in args.only},
    }
    # Rounds, each server once per round: the machine's other load drifts over minutes, and a
    # server measured only while it was high would lose rows it wins otherwise.
    for index in range(args.rounds):
        for name in args.only:
            results["rounds"][name].append(
                measure(name, demo, args.cache, args.quick, first=index == 0)
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(results, indent=2))
    if list(results["rounds"]) == ["torchwire", *PEERS]:
        (args.out / "peers.md").write_text(markdown(results))
        plot(results, args.out / "peers.png")
        print(markdown(results))


if __name__ == "__main__":
    main()
