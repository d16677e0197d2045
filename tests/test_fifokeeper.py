"""The keeper's holder scan kills only holders of the daemon's own FIFO inode."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fractalfs import fifokeeper, procs

NAME = "0123456789abcdef0123456789abcdef"


def _holder(path: str) -> subprocess.Popen[bytes]:
    """A process holding ``path`` open read-only until told to go."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; f = open(sys.argv[1], 'rb'); print('open', flush=True); sys.stdin.read()",
            path,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"open\n"
    return proc


def test_same_name_and_inode_number_on_another_mount_is_not_killed(tmp_path: Path) -> None:
    """A file elsewhere whose path ends in the edge's name and whose inode number equals
    the FIFO's (another fractalfs mount numbers its inodes alike) is not the FIFO: its
    holder must not be SIGKILLed when a stream fails."""
    victim_path = tmp_path / NAME
    victim_path.write_bytes(b"x")
    ino = os.stat(victim_path).st_ino
    victim = _holder(str(victim_path))
    r, w = os.pipe()  # the daemon's own end lives on another mount than tmp_path
    try:
        other = procs.mount_id(w)
        assert other is not None
        assert fifokeeper.kill_holders(NAME, ino, other) == 0
        assert victim.poll() is None
        # The same scan with the file's own mount does find it (the test can fail).
        with open(victim_path, "rb") as own:
            same = procs.mount_id(own.fileno())
        assert procs.holds_file(victim.pid, NAME, ino, same)
        assert not procs.holds_file(victim.pid, NAME, ino, other)
    finally:
        os.close(r)
        os.close(w)
        assert victim.stdin is not None
        victim.stdin.close()
        victim.wait(5)


def _fifo(tmp_path: Path, name: str = "f") -> str:
    path = str(tmp_path / name)
    os.mkfifo(path)
    return path


def _kept_fifo(keeper: fifokeeper.Keeper, tmp_path: Path) -> tuple[str, int, int]:
    """A FIFO whose ends ``keeper`` opened for stream 7 (the daemon's hold on the read end
    closed) and a non-blocking reader of it: returns its path, the daemon's write end and
    the reader."""
    path = _fifo(tmp_path)
    hold, wfd = keeper.open_fifo(path, 7, NAME)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    os.close(hold)
    return path, wfd, reader


def _writers(path: str, reader: int) -> bool:
    """Whether a write end of the FIFO at ``path`` is still open anywhere: a non-blocking
    reader reads EAGAIN while one is, EOF once none is."""
    try:
        return os.read(reader, 1) != b""
    except BlockingIOError:
        return True


def _until_no_writer(path: str, reader: int, why: str) -> None:
    """Waits (up to 5 s) until no write end of the FIFO at ``path`` is left; fails with
    ``why`` otherwise."""
    deadline = time.monotonic() + 5
    while _writers(path, reader):
        assert time.monotonic() < deadline, why
        time.sleep(0.01)


def _ends(pid: int, path: str, access: int) -> list[int]:
    """The descriptors of process ``pid`` open on the FIFO at ``path`` with ``access``
    (``os.O_RDONLY`` or ``os.O_WRONLY``); none once it is gone (replaced)."""
    ends: list[int] = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ends
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") != path:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = int(info.read().split("flags:")[1].split()[0], 8)
            if flags & os.O_ACCMODE == access:
                ends.append(int(fd))
    return ends


def _write_ends(pid: int, path: str) -> list[int]:
    return _ends(pid, path, os.O_WRONLY)


def _read_ends(pid: int, path: str) -> list[int]:
    return _ends(pid, path, os.O_RDONLY)


def _until(check: Callable[[], bool], why: str) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, why
        time.sleep(0.01)


def _holds_write_end(pid: int, path: str) -> bool:
    return bool(_write_ends(pid, path))


