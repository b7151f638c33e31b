"""The ``torchwire`` command: ``torchwire serve`` (more subcommands come with their features)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from torchwire.config import ENV_PREFIX, ServerSettings, load_settings
from torchwire.errors import ConfigError
from torchwire.logs import configure_logging

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
    return parser


def _serve_command(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    try:
        settings = load_settings(flags)
    except ConfigError as exc:
        print(f"torchwire: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(serve(settings))


async def serve(settings: ServerSettings) -> int:
    """Serve until SIGTERM or SIGINT (a second SIGINT exits at once); return the exit code."""
    from torchwire.server import Server  # imports torch: only for the command that needs it

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def request_stop(signum: int) -> None:
        if stop.is_set():
            if signum == signal.SIGINT:  # Ctrl-C twice: the user does not want to wait
                log.warning("second SIGINT: exiting now")
                os._exit(1)
            return
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)

    server = Server(settings)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        try:
            starting.result()
        except ConfigError as exc:
            log.error("%s", exc)
            stopping.cancel()
            await server.stop(grace_s=0)
            return 2
        await stopping
    else:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
    await server.stop()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``torchwire`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
