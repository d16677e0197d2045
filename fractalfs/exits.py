"""Exit statuses of writing programs: the kernel's proc connector, or /proc.

Moved out of :mod:`fractalfs.node` unchanged. :meth:`ExitWatcher.outcome` answers
:class:`~fractalfs.writerstate.Exited`, ``Running`` or ``Unknown``; what that means for
the stream is :func:`fractalfs.writerstate.settle`'s to decide.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Container

import trio

from . import procs
from .edges import Notifier
from .writerstate import Exit, Exited, Running, Unknown

log = logging.getLogger(__name__)

EVENT_LATENESS = 1.0  # how long a proc connector event may trail the process's exit


CLONE_NEWNET = 0x40000000
INIT_NET_INO = 0xEFFFFFF9  # the initial network namespace's inode (PROC_NET_INIT_INO)


def _in_initial_netns(
    open_socket: Callable[[], socket.socket | None],
) -> socket.socket | None:
    """``open_socket()`` called in the initial network namespace (kernel threads'), or None.

    The kernel's proc connector answers only in the initial network namespace, yet a node
    daemon may run in another (``nsenter --net=``: one host of a cluster). There it fell
    back to /proc, and a writer SIGKILLed and reaped by its parent before the daemon looked
    was taken as complete: its reader exited 0 with half the stream. A socket keeps the
    namespace it was made in, so a short-lived thread enters the initial network
    namespace (``setns`` moves only the calling thread; CAP_SYS_ADMIN, i.e. root), opens
    it and ends; no other thread moves."""
    try:
        if os.stat("/proc/thread-self/ns/net").st_ino == INIT_NET_INO:
            return None  # already there: the connector is unavailable for another reason
    except OSError:
        return None
    # pid 1's namespace links may be unreadable (a non-dumpable init, as in this VM);
    # kthreadd's (pid 2) are not, and kernel threads always live in the initial one.
    for pid in (1, 2):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == INIT_NET_INO:
                path = f"/proc/{pid}/ns/net"
                break
        except OSError:
            continue
    else:
        return None
    got: list[socket.socket | None] = [None]

    def enter_and_open() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    return  # not allowed (no CAP_SYS_ADMIN over it): /proc it is
            finally:
                os.close(fd)
            got[0] = open_socket()
        except OSError:
            pass
        # This thread stays in the initial namespace and ends here.

    thread = threading.Thread(target=enter_and_open, name="proc-connector", daemon=True)
    thread.start()
    thread.join()
    return got[0]


class _Holders(set[object]):
    """The holders of one watch when there are several (one is the rule: kept as is).
    Its own type: a holder may itself be a set."""

    __slots__ = ()


class _Watch:
    """One watched program: its wait status once it exited, the overrun count when it
    was first watched (events lost since: its exit may be among them), and who watches
    it (one holder, or several in a :class:`_Holders`). Holders are kept by reference,
    not by ``id()``: an int of 32 bytes each."""

    __slots__ = ("at", "holders", "seq", "status")

    def __init__(self, at: int, holder: object) -> None:
        self.status: int | None = None
        self.seq = 0  # the order its exit event came in among the watched (0: not yet)
        self.at = at
        self.holders = holder


class ExitWatcher:
    """Exit statuses of writing programs, from the kernel's proc connector or /proc."""

    def __init__(self) -> None:
        raw = procs.open_exit_events() or _in_initial_netns(procs.open_exit_events)
        self._raw = raw
        self._sock = trio.socket.from_stdlib_socket(raw) if raw is not None else None
        # One record per watched program: a daemon watches every waiting reader's (three
        # maps by pid, and an int id per holder, were ~130 bytes per reader more).
        self._watched: dict[int, _Watch] = {}
        self._overrun = 0  # exit events the kernel dropped so far (ENOBUFS), as a count
        self._seq = 0  # exit events of watched programs applied so far
        self.changed = Notifier()

    @property
    def precise(self) -> bool:
        return self._sock is not None

    def watch(self, pid: int, holder: object = None) -> None:
        """Watches process ``pid`` for ``holder`` (a writer): one program may hold several
        edges (``tee E1 E2``, or threads of one process), each settled on its own. The
        watch ends when the last holder forgets it (forgetting twice is harmless)."""
        watch = self._watched.get(pid)
        if watch is None or (watch.status is not None and watch.holders is not holder):
            # None, or the watched process ended and its pid is another's now (a watch
            # is taken while its process runs): a new record; the old holders', gone
            # from the map, reads that process's status from then on.
            self._watched[pid] = _Watch(self._overrun, holder)
            return
        have = watch.holders
        if type(have) is _Holders:
            have.add(holder)
        elif have is not holder:
            watch.holders = _Holders((have, holder))

    def forget(self, pid: int, holder: object = None) -> None:
        watch = self._watched.get(pid)
        if watch is None:
            return
        have = watch.holders
        if type(have) is _Holders:
            have.discard(holder)
            if have:
                return
        elif have is not holder:
            return
        del self._watched[pid]

    async def run(self) -> None:
        if self._sock is None:
            log.info(
                "proc connector unavailable (not root, or no way into the initial network "
                "namespace): exit statuses come from /proc"
            )
            return
        with self._sock:
            while True:
                try:
                    data = await self._sock.recv(4096)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # The kernel dropped exit events (a busy host, SO_RCVBUF capped by
                    # rmem_max): the socket still works, but an exit of a watched program
                    # may be gone for good: its outcome is unknown, never success.
                    log.warning("proc connector overrun: exit events were lost")
                    self._overrun += 1
                    self.changed.notify()
                    continue
                self._apply(data)
                self._drain()  # the backlog of a busy loop, in one go

    def _apply(self, data: bytes) -> None:
        event = procs.parse_exit_event(data)
        watch = self._watched.get(event[0]) if event is not None else None
        if event is not None and watch is not None and watch.status is None:
            # The first exit only: a later one is of another process given the pid
            # (pid_max may be 32768), killed perhaps, which ended no stream here.
            watch.status = event[1]
            self._seq += 1
            watch.seq = self._seq
            self.changed.notify()

    def _drain(self) -> None:
        """Applies every exit event already queued on the socket, without waiting: the
        kernel queues a process's event before its parent can reap it, so once the
        process is gone its event is here unless the kernel dropped it. On a busy loop
        (a thousand writers) the reading task may not have run for longer than
        ``EVENT_LATENESS``: a gone program must not be taken as unknown for that."""
        if self._raw is None or self._sock is None:
            return
        while True:
            try:
                data = self._raw.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    return
                log.warning("proc connector overrun: exit events were lost")
                self._overrun += 1
                self.changed.notify()
                continue
            self._apply(data)

    def status(self, pid: int) -> int | None:
        """The wait status of ``pid`` if it has exited (and was watched, or is a zombie)."""
        return self._status(pid)

    def _status(self, pid: int) -> int | None:
        self._drain()
        watch = self._watched.get(pid)
        status = watch.status if watch is not None else None
        return status if status is not None else procs.exit_status(pid)

    def cut_short(
        self,
        peers: tuple[int, ...],
        pid: int,
        aborted: Container[int] = (),
        upstream: int = 0,
        parent_feeds: bool = True,
    ) -> tuple[int, int] | None:
        """(pid, wait status) of the process of ``pid``'s pipeline whose end cut its
        stream short, if one did by now, else None. ``peers`` (watched) are its pipeline's
        other processes, its parent first, then the ``upstream`` ones that feed it through
        pipes (:func:`procs.pipeline_peers`).

        ``b`` in ``a | b > E`` reads EOF when ``a`` dies and exits 0 with a stream cut
        short; on plain pipes the script fails (pipefail) and is re-run, so the edge's
        stream must not end there. Three signs:

        * its parent if it feeds ``pid`` (``parent_feeds``: ``split``), or an upstream
          peer, killed by a signal other than SIGPIPE (``yes``
          in ``yes | head -c 1 > E`` dies of SIGPIPE once ``head`` is gone). Not another
          child of the parent: a script kills its own helpers (``sleep 100 & ...; kill
          $!``, a trap on EXIT), or a sibling job whose stream is not this one;
        * any peer killed by SIGPIPE if it is in ``aborted``,
          the writers the daemon ended for a failure: GNU ``split --filter`` takes a
          filter's EPIPE for "that consumer is done", stops feeding every filter and exits
          0 (on plain pipes too). Exit codes do not count: ``grep``
          finding nothing exits 1 and its script goes on). No order is asked of the
          events: the killed process may send its exit event after the writer it woke
          with EOF did; a peer killed after the writer ended, just before this look,
          costs a re-run, never a short stream;
        * its parent ended with any failure before ``pid`` did: ``split --filter='cat >
          E'`` exits 1 when another filter's ``cat`` dies of SIGPIPE, and its other
          filters read EOF. A parent that waits for ``pid`` (a shell: ``false | cat > E``
          with pipefail exits 1 after ``cat``) ends after it: its event comes later, or
          it is still running when ``pid`` is seen ending.
        A peer still exiting is seen in /proc."""
        self._drain()
        own = self._watched.get(pid)
        own_seq = own.seq if own is not None else 0
        for i, peer in enumerate(peers):
            watch = self._watched.get(peer)
            status = watch.status if watch is not None else None
            seq = watch.seq if watch is not None else 0
            if status is None:
                status = procs.exit_status(peer)
            if not status:
                continue
            killed = status & 0x7F
            feeds = parent_feeds if i == 0 else i <= upstream
            if killed and killed != signal.SIGPIPE and feeds:
                return peer, status
            if killed == signal.SIGPIPE and peer in aborted:
                return peer, status
            if i == 0 and (seq or not own_seq) and (not own_seq or seq < own_seq):
                return peer, status  # the parent, ended with a failure before pid
        return None

    def _lost_events(self, pid: int) -> bool:
        watch = self._watched.get(pid)
        return watch is not None and watch.at != self._overrun

    async def outcome(self, pid: int, grace: float) -> Exit:
        """How ``pid`` ended if it exits within ``grace`` seconds; :class:`Running` if it
        still runs then; :class:`Unknown` if it is gone and its status was not seen."""
        if self._sock is not None:
            with trio.move_on_after(grace):
                while (status := self._status(pid)) is None and not self._lost_events(pid):
                    await self.changed.wait()
                if status is not None:
                    return Exited(status)
        else:
            pidfd = -1
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)  # readable the moment it exits
            try:
                with trio.move_on_after(grace):
                    while (status := self._status(pid)) is None and pidfd >= 0:
                        with trio.move_on_after(0.002):
                            await trio.lowlevel.wait_readable(pidfd)
                        if not os.path.exists(f"/proc/{pid}"):
                            break
                    status = self._status(pid)
                    if status is not None:
                        return Exited(status)
            finally:
                if pidfd >= 0:
                    os.close(pidfd)
        status = self._status(pid)
        if status is not None:
            return Exited(status)
        if os.path.exists(f"/proc/{pid}"):
            return Running()
        if self._sock is not None:
            # It exited just now: its event may still be on the way.
            with trio.move_on_after(EVENT_LATENESS):
                while (status := self._status(pid)) is None and not self._lost_events(pid):
                    await self.changed.wait()
            if status is not None:
                return Exited(status)
            why = "its exit event was lost" if self._lost_events(pid) else "no exit event came"
            return Unknown(f"process {pid} is gone; {why}")
        # Without the proc connector a program reaped by its parent between two looks at
        # /proc leaves no trace: its status cannot be observed here at all (see README).
        return Unknown(f"process {pid} was reaped before /proc showed its status", False)
