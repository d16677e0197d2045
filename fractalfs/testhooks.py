"""Faults a test can cause in a real daemon, off unless its environment enables them.

``FRACTALFS_TEST_HOOKS=1``: on SIGUSR2 the daemon's trio loop runs pure Python for
``FRACTALFS_TEST_BUSY`` seconds (default 3) without reaching a checkpoint, as a loop
saturated by thousands of opens does: no heartbeat, no FUSE answer, no data-plane byte
moves meanwhile, while its threads (the pulse) still run. Without the variable SIGUSR2
keeps its default action and nothing here runs.

``FRACTALFS_TEST_DROP_EVENTS=kind,kind``: the daemon ignores discovery's events of these
kinds, as one whose feed missed them (a broken feed, a switched replica, a pruned log).
"""

from __future__ import annotations

import logging
import os
import signal
import time

import trio

log = logging.getLogger(__name__)

ENV = "FRACTALFS_TEST_HOOKS"
BUSY_ENV = "FRACTALFS_TEST_BUSY"
DROP_EVENTS_ENV = "FRACTALFS_TEST_DROP_EVENTS"


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def dropped_events() -> frozenset[str]:
    """The event kinds this daemon is to miss (none unless test hooks are enabled)."""
    if not enabled():
        return frozenset()
    return frozenset(k for k in os.environ.get(DROP_EVENTS_ENV, "").split(",") if k)


def busy(seconds: float) -> None:
    """Keeps the calling thread in pure Python for ``seconds`` (the GIL is still handed
    to other threads every switch interval, as with any CPU-bound code)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    seconds = float(os.environ.get(BUSY_ENV, "3"))
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        task_status.started()
        async for _ in signals:
            log.warning("test hook: the loop is busy for %.1f s", seconds)
            busy(seconds)
            log.warning("test hook: the loop runs again")
