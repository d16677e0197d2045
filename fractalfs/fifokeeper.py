"""Readers of reader FIFOs must never see EOF of a stream that did not complete.

A kernel FIFO carries only data or EOF, and EOF comes when the last write end closes: the
daemon's own end closes when the daemon dies, however that happens. So a small keeper
process (``python -m fractalfs.fifokeeper``, one per daemon, in a session of its own) holds a
dup of every reader-FIFO write end the daemon opens (``socket.send_fds`` over a
``SOCK_SEQPACKET`` socketpair). The daemon tells it when a stream is finished (complete:
the keeper closes its dup, so the reader's EOF can happen; failed: the daemon already killed
the readers). When the socketpair reports EOF the daemon is gone: the keeper SIGKILLs every
process holding the read end of a stream not finished, then closes the dups and exits.

Holders are found by ``/proc/*/fd`` link text (the edge's name, never a ``stat`` through the
link: that would be a FUSE request to the daemon) and confirmed by ``/proc/*/fdinfo`` (read
access, the FIFO's inode number).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

KILL_FOR = 2.0  # seconds to keep killing holders until none is left


def mount_of(fd: int) -> int | None:
    """The mount id of this process's open file ``fd`` (fdinfo ``mnt_id``), or None."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f.read().splitlines():
                if line.startswith(b"mnt_id:"):
                    return int(line.split(b":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def holds(pid: int, name: str, ino: int, mnt: int | None = None) -> bool:
    """Whether ``pid`` holds a read end of the FIFO inode ``ino`` whose path ends in
    ``/name`` (link text, then fdinfo: never a stat through the link). An inode number
    names an inode only within one mount (another fractalfs mount numbers its inodes
    alike, any file elsewhere may be called ``name``): with ``mnt`` (:func:`mount_of` of
    the daemon's own end) the fdinfo ``mnt_id`` must match too."""
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return False
    suffix = "/" + name
    for fd in fds:
        try:
            if not os.readlink(f"{base}/{fd}").removesuffix(" (deleted)").endswith(suffix):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                info = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
            flags = int(info.get(b"flags", b"0").strip(), 8)
            seen_ino = info.get(b"ino")
            if flags & os.O_ACCMODE == os.O_WRONLY:
                continue
            if seen_ino is not None and int(seen_ino.strip()) != ino:
                continue
            seen_mnt = info.get(b"mnt_id")
            if mnt is not None and (seen_mnt is None or int(seen_mnt.strip()) != mnt):
                continue
        except (OSError, ValueError):
            continue
        return True
    return False


def holders(name: str, ino: int, mnt: int | None = None) -> set[int]:
    """Processes (other than this one) holding a read end of the FIFO inode ``ino`` whose
    path ends in ``/name``."""
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return set()
    return {pid for pid in pids if pid != me and holds(pid, name, ino, mnt)}


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


class Keeper:
    """The daemon's side: starts the keeper on first use and hands it write ends."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._failed = False

    def start(self) -> None:
        """Starts the keeper now (from a worker thread: it forks)."""
        with self._lock:
            self._start()

    def _start(self) -> socket.socket | None:
        if self._sock is not None or self._failed:
            return self._sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "fractalfs.fifokeeper", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a signal to the daemon's group must not take it
            )
        except OSError as exc:
            log.warning("cannot start the FIFO keeper: %s (a daemon crash gives EOF)", exc)
            self._failed = True
            ours.close()
            return None
        finally:
            theirs.close()
        self._sock = ours
        return ours

    def add(self, fd: int, ino: int, name: str) -> None:
        """Hands the keeper a dup of write end ``fd`` (callable from a worker thread)."""
        with self._lock:
            sock = self._start()
            if sock is None:
                return
            try:
                socket.send_fds(sock, [b"A %d %s" % (ino, name.encode())], [fd])
            except OSError as exc:
                log.warning("FIFO keeper: %s", exc)

    def done(self, ino: int) -> None:
        """The stream of FIFO ``ino`` is finished: the keeper closes its dup."""
        with self._lock:
            if self._sock is None:
                return
            try:
                self._sock.send(b"D %d" % ino)
            except OSError as exc:
                log.warning("FIFO keeper: %s", exc)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(5)


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    ends: dict[int, tuple[int, str]] = {}  # ino -> (write end, edge name)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 512, 4)
        except InterruptedError:
            continue
        except OSError:
            break
        if not msg:
            for extra in fds:
                os.close(extra)
            break
        words = msg.split()
        if words[0] == b"A" and fds:
            ino = int(words[1])
            old = ends.pop(ino, None)
            if old is not None:
                os.close(old[0])
            ends[ino] = (fds[0], words[2].decode())
            for extra in fds[1:]:
                os.close(extra)
        elif words[0] == b"D":
            end = ends.pop(int(words[1]), None)
            if end is not None:
                os.close(end[0])
    # The daemon is gone: no stream still held here may ever look complete.
    for ino, (wfd, name) in ends.items():
        n = kill_holders(name, ino, mount_of(wfd))
        if n:
            print(f"fractalfs fifokeeper: killed {n} reader(s) of {name}", file=sys.stderr)
        os.close(wfd)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    main(int(sys.argv[1]))