def test_the_keeper_opens_both_ends_and_holds_the_write_end_until_done(tmp_path: Path) -> None:
    keeper = fifokeeper.Keeper()
    try:
        assert keeper.start() and keeper.usable
        path, wfd, reader = _kept_fifo(keeper, tmp_path)
        try:
            assert _writers(path, reader)  # the daemon's end, the keepers' dups
            pids = keeper.pids
            _until(lambda: all(_holds_write_end(p, path) for p in pids), "a keeper holds none")
            assert _write_ends(os.getpid(), path) == [wfd]  # no dup of it in the daemon
            keeper.done(7)
            _until_no_writer(path, reader, "the keeper kept its dup after done")
            assert _write_ends(os.getpid(), path) == []  # done() closed the daemon's end
        finally:
            os.close(reader)
        with pytest.raises(OSError) as failed:
            keeper.open_fifo(str(tmp_path / "missing"), 8, NAME)
        assert failed.value.errno == errno.ENOENT
    finally:
        keeper.close()


@pytest.mark.parametrize(
    ("trouble", "names"),
    [
        (signal.SIGKILL, "own"),
        (signal.SIGSTOP, "own"),
        (signal.SIGKILL, "daemon"),
        (signal.SIGKILL, "forgotten"),
    ],
    ids=["killed", "stopped", "killed-names-of-daemon", "killed-inode-forgotten"],
)
def test_a_keeper_that_dies_or_stops_is_replaced_and_gets_the_live_ends(
    tmp_path: Path, trouble: int, names: str
) -> None:
    """``names``: the keeper keeps each FIFO's edge name ("own"), or asks the daemon's
    table of inodes ("daemon"), which forgot the inode meanwhile ("forgotten": the
    keeper was told its name first). A replacement is handed the end only by name."""
    table: dict[int, str] = {}
    keeper = fifokeeper.Keeper(name_of=None if names == "own" else table.get)
    old = -1
    try:
        assert keeper.start()
        table[7] = NAME
        path, wfd, reader = _kept_fifo(keeper, tmp_path)
        if names == "forgotten":
            keeper.remember(7, table.pop(7))
        first = set(keeper.pids)
        assert len(first) == fifokeeper.COPIES
        old = keeper.pid
        os.kill(old, trouble)
        deadline = time.monotonic() + 10
        while keeper.pid == old:
            assert time.monotonic() < deadline, "the keeper was not replaced"
            keeper.check()
            time.sleep(0.1)
        assert keeper.usable and keeper.replaced == 1
        for pid in first - {old}:  # its dup goes too: only the new keeper's is left
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        # The daemon's own end is what the new keeper got (no dup of it in the daemon).
        _until(lambda: _holds_write_end(keeper.pid, path), "the new keeper got no write end")
        assert _write_ends(os.getpid(), path) == [wfd]
        keeper.done(7)
        _until_no_writer(path, reader, "the new keeper kept its dup after done")
        os.close(reader)
    finally:
        if old > 0:
            with contextlib.suppress(OSError):
                os.kill(old, signal.SIGCONT)
        keeper.close()


def test_done_during_a_replacement_keeps_the_end_open_until_the_replacement_is_over(
    tmp_path: Path,
) -> None:
    """A keeper is replaced (a worker thread holds the lock and hands the new keeper every
    live write end) while the loop settles a finished stream (``done``, which never
    blocks). The daemon's write end is what the new keeper is handed: closed at once, its
    number could be reused by the next open (another FIFO's end) and handed in its place.
    It stays open until the replacement is over, then closes with the keepers' dups."""
    keeper = fifokeeper.Keeper()
    try:
        assert keeper.start()
        path, wfd, reader = _kept_fifo(keeper, tmp_path)
        ino = os.fstat(wfd).st_ino
        old = keeper.pid
        with keeper._locked():  # as check() replacing a keeper holds it
            keeper.done(7)  # from the loop meanwhile: queued, nothing closed
            assert os.fstat(wfd).st_ino == ino
            assert _write_ends(os.getpid(), path) == [wfd]
            keeper._replace_locked(0)  # the new keeper gets the end, still this FIFO's
            assert keeper.pid != old
        # The replacement over, the stream is settled: every write end goes.
        _until_no_writer(path, reader, "a write end outlived done()")
        assert _write_ends(os.getpid(), path) == []
        pids = keeper.pids
        _until(lambda: not any(_holds_write_end(p, path) for p in pids), "a keeper kept it")
        os.close(reader)
    finally:
        keeper.close()


def test_without_a_keeper_the_route_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fork(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_fork)
    keeper = fifokeeper.Keeper()
    assert not keeper.start()
    assert not keeper.usable
    with pytest.raises(fifokeeper.KeeperUnavailable):
        keeper.open_fifo("/nonexistent", 1, NAME)
    keeper.close()


