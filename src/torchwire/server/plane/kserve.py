"""The KServe V2 answers that do not depend on the transport, as plain data: server and model
metadata, model config, statistics, the repository index. The gRPC servicer parses them into
``tritonclient``'s protobuf messages; the HTTP front-end sends them as JSON. Field names are the
protocol's (and Triton's model configuration's). ``Backend`` is what both answer from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torchwire import __version__
from torchwire.errors import InvalidInputError
from torchwire.repository import ModelRepository
from torchwire.runtime import Batcher
from torchwire.server.common.auth import Access
from torchwire.server.common.health import Health
from torchwire.server.common.observe import Observer
from torchwire.server.common.shm import Regions
from torchwire.server.plane.control import ModelControl, RegionControl
from torchwire.server.plane.inference import DataPlane, require_model_name

PLATFORMS = {
    "torchscript": "pytorch_libtorch",
    "exported": "pytorch_exported",
    "aoti": "pytorch_aoti",
    "python": "python",  # Triton's Python backend says the same
}
EXTENSIONS = [
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "binary_tensor_data",
]

View = dict[str, Any]


@dataclass(frozen=True)
class Backend:
    """What a V2 front-end (the gRPC servicer, the HTTP API) answers from.

    Attributes:
        repository: the served models.
        observer: per-request metrics and access log.
        health: readiness, as the health service reports it.
        access: tokens and repository control rules.
        control: who applies a load/unload a client asks for (the repository itself, or for a
            worker of several, its supervisor).
        regions: the shared memory regions clients register (``--allow-client-shm``).
        region_control: who applies a registration a client asks for (``regions`` itself, or
            for a worker of several, its supervisor).
    """

    repository: ModelRepository
    observer: Observer
    health: Health
    access: Access
    control: ModelControl
    regions: Regions
    region_control: RegionControl
    plane: DataPlane = field(init=False)
    """Inference on the repository, for every transport."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "plane", DataPlane(self.repository, self.regions))


def check_model_name(name: str) -> str:
    """Refuse names that could point outside the repository."""
    if not name or "/" in name or "\\" in name or ".." in name or "\0" in name:
        shown = repr(name) if len(name) <= 80 else repr(name[:80]) + "..."
        raise InvalidInputError(
            f"invalid model name {shown}: no '/', '\\\\', '..' or NUL, and not empty"
        )
    return name


def check_load_parameters(names: Iterable[str]) -> None:
    """Triton's load parameters (``config``, ``file:...``) would replace the model's files;
    torchwire loads the repository's directory as it is, so it refuses them rather than answer
    OK having ignored them."""
    given = sorted(names)
    if given:
        raise InvalidInputError(
            f"load parameters {given[:8]} are not supported: torchwire loads the model's "
            "directory in the repository as it is (write config.toml and the version "
            "directories there, then load)"
        )


def find(repository: ModelRepository, name: str, version: str = "") -> Batcher:
    """The version a V2 request names."""
    require_model_name(name)
    return repository.get(name, version or None)


def server_metadata() -> View:
    return {"name": "torchwire", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(repository: ModelRepository, batcher: Batcher) -> View:
    model = batcher.model

    def tensors(specs: Any) -> list[View]:
        return [{"name": s.name, "datatype": s.dtype, "shape": [-1, *s.shape]} for s in specs]

    return {
        "name": batcher.name,
        "versions": [str(v) for v in sorted(repository.models[batcher.name].versions)],
        "platform": PLATFORMS[model.config.format],
        "inputs": tensors(model.inputs),
        "outputs": tensors(model.outputs),
    }


def model_config(batcher: Batcher) -> View:
    """Triton's model configuration (``model_config.proto``) of the version."""
    model, config = batcher.model, batcher.model.config

    def tensors(specs: Any) -> list[View]:
        return [
            {"name": s.name, "data_type": _config_type(s.dtype), "dims": list(s.shape)}
            for s in specs
        ]

    return {
        "name": batcher.name,
        "platform": PLATFORMS[config.format],
        "max_batch_size": config.batching.max_batch_size,
        "input": tensors(model.inputs),
        "output": tensors(model.outputs),
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(config.batching.max_delay_ms * 1000)
        },
        "instance_group": [{"count": config.instances.count}],
    }


def model_statistics(repository: ModelRepository, name: str = "", version: str = "") -> View:
    """Statistics of every version, or of those ``name`` (and ``version``) select."""
    if name:
        repository.get(name, version or None)  # NOT_FOUND if absent
    rows = []
    for model, served in sorted(repository.models.items()):
        if name and model != name:
            continue
        for number, batcher in sorted(served.versions.items()):
            if version and str(number) != version:
                continue
            s = batcher.stats
            rows.append(
                {
                    "name": model,
                    "version": str(number),
                    "last_inference": s.last_inference_ms,
                    "inference_count": s.inference_count,
                    "execution_count": s.execution_count,
                    "inference_stats": {
                        "success": {"count": s.success_count, "ns": s.success_ns},
                        "fail": {"count": s.fail_count, "ns": s.fail_ns},
                        "queue": {"count": s.queue_count, "ns": s.queue_ns},
                        "compute_infer": {"count": s.compute_count, "ns": s.compute_ns},
                    },
                }
            )
    return {"model_stats": rows}


async def repository_index(repository: ModelRepository, ready_only: bool = False) -> list[View]:
    return [
        {"name": name, "version": version, "state": state, "reason": reason}
        for name, version, state, reason in await repository.index()
        if not ready_only or state == "READY"
    ]


def _config_type(dtype: str) -> str:
    """A datatype as Triton's model configuration names it (BYTES is its TYPE_STRING)."""
    return "TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}"
