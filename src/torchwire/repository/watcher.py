"""Watches the repository (or the ``--model`` file) and reconciles once changes have settled.

Changes are noticed by ``watchfiles`` (inotify) when it can run, and by a poll of file stamps
every ``interval_s`` in any case (a file system without inotify, a network mount). A change is
acted on only once the files are complete: their stamps (inode, size, mtime) must stay the same
for ``settle_s``; an atomic rename into place is complete at once. A burst of writes thus loads
once, with the newest files. ``trigger()`` (SIGHUP) forces a reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from torchwire.repository.repository import ModelRepository
from torchwire.repository.sources import Scanner

log = logging.getLogger(__name__)

WatchMode = Literal["auto", "poll", "off"]


async def snapshot(scanner: Scanner) -> dict[str, object]:
    """The repository's file stamps now (read off the event loop)."""
    return dict(await asyncio.to_thread(scanner.snapshot))


class RepositoryWatcher:
    """Runs until ``stop``; never dies of a bad file (the repository logs and keeps serving)."""

    def __init__(
        self,
        repository: ModelRepository,
        mode: WatchMode = "auto",
        interval_s: float = 1.0,
        settle_s: float = 0.5,
        baseline: dict[str, object] | None = None,
    ) -> None:
        """``baseline``: the stamps from before the repository was loaded (``snapshot()``);
        without it, those of when ``run`` starts, and a change made while the models loaded
        would never be noticed."""
        self.repository = repository
        self.mode = mode
        self.interval_s = interval_s
        self.settle_s = settle_s
        self._wake = asyncio.Event()
        self._forced = False
        self._stop = asyncio.Event()
        self._baseline = baseline

    def trigger(self) -> None:
        """Rescan now, even if no stamp changed (SIGHUP)."""
        self._forced = True
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def _notify(self) -> None:
        """Wake the loop on each file-system event (inotify); the poll covers the rest."""
        try:
            from watchfiles import awatch

            scanner = self.repository.scanner
            path = scanner.root or (scanner.model_file.parent if scanner.model_file else None)
            async for _ in awatch(str(path), stop_event=self._stop, debounce=50, step=25):
                self._wake.set()
        except Exception as exc:  # no inotify here: polling alone will do
            log.warning("file events unavailable (%s); polling every %.1f s", exc, self.interval_s)

    async def _snapshot(self) -> dict[str, object]:
        return await snapshot(self.repository.scanner)

    async def _settled(self, current: dict[str, object]) -> dict[str, object]:
        """Wait until the stamps stop changing for ``settle_s``; return them."""
        while not self._stop.is_set():
            await asyncio.sleep(self.settle_s)
            again = await self._snapshot()
            if again == current:
                return current
            current = again
        return current

    async def run(self) -> None:
        notifier = asyncio.create_task(self._notify()) if self.mode == "auto" else None
        applied = self._baseline if self._baseline is not None else await self._snapshot()
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval_s)
                self._wake.clear()
                if self._stop.is_set():
                    break
                current = await self._snapshot()
                if current == applied and not self._forced:
                    continue
                self._forced = False
                current = await self._settled(current)
                try:
                    await self.repository.reconcile()
                except Exception:  # a bug must not end watching
                    log.exception("reconciling the repository failed")
                applied = current
        finally:
            if notifier is not None:
                notifier.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await notifier
