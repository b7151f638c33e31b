"""`torchwire bench` and `torchwire predict` as a user types them, against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from support import ServerThread

TORCHWIRE = str(Path(sys.executable).parent / "torchwire")


def _torchwire(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TORCHWIRE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _check_counts_and_order(report: dict[str, Any]) -> None:
    summary = report["summary"]
    assert summary["ok"] + summary["errors"] == summary["requests"] == summary["sent"]
    ladder = [summary[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms")]
    assert ladder == sorted(ladder) and ladder[0] > 0
    assert sum(s["ok"] for s in report["per_second"]) == summary["ok"]


def test_closed_loop_writes_json_and_a_plot(repo_server: ServerThread, tmp_path: Path) -> None:
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    result = _torchwire(
        "bench", "--target", repo_server.target, "--model", "scale", "--concurrency", "4",
        "--duration", "2", "--warmup", "0.5", "--batch", "3", "--json", str(out),
        "--plot", str(png),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "item shape [4]" in result.stderr  # asked the server
    report = json.loads(out.read_text())
    _check_counts_and_order(report)
    assert report["summary"]["errors"] == 0 and report["summary"]["ok"] > 20
    assert report["config"]["concurrency"] == 4 and report["config"]["batch"] == 3
    assert len(report["per_second"]) == 2
    assert 0 < report["client"]["cpu_cores"] <= 1.5
    for column in ("QPS", "P50 ms", "P99.9 ms", "max ms"):
        assert column in result.stdout
    import matplotlib.image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[0] > 100


def test_open_loop_sends_at_the_rate_asked(repo_server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "open.json"
    result = _torchwire(
        "bench", "--target", repo_server.target, "--model", "scale", "--rate", "200",
        "--poisson", "--duration", "2", "--warmup", "0.5", "--procs", "2", "--json", str(out),
        "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    _check_counts_and_order(report)
    assert 300 <= report["summary"]["sent"] <= 500  # 200/s for 2 s, Poisson
    assert report["client"]["procs"] == 2


def test_stream_mode(repo_server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    for mode in (["--concurrency", "3"], ["--rate", "100"]):
        result = _torchwire(
            "bench", "--target", repo_server.target, "--model", "scale", "--stream", *mode,
            "--duration", "1", "--warmup", "0.2", "--json", str(out), "--quiet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = json.loads(out.read_text())
        _check_counts_and_order(report)
        assert report["summary"]["errors"] == 0 and report["config"]["stream"] is True


def test_a_server_that_rejects_everything_is_reported_by_status(
    repo_server: ServerThread, tmp_path: Path
) -> None:
    out = tmp_path / "errors.json"
    result = _torchwire(
        "bench", "--target", repo_server.target, "--model", "no-such-model", "--shape", "4",
        "--concurrency", "2", "--duration", "1", "--warmup", "0", "--json", str(out), "--quiet",
    )  # fmt: skip
    assert result.returncode == 1
    report = json.loads(out.read_text())
    assert report["summary"]["ok"] == 0
    assert report["errors"] == {"NOT_FOUND": report["summary"]["errors"]} and report["errors"]
    assert report["summary"]["sent"] == report["summary"]["errors"]
    assert "NOT_FOUND:" in result.stdout


def test_sweep_reports_the_highest_rate_within_the_slo(
    repo_server: ServerThread, tmp_path: Path
) -> None:
    out = tmp_path / "sweep.json"
    result = _torchwire(
        "bench", "--target", repo_server.target, "--model", "scale", "--sweep", "--rate", "50",
        "--sweep-growth", "2", "--sweep-max-rate", "150", "--duration", "1", "--warmup", "0.2",
        "--json", str(out), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [step["rate"] for step in report["steps"]] == [50, 100]
    assert all(step["passed"] for step in report["steps"])
    assert 80 <= report["best_qps"] <= 110
    assert "highest QPS at P99 < 50 ms" in result.stdout

    impossible = _torchwire(
        "bench", "--target", repo_server.target, "--model", "scale", "--sweep", "--rate", "50",
        "--slo-ms", "0.001", "--duration", "1", "--warmup", "0", "--quiet",
    )  # fmt: skip
    assert impossible.returncode == 1
    assert "no rate kept P99 under 0.001 ms" in impossible.stdout


def test_predict_reads_and_writes_npy(repo_server: ServerThread, tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", np.arange(8, dtype=np.float32).reshape(2, 4))
    result = _torchwire(
        "predict", "--target", repo_server.target, "--model", "scale", "--version", "1",
        "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "out.npy"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(
        np.load(tmp_path / "out.npy"), np.arange(8, dtype=np.float32).reshape(2, 4) * 2
    )
    failed = _torchwire(
        "predict", "--target", repo_server.target, "--model", "nope",
        "--input", str(tmp_path / "in.npy"),
    )  # fmt: skip
    assert failed.returncode == 1 and "NOT_FOUND" in failed.stderr


def test_the_v2_protocol_closed_loop_and_stream(repo_server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "v2.json"
    for extra in ([], ["--stream"]):
        result = _torchwire(
            "bench", "--target", repo_server.target, "--model", "scale", "--protocol", "v2",
            "--concurrency", "2", "--duration", "1", "--warmup", "0.2", "--json", str(out),
            "--quiet", *extra,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = json.loads(out.read_text())
        _check_counts_and_order(report)
        assert report["summary"]["errors"] == 0 and report["config"]["input_name"] == "x"


def test_plot_without_matplotlib_says_so_before_sending_anything(
    repo_server: ServerThread, tmp_path: Path
) -> None:
    # A Python where matplotlib cannot be imported: a module of that name that is not there.
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['matplotlib'] = None  # import fails, find_spec says None\n"
    )
    result = subprocess.run(
        [TORCHWIRE, "bench", "--target", repo_server.target, "--model", "scale", "--duration",
         "30", "--plot", str(tmp_path / "run.png")],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(blocker)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "pip install 'torchwire[plot]'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run.png").exists()
