"""``torchwire repo check``: load every model version of a repository, run its warm-up input,
check its outputs, and say what failed and why (and, for what loads, its signature and threads:
instances x intra-op threads, as ``torchwire serve`` would run it without ``--torch-threads``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from torchwire.repository.sources import Scanner
from torchwire.runtime import LoadedModel
from torchwire.runtime.cost import measure


@dataclass(frozen=True)
class CheckRow:
    model: str
    version: str
    ok: bool
    seconds: float
    detail: str


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def check_repository(root: Path) -> list[CheckRow]:
    """One row per model version (or per model that cannot be read), in name order."""
    scan = Scanner(root=root).scan()
    rows = [
        CheckRow(name or str(root), "-", False, 0.0, _one_line(str(error)))
        for name, error in scan.errors.items()
    ]
    for name, source in scan.sources.items():
        for version, path in sorted(source.files.items()):
            started = time.monotonic()
            model = None
            try:
                model = LoadedModel.load(path, source.config)
                model.warm_up()
                cost = measure(model)
            except Exception as exc:
                detail, ok = _one_line(str(exc)), False
            else:
                threads = f"threads {model.config.instances.count}x{cost.threads} ({cost.why})"
                detail, ok = f"{model.signature()}  {threads}", True
            finally:
                if model is not None:
                    model.release()
            rows.append(CheckRow(name, str(version), ok, time.monotonic() - started, detail))
    return sorted(rows, key=lambda row: (row.model, row.version))


def format_rows(rows: list[CheckRow]) -> str:
    width = max([len("model"), *(len(row.model) for row in rows)])
    lines = [f"{'model':<{width}}  version  status  seconds  detail"]
    for row in rows:
        status = "ok" if row.ok else "FAILED"
        lines.append(
            f"{row.model:<{width}}  {row.version:<7}  {status:<6}  {row.seconds:7.2f}  {row.detail}"
        )
    return "\n".join(lines)
