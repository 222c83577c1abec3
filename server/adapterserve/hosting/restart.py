"""The one restart policy of both modes: an engine that died is started again until a
start succeeds, waiting between tries as its back-off says (at once the first time, then
doubling while it keeps dying soon after each start; hosting/backoff.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from adapterserve.config import Settings

from .backoff import Backoff
from .protocol import Engine

log = logging.getLogger(__name__)


def backoff_for(settings: Settings) -> Backoff:
    return Backoff(settings.engine_restart_backoff_s, settings.engine_restart_backoff_max_s)


async def start_again(
    name: str, start_new: Callable[[], Awaitable[Engine]], backoff: Backoff, on_failure: Callable[[str], None],
) -> Engine:
    """The new engine, once `start_new()` gives one; each failed try is reported to
    `on_failure` (the host shows it as the reason the engine is down) and tried again."""
    while True:
        await asyncio.sleep(backoff.wait_s())
        backoff.started()
        try:
            return await start_new()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # tried again after the back-off, whatever the failure was
            on_failure(f"restart failed: {exc}")
            log.error("engine %s did not restart: %s", name, exc)
