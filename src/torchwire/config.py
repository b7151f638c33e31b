"""Typed configuration: the server's settings and each model's ``config.toml``.

Server settings come, highest priority first, from command-line flags, ``TORCHWIRE_<FIELD>``
environment variables, the TOML file named by ``--config`` (top-level keys are field names), and the
defaults below. Every option is defined once, here; the CLI builds its flags from these fields.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from torchwire.errors import ConfigError

DType = Literal[
    "FP32", "FP64", "FP16", "BF16", "INT8", "INT16", "INT32", "INT64", "UINT8", "BOOL", "BYTES"
]
ENV_PREFIX = "TORCHWIRE_"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchwire"


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (what a
    Kubernetes CPU limit sets), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores or 1, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores or 1)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` (or ``3x224x224``) as a tuple; ``ValueError`` saying what was expected."""
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"expected comma-separated integers like 3,224,224, got {text!r}"
        ) from None


def _parse_shape(value: Any) -> Any:
    """Accept a string (flag or env var) as well as a list."""
    return parse_shape(value) if isinstance(value, str) else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Strict):
    """How ``torchwire serve`` runs. Each field is a flag ``--field-name`` and an env var."""

    repository: Path | None = None
    """Model repository directory (``<model>/config.toml``, ``<model>/<version>/model.pt``)."""
    model: Path | None = None
    """One TorchScript file to serve; its shape comes from a config.toml beside it or
    --input-shape."""
    input_shape: tuple[int, ...] | None = None
    """Per-item input shape for --model without a config.toml, e.g. 3,224,224."""
    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port (0 picks a free one)."""
    http_port: Annotated[int, Field(ge=0, le=65535)] | Literal["auto"] = 8000
    """KServe V2 REST port on the same host; 0 turns HTTP off; auto picks a free one (the
    start-up banner says which)."""
    metrics_port: int = Field(8002, ge=0, le=65535)
    """Prometheus /metrics port (0 picks a free one)."""
    metrics_host: str = "0.0.0.0"
    """Address of the /metrics endpoint."""
    metrics_enabled: bool = True
    """Serve Prometheus metrics at all."""
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    """Server processes sharing the port under a supervisor (auto: one per core available to
    this process, cgroup CPU limit included); each loads its own copy of every model."""
    default_model: str | None = None
    """Model answering seed requests without metadata["model"]; default: the first by name."""
    grace_period_s: float = Field(10.0, ge=0)
    """On SIGTERM/SIGINT, how long in-flight requests may take to finish."""
    shutdown_delay_s: float = Field(0.0, ge=0)
    """On SIGTERM/SIGINT, keep serving this long with health NOT_SERVING before refusing new
    calls, so that load balancers stop routing here first."""
    torch_threads: int = Field(0, ge=0)
    """Intra-op threads shared by a model's inference threads; 0: chosen per model at load
    (torch's threads where a timed full batch gains from them, else 1; ``runtime.cost``)."""
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Where the built-in demo repository is built, once."""
    auth_token_file: Path | None = None
    """Bearer tokens, one a line ('#' comments): every call must send ``authorization: Bearer
    <token>`` (gRPC metadata or HTTP header); re-read when the file changes. None: no tokens."""
    auth_health: bool = False
    """Also require a token for health checks and reflection (open by default, for probes)."""
    model_control: Literal["off", "open", "token"] = "off"
    """Loading and unloading models over the APIs: off (PERMISSION_DENIED), open (any caller
    that may call), or token (a token from --admin-token-file)."""
    admin_token_file: Path | None = None
    """Tokens allowed to load and unload models under ``--model-control token``."""
    tls_cert: Path | None = None
    """PEM certificate chain of the server; with --tls-key, serve TLS instead of plaintext."""
    tls_key: Path | None = None
    """PEM private key of the server certificate."""
    tls_client_ca: Path | None = None
    """PEM of the CAs that sign client certificates; when set, clients must present one (mTLS)."""
    allow_client_shm: bool = False
    """KServe V2 system shared memory: clients on this machine may register regions of
    /dev/shm (files owned by this server's user) and pass tensors through them."""
    watch: Literal["auto", "poll", "off"] = "auto"
    """Reload changed models: file events with polling behind them (auto), polling only, or off."""
    watch_interval_s: float = Field(1.0, gt=0)
    """How often the model files' stamps are polled."""
    watch_settle_s: float = Field(0.5, ge=0)
    """A changed file is loaded once its size and mtime have not moved for this long."""
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=4096, le=2**31 - 1)
    """Largest request or response message accepted or sent."""
    grpc_frontend: Literal["native", "aio"] = "native"
    """Who speaks gRPC on the port: native (pygrpc-native, HTTP/2 in Rust outside the GIL,
    serving Predict and ModelInfer itself and passing every other method to grpc.aio behind it)
    or aio (grpc.aio alone). native falls back to aio, saying why, where it cannot serve the
    configuration (TLS, --max-connection-age-s, --max-connections, --connection-idle-s)."""
    engine: Literal["auto", "on", "off"] = "auto"
    """One engine process per device holding each model once, fed by every worker through
    shared memory: on, off, or auto (models on a GPU under --workers get one, CPU models do
    not). A model's ``[instances] engine`` wins over this. ``on`` with one worker still runs
    the engine apart, so that inference never waits for the front end's GIL."""
    grpc_io_threads: int = Field(0, ge=0, le=64)
    """Threads of the native front end's HTTP/2 runtime (per process); 0: 1 where the process's
    share of the cores is under 8, else 2 (a second thread costs more wake-ups than it adds on
    few cores: docs/frontends.md, "I/O threads")."""
    connection_idle_s: float = Field(300.0, ge=0)
    """A client connection with no call for this long is closed (clients reconnect when they
    call again); 0: never. Idle connections otherwise hold file descriptors forever."""
    max_connection_age_s: float = Field(0.0, ge=0)
    """Close every connection (gracefully) after this long, so that clients reconnect and spread
    over workers and replicas started since; 0: never."""
    max_connections: int = Field(0, ge=0)
    """Most client connections held at once (per worker); beyond, new ones are closed at once.
    0: the open-file limit less 256 for models, logs and metrics."""
    max_streams_per_connection: int = Field(1024, ge=1)
    """Most calls (streams) open at once on one connection."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The asyncio event loop: uvloop (faster gRPC handling; auto picks it when installed)."""
    malloc_arenas: int = Field(2, ge=0)
    """glibc malloc arenas of the server's processes (0: glibc's default, 8 per core): fewer
    arenas fragment less, and the resident size creeps less under load."""
    malloc_keep_mb: int = Field(256, ge=0, le=2047)
    """Freed memory each glibc heap keeps for reuse instead of returning it to the system, and
    the size (up to 32 MB) below which blocks come from the heaps rather than fresh pages: a
    model's activations are then not page-faulted in again at every call (0: glibc's moving
    defaults)."""
    gil_switch_interval_ms: float = Field(0.5, gt=0, le=100)
    """How long a thread may hold the GIL while another waits for it (Python's default is 5).
    An inference thread gives the GIL up at every model call and copy and must wait this long
    to get it back from a busy event loop (docs/design-notes.md, "The GIL switch interval")."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Logging level."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text or as one JSON object each."""
    access_log: bool = False
    """Log one line per request: peer, API, model, version, items, code, duration, request id."""
    watchdog_interval_s: float = Field(5.0, ge=0)
    """How often the memory watchdog reads memory; 0 turns it off."""
    watchdog_min_available_mb: int = Field(1024, ge=0)
    """Health goes NOT_SERVING while the host has less memory available than this."""
    watchdog_recover_margin_mb: int = Field(256, ge=0)
    """Hysteresis: back to SERVING only above the threshold plus this margin."""
    watchdog_max_rss_mb: int = Field(0, ge=0)
    """Also NOT_SERVING while this process's resident memory exceeds this; 0: no limit."""
    watchdog_min_gpu_available_mb: int = Field(0, ge=0)
    """Also NOT_SERVING while a GPU the models use has less than this available to the server
    (free on the device plus its allocator's unused cache); 0: GPU memory never trips it."""

    _parse_input_shape = field_validator("input_shape", mode="before")(_parse_shape)

    def engine_wanted(self, model: ModelConfig) -> bool:
        """Whether ``model`` is served by an engine process: its ``[instances] engine`` if
        set, else ``--engine``; auto means a GPU model under several workers."""
        choice = model.instances.engine if model.instances.engine != "auto" else self.engine
        if choice == "auto":
            return self.worker_count() > 1 and model.instances.device.startswith("cuda")
        return choice == "on"

    def http_bind_port(self) -> int:
        """The port to bind for HTTP: ``http_port``, 0 (any free one) for auto."""
        return 0 if self.http_port == "auto" else self.http_port

    def worker_count(self) -> int:
        """``workers`` as a number: ``auto`` is the cores this process may use."""
        return available_cores() if self.workers == "auto" else self.workers

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Each field's docstring, for the CLI's help text."""
        return field_docs(cls)


class TensorSpec(_Strict):
    """One named input or output, per item: the batch dimension is not part of ``shape``."""

    name: str = Field(min_length=1)
    dtype: DType = "FP32"
    shape: tuple[int, ...]

    @field_validator("shape")
    @classmethod
    def _check_dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(dim == 0 or dim < -1 for dim in shape):
            raise ValueError(f"dimensions must be positive or -1 (variable), got {list(shape)}")
        return shape


class BatchingConfig(_Strict):
    max_batch_size: int = Field(64, ge=1)
    """Most items in one model call; 1 turns batching off."""
    max_delay_ms: float = Field(2.0, ge=0)
    """Longest a queued request waits for batchmates while the model is busy."""
    max_queue: int = Field(1024, ge=1)
    """Most items waiting; beyond it requests get RESOURCE_EXHAUSTED."""
    inline_max_ms: float = Field(0.2, ge=0)
    """A batch whose call is measured (at load) to take at most this long on one thread runs on
    the event loop when it is idle, without a hand-off to an inference thread; 0: never."""
    pad_to: list[int] = Field(default_factory=list)
    """Batch sizes the model is called with: a batch is padded with items of zeros up to the
    smallest that holds it (their outputs are dropped), so that a GPU sees a few shapes only
    (TorchScript specialises its fused kernels by shape). Ascending, each at most
    max_batch_size; a batch larger than the last is not padded. Empty (default): no padding."""

    @field_validator("pad_to")
    @classmethod
    def _pad_sizes_fit(cls, sizes: list[int], info: ValidationInfo) -> list[int]:
        largest = info.data.get("max_batch_size", 0)
        if any(b <= a for a, b in itertools.pairwise(sizes)) or any(
            not 1 <= size <= largest for size in sizes
        ):
            raise ValueError(f"sizes must ascend, from 1 to max_batch_size ({largest})")
        return sizes


class InstancesConfig(_Strict):
    count: int = Field(1, ge=1)
    """Inference threads for this model, each running whole batches. Left unset, a CPU model
    served from an engine gets one per worker feeding it (docs/engines.md)."""
    threads: int = Field(0, ge=0)
    """Intra-op (torch) threads of each instance; 0: --torch-threads shared among the instances
    if given, else chosen at load from what a full batch measures (1 on a GPU). A light model
    at a high request rate is faster with 1: the event loop needs a core too."""
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    """``cpu``, ``cuda`` or ``cuda:N``."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """fp16/bf16 run under ``torch.autocast``."""
    engine: Literal["auto", "on", "off"] = "auto"
    """Serve this model from the device's engine process (one copy for all workers), from
    every worker (off), or as ``--engine`` says (auto)."""


class CompileConfig(_Strict):
    """``torch.compile`` of a Python model's ``predict`` (``format = "python"`` only)."""

    mode: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    """off: eager; else torch.compile's mode (reduce-overhead: CUDA graphs, one per batch size:
    set [batching] pad_to so that a few sizes are captured, at load)."""
    dynamic: bool | None = None
    """torch.compile's ``dynamic``: None lets it decide (it recompiles once a size varies)."""
    fullgraph: bool = False
    """Refuse graph breaks (the load fails saying where) instead of running them eagerly."""


class VersionsConfig(_Strict):
    policy: Literal["latest", "all", "specific"] = "latest"
    specific: list[int] = Field(default_factory=list)


class ModelConfig(_Strict):
    """A model's ``config.toml``."""

    format: Literal["torchscript", "exported", "aoti", "python"] = "torchscript"
    """The version file: model.pt (TorchScript), model.pt2 (torch.export, or an AOTInductor
    package for aoti), or model.py (a class ``Model``: see docs/models.md)."""
    inputs: list[TensorSpec] = Field(min_length=1)
    """What requests carry (for a Python model: before its preprocess)."""
    outputs: list[TensorSpec] = Field(default_factory=list)
    """Checked against the warm-up run; when empty, taken from it (a Python model: required)."""
    batching: BatchingConfig = BatchingConfig()
    instances: InstancesConfig = InstancesConfig()
    versions: VersionsConfig = VersionsConfig()
    compile: CompileConfig = CompileConfig()

    @model_validator(mode="after")
    def _fits_format(self) -> ModelConfig:
        if self.format == "python":
            if not self.outputs:
                raise ValueError("a Python model declares its [[outputs]] (name, dtype, shape)")
            return self
        if self.compile.mode != "off":
            raise ValueError(f'[compile] applies to format = "python", not {self.format!r}')
        texts = [f"'{s.name}'" for s in (*self.inputs, *self.outputs) if s.dtype == "BYTES"]
        if texts:
            raise ValueError(
                f'BYTES tensors ({", ".join(texts)}) need format = "python" (a model.py whose '
                f"preprocess or postprocess turns them into tensors); {self.format} models take "
                "and give numbers only"
            )
        return self

    @field_validator("inputs", "outputs")
    @classmethod
    def _one_name_each(cls, specs: list[TensorSpec]) -> list[TensorSpec]:
        names = [spec.name for spec in specs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"tensor names must differ; {', '.join(repeated)} is used twice")
        return specs


def field_docs(cls: type[BaseModel]) -> dict[str, str]:
    """Read the docstrings written under each field (the source is the single definition)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0]
    assert isinstance(body, ast.ClassDef)
    previous: str | None = None
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            previous = node.target.id
        elif (
            previous
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[previous] = " ".join(node.value.value.split())
            previous = None
        else:
            previous = None
    return docs


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _flatten_sections(table: dict[str, Any]) -> dict[str, Any]:
    """``[metrics] port = 9100`` in the TOML file is the field ``metrics_port``."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{inner}": v for inner, v in _flatten_sections(value).items()})
        else:
            flat[key] = value
    return flat


def load_settings(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Merge defaults < TOML file < ``TORCHWIRE_*`` env vars < flags into one ``ServerSettings``.

    Args:
        flags: values given on the command line (only those given), keyed by field name; the
            key ``config`` names the TOML file.
        environ: the environment to read (default: ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    config_file = flags.get("config") or environ.get(f"{ENV_PREFIX}CONFIG")
    sources = []
    if config_file:
        merged.update(_flatten_sections(_read_toml(Path(config_file))))
        sources.append(str(config_file))
    for field in ServerSettings.model_fields:
        value = environ.get(f"{ENV_PREFIX}{field.upper()}")
        if value is not None and value != "":
            merged[field] = value
            sources.append(f"{ENV_PREFIX}{field.upper()}")
    merged.update({key: value for key, value in flags.items() if key != "config"})
    try:
        return ServerSettings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, ", ".join(["flags", *sources]))) from None


def load_model_config(path: Path) -> ModelConfig:
    """Parse a model's ``config.toml``; errors name the file, the key and what was expected."""
    try:
        return ModelConfig.model_validate(_read_toml(path))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path))) from None
