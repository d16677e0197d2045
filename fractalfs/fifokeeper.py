"""Readers of reader FIFOs must never see EOF of a stream that did not complete.

A kernel FIFO carries only data or EOF, and EOF comes when the last write end closes: the
daemon's own end closes when the daemon dies, however that happens. So two small keeper
processes (``python -m fractalfs.fifokeeper``, each in a session of its own; two, so that
one dying with the daemon still leaves one: see :class:`Keeper`) hold a dup of every
reader-FIFO write end the daemon opens (``socket.send_fds`` over a ``SOCK_SEQPACKET``
socketpair). The daemon tells it when a stream is finished (complete:
the keeper closes its dup, so the reader's EOF can happen; failed: the daemon already killed
the readers). When the socketpair reports EOF the daemon is gone: the keeper SIGKILLs every
process holding the read end of a stream not finished, then closes the dups and exits.

Holders are found by ``/proc/*/fd`` link text (the edge's name, never a ``stat`` through the
link: that would be a FUSE request to the daemon) and confirmed by ``/proc/*/fdinfo`` (read
access, the FIFO's inode number and mount): :func:`fractalfs.procs.holds_file`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from . import procs

log = logging.getLogger(__name__)

KILL_FOR = 2.0  # seconds to keep killing holders until none is left
LATE_OPEN = 1.0  # seconds a dead daemon's FIFOs stay held (and scanned) for late openers
PIPE_SIZE = 1 << 20  # a reader FIFO's pipe (counted against the opener's uid_memory_limit)
F_SETPIPE_SZ = 1031
SEND_TIMEOUT = 2.0  # a blocking send to the keeper (from a worker thread) gives up after
OPEN_WITHIN = 3.0  # seconds the keeper has to answer an open (one may wait ~1 s: fs.lookup)
PING_EVERY = 1.0  # seconds between health checks of the keeper
ANSWER_WITHIN = 2.0  # a ping unanswered this long: the keeper is stopped or stuck
MAX_REPLACEMENTS = 100  # a keeper that keeps dying: give the route up
CLOSE_WAIT = 5.0  # seconds the keepers have to exit when the daemon stops
COPIES = 2  # keepers per daemon: one may die (or stop) with the daemon (see Keeper)


def holders(name: str, ino: int, mnt: int | None = None) -> set[int]:
    """Processes (other than this one) holding a read end of the FIFO inode ``ino`` whose
    path ends in ``/name``."""
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return set()
    return {pid for pid in pids if pid != me and procs.holds_file(pid, name, ino, mnt)}


def kill_holders(name: str, ino: int, mnt: int | None = None, sleep: float = 0.01) -> int:
    """SIGKILLs every holder of the read end, again until none is left (a holder may have
    forked meanwhile); returns how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + KILL_FOR
    while True:
        found = holders(name, ino, mnt)
        if not found:
            break
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        killed |= found
        if time.monotonic() > deadline:
            break
        time.sleep(sleep)
    return len(killed)


