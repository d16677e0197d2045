"""Writers through a kernel FIFO: the writing program's bytes never cross FUSE.

An ``S_IFIFO`` entry on a FUSE mount is a real kernel FIFO: the kernel serves its opens,
reads and writes itself and the daemon only sees the LOOKUP, which carries the opener's
pid. With entry timeout 0 every path walk looks the name up again, so the daemon can choose
per open: ``/proc/<pid>/syscall`` shows the ``open``/``openat`` being served and its flags.
A plain write-only open (``>``, ``>>``, ``open(..., "wb")``) gets a fresh FIFO inode; the
daemon has its keeper process open that FIFO's read end (``MOUNT/.fifo/<ino>``, a name
only the keeper may look up), registers the writer (errors fail the open), and drains the
FIFO in 1 MiB reads into the same
:class:`~fractalfs.edges.WriterEnd` a FUSE write feeds. Small writes (4 KiB from stdio,
``dd bs=4k``) then cost a pipe write, not a FUSE round trip.

What the kernel gives for free: a program blocked on a full pipe is killable; when the
daemon closes the read end (the reader closed early, the edge was removed, the writer was
fenced, the daemon died) the program's next write fails with EPIPE and SIGPIPE, as with any
pipe. The end: the pipe reports EOF once every holder of the write end closed it; the
opener's exit status then decides, as at a FUSE close, whether that is the stream's end or
a failed generation (:meth:`Node.release_writer`).

Readers (``fifo_readers``, on by default) take the same route the other way: a plain
read-only open gets a fresh FIFO inode, the keeper opens its write end the same way and
the daemon pours the reader's stream into it (:func:`feed`). A FIFO cannot carry an error,
only data or EOF, and a failed stream must never look complete: where a FUSE reader gets an
errno, every holder of the FIFO's read end is killed (SIGKILL) before the write end closes,
and a keeper process (:mod:`fractalfs.fifokeeper`) does the same if the daemon dies.

Everything else stays on FUSE: ``O_RDWR``, ``O_NONBLOCK`` and
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
import signal
import termios
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from . import fifokeeper, procs
from .dataplane import Arenas
from .edges import EdgeError, ReaderEnd, ReaderState, WriterEnd, WriterState
from .writerstate import Exited, Running

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
#: A writer FIFO is read into reused 1 MiB arenas, never into a fresh buffer per read: a
#: 1 MiB ``os.read`` allocates (mmap), faults in and frees its buffer every time, which
#: cost more than the copy at 64 KiB writes (perf: page faults, clear_page, munmap).
#: The writer end keeps views of the arenas until the reader acknowledged them; an arena
#: is filled again only once no view of it is left (:class:`~fractalfs.dataplane.Arenas`).
MIN_READ = 64 * 1024  # an arena with less room than this is retired
F_SETPIPE_SZ = 1031
CLOSE_GRACE = 0.25  # how long a closed reader FIFO waits to see its program exit
OPENER_CHECK = 1.0  # seconds between checks that the opener did open the FIFO
#: A full window waits this long for the reader's ACK before it also watches the opener
#: (whose failure, while the window stays full, ends the drain: see _write_all).
ROOM_WAIT = 0.05

# (syscall number -> index of its flags argument) by machine: open, openat (openat2 passes
# a struct: not followed, such opens stay on FUSE).
_OPENS = {
    "x86_64": {2: 1, 257: 2},
    "aarch64": {56: 2},
}.get(os.uname().machine, {})


def _syscall(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/syscall`` (None: no such thread)."""
    try:
        with open(f"/proc/{pid}/syscall", "rb") as f:
            return f.read().split()
    except OSError:
        return None


def opening(pid: int) -> bool | None:
    """Whether the thread ``pid`` is inside open(2)/openat(2): True; in another call, or
    gone: False; None: it is not blocked in any call, so the kernel does not say which
    (``/proc/<pid>/syscall`` reads "running": on a CPU, or preempted and runnable, which on
    a loaded machine may last long *inside* an open whose LOOKUP was answered)."""
    fields = _syscall(pid)
    if fields is None:
        return False
    if not fields or fields[0] == b"running":
        return None
    try:
        return int(fields[0]) in _OPENS
    except ValueError:
        return None


