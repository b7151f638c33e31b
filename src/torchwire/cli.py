"""The ``torchwire`` command: ``serve``, ``bench``, ``predict``, ``repo check`` and ``export``."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchwire.config import ENV_PREFIX, ServerSettings, load_settings, parse_shape
from torchwire.errors import START_FAILED, ConfigError, TorchwireError
from torchwire.logs import configure_logging
from torchwire.native import tune_malloc

log = logging.getLogger("torchwire")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``ServerSettings`` field, named and documented by the field itself."""
    docs = ServerSettings.field_help()
    for name, field in ServerSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=f"{docs.get(name, '')} [env {ENV_PREFIX}{name.upper()}; default {default}]",
        )
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE.toml",
        help=f"TOML file of settings, keys named as the flags [env {ENV_PREFIX}CONFIG]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchwire", description="Serve PyTorch models over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a model repository, one model file, or the built-in demo models",
        description="With neither --repository nor --model, serves the built-in demo repository.",
    )
    _add_settings_flags(serve)
    serve.set_defaults(func=_serve_command)
    _add_bench(commands)
    _add_predict(commands)
    repo = commands.add_parser("repo", help="model repository tools")
    repo_commands = repo.add_subparsers(dest="repo_command", required=True)
    check = repo_commands.add_parser(
        "check",
        help="load every model version, run its warm-up, check its outputs; exit 1 on a failure",
    )
    check.add_argument("directory", type=Path, help="the model repository")
    check.set_defaults(func=_repo_check_command)
    _add_export(commands)
    return parser


def _add_export(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="write an nn.Module as a repository model (any format) and check it loads and agrees",
        description="Builds the module with MODULE:NAME, writes DIRECTORY/config.toml and "
        "DIRECTORY/VERSION/<file>, loads it back as the server would and compares its answers "
        "with the module's at 1 and 3 items.",
    )
    export.add_argument("directory", type=Path, help="the model's directory in a repository")
    export.add_argument(
        "--module", required=True, help="MODULE:NAME of an nn.Module or a function returning one"
    )
    export.add_argument(
        "--input",
        action="append",
        required=True,
        dest="inputs",
        metavar="NAME[:DTYPE]:SHAPE",
        help="an input per item, in call order, e.g. image:FP32:3,224,224 (repeat per input)",
    )
    export.add_argument(
        "--format", default="torchscript", choices=["torchscript", "exported", "aoti", "python"]
    )
    export.add_argument("--version", type=int, default=1, help="the version directory to write")
    export.set_defaults(func=_export_command)


def _export_command(args: argparse.Namespace) -> int:
    from torchwire.repository.export import describe, export_model, load_factory, parse_input

    factory = load_factory(args.module)
    inputs = [parse_input(text) for text in args.inputs]
    result = export_model(
        factory(), inputs, args.format, args.directory, args.version, factory=args.module
    )
    print(describe(result))
    return 0


def _repo_check_command(args: argparse.Namespace) -> int:
    from torchwire.repository.check import check_repository, format_rows

    rows = check_repository(args.directory)
    print(format_rows(rows))
    return 0 if rows and all(row.ok for row in rows) else 1