def _holders_of(targets: dict[str, list[tuple[int, int | None]]]) -> dict[int, set[str]]:
    """One pass over ``/proc``: which processes (other than this one) hold a read end of
    one of ``targets`` (edge name -> [(FIFO inode, mount id)]), as :func:`holds_file`
    decides, each descriptor's link read once however many targets there are."""
    me = os.getpid()
    found: dict[int, set[str]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                name = procs.link_path(os.readlink(f"/proc/{pid}/fd/{fd}")).rsplit("/", 1)[-1]
            except OSError:
                continue
            for ino, mnt in targets.get(name, ()):
                if procs.holds_file(pid, name, ino, mnt):
                    found.setdefault(pid, set()).add(name)
                    break
    return found


def kill_all_holders(
    targets: dict[str, list[tuple[int, int | None]]], hold_for: float = 0.0
) -> dict[str, int]:
    """SIGKILLs every holder of a read end of ``targets`` (see :func:`_holders_of`), round
    after round, for at least ``hold_for`` seconds and until a round finds none (at most
    ``KILL_FOR`` more); the caller keeps the write ends open meanwhile. Returns how many
    were killed per edge name."""
    killed: dict[str, set[int]] = {}
    start = time.monotonic()
    while True:
        found = _holders_of(targets)
        for pid, names in found.items():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            for name in names:
                killed.setdefault(name, set()).add(pid)
        waited = time.monotonic() - start
        if (not found and waited >= hold_for) or waited > hold_for + KILL_FOR:
            break
        time.sleep(0.01 if found else 0.05)
    return {name: len(pids) for name, pids in killed.items()}


class KeeperUnavailable(OSError):
    """No keeper answers: the FIFO route must not be used (see :meth:`Keeper.open_fifo`)."""


class _Copy:
    """One keeper process, as the daemon sees it."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.ping_sent = 0.0  # monotonic time of the unanswered ping (0: none)
        self.suspect = False  # a send found its socket full: replace at the next check


class Keeper:
    """The daemon's side: runs ``COPIES`` keeper processes, has the first one open FIFOs,
    gives every one a dup of each reader FIFO's write end, tells them which streams are
    finished, and replaces a keeper that died or stopped answering.

    Why two: a keeper that dies is noticed at the next ping (up to ~1 s), and replaced
    after that; a daemon that dies inside that window (or in the same instant: one
    ``kill -9``, a cgroup kill) would be the last holder of the write ends, and its readers
    would read EOF. With two, whatever order the daemon and one keeper die in, the other
    keeper is left holding every live write end, sees the daemon's EOF and kills the
    readers. It also covers a keeper stopped (SIGSTOP) when the daemon dies. Only the
    daemon and both keepers dying within one replacement window gives EOF.

    Every open goes through the first keeper (:meth:`open_fifo`): a daemon SIGKILLed while
    one of its own threads waits in a request to its own mount could never exit (the
    thread waits for an answer only the dead daemon could give), its mount would hang
    instead of failing with ENOTCONN, and so would its readers. The keeper's request pins
    nobody: when the daemon dies its FUSE connection is aborted and the keeper's open fails.

    A keeper that died (EOF on its socketpair) or stopped answering (a ping unanswered for
    ``ANSWER_WITHIN``, an open unanswered, its socket full) is SIGKILLed (never just let go:
    a keeper that sees EOF kills the readers of every unfinished stream) and a new one gets
    a dup of every write end still live. If no keeper can be started, :attr:`usable` is
    False and readers stay on FUSE.
    """

    def __init__(
        self, copies: int = COPIES, name_of: Callable[[int], str | None] | None = None
    ) -> None:
        self._copies: list[_Copy | None] = [None] * copies  # [0] opens the FIFOs
        self._lock = threading.Lock()
        self._failed = False
        self._closed = False
        # ino -> the daemon's own write end, handed to a replacement keeper. Only
        # :meth:`_done_locked` closes it, under the lock, after taking it out: a
        # replacement (which sends these under the lock) never sends a number that was
        # closed and reused for another file.
        self._live: dict[int, int] = {}
        # Each live FIFO's edge name is asked of ``name_of`` (the daemon's table of
        # inodes: a name kept in each entry here made a tuple, 56 bytes per waiting
        # reader), and kept here only for an inode the daemon forgot while its FIFO
        # lives (:meth:`remember`), or for every FIFO without ``name_of``.
        self._name_of = name_of
        self._names: dict[int, str] = {}
        self._pending: deque[int] = deque()  # finished streams done() could not settle yet
        self.replaced = 0  # keepers replaced since start (for logs and tests)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock; on the way out, the streams :meth:`done` left pending are settled."""
        try:
            with self._lock:
                yield
        finally:
            self._settle_pending()

    def _settle_pending(self) -> None:
        """Settles the streams :meth:`done` left pending, unless another thread holds the
        lock (that one settles them when it lets the lock go). Every thread letting the
        lock go calls this after it did, and :meth:`done` after it queued: one of the two
        always sees the other's work, so nothing waits for the next lock holder."""
        while self._pending and self._lock.acquire(blocking=False):
            try:
                while self._pending:
                    self._done_locked(self._pending.popleft())
            finally:
                self._lock.release()

    @property
    def usable(self) -> bool:
        """Whether the FIFO route may be used: a keeper runs (or may still be started)."""
        return not self._failed

    @property
    def pid(self) -> int:
        """The pid of the keeper that opens FIFOs (-1: none)."""
        copy = self._copies[0]
        return copy.proc.pid if copy is not None else -1

    @property
    def pids(self) -> list[int]:
        """The pids of the keepers running."""
        return [copy.proc.pid for copy in self._copies if copy is not None]

    def start(self) -> bool:
        """Starts the keepers now (from a worker thread: it forks). False: none can run."""
        with self._locked():
            return self._start() is not None

    def _start(self) -> socket.socket | None:
        """Starts every keeper not running; returns the socket of the one that opens."""
        if self._failed or self._closed:
            return None
        for i, copy in enumerate(self._copies):
            if copy is None:
                self._start_copy(i)
                if self._failed:
                    return None
        first = self._copies[0]
        return first.sock if first is not None else None

    def _start_copy(self, i: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                # -P: never the working directory first on sys.path (a package planted
                # where root started the daemon would run as root).
                [sys.executable, "-P", "-m", "fractalfs.fifokeeper", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a signal to the daemon's group must not take it
            )
        except OSError as exc:
            log.warning("reader FIFOs off: cannot start the FIFO keeper: %s", exc)
            self._failed = True
            ours.close()
            return
        finally:
            theirs.close()
        copy = self._copies[i] = _Copy(proc, ours)
        # A new keeper holds every stream still live, or a daemon crash would give EOF.
        for ino, fd in list(self._live.items()):
            name = self._name(ino)
            if name is None:
                # Only a FIFO whose open was abandoned (no program got it) and whose
                # inode the daemon forgot before the keeper's answer came has none.
                log.info("FIFO keeper: FIFO %d has no edge name; not handed", ino)
                continue
            try:
                _send(ours, b"A %d %s" % (ino, name.encode()), [fd], SEND_TIMEOUT)
            except OSError as exc:
                log.error("FIFO keeper: cannot hand it edge %s: %s", name, exc)
                if self._copies[i] is copy:
                    self._replace_locked(i)
                return

    def _replace_locked(self, i: int) -> None:
        """Kills keeper ``i`` (SIGKILL: it must not take our going for the daemon's death
        and kill the readers) and starts another."""
        copy = self._copies[i]
        self._copies[i] = None
        log.warning(
            "FIFO keeper (pid %s) gone or not answering: starting another",
            copy.proc.pid if copy is not None else "-",
        )
        if copy is not None:
            with contextlib.suppress(OSError):
                copy.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                copy.proc.wait(5)
            copy.sock.close()
        self.replaced += 1
        if self.replaced > MAX_REPLACEMENTS:
            log.error("reader FIFOs off: the FIFO keeper was replaced %d times", self.replaced)
            self._failed = True
            return
        self._start()

    def _index(self, sock: socket.socket | None) -> int:
        """Which keeper ``sock`` talks to (-1: none now)."""
        for i, copy in enumerate(self._copies):
            if copy is not None and copy.sock is sock:
                return i
        return -1

    def replace(self, sock: socket.socket | None) -> None:
        """Replaces the keeper behind ``sock`` (if it still runs)."""
        with self._locked():
            i = self._index(sock)
            if i >= 0 and not self._failed:
                self._replace_locked(i)

    def _ask(self, msg: bytes, nfds: int) -> tuple[socket.socket | None, bytes, list[int]]:
        """Sends ``msg`` with a fresh reply socket to the keeper that opens, and waits up to
        OPEN_WITHIN for the answer: (the keeper's socket it went to, the reply, up to
        ``nfds`` descriptors). The socket is None if the send failed (the keeper was
        replaced). An empty reply: it died or did not answer in time. From a worker
        thread."""
        with self._locked():
            sock = self._start()
            if sock is None:
                raise KeeperUnavailable(errno.ENOTCONN, "no FIFO keeper")
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                _send(sock, msg, [theirs.fileno()], SEND_TIMEOUT)
            except OSError:
                mine.close()
                self._replace_locked(0)
                return None, b"", []
            finally:
                theirs.close()
        try:
            mine.settimeout(OPEN_WITHIN)
            reply, fds, _, _ = socket.recv_fds(mine, 256, nfds)
        except OSError:  # no answer in time: stopped, or stuck
            reply, fds = b"", []
        finally:
            mine.close()
        return sock, reply, fds

    def open_fifo(self, path: str, ino: int, name: str) -> tuple[int, int]:
        """Has the keeper open the FIFO at ``path`` (``MOUNT/.fifo/<ino>``) read-write (the
        stand-in reader) and write-only, keep a dup of the write end, and hand both back:
        (stand-in, write end); every other keeper gets a dup of the write end before this
        returns (before any program can hold the read end). The write end stays this
        object's until :meth:`done` closes it (the caller never closes it itself): it is
        what a replacement keeper is handed, so a FIFO costs the daemon one descriptor.
        From a worker thread.
        KeeperUnavailable: no keeper answered (even a fresh one); other OSErrors: the
        keeper's open failed."""
        for _attempt in range(2):
            msg = b"O %d %s %s" % (ino, name.encode(), os.fsencode(path))
            sock, reply, fds = self._ask(msg, 2)
            if sock is None:
                continue
            if reply.startswith(b"K") and len(fds) != 2:
                # Out of descriptors here: the kernel dropped what did not fit (MSG_CTRUNC).
                # Not the keeper's fault: it lets its dup go, and the open fails.
                for fd in fds:
                    os.close(fd)
                self._forget_unused(ino)
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            if reply.startswith(b"K"):
                with self._locked():
                    self._live[ino] = fds[1]
                    if self._name_of is None:
                        self._names[ino] = name
                    # The others (and the opener's replacement, if it was replaced
                    # meanwhile) must hold this one too.
                    add = b"A %d %s" % (ino, name.encode())
                    for i, copy in enumerate(self._copies):
                        if copy is None or copy.sock is sock:
                            continue
                        try:
                            _send(copy.sock, add, [fds[1]], SEND_TIMEOUT)
                        except OSError:
                            if self._copies[i] is copy:
                                self._replace_locked(i)  # the new one gets it from _live
                return fds[0], fds[1]
            for fd in fds:
                os.close(fd)
            if reply.startswith(b"E "):
                code = int(reply.split()[1])
                raise OSError(code, os.strerror(code))
            self.replace(sock)  # EOF (it died) or silence (stopped): a new one, then retry
        raise KeeperUnavailable(errno.ETIMEDOUT, "the FIFO keeper does not answer")

    def drain_held(self, ino: int) -> None:
        """The program holds writer FIFO ``ino`` (or its drain ended): the keeper lets its
        read end go (see :func:`_open_drain_end`). From the loop thread: never blocks."""
        for copy in self._copies:
            if copy is not None:
                try:
                    copy.sock.send(b"D %d" % ino, socket.MSG_DONTWAIT)
                except OSError:
                    # Dropped, that keeper would hold the end for its life (a writer
                    # never told EPIPE): replaced at the next check, its dups die with it.
                    copy.suspect = True

    def open_drain_end(self, path: str, ino: int = 0) -> int:
        """Has the keeper open the writer FIFO at ``path`` (``MOUNT/.fifo/<ino>``) read-only
        and non-blocking (the end the daemon drains) and hand it back; with ``ino`` the
        keeper keeps a dup of it until :meth:`drain_held` (a daemon dying before the
        program's open would leave that open waiting for a reader), never longer (a
        writer's daemon that dies gives its program EPIPE, as it should).
        Not a thread of the daemon: one waiting in a request to the daemon's own mount
        would keep a SIGKILLed daemon from exiting. From a worker thread.
        KeeperUnavailable: no keeper answered; other OSErrors: the keeper's open failed."""
        sock, reply, fds = self._ask(b"R %d - %s" % (ino, os.fsencode(path)), 1)
        if sock is None:
            raise KeeperUnavailable(errno.ENOTCONN, "the FIFO keeper is gone")
        if reply.startswith(b"K") and len(fds) == 1:
            return fds[0]
        for fd in fds:
            os.close(fd)
        if reply.startswith(b"K"):  # out of descriptors here (MSG_CTRUNC)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        if reply.startswith(b"E "):
            code = int(reply.split()[1])
            raise OSError(code, os.strerror(code))
        self.replace(sock)  # EOF (it died) or silence (stopped): a new one for the next
        raise KeeperUnavailable(errno.ETIMEDOUT, "the FIFO keeper does not answer")

    def _forget_unused(self, ino: int) -> None:
        """The keepers' dups of a FIFO the daemon never got go (no program can hold it)."""
        self.drain_held(ino)  # the same message: "let your copy of ``ino`` go"

    def done(self, ino: int) -> None:
        """The stream of FIFO ``ino`` is finished: the daemon's write end (from
        :meth:`open_fifo`) closes and the keepers close their dups (then the reader's EOF
        can happen). From the loop thread, so it never blocks: while a worker thread holds
        the lock (an open, a replacement), that thread settles it on its way out, and the
        write end stays open until then (a replacement may be sending it right now); a
        keeper whose socket is full is replaced by :meth:`check` (the old one's dups die
        with it)."""
        self._pending.append(ino)
        self._settle_pending()

    def _name(self, ino: int) -> str | None:
        name = self._names.get(ino)
        if name is None and self._name_of is not None:
            name = self._name_of(ino)
        return name

    def remember(self, ino: int, name: str) -> None:
        """The daemon forgets inode ``ino`` (``name_of`` will not know it): its name is
        kept here while its FIFO lives. Before the daemon forgets it, so that one of the
        two always knows it. From the loop thread: never blocks."""
        if ino in self._live:
            self._names[ino] = name
            if ino not in self._live:  # done meanwhile (_done_locked popped it first)
                self._names.pop(ino, None)

    def _done_locked(self, ino: int) -> None:
        end = self._live.pop(ino, None)
        self._names.pop(ino, None)
        if end is None:
            return
        os.close(end)
        for copy in self._copies:
            if copy is None:
                continue
            try:
                copy.sock.send(b"D %d" % ino, socket.MSG_DONTWAIT)
            except OSError as exc:
                log.warning("FIFO keeper: %s (replacing it)", exc)
                copy.suspect = True

    def check(self) -> bool:
        """One health check (from a worker thread, every ``PING_EVERY`` s): reads pongs,
        notices EOF, pings, and replaces a keeper that died or did not answer a ping within
        ``ANSWER_WITHIN``. True: healthy (or nothing to check)."""
        healthy = True
        with self._locked():
            for i in range(len(self._copies)):
                if self._failed:
                    return False
                copy = self._copies[i]
                if copy is None:
                    continue
                if not self._check_copy(copy):
                    healthy = False
                    if self._copies[i] is copy:
                        self._replace_locked(i)
            return healthy and not self._failed

    @staticmethod
    def _check_copy(copy: _Copy) -> bool:
        bad = copy.suspect
        while not bad:
            try:
                msg = copy.sock.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                bad = True
                break
            if not msg:
                bad = True  # the keeper died
            elif msg.startswith(b"p"):
                copy.ping_sent = 0.0
        now = time.monotonic()
        if not bad and copy.ping_sent and now - copy.ping_sent > ANSWER_WITHIN:
            bad = True  # stopped (SIGSTOP) or stuck
        if not bad and not copy.ping_sent:
            try:
                copy.sock.send(b"P", socket.MSG_DONTWAIT)
                copy.ping_sent = now
            except OSError:
                bad = True
        return not bad

    async def watch(self) -> None:
        """Checks the keepers every ``PING_EVERY`` seconds, for as long as the daemon runs."""
        import trio

        while True:
            try:
                await trio.to_thread.run_sync(self.check)
            except Exception:
                log.exception("FIFO keeper check failed")
            await trio.sleep(PING_EVERY)

    def close(self) -> None:
        """The daemon stops: the keepers take the EOF, kill the readers of every stream not
        finished, and exit. A keeper still there after ``CLOSE_WAIT`` (stopped) is SIGKILLed
        if another one exited cleanly: that one held every unfinished stream too (each
        keeper gets every write end before its LOOKUP is answered) and its readers are
        dead, so the leftover holds only finished streams, whose readers would otherwise
        wait for their EOF until it is resumed."""
        with self._locked():
            self._closed = True
            copies = [copy for copy in self._copies if copy is not None]
            self._copies = [None] * len(self._copies)
            for copy in copies:
                copy.sock.close()
            deadline = time.monotonic() + CLOSE_WAIT
            for copy in copies:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    copy.proc.wait(max(0.0, deadline - time.monotonic()))
            if any(copy.proc.returncode == 0 for copy in copies):
                for copy in copies:
                    if copy.proc.returncode is None:
                        log.warning("FIFO keeper (pid %d) did not exit: killed", copy.proc.pid)
                        copy.proc.kill()
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            copy.proc.wait(5)


def _send(sock: socket.socket, msg: bytes, fds: list[int], wait: float) -> None:
    """Sends one message (with ``fds``), waiting at most ``wait`` seconds for room: the
    socket stays blocking for nobody (TimeoutError: the keeper does not read)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            socket.send_fds(sock, [msg], fds, socket.MSG_DONTWAIT)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(errno.ETIMEDOUT, "the FIFO keeper does not read") from None
            ready = select.poll()
            ready.register(sock.fileno(), select.POLLOUT)
            ready.poll(min(left, 0.05) * 1000)


def _open_for_daemon(
    ino: int,
    name: str,
    path: bytes,
    reply: socket.socket,
    ends: dict[int, tuple[int, str]],
    lock: threading.Lock,
    closing: threading.Event,
) -> None:
    """The keeper's part of :meth:`Keeper.open_fifo` (a thread per open: one may wait for
    the mount while others go on)."""
    try:
        try:
            hold = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                os.close(hold)
                raise
        except OSError as exc:
            with contextlib.suppress(OSError):
                reply.send(b"E %d" % (exc.errno or errno.EIO))
            return
        with contextlib.suppress(OSError):
            fcntl.fcntl(wfd, F_SETPIPE_SZ, PIPE_SIZE)
        keep = os.dup(wfd)
        with lock:
            if closing.is_set():  # the daemon went meanwhile: nobody reads this one
                os.close(keep)
            else:
                old = ends.pop(ino, None)
                if old is not None:
                    os.close(old[0])
                ends[ino] = (keep, name)
        try:
            socket.send_fds(reply, [b"K"], [hold, wfd])
        except OSError:
            pass  # the daemon gave up on this open; its "D" (or its death) settles it
        finally:
            os.close(hold)
            os.close(wfd)
    finally:
        reply.close()


def _open_drain_end(
    ino: int,
    path: bytes,
    reply: socket.socket,
    drains: dict[int, int],
    lock: threading.Lock,
    closing: threading.Event,
) -> None:
    """The keeper's part of :meth:`Keeper.open_drain_end` (a thread per open). It keeps a
    dup of the end until the daemon says its program holds the FIFO (``D``): a daemon
    dying between answering the LOOKUP and the program's open would leave the FIFO no
    reader, and the open waiting for one for good (see main's end)."""
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            with contextlib.suppress(OSError):
                reply.send(b"E %d" % (exc.errno or errno.EIO))
            return
        if ino:
            try:
                keep = os.dup(fd)
            except OSError:
                keep = -1  # out of descriptors: the daemon's end alone, as before
            with lock:
                if keep >= 0 and (closing.is_set() or ino in drains):
                    os.close(keep)
                elif keep >= 0:
                    drains[ino] = keep
        try:
            socket.send_fds(reply, [b"K"], [fd])
        except OSError:
            pass  # the daemon gave up on this open: the end closes here
        finally:
            os.close(fd)
    finally:
        reply.close()


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    ends: dict[int, tuple[int, str]] = {}  # ino -> (write end, edge name)
    drains: dict[int, int] = {}  # ino -> a writer FIFO's read end, until its program holds it
    lock = threading.Lock()
    closing = threading.Event()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 4096, 4)
        except InterruptedError:
            continue
        except OSError:
            break
        if not msg:
            for extra in fds:
                os.close(extra)
            break
        words = msg.split(b" ", 3)
        if words[0] == b"O" and fds:
            reply = socket.socket(fileno=fds[0])
            for extra in fds[1:]:
                os.close(extra)
            threading.Thread(
                target=_open_for_daemon,
                args=(int(words[1]), words[2].decode(), words[3], reply, ends, lock, closing),
                daemon=True,
            ).start()
        elif words[0] == b"R" and fds and len(words) == 4:
            reply = socket.socket(fileno=fds[0])
            for extra in fds[1:]:
                os.close(extra)
            threading.Thread(
                target=_open_drain_end,
                args=(int(words[1]), words[3], reply, drains, lock, closing),
                daemon=True,
            ).start()
        elif words[0] == b"A" and fds:
            with lock:
                ino = int(words[1])
                old = ends.pop(ino, None)
                if old is not None:
                    os.close(old[0])
                ends[ino] = (fds[0], words[2].decode())
            for extra in fds[1:]:
                os.close(extra)
        elif words[0] == b"D":
            with lock:
                end = ends.pop(int(words[1]), None)
                drain = drains.pop(int(words[1]), None)
            if end is not None:
                os.close(end[0])
            if drain is not None:
                os.close(drain)
        elif words[0] == b"P":
            with contextlib.suppress(OSError):
                sock.send(b"p")
        else:
            for extra in fds:
                os.close(extra)
    # The daemon is gone: no stream still held here may ever look complete. The write ends
    # stay open for LATE_OPEN: a program whose open the daemon answered just before it died
    # may open its FIFO only now, and must find a writer (a non-blocking open of a FIFO
    # without one reads EOF at once, a blocking one waits for good) and be killed.
    # Writer FIFOs whose program was not seen holding them yet: their read ends stay open
    # as long, so that such a program's open completes, then close: its next write fails
    # with EPIPE/SIGPIPE instead of its open waiting for a reader for good.
    died = time.monotonic()
    with lock:
        closing.set()
        left = list(ends.items())
        drained = list(drains.values())
        drains.clear()
    targets: dict[str, list[tuple[int, int | None]]] = {}
    for ino, (wfd, name) in left:
        targets.setdefault(name, []).append((ino, procs.mount_id(wfd)))
    if targets:
        for name, n in sorted(kill_all_holders(targets, LATE_OPEN).items()):
            print(f"fractalfs fifokeeper: killed {n} reader(s) of {name}", file=sys.stderr)
    for _ino, (wfd, _name) in left:
        os.close(wfd)
    if drained:
        time.sleep(max(0.0, LATE_OPEN - (time.monotonic() - died)))
        for rfd in drained:
            os.close(rfd)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    main(int(sys.argv[1]))