def open_flags(pid: int) -> int | None:
    """The flags of the open(2)/openat(2) that ``pid`` (a thread id, as FUSE gives it) is
    inside right now, or None if it is in no such call."""
    try:
        fields = _syscall(pid) or []
        where = _OPENS.get(int(fields[0]))
        if where is None:
            return None
        return int(fields[1 + where], 16)
    except (ValueError, IndexError):
        return None


#: Programs that stat a path, open it and refuse the file unless fstat shows the same
#: inode (coreutils copy.c: "skipping file ..., as it was replaced while being copied"):
#: a reader FIFO is another inode than the regular file that stat shows.
SAME_INODE_CHECKERS = frozenset({b"cp", b"mv", b"install"})


def _argv0(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0", 1)[0])
    except OSError:
        return b""


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


def wants_fifo_reader(flags: int | None) -> bool:
    """Whether an open with ``flags`` (:func:`open_flags`) should get a reader FIFO: a
    read-only open (not ``O_PATH``, ``O_DIRECTORY``, ``O_CREAT``, ``O_TRUNC``, nor
    ``O_DIRECT``: a FIFO's open refuses it with EINVAL, the regular file reads)."""
    if flags is None or flags & os.O_ACCMODE != os.O_RDONLY:
        return False
    return not flags & (os.O_PATH | os.O_DIRECTORY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)


def stays_on_fuse(pid: int) -> bool:
    """Readers that must see the regular file: see SAME_INODE_CHECKERS."""
    return _argv0(pid) in SAME_INODE_CHECKERS


def wants_fifo_writer(pid: int, flags: int | None) -> bool:
    """Whether the open ``pid`` is making (with ``flags``, :func:`open_flags`) should get a
    FIFO (a plain write-only open)."""
    if flags is None or flags & os.O_ACCMODE != os.O_WRONLY:
        return False
    if flags & (os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC | os.O_DIRECT):
        return False
    return not _fsyncs(pid)


def is_own_child(pid: int) -> bool:
    """Whether ``pid`` is a child process of this daemon (its warm-up of ``.fifo``)."""
    return procs.parent(pid) == os.getpid()


def is_own_thread(tid: int) -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/task/{tid}")


def _holds(pid: int, name: str, waited: float) -> bool | None:
    """Whether ``pid`` has the edge ``name`` open for writing, may still be opening (None:
    inside its open, or seen only "running" for less than RUNNING_FOR after ``waited``
    seconds), or neither."""
    if procs.holds_file(pid, name, writing=True):
        return True
    state = opening(pid)
    if state is True or (state is None and waited < RUNNING_FOR):
        return None
    return False


class Fifo:
    """One FIFO handed out to a writer's open, and the daemon's read end of it."""

    def __init__(self, writer: WriterEnd, ino: int, path: str) -> None:
        self.writer, self.ino, self.path = writer, ino, path
        self.fd: int | None = None
        self.done = False
        #: Called before each write into the end; an EdgeError ends the drain (the uid's
        #: spill limit, see Operations._fifo_writer).
        self.check: Callable[[], None] = lambda: None
        #: Called once the program holds the FIFO, or the drain ends: the keeper lets go
        #: of its read end (fifokeeper.Keeper.drain_held).
        self.held: Callable[[], None] = lambda: None

    def hung_up(self) -> bool:
        """The drain runs on, and every program that wrote into the FIFO closed it."""
        if self.done or self.fd is None:
            return False
        ready = select.poll()
        ready.register(self.fd, select.POLLIN | select.POLLHUP)
        try:
            return any(ev & select.POLLHUP for _, ev in ready.poll(0))
        except OSError:
            return False

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
        mnt = procs.mount_id(self.fd)
        return not procs.holds_file(pid, self.writer.edge.hex, self.ino, mnt, writing=True)


async def drain(node: Node, fifo: Fifo) -> None:
    """Feeds the FIFO's bytes to ``writer`` until every writing program closed it, then
    ends the writer as a FUSE close would. Closing the read end early (any error) gives
    the program EPIPE/SIGPIPE."""
    writer = fifo.writer
    writer.interrupt_pid = 0  # nobody waits in our handler: signals are the kernel's
    fd = fifo.fd
    assert fd is not None  # opened (by the keeper) before the LOOKUP was answered
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        seen = False
        since = trio.current_time()
        arenas = Arenas.covering(writer.window, CHUNK)
        while True:
            # Never read before poll says so: a FIFO no writer opened yet reads as EOF,
            # and the kernel reports hang-up only once a writer came and went.
            with trio.move_on_after(OPENER_CHECK) as idle:
                await trio.lowlevel.wait_readable(fd)
            if idle.cancelled_caught:
                arenas.trim()  # nothing written for OPENER_CHECK: no spares kept idle
                if not seen:
                    holds = _holds(writer.pid, writer.edge.hex, trio.current_time() - since)
                    if holds is False:  # its open failed, or it went without opening
                        log.info("edge %s: the opener never opened its FIFO", writer.edge)
                        writer.exit_status = 9  # not an (empty) end: a failed generation
                        return
                    seen = holds is True
                    if seen:
                        fifo.held()
                continue
            if arenas.room < MIN_READ:
                arenas.next()
            at = arenas.fill
            try:
                n = os.readv(fd, [memoryview(arenas.buf)[at:]])
            except BlockingIOError:
                continue
            if not n:
                break
            if not seen:
                seen = True
                fifo.held()
            arenas.fill += n
            fifo.check()
            status = await _write_all(node, writer, memoryview(arenas.buf)[at : at + n])
            if status is not None:
                log.info("edge %s: the writing program failed (status %d)", writer.edge, status)
                writer.exit_status = status
                return
        await node.flush_writer(writer)
    except EdgeError as exc:
        # Bytes the program wrote were not taken: the stream is cut short whatever its exit
        # (``printf x > E`` exits 0 before they are drained): a failed generation, never
        # one "complete" at the length taken, which a re-run reader would get as whole.
        writer.exit_status = signal.SIGPIPE
        if exc.errno != errno.EPIPE:
            # The program sees only EPIPE: the log names the errno it stands for.
            log.warning("edge %s: writer FIFO: %s (%s)", writer.edge, exc, os.strerror(exc.errno))
    finally:
        fifo.done = True
        fifo.held()  # (again: harmless) the keeper's read end goes first
        os.close(fd)  # the program's next write: EPIPE/SIGPIPE
        node.release_writer(writer)


async def _write_all(node: Node, writer: WriterEnd, data: memoryview) -> int | None:
    """Hands ``data`` to the writer end. None: done; a wait status: while the end was full
    (window or spill), the program that opened the FIFO exited with that failure status.

    Its bytes still in the pipe are then dropped, as a FUSE write interrupted by the kill
    is: the generation failed, and waiting for window space to drain them held the end
    open, so a re-run got EBUSY (``test_a_rerun_may_open_while_the_killed_program_is_
    still_exiting``)."""
    while data:
        full = writer.end - writer.acked >= writer.window or writer.spilling
        if full and not writer.spilling:
            # At full speed the window is full at nearly every chunk and the reader's next
            # ACK opens it within milliseconds: wait for that alone. A watcher task and its
            # nursery per chunk (below) made this function 10% of the writer's daemon's
            # time holding the GIL at bs=1M (py-spy); 6% with this wait first.
            with trio.move_on_after(ROOM_WAIT):
                while (
                    writer.end - writer.acked >= writer.window
                    and writer.state is WriterState.OPEN
                    and not writer.reader_closed
                    and not writer.spilling
                ):
                    await writer.changed.wait()
            full = writer.end - writer.acked >= writer.window or writer.spilling
        n = 0
        try:
            if not full:
                n = await node.write(writer, data)
            else:
                error: EdgeError | None = None
                async with trio.open_nursery() as nursery:
                    failed: list[int] = []
                    nursery.start_soon(_opener_failed, node, writer, failed, nursery.cancel_scope)
                    try:
                        n = await node.write(writer, data)
                    except EdgeError as exc:
                        error = exc  # raised in here it would leave as an ExceptionGroup
                    nursery.cancel_scope.cancel()
                if failed:
                    return failed[0]
                if error is not None:
                    raise error
        except EdgeError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        data = data[n:]
    return None


async def _opener_failed(
    node: Node, writer: WriterEnd, failed: list[int], scope: trio.CancelScope
) -> None:
    """Cancels ``scope`` once the writer's program exited with a failure status."""
    while True:
        status = node.exits.status(writer.tgid)
        if status is not None and status != 0:
            failed.append(status)
            scope.cancel()
            return
        with trio.move_on_after(node.config.signal_poll):
            await node.exits.changed.wait()


# -- readers ------------------------------------------------------------------------------

RUNNING_FOR = 10.0  # seconds an opener seen only "running" may take to hold its FIFO
OPEN_NAP = 0.02  # longest pause between tries to open a reader FIFO's write end
CONSUMED_POLL = 0.005  # how often the end of a stream checks its pipe for unread bytes
REOPEN_POLL = 0.005  # how often a lingering FIFO looks for its new reader
#: Bulk data goes into the pipe up to page boundaries of the stream, so a program reading
#: records never sees a pipe holding a fraction of a page while more is on the way: GNU
#: tar takes a read that is no multiple of 512 for a broken archive ("Unaligned block"), and
#: on a `mkfifo` FIFO its writer's page-sized writes spare it that. A tail that is not page
#: aligned waits TAIL_WAIT seconds for more; small writes (lines) pass at once.
PAGE = 4096
TAIL_WAIT = 0.02


def fionread(fd: int) -> int:
    """Bytes in the pipe of ``fd`` that no reader took yet (FIONREAD works on either end)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, "little")


_DONE, _OPENED, _LINGERING = 1, 2, 4  # FifoReader's flags


class FifoReader:
    """One FIFO handed out to a reader's open, and the daemon's write end of it."""

    # Its three flags are bits of one int (``done``, ``opened``, ``lingering``): a slot
    # each was 8 bytes per waiting reader.
    __slots__ = (
        "_flags",
        "fd",
        "hold",
        "ino",
        "parked_in",
        "pending",
        "reader",
        "reopeners",
        "reserved",
        "uid",
    )

    def __init__(
        self, reader: ReaderEnd, ino: int, ends: tuple[int, int], uid: int = 0, reserved: int = 0
    ) -> None:
        # No path kept (it is MOUNT/.fifo/<ino>, used only by the keeper's open): a
        # string of ~90 bytes per waiting reader.
        self.reader, self.ino = reader, ino
        # Who opened it and the memory counted against that uid (the read buffer and the
        # pipe): what a FUSE handle holds, kept here (a Handle, its map entry and key were
        # ~140 bytes per waiting reader).
        self.uid, self.reserved = uid, reserved
        self.hold: int | None = ends[0]  # a stand-in reader until the program opened
        self.fd: int | None = ends[1]  # the write end
        self._flags = 0  # opened: the program's open was seen (or given up on); done
        self.pending = 0  # bytes taken from the reader end, not yet in the pipe
        self.parked_in: IdleFifos | None = None  # waiting for its first byte with no task
        # lingering: closed unread, the next reading open gets it (_reopened)
        #: Threads whose LOOKUP got this FIFO while it lingered: each may still be between
        #: that answer and the kernel's open of the FIFO (see _late_reopen). None until
        #: one does: an empty set is 216 bytes, and a daemon holds a FifoReader per
        #: waiting reader.
        self.reopeners: set[int] | None = None

    def _flag(self, bit: int, on: bool) -> None:
        self._flags = self._flags | bit if on else self._flags & ~bit

    @property
    def done(self) -> bool:
        return bool(self._flags & _DONE)

    @done.setter
    def done(self, on: bool) -> None:
        self._flag(_DONE, on)

    @property
    def opened(self) -> bool:
        return bool(self._flags & _OPENED)

    @opened.setter
    def opened(self, on: bool) -> None:
        self._flag(_OPENED, on)

    @property
    def lingering(self) -> bool:
        return bool(self._flags & _LINGERING)

    @lingering.setter
    def lingering(self, on: bool) -> None:
        self._flag(_LINGERING, on)

    def wake(self) -> None:
        """Its reader end changed (see :meth:`IdleFifos.park`)."""
        idle = self.parked_in
        if idle is not None:
            idle.wake(self)

    def unopened_by(self, pid: int) -> bool:
        """True while the program ``pid`` has not opened this FIFO yet: a second LOOKUP of
        the same open must get the same FIFO (see :meth:`Fifo.unopened_by`)."""
        if self.done or self.opened or pid != self.reader.pid:
            return False
        mnt = procs.mount_id(self.fd) if self.fd is not None else None
        return not procs.holds_file(pid, self.reader.edge.hex, self.ino, mnt)

    def backlog(self) -> int:
        fd = self.fd
        return self.pending + (fionread(fd) if fd is not None else 0)


FIFO_DIR = b".fifo"  # the daemon's directory of reader FIFOs (see prepare)
PREPARE_FOR = 1.0  # seconds a LOOKUP waits for the write end; then the open stays on FUSE


class Opening:
    """A reader FIFO's write end being opened (:func:`prepare`, in a worker thread) while
    the program's LOOKUP waits at most ``PREPARE_FOR`` for it (:meth:`settle`)."""

    def __init__(self, ino: int, path: str, name: str) -> None:
        self.ino, self.path, self.name = ino, path, name
        self._lock = threading.Lock()
        self._ends: tuple[int, int] | None = None  # (stand-in reader, write end)
        self._abandoned = False
        self.failure: OSError | None = None

    def settle(self) -> tuple[int, int] | None:
        """The ends if they are open; else None, and ends opened later are let go."""
        with self._lock:
            self._abandoned = True
            return self._ends


def prepare(opening: Opening, keeper: fifokeeper.Keeper) -> None:
    """Opens the FIFO's write end before the program's LOOKUP is answered, so that its open
    finds a writer: a blocking open does not wait, and a non-blocking one (gzip opens
    ``O_NONBLOCK``, then clears it) does not read EOF before the daemon came. A write-only
    open needs a reader: a read-write one (Linux allows it on a FIFO) stands in until the
    program has opened (:func:`_await_opener`).

    The keeper process opens both (:meth:`fifokeeper.Keeper.open_fifo`), never a thread of
    the daemon: a daemon killed while its own thread waits in a request to its own mount
    cannot exit. Runs in a worker thread while the loop waits in the program's LOOKUP. The
    kernel serialises the lookups of one directory (``fuse_lock_inode``) and the program's
    LOOKUP holds the root's: the path is ``MOUNT/.fifo/<ino>``, whose ``.fifo`` entry the
    kernel keeps cached (see Operations.warm_fifo_dir), so only ``.fifo``'s own lock is
    taken."""
    try:
        ends = keeper.open_fifo(opening.path, opening.ino, opening.name)
    except OSError as exc:
        opening.failure = exc
        return
    with opening._lock:
        if not opening._abandoned:
            opening._ends = ends
            return
    let_go(ends, opening.ino, keeper)


def let_go(ends: tuple[int, int], ino: int, keeper: fifokeeper.Keeper) -> None:
    """Closes a reader FIFO no program got (the write end is the keeper's to close)."""
    os.close(ends[0])
    keeper.done(ino)


async def _await_opener(fifo: FifoReader) -> bool:
    """Waits until the program holds its read end, then lets the stand-in reader go (from
    then on POLLERR on the write end means no program reads any more). False: it never
    opened it (its open failed, or it went)."""
    reader = fifo.reader
    name = reader.edge.hex
    nap, start, absent = 0.0002, trio.current_time(), 0
    opened = False
    mnt = procs.mount_id(fifo.fd) if fifo.fd is not None else None
    while True:
        # The process's descriptors: the opening thread (``reader.pid``) may be gone while
        # the program holds its read end (a worker thread opened it, then exited).
        if procs.holds_file(reader.tgid, name, fifo.ino, mnt):
            opened = True
            break
        await trio.sleep(nap)
        nap = min(2 * nap, OPEN_NAP)
        waited = trio.current_time() - start
        if waited > 0.2:
            state = opening(reader.pid)
            if state is True:
                absent = 0
            elif state is False or waited > RUNNING_FOR:
                absent += 1
            # None: running, maybe still inside its open on a loaded machine: not absent
            # (about 300 of 10,000 readers were taken for gone and killed that way).
            if absent >= 3:
                break
    fifo.opened = True
    if fifo.hold is not None:
        os.close(fifo.hold)
        fifo.hold = None
    return opened


class IdleFifos:
    """Reader FIFOs opened by their program whose stream has no byte yet, waiting with no
    task: thousands of readers wait for writers that come later, and a pour task each (a
    trio task blocked on the end, another on the write end's hang-up, a nursery, their
    frames) was most of what a waiting reader cost the daemon. A parked FIFO is woken,
    and its pour task started (``wake``), by the first change of its reader end (bytes,
    the end, a failure, a close: :meth:`Notifier.call_once`) or by its program closing
    the read end (POLLERR on the write end, seen by one epoll set for all of them). While
    :meth:`run` is not running nothing is parked (each FIFO keeps its pour task)."""

    def __init__(
        self, wake: Callable[[FifoReader], None], stop: Callable[[FifoReader], None]
    ) -> None:
        self._wake = wake  # starts the pour task of a woken FIFO
        self._stop = stop  # lets go of a FIFO still parked when the daemon stops
        self._epoll: select.epoll | None = None
        # Indexed by write end: descriptors are small and dense, and a list slot is 8
        # bytes where a dict entry was ~37 per waiting reader. Trailing Nones are cut.
        self._parked: list[FifoReader | None] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _at(self, fd: int) -> FifoReader | None:
        return self._parked[fd] if 0 <= fd < len(self._parked) else None

    def park(self, fifo: FifoReader) -> bool:
        """Parks ``fifo`` if its stream has no byte yet (False: it pours now)."""
        reader, fd, epoll = fifo.reader, fifo.fd, self._epoll
        if epoll is None or fd is None or reader.received or not reader.waiting():
            return False
        epoll.register(fd, 0)  # EPOLLERR (no reader left) is reported without asking
        parked = self._parked
        if fd >= len(parked):
            parked.extend([None] * (fd + 1 - len(parked)))
        parked[fd] = fifo
        self._count += 1
        fifo.parked_in = self
        reader.changed.call_once(fifo)
        return True

    def wake(self, fifo: FifoReader) -> None:
        fd = fifo.fd
        if fd is None or self._at(fd) is not fifo:
            return
        parked = self._parked
        parked[fd] = None
        self._count -= 1
        while parked and parked[-1] is None:
            parked.pop()
        fifo.parked_in = None
        if self._epoll is not None:
            self._epoll.unregister(fd)
        self._wake(fifo)

    async def run(self) -> None:
        with select.epoll() as epoll:
            self._epoll = epoll
            try:
                while True:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                    for fd, _ in epoll.poll(0):
                        fifo = self._at(fd)
                        if fifo is not None:
                            self.wake(fifo)
            finally:
                self._epoll = None
                parked, self._parked, self._count = self._parked, [], 0
                for fifo in parked:
                    if fifo is None:
                        continue
                    fifo.parked_in = None
                    fifo.reader.changed.call_once(None)
                    self._stop(fifo)


async def feed(
    node: Node, fifo: FifoReader, keeper: fifokeeper.Keeper, idle: IdleFifos | None = None
) -> bool:
    """Pours the reader's stream into the FIFO until it is complete *and* consumed (then
    EOF), the program closed its read end (an early close or a failure, decided from how
    it ended, as a FUSE release does), or the stream failed (every holder of the read end
    is killed: a FIFO cannot carry the errno, and EOF would look like the end).

    True: the FIFO was parked in ``idle`` (its stream had no byte yet) and this task
    ends; waking it starts :func:`resume`, which pours and lets go of it."""
    reader = fifo.reader
    reader.interrupt_pid = 0  # nobody waits in our handler: signals are the kernel's
    node.exits.watch(reader.tgid, reader)
    settled = False  # the stream's fate is decided: the keeper may let the write end go
    parked = False
    reader.exit_status = 9  # until decided otherwise: a failure, never "no more"
    try:
        opened = fifo.fd is not None and await _await_opener(fifo)
        if not opened or fifo.fd is None:
            log.info("edge %s: the opener never opened its FIFO", reader.edge)
            if fifo.fd is not None:
                # Never EOF to a program we did not see open it (a holder we missed, or
                # one that got the descriptor since): whoever holds it dies instead.
                await trio.to_thread.run_sync(
                    fifokeeper.kill_holders,
                    reader.edge.hex,
                    fifo.ino,
                    procs.mount_id(fifo.fd),
                )
            settled = True
            # Seen or not, a program that opened it and went at once (``: < E``) ends the
            # stream early if it exits as one that closed early does (status 0, SIGPIPE,
            # ...); one whose open failed exits non-zero, and one running on may still
            # read (not "no more": the stream stays for another reader).
            outcome = await node.exits.outcome(reader.tgid, 0)
            if isinstance(outcome, Exited) and procs.reader_closed_early(outcome.status):
                log.info("edge %s: the opener exited (status %d)", reader.edge, outcome.status)
                reader.exit_status = outcome.status
            return False
        if idle is not None and idle.park(fifo):
            parked = True
            return True
        settled = await _stream(node, fifo, fifo.fd)
        return False
    finally:
        if not parked:
            finish(node, fifo, keeper, settled)


async def resume(node: Node, fifo: FifoReader, keeper: fifokeeper.Keeper) -> None:
    """The pour task of a FIFO woken in :class:`IdleFifos`."""
    settled = False
    try:
        if fifo.fd is not None:
            settled = await _stream(node, fifo, fifo.fd)
    finally:
        finish(node, fifo, keeper, settled)


async def _stream(node: Node, fifo: FifoReader, fd: int) -> bool:
    """Pours the stream into the opened FIFO and decides how it ended (see :func:`feed`);
    True once decided (the keeper may let the write end go)."""
    reader = fifo.reader
    reader.backlog = fifo.backlog  # (not while parked: nothing was poured yet)
    result = await _pour(node, fifo, fd)
    if result is True:
        reader.exit_status = 0
    elif result is False:
        reader.exit_status = await _how_it_ended(node, reader.tgid)
        log.info(
            "edge %s: the reading program closed its FIFO with %d bytes unread (status %s)",
            reader.edge,
            fifo.backlog(),
            reader.exit_status,
        )
    else:
        killed = await trio.to_thread.run_sync(
            fifokeeper.kill_holders, reader.edge.hex, fifo.ino, procs.mount_id(fd)
        )
        log.warning(
            "edge %s: reader FIFO: %s; killed %d reading program(s)",
            reader.edge,
            result,
            killed,
        )
    return True


def finish(node: Node, fifo: FifoReader, keeper: fifokeeper.Keeper, settled: bool) -> None:
    """Lets go of the FIFO (EOF to its program only if the stream was complete and
    consumed) and releases its reader end. ``settled`` False (the daemon stops): the
    keeper kills the programs holding it."""
    reader = fifo.reader
    fifo.done = True
    if fifo.hold is not None:
        os.close(fifo.hold)
        fifo.hold = None
    poured = reader.delivered
    if fifo.fd is not None:
        reader.delivered = reader.consumed
        reader.backlog = None
        # The write end is the keeper's (it hands it to a replacement keeper): done()
        # closes it (EOF now only if the stream was complete and consumed), under its lock,
        # so that no replacement is ever handed its number once reused. Not settled
        # (cancelled: the daemon stops): it stays open, and the keepers kill the readers.
        if settled:
            keeper.done(fifo.ino)
        fifo.fd = None
    node.exits.forget(reader.tgid, reader)
    if poured or not settled:
        node.release_reader(reader)
    else:  # nothing of it left the end: a reopen may take it over
        node.linger_reader(reader)


async def _pour(node: Node, fifo: FifoReader, fd: int) -> bool | EdgeError:
    """True: every byte and the end were consumed; False: every read end closed first;
    an EdgeError: the stream failed."""
    reader = fifo.reader
    result: bool | EdgeError = False

    async def hang_up(scope: trio.CancelScope) -> None:
        # The write end is never readable: epoll reports only POLLERR (no reader left).
        await trio.lowlevel.wait_readable(fd)
        while await _reopened(node, fifo, fd):
            await trio.lowlevel.wait_readable(fd)
        scope.cancel()

    queue: deque[memoryview] = deque()  # taken from the reader end, not in the pipe yet
    written = 0  # stream bytes put into the pipe

    async def write_out(limit: int) -> bool:
        nonlocal written
        while limit > 0:
            parts, size = [], 0
            for part in queue:
                parts.append(part[: limit - size])
                size += len(parts[-1])
                if size >= limit or len(parts) >= 64:
                    break
            try:
                n = os.writev(fd, parts)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            except BrokenPipeError:
                # No reader: hang_up decides (it ends this, or a reader opened it again).
                await trio.sleep(REOPEN_POLL)
                continue
            written += n
            limit -= n
            fifo.pending -= n
            while n:
                head = queue[0]
                if len(head) <= n:
                    n -= len(head)
                    queue.popleft()
                else:
                    queue[0] = head[n:]
                    n = 0
        return True

    async def pour() -> bool:
        while True:
            data: bytes | memoryview | None
            if fifo.pending and (written + fifo.pending) % PAGE:
                # An unaligned tail waits a moment for more: see PAGE.
                with trio.move_on_after(TAIL_WAIT) as waited:
                    data = await reader.read(CHUNK, node.config.signal_poll)
                if waited.cancelled_caught:
                    data = None
            else:
                data = await reader.read(CHUNK, node.config.signal_poll)
            if data:
                queue.append(memoryview(data))
                fifo.pending += len(data)
            limit = fifo.pending
            if data and len(data) >= PAGE:  # bulk: up to a page boundary of the stream
                limit -= (written + limit) % PAGE
            if not await write_out(limit):
                return False
            if data is not None and not data:
                break
        while fionread(fd):
            await trio.sleep(CONSUMED_POLL)
        return reader.state is ReaderState.EOF

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang_up, nursery.cancel_scope)
        try:
            result = await pour()
        except EdgeError as exc:
            result = exc
        nursery.cancel_scope.cancel()
    if result is False and reader.state is ReaderState.EOF and fifo.backlog() == 0:
        return True  # the program closed right after its last byte
    return result


