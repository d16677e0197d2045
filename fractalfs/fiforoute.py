"""Writers through a kernel FIFO: the writing program's bytes never cross FUSE.

An ``S_IFIFO`` entry on a FUSE mount is a real kernel FIFO: the kernel serves its opens,
reads and writes itself and the daemon only sees the LOOKUP, which carries the opener's
pid. With entry timeout 0 every path walk looks the name up again, so the daemon can choose
per open: ``/proc/<pid>/syscall`` shows the ``open``/``openat`` being served and its flags.
A plain write-only open (``>``, ``>>``, ``open(..., "wb")``) gets a fresh FIFO inode; the
daemon registers the writer (errors fail the open), opens that FIFO's read end through a
hidden name only it may look up, and drains it in 1 MiB reads into the same
:class:`~fractalfs.edges.WriterEnd` a FUSE write feeds. Small writes (4 KiB from stdio,
``dd bs=4k``) then cost a pipe write, not a FUSE round trip.

What the kernel gives for free: a program blocked on a full pipe is killable; when the
daemon closes the read end (the reader closed early, the edge was removed, the writer was
fenced, the daemon died) the program's next write fails with EPIPE and SIGPIPE, as with any
pipe. The end: the pipe reports EOF once every holder of the write end closed it; the
opener's exit status then decides, as at a FUSE close, whether that is the stream's end or
a failed generation (:meth:`Node.release_writer`).

Everything else stays on FUSE: reads (a FIFO cannot carry an error to a reader, only data
or EOF, and a failed stream must never look complete), ``O_RDWR``, ``O_NONBLOCK`` and
``O_SYNC``/``O_DSYNC`` opens, and ``dd conv=fsync``/``fdatasync`` (fsync of a pipe fails with
EINVAL; a regular file's result is what those programs expect).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
from typing import TYPE_CHECKING

import trio

from .edges import EdgeError, WriterEnd

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

HIDDEN = b".fifo-"  # + inode number: the daemon's own way to the FIFO it handed out
CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
OPENER_CHECK = 1.0  # seconds between checks that the opener did open the FIFO

# (syscall number -> index of its flags argument) by machine: open, openat (openat2 passes
# a struct: not followed, such opens stay on FUSE).
_OPENS = {
    "x86_64": {2: 1, 257: 2},
    "aarch64": {56: 2},
}.get(os.uname().machine, {})


def open_flags(pid: int) -> int | None:
    """The flags of the open(2)/openat(2) that ``pid`` (a thread id, as FUSE gives it) is
    inside right now, or None if it is in no such call."""
    try:
        with open(f"/proc/{pid}/syscall", "rb") as f:
            fields = f.read().split()
        where = _OPENS.get(int(fields[0]))
        if where is None:
            return None
        return int(fields[1 + where], 16)
    except (OSError, ValueError, IndexError):
        return None


def _fsyncs(pid: int) -> bool:
    """dd told to fsync its output (conv=fsync, conv=fdatasync)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if not argv or os.path.basename(argv[0]) != b"dd":
        return False
    return any(a.startswith(b"conv=") and b"sync" in a for a in argv[1:])


def wants_fifo_writer(pid: int) -> bool:
    """Whether the open ``pid`` is making should get a FIFO (a plain write-only open)."""
    flags = open_flags(pid)
    if flags is None or flags & os.O_ACCMODE != os.O_WRONLY:
        return False
    if flags & (os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC | os.O_DIRECT):
        return False
    return not _fsyncs(pid)


def is_own_thread(tid: int) -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/task/{tid}")


def _holds(pid: int, name: str) -> bool | None:
    """Whether ``pid`` has the edge ``name`` open, is still opening (None), or neither."""
    if _has_open(pid, name):
        return True
    return None if open_flags(pid) is not None else False


def _has_open(pid: int, name: str) -> bool:
    """Whether ``pid`` holds a file of edge ``name``. By link text only: a stat through
    the link would be a request to this very daemon, from the thread that must answer it."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("/" + name):
                return True
    return False


class Fifo:
    """One FIFO handed out to a writer's open, and the daemon's read end of it."""

    def __init__(self, writer: WriterEnd, ino: int, path: str) -> None:
        self.writer, self.ino, self.path = writer, ino, path
        self.fd: int | None = None
        self.done = False

    def unopened_by(self, pid: int) -> bool:
        """True while no program opened this FIFO yet, and ``pid`` did not either: a second
        LOOKUP in the same open (the kernel revalidates a cached regular-file entry, finds
        another inode and looks the name up afresh) must get the same FIFO, not a second
        writer registration."""
        if self.done or pid != self.writer.pid:
            return False
        if self.fd is None:
            return True  # no read end yet: no writer's open can have completed
        ready = select.poll()
        ready.register(self.fd, select.POLLIN | select.POLLHUP)
        if ready.poll(0):
            return False  # a writer came (bytes, or it came and went)
        return not _has_open(pid, self.writer.edge.hex)


async def drain(node: Node, fifo: Fifo) -> None:
    """Feeds the FIFO's bytes to ``writer`` until every writing program closed it, then
    ends the writer as a FUSE close would. Closing the read end early (any error) gives
    the program EPIPE/SIGPIPE."""
    writer = fifo.writer
    writer.interrupt_pid = 0  # nobody waits in our handler: signals are the kernel's
    try:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        fd = fifo.fd = await trio.to_thread.run_sync(os.open, fifo.path, flags)
    except OSError as exc:
        log.warning("edge %s: cannot open the writer's FIFO: %s", writer.edge, exc)
        writer.exit_status = 9  # never had its bytes: a failed generation
        fifo.done = True
        node.release_writer(writer)
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        seen = False
        while True:
            # Never read before poll says so: a FIFO no writer opened yet reads as EOF,
            # and the kernel reports hang-up only once a writer came and went.
            with trio.move_on_after(OPENER_CHECK) as idle:
                await trio.lowlevel.wait_readable(fd)
            if idle.cancelled_caught:
                if not seen:
                    holds = _holds(writer.pid, writer.edge.hex)
                    if holds is False:  # its open failed, or it went without opening
                        log.info("edge %s: the opener never opened its FIFO", writer.edge)
                        writer.exit_status = 9  # not an (empty) end: a failed generation
                        return
                    seen = holds is True
                continue
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                continue
            if not data:
                break
            seen = True
            await _write_all(node, writer, data)
        await node.flush_writer(writer)
    except EdgeError as exc:
        if exc.errno != errno.EPIPE:
            log.info("edge %s: writer FIFO: %s", writer.edge, exc)
    finally:
        fifo.done = True
        os.close(fd)  # the program's next write: EPIPE/SIGPIPE
        node.release_writer(writer)


async def _write_all(node: Node, writer: WriterEnd, data: bytes) -> None:
    while data:
        try:
            n = await node.write(writer, data)
        except EdgeError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        data = data[n:]
