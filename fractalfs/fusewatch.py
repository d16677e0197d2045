"""Keeps the daemon's loop out of a read of ``/dev/fuse`` that has nothing to read.

pyfuse3 waits (in trio) for ``/dev/fuse`` to be readable, then reads it with a blocking
``read(2)`` in the loop's thread. A request can leave the kernel's queue in between: one
not yet read is dropped when its program is killed (SIGKILL, or a fatal SIGINT while its
open or stat waits), and a FUSE_INTERRUPT is dropped when the request it names is answered.
Trio runs the tasks woken by one poll in one batch; if another task of that batch runs first
and takes long enough (a busy loop, or the daemon itself killing a FIFO's readers), the
read that follows finds the queue empty and blocks the whole loop until some program makes
another request: no data-plane byte, no heartbeat, no keeper ping meanwhile (the pulse
stops after ``LOOP_STALL``: the node is declared lost). Measured with the test hook: 4 of 8
rounds blocked.

The read holds the GIL (pyfuse3 does not release it around the read): no thread of ours
can run, not even the pulse. The kernel can still interrupt it: an interval timer sends the
process :data:`SIGNAL` every :data:`EVERY` seconds; its handler does nothing and is
installed without ``SA_RESTART`` (as Python installs every handler), so a read waiting on
an empty queue fails with ``EINTR``, which libfuse passes up and pyfuse3 takes as "wait
for readable again". The signal goes to the main thread (the loop's) unless it blocks it;
any other system call it hits is retried by Python (PEP 475), trio or SQLite. Cost: a few
wakeups of the loop a second.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

EVERY = 0.2  # seconds between interrupts: the longest such a read can hold the loop
SIGNAL = signal.SIGALRM  # what ITIMER_REAL sends
READ = "0"  # read(2) on x86-64 and arm64 as /proc/<pid>/syscall shows it (for tests)


def reading(text: str, fds: set[int]) -> bool:
    """``text`` (a ``/proc/.../syscall`` line) shows a thread blocked in ``read`` of one
    of ``fds``."""
    parts = text.split()
    if len(parts) < 2 or parts[0] != READ:
        return False
    try:
        return int(parts[1], 16) in fds
    except ValueError:
        return False


class FuseWatch:
    """Started from the loop's thread (the main thread: signal handlers are installed
    there) once the session's device is open; :meth:`stop` before it closes."""

    def __init__(self, every: float = EVERY) -> None:
        self.every = every
        self.on = False

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("the loop runs outside the main thread: no FUSE read interrupts")
            return
        signal.signal(SIGNAL, _ignore)  # a handler, not SIG_IGN: the read must see EINTR
        signal.setitimer(signal.ITIMER_REAL, self.every, self.every)
        self.on = True

    def stop(self) -> None:
        if self.on:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            self.on = False


def _ignore(signum: int, frame: object) -> None:
    return None
