"""Faults a test can cause in a real daemon, off unless its environment enables them.

``FRACTALFS_TEST_HOOKS=1``: on SIGUSR2 the daemon's trio loop runs pure Python for
``FRACTALFS_TEST_BUSY`` seconds (default 3) without reaching a checkpoint, as a loop
saturated by thousands of opens does (``1,1``: 1 s, one checkpoint, 1 s again): no
heartbeat, no FUSE answer, no data-plane byte moves meanwhile, while its threads (the
pulse) still run. Without the variable SIGUSR2 keeps its default action and nothing here
runs.

``FRACTALFS_TEST_DROP_EVENTS=kind,kind``: the daemon ignores discovery's events of these
kinds, as one whose feed missed them (a broken feed, a switched replica, a pruned log).

``FRACTALFS_TEST_WRITER_LOOKUP_DIES=1``: the daemon dies (SIGKILL, 0.3 s later) right
after answering a writer FIFO's LOOKUP, its own read end of the FIFO closed before the
answer: as a daemon dying between the LOOKUP and the program's open of the FIFO.

``FRACTALFS_TEST_LINGER_LOOKUP_DELAY=S``: a LOOKUP answered with a lingering reader FIFO
(closed unread, see fiforoute._reopened) is answered S seconds late, as a program whose
open reaches the FIFO only after the grace ran out (a loaded machine).

``FRACTALFS_TEST_READER_RELEASE_DELAY=S``: a reader's release (its end: done, closed,
failed) reaches discovery S seconds late, as on a loaded machine or a slow discovery: a
re-run writer registers before it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
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


WRITER_LOOKUP_DIES_ENV = "FRACTALFS_TEST_WRITER_LOOKUP_DIES"


def dies_after_writer_lookup() -> bool:
    return enabled() and os.environ.get(WRITER_LOOKUP_DIES_ENV) == "1"


def die_after_writer_lookup(fd: int) -> None:
    """Closes the daemon's read end ``fd`` of a writer FIFO (its number kept, on
    /dev/null) and SIGKILLs the daemon 0.3 s later, from a thread."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, fd)
    os.close(null)
    log.warning("test hook: the daemon dies after this writer's LOOKUP")

    def die() -> None:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=die, daemon=True).start()


LINGER_LOOKUP_DELAY_ENV = "FRACTALFS_TEST_LINGER_LOOKUP_DELAY"


async def lingering_lookup_delay() -> None:
    """Holds up a LOOKUP answered with a lingering reader FIFO (off unless enabled)."""
    if enabled() and (delay := float(os.environ.get(LINGER_LOOKUP_DELAY_ENV) or 0)):
        log.warning("test hook: a lingering FIFO's LOOKUP waits %.1f s", delay)
        await trio.sleep(delay)


READER_RELEASE_DELAY_ENV = "FRACTALFS_TEST_READER_RELEASE_DELAY"


async def reader_release_delay() -> None:
    """Holds up a reader's release to discovery (off unless enabled)."""
    if enabled() and (delay := float(os.environ.get(READER_RELEASE_DELAY_ENV) or 0)):
        log.warning("test hook: a reader's release waits %.1f s", delay)
        await trio.sleep(delay)


HOLD_HEARTBEATS_ENV = "FRACTALFS_TEST_HOLD_HEARTBEATS"
_STARTED = time.monotonic()


def heartbeats_held() -> bool:
    """For the first seconds of the process (the env's value), every heartbeat fails as
    if discovery were unreachable (off unless enabled)."""
    held = float(os.environ.get(HOLD_HEARTBEATS_ENV) or 0) if enabled() else 0.0
    return held > 0 and time.monotonic() - _STARTED < held


def busy(seconds: float) -> None:
    """Keeps the calling thread in pure Python for ``seconds`` (the GIL is still handed
    to other threads every switch interval, as with any CPU-bound code)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    phases = [float(s) for s in os.environ.get(BUSY_ENV, "3").split(",")]
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        task_status.started()
        async for _ in signals:
            log.warning("test hook: the loop is busy for %.1f s", phases[0])
            busy(phases[0])
            for seconds in phases[1:]:
                # One pass through the loop's poll: whatever became ready meanwhile (a
                # request on /dev/fuse) runs in the next batch, with this task.
                await trio.sleep(0)
                log.warning("test hook: a checkpoint, then busy again for %.1f s", seconds)
                busy(seconds)
            log.warning("test hook: the loop runs again")