def _shape(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="load-test a server: closed or open loop, HDR percentiles, sweep to a P99 target",
        description="Closed loop with --concurrency, open loop with --rate (latency counted from "
        "each request's scheduled send time). Exit code 1 when any request failed.",
    )
    bench.add_argument("--target", required=True, help="HOST:PORT of the server")
    bench.add_argument("--model", required=True, help="model name")
    bench.add_argument("--version", help="model version (default: the server's)")
    bench.add_argument(
        "--protocol",
        choices=["seed", "v2", "http", "http_json"],
        default="seed",
        help="seed API, KServe V2 over gRPC, or V2 over HTTP (--target is then the HTTP port) "
        "with binary tensors or JSON",
    )
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: callers (default 8)")
    mode.add_argument("--rate", type=float, help="open loop: requests per second")
    bench.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals")
    bench.add_argument("--stream", action="store_true", help="use PredictStream")
    bench.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    bench.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (1)")
    bench.add_argument("--batch", type=int, default=1, help="items per request (1)")
    bench.add_argument("--shape", type=_shape, help="per-item shape, e.g. 256 (default: ask)")
    bench.add_argument("--procs", type=int, default=1, help="load processes (1)")
    bench.add_argument("--channels", type=int, default=2, help="connections per process (2)")
    bench.add_argument("--timeout", type=float, default=5.0, help="deadline per request, s (5)")
    bench.add_argument(
        "--encoding", choices=["raw", "floats"], default="raw", help="raw_inputs or inputs"
    )
    bench.add_argument("--json", type=Path, help="write config, summary, series, errors")
    bench.add_argument("--plot", type=Path, help="write latency plots (PNG)")
    bench.add_argument("--sweep", action="store_true", help="find the highest QPS under --slo-ms")
    bench.add_argument("--slo-ms", type=float, default=50.0, help="P99 target of --sweep (50)")
    bench.add_argument(
        "--sweep-growth", type=float, default=1.5, help="rate factor between steps (1.5)"
    )
    bench.add_argument("--sweep-max-rate", type=float, default=float("inf"), help="stop here")
    bench.add_argument("--quiet", action="store_true", help="no live progress")
    _token_flag(bench)
    bench.set_defaults(func=_bench_command)


def _token_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file",
        type=Path,
        help="file whose first line is the bearer token to send (default: $TORCHWIRE_TOKEN)",
    )


def _token(args: argparse.Namespace) -> str | None:
    """The token of --token-file, else $TORCHWIRE_TOKEN, else None."""
    if args.token_file is None:
        return os.environ.get("TORCHWIRE_TOKEN") or None
    try:
        lines = args.token_file.read_text().split()
    except OSError as exc:
        raise SystemExit(f"torchwire: --token-file {args.token_file}: {exc}") from None
    if not lines:
        raise SystemExit(f"torchwire: --token-file {args.token_file} is empty")
    token: str = lines[0]
    return token


def _http_spec(
    target: str, model: str, version: str | None, token: str | None
) -> tuple[str, str, tuple[int, ...]]:
    """The first input's name, datatype and item shape, from the REST model metadata."""
    import json
    import urllib.error
    import urllib.request

    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    try:
        request = urllib.request.Request(f"http://{target}{path}")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            meta = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise TorchwireError(f"GET {path}: {exc}") from None
    first = meta["inputs"][0]
    return first["name"], first["datatype"], tuple(first["shape"][1:])


def _bench_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from torchwire.bench import LoadConfig, run_load, sweep
    from torchwire.bench.report import (
        plot,
        print_result,
        print_sweep,
        sweep_dict,
        write_json,
    )
    from torchwire.client import Client

    console = Console(stderr=True)
    out = Console() if sys.stdout.isatty() else Console(width=120)
    shape, input_name, datatype = args.shape, "", "FP32"
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        console.print(
            "torchwire bench: --plot needs matplotlib: pip install 'torchwire[plot]' "
            "(nothing was sent)",
            markup=False,
            soft_wrap=True,
        )
        return 2
    if args.stream and args.protocol.startswith("http"):
        console.print("torchwire bench: --stream needs a gRPC protocol (seed or v2), not HTTP")
        return 2
    try:
        if args.protocol.startswith("http"):
            input_name, datatype, item_shape = _http_spec(
                args.target, args.model, args.version, _token(args)
            )
            shape = shape or item_shape
        else:
            with Client(
                args.target, timeout=10, protocol=args.protocol, token=_token(args)
            ) as client:
                # The model's V2 metadata, for the seed API too: it carries floats, but an
                # integer model takes only whole numbers.
                try:
                    spec = client.spec(args.model, args.version)
                    input_name, datatype = spec.input_name, spec.datatype
                    shape = shape or spec.item_shape
                except TorchwireError:
                    if args.protocol == "v2":
                        raise
                    # A server of the seed API alone: floats, the shape its refusal names.
                    shape = shape or client.item_shape(args.model)
    except TorchwireError as exc:
        console.print(f"torchwire bench: cannot ask {args.target} about {args.model}: {exc}")
        return 2
    config = LoadConfig(
        target=args.target,
        model=args.model,
        shape=shape,
        batch=args.batch,
        version=args.version,
        concurrency=args.concurrency or (0 if args.rate else 8),
        rate=args.rate or 0.0,
        poisson=args.poisson,
        stream=args.stream,
        duration_s=args.duration,
        warmup_s=args.warmup,
        timeout_s=args.timeout,
        channels=args.channels,
        raw=args.encoding == "raw",
        protocol=args.protocol,
        input_name=input_name,
        datatype=datatype,
        token=_token(args) or "",
    )
    console.print(f"{args.model} at {args.target}: item shape {list(shape)}", highlight=False)
    if args.sweep:
        steps = sweep(
            config, args.slo_ms, args.procs, start_rate=args.rate or 200.0,
            growth=args.sweep_growth, max_rate=args.sweep_max_rate, console=console,
            progress=not args.quiet,
        )  # fmt: skip
        print_sweep(out, steps, args.slo_ms)
        if args.json:
            write_json(args.json, sweep_dict(steps, args.slo_ms))
        return 0 if any(step.passed for step in steps) else 1
    result = run_load(config, args.procs, console, progress=not args.quiet)
    print_result(out, result)
    if args.json:
        write_json(args.json, result.as_dict())
    if args.plot:
        plot(args.plot, result)
    return 1 if result.error_count or not result.ok else 0