async def _reopened(node: Node, fifo: FifoReader, fd: int) -> bool:
    """Every read end of the FIFO closed. If the program read nothing of it and runs on,
    it may open the edge again (bzip2 checks its input with an open and a close, then
    opens it to read): the next reading open gets this FIFO, its bytes still in the pipe
    (``lingering``), for up to procs.REOPEN_GRACE. True: a reader holds the FIFO again; False:
    the program exited, read something, or stayed away (see Node.linger_reader)."""
    reader = fifo.reader
    if reader.consumed or procs.exit_status(reader.tgid) is not None:
        return False
    fifo.lingering = True
    fifo.reopeners = None
    try:
        with trio.move_on_after(procs.REOPEN_GRACE):
            while node.exits.status(reader.tgid) is None:
                if not _hung_up(fd):  # a reader holds it again
                    log.info("edge %s: a reader closed unread opened it again", reader.edge)
                    return True
                with trio.move_on_after(REOPEN_POLL):
                    await node.exits.changed.wait()
    finally:
        fifo.lingering = False  # from here on no LOOKUP gets this FIFO
    return await _late_reopen(fifo, fd)


def _hung_up(fd: int) -> bool:
    """POLLERR on a reader FIFO's write end: no process holds its read end."""
    ready = select.poll()
    ready.register(fd, 0)
    return bool(ready.poll(0))


