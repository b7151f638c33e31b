"""aiohttp's ``AppRunner`` takes the grace period of its shutdown at construction only
(``shutdown_timeout``), before torchwire knows the stop's remaining grace: set it later."""

from __future__ import annotations

from aiohttp import web


def set_shutdown_timeout(runner: web.AppRunner, seconds: float) -> bool:
    """Give requests in flight ``seconds`` to finish when ``runner.cleanup()`` stops the site;
    False where this aiohttp keeps it elsewhere (its own timeout then applies)."""
    if not hasattr(runner, "_shutdown_timeout"):
        return False
    runner._shutdown_timeout = seconds
    return True