def _add_predict(commands: Any) -> None:
    predict = commands.add_parser("predict", help="send one .npy array, print or save the answer")
    predict.add_argument("--target", required=True, help="HOST:PORT of the server")
    predict.add_argument("--model", required=True, help="model name")
    predict.add_argument("--version", help="model version (default: the server's)")
    predict.add_argument("--input", required=True, type=Path, help="FILE.npy, items first")
    predict.add_argument("--output", type=Path, help="FILE.npy for the answer")
    predict.add_argument("--timeout", type=float, default=30.0, help="deadline, s (30)")
    predict.add_argument("--protocol", choices=["seed", "v2"], default="seed")
    _token_flag(predict)
    predict.set_defaults(func=_predict_command)


def _predict_command(args: argparse.Namespace) -> int:
    import numpy as np

    from torchwire.client import Client

    try:
        array = np.load(args.input)
    except (OSError, ValueError) as exc:
        print(f"torchwire predict: cannot read {args.input}: {exc}", file=sys.stderr)
        return 2
    try:
        with Client(
            args.target, timeout=args.timeout, protocol=args.protocol, token=_token(args)
        ) as client:
            answer = client.predict(args.model, array, args.version)
    except TorchwireError as exc:
        print(f"torchwire predict: {exc.code}: {exc}", file=sys.stderr)
        return 1
    if args.output:
        np.save(args.output, answer)
        print(f"wrote {args.output}: shape {list(answer.shape)}")
    else:
        with np.printoptions(threshold=50, precision=6):
            print(answer)
    return 0


def _serve_command(args: argparse.Namespace) -> int:
    # SIGHUP means "rescan the models" once serving; until its handler is installed (after
    # torch is imported, seconds from now) its default action would kill the server.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    try:
        settings = load_settings(flags)
    except ConfigError as exc:
        print(f"torchwire: {exc}", file=sys.stderr)
        return START_FAILED
    configure_logging(settings.log_level, settings.log_format)
    tune_malloc(settings.malloc_arenas, settings.malloc_keep_mb)  # before any thread of ours starts
    from torchwire.fleet.plan import engine_devices

    # Child processes under a supervisor, which loads no torch: workers, or an engine apart.
    if settings.worker_count() > 1 or engine_devices(settings):
        from torchwire.fleet import Supervisor

        return asyncio.run(Supervisor(settings).run())
    # torchwire.server imports torch: only for the command that needs it
    from torchwire.server import Server
    from torchwire.server.process.lifecycle import run_in_loop, serve_until_stopped

    return run_in_loop(settings, lambda: serve_until_stopped(Server(settings)))


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``torchwire`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