async def _late_reopen(fifo: FifoReader, fd: int) -> bool:
    """The grace ran out (or the program exited): but a LOOKUP answered with this FIFO
    while it lingered may not have reached the kernel's open of it yet (the open follows
    the answer, on a loaded machine by milliseconds or more). Closing the write end then
    would hand that program the pipe's bytes and EOF: a silent truncation. So each such
    thread is waited for until it holds the FIFO (True), or is seen three times outside
    any open(2) (it went, or its open failed), as the first open is (_await_opener).
    A reader that opened, read and closed meanwhile has consumed bytes: True too (the
    hang-up that follows decides, as for any close after reading)."""
    reader = fifo.reader
    absent = dict.fromkeys(fifo.reopeners or (), 0)
    fifo.reopeners = None
    start = trio.current_time()
    while True:
        if not _hung_up(fd) or reader.consumed:
            log.info("edge %s: a reader closed unread opened it again", reader.edge)
            return True
        if not absent:
            return False
        waited = trio.current_time() - start
        for pid in list(absent):
            # Past RUNNING_FOR an open is no longer taken for one on its way to this
            # FIFO (whose write end is held: its open does not block): the thread may
            # have opened and closed it between two polls, then blocked in another open.
            state = opening(pid)
            if state is False or waited > RUNNING_FOR:
                absent[pid] += 1
            elif state is True:
                absent[pid] = 0
            if absent[pid] >= 3:
                del absent[pid]
        await trio.sleep(REOPEN_POLL)


async def _how_it_ended(node: Node, pid: int) -> int | None:
    """The wait status of the program that closed its FIFO (None: it runs on), as a FUSE
    release decides from FLUSH; a program gone without a status seen is a failure."""
    status = procs.exit_status(pid)
    if status is not None:
        return status
    if os.path.exists(f"/proc/{pid}"):
        return None  # closed while running on: "no more", as at a FUSE FLUSH
    outcome = await node.exits.outcome(pid, CLOSE_GRACE)
    if isinstance(outcome, Exited):
        return outcome.status
    if isinstance(outcome, Running):
        return None
    return 9
