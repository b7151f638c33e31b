"""One server as a process: start it, serve until told to stop, stop it in order.

SIGTERM and SIGINT ask for a graceful stop (a second SIGINT exits at once), SIGHUP rescans the
models. A worker of ``--workers N`` also stops when its supervisor goes away (``stop`` set by
its link) and tells the supervisor when it is ready (``on_ready``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from torchwire.config import ServerSettings
from torchwire.errors import ABANDONED_CALLS, DEVICE_FAILED, START_FAILED, ConfigError
from torchwire.server.process.app import Server

log = logging.getLogger("torchwire")


def run_in_loop(settings: ServerSettings, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main()`` to completion in the event loop ``--event-loop`` chose, with the GIL
    switch interval of ``--gil-switch-interval-ms`` (process-wide); return its code."""
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
        code = runner.run(main())
    if code in (ABANDONED_CALLS, DEVICE_FAILED):
        # A thread still runs a model call, or the device is broken: the interpreter's normal
        # exit would wait on or tear down torch's threads, or free device memory, under it
        # (abort). Leave at once, logs flushed.
        logging.shutdown()
        os._exit(code)
    return code


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("torchwire: --event-loop uvloop needs the uvloop package") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def serve_until_stopped(
    server: Server,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Serve until SIGTERM, SIGINT, ``stop`` or a model's device fails; return the process's
    exit code."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()

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
    loop.add_signal_handler(signal.SIGHUP, server.rescan)
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
            return DEVICE_FAILED if server.device_failed.is_set() else START_FAILED
        if on_ready is not None:
            await on_ready()
        failing = asyncio.create_task(server.device_failed.wait())
        await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        failing.cancel()
    else:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
    if not await server.stop():
        log.error("stopped, leaving a model call running (see above)")
        return ABANDONED_CALLS
    if server.device_failed.is_set():
        log.error("stopped: a model's device failed (see above)")
        return DEVICE_FAILED
    log.info("stopped")
    return 0