def test_a_stopped_keeper_is_killed_when_the_daemon_stops_after_the_other_exited(
    tmp_path: Path,
) -> None:
    """A complete stream's "done" waits unread in a stopped keeper, which holds the write
    end: when the daemon stops, the other keeper exits (it held every unfinished stream
    and killed their readers) and the stopped one is killed, so the reader gets its EOF
    instead of waiting until someone resumes the keeper."""
    keeper = fifokeeper.Keeper()
    stopped = -1
    try:
        assert keeper.start()
        path, _wfd, reader = _kept_fifo(keeper, tmp_path)
        stopped = keeper.pids[-1]
        os.kill(stopped, signal.SIGSTOP)
        keeper.done(7)  # complete: the running keeper lets its dup go, the stopped one not
        time.sleep(0.2)
        assert _writers(path, reader)
        keeper.close()
        _until_no_writer(path, reader, "the stopped keeper still holds the stream")
        os.close(reader)
    finally:
        if stopped > 0:
            with contextlib.suppress(OSError):
                os.kill(stopped, signal.SIGCONT)
        keeper.close()


LATE_READER = (
    "import os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)\n"  # as gzip opens its input
    "while True:\n"
    "    try:\n"
    "        if os.read(fd, 100) == b'':\n"
    "            sys.exit(0)\n"  # EOF: it would take the stream for complete
    "    except BlockingIOError:\n"
    "        time.sleep(0.01)\n"
)


def test_a_program_opening_its_fifo_just_after_the_daemon_died_is_killed_not_given_eof(
    tmp_path: Path,
) -> None:
    """The daemon answered a program's open of a reader FIFO and died before the program's
    open reached the FIFO: the keepers had already scanned for holders (none), closed
    their write ends and exited, so a non-blocking open (gzip's) read EOF at once and the
    program took an empty stream for complete (a blocking one would wait for good). The
    keepers keep the write ends for a moment and kill such late openers too."""
    path = str(tmp_path / NAME)
    os.mkfifo(path)
    ino = os.stat(path).st_ino
    keeper = fifokeeper.Keeper()
    late: subprocess.Popen[bytes] | None = None
    try:
        assert keeper.start()
        hold, _wfd = keeper.open_fifo(path, ino, NAME)
        procs_before = keeper.pids
        # The daemon dies: every descriptor of its own closes, the keepers see EOF.
        for end in keeper._live.values():
            os.close(end)
        keeper._live.clear()
        os.close(hold)
        for copy in keeper._copies:
            assert copy is not None
            copy.sock.close()
        time.sleep(0.3)  # the keepers' first scan found nobody
        late = subprocess.Popen([sys.executable, "-c", LATE_READER, path])
        late.wait(10)
        assert late.returncode == -signal.SIGKILL
        for pid in procs_before:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # they exit once their write ends are let go
    finally:
        if late is not None and late.poll() is None:
            late.kill()
            late.wait()
        keeper.close()


def test_a_drain_held_message_the_keeper_socket_drops_gets_that_keeper_replaced(
    tmp_path: Path,
) -> None:
    """The keeper keeps a writer FIFO's drain end until the daemon's ``D`` (drain_held),
    sent without waiting. Dropped (a keeper's socket full for a moment: a burst), the
    keeper held the read end for its life: a writer whose drain ended (its reader closed
    early) was never told EPIPE and blocked on its full pipe for good. A send that fails
    marks the keeper for replacement, as done() does; its dups die with it."""
    keeper = fifokeeper.Keeper()
    try:
        assert keeper.start()
        path = _fifo(tmp_path)
        fd = keeper.open_drain_end(path, 7)
        pids = keeper.pids
        _until(lambda: any(_read_ends(p, path) for p in pids), "no keeper kept a dup")
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(20000):  # fills the stopped keepers' sockets
                keeper.drain_held(10**9)
            keeper.drain_held(7)  # dropped: nothing takes it now
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.5)  # the keepers read what was queued (not the dropped one)
        keeper.check()
        _until(
            lambda: not any(_read_ends(p, path) for p in set(pids) | set(keeper.pids)),
            "a keeper kept the drain end after the daemon said the program holds the FIFO",
        )
        os.close(fd)
    finally:
        keeper.close()
