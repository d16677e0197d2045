"""What /proc tells about a requesting process."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fractalfs import procs


def _wait_zombie(proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.01)
    raise AssertionError("child did not exit")


def test_exit_status_of_exiting_processes() -> None:
    ok = subprocess.Popen(["true"])
    bad = subprocess.Popen(["sh", "-c", "exit 3"])
    killed = subprocess.Popen(["sleep", "30"])
    live = subprocess.Popen(["sleep", "30"])
    killed.kill()
    try:
        for p in (ok, bad, killed):
            _wait_zombie(p)
        assert procs.exit_status(ok.pid) == 0
        assert procs.exit_status(bad.pid) == 3 << 8
        assert procs.exit_status(killed.pid) == signal.SIGKILL
        assert procs.exit_status(live.pid) is None
        assert procs.describe_status(3 << 8) == "exited with status 3"
        assert procs.describe_status(9) == "killed by signal 9"
    finally:
        live.kill()
        for p in (ok, bad, killed, live):
            p.wait()


def test_signal_pending_respects_blocked_signals() -> None:
    code = (
        "import signal, sys, time\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        assert not procs.signal_pending(child.pid)
        child.send_signal(signal.SIGUSR1)  # blocked: does not count
        time.sleep(0.05)
        assert not procs.signal_pending(child.pid)
    finally:
        child.kill()
        child.wait()
    assert procs.signal_pending(child.pid)  # gone: nobody waits any more


def test_signal_pending_sees_an_undelivered_signal() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        child.send_signal(signal.SIGSTOP)  # a stopped process keeps SIGTERM pending
        time.sleep(0.05)
        assert not procs.signal_pending(child.pid)
        child.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        assert procs.signal_pending(child.pid)
    finally:
        child.kill()
        child.wait()


def test_dying_is_gone_or_exiting_but_not_merely_signalled() -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        assert not procs.dying(child.pid)
        child.send_signal(signal.SIGUSR1)  # caught: it lives on
        time.sleep(0.05)
        assert not procs.dying(child.pid)
        child.send_signal(signal.SIGKILL)
        _wait_zombie(child)
        assert procs.dying(child.pid)
    finally:
        child.kill()
        child.wait()
    assert procs.dying(child.pid)  # reaped


def test_which_reader_endings_mean_closed_early() -> None:
    assert procs.reader_closed_early(None)  # closed while still running (`head -c 10`)
    assert procs.reader_closed_early(0)
    for signum in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        assert procs.reader_closed_early(int(signum)), signum
        assert procs.reader_closed_early(int(signum) | 0x80), signum  # with a core dump bit
    for signum in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
        assert not procs.reader_closed_early(int(signum)), signum
    assert not procs.reader_closed_early(1 << 8)  # exit 1
    assert not procs.reader_closed_early(2 << 8)  # exit 2: not SIGINT


def test_a_burst_of_writer_opens_scans_proc_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dynamic policy's CPU figures: one /proc scan serves every group for a moment,
    so N writers opened at once do not cost N scans of every process."""
    import os as _os

    from fractalfs import procs as _procs

    scans = 0
    listdir = _os.listdir

    def counting(path: str) -> list[str]:
        nonlocal scans
        scans += path == "/proc"
        return listdir(path)

    monkeypatch.setattr(_os, "listdir", counting)
    monkeypatch.setattr(_procs, "_scan", (float("-inf"), {}))
    own = _os.getpgid(0)
    sum(range(3_000_000))  # some CPU of our own
    times = [_procs.group_times(own) for _ in range(500)]
    assert scans == 1
    assert times[0][0] > 0 and len(set(times)) == 1
    assert _procs.group_times(own, max_age=0)[0] >= times[0][0]  # fresh when asked
    assert scans == 2


LINGERING_CLOSE = """
import socket, struct, sys
listener = socket.create_server(("127.0.0.1", 0))
sock = socket.create_connection(listener.getsockname())
peer, _ = listener.accept()  # never reads: what we send stays queued
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
sock.setblocking(False)
try:
    while True:
        sock.send(b"x" * 65536)
except BlockingIOError:
    pass
sock.setblocking(True)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
other = open("/dev/null")  # a descriptor that stays open: a close of it is not ours
print(sock.fileno(), flush=True)
sock.close()  # blocks (lingers) until the peer reads or 5 s pass
"""


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/<pid>/syscall")
def test_closing_a_file_sees_a_program_blocked_in_close() -> None:
    """A FLUSH is served while its program waits in close(2), its descriptor already out
    of the table: ``closing_a_file`` says so (a socket closing with SO_LINGER waits the
    same way). A program elsewhere (sleeping, running) is not closing a file."""
    closing = subprocess.Popen([sys.executable, "-c", LINGERING_CLOSE], stdout=subprocess.PIPE)
    sleeping = subprocess.Popen(["sleep", "30"])
    try:
        assert closing.stdout is not None
        closing.stdout.readline()
        deadline = time.monotonic() + 4
        while not procs.closing_a_file(closing.pid):
            assert time.monotonic() < deadline, "never seen in close(2)"
            time.sleep(0.01)
        assert not procs.closing_a_file(sleeping.pid)
        assert not procs.closing_a_file(999_999_999)  # no such process
    finally:
        closing.kill()
        sleeping.kill()
        closing.wait()
        sleeping.wait()


def test_a_thread_maps_to_its_process_and_outlives_nothing() -> None:
    """FUSE names the requesting thread. Once a worker thread that opened a file exited,
    its process runs on: not interrupted, not exiting; its own signals still count."""
    code = (
        "import threading, time\n"
        "t = threading.Thread(target=lambda: print(threading.get_native_id(), flush=True))\n"
        "t.start(); t.join()\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        tid = int(child.stdout.readline())
        for _ in range(200):
            if not Path(f"/proc/{child.pid}/task/{tid}").exists():
                break
            time.sleep(0.01)
        assert tid != child.pid and procs.tgid(child.pid) == child.pid
        assert not procs.signal_pending(tid, child.pid)  # the thread is gone, not the program
        assert procs.signal_pending(tid)  # the old reading: "gone, nobody waits"
        assert procs.exit_status(child.pid) is None
        child.send_signal(signal.SIGSTOP)
        child.send_signal(signal.SIGTERM)  # stays pending while stopped
        time.sleep(0.05)
        assert procs.signal_pending(tid, child.pid)
    finally:
        child.kill()
        child.wait()
    assert procs.signal_pending(tid, child.pid)  # the process is gone


def test_tgid_of_a_live_thread() -> None:
    import threading

    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(procs.tgid(threading.get_native_id())))
    t.start()
    t.join()
    assert got == [os.getpid()]


SEES = "from fractalfs import procs; print(procs.sees_every_process())"


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
@pytest.mark.parametrize("proc_mount", [[], ["--mount-proc"]], ids=["host-proc", "own-proc"])
def test_only_the_initial_pid_namespace_sees_every_process(proc_mount: list[str]) -> None:
    """A daemon that may miss a holder of its reader FIFO must not hand one out: in a child
    pid namespace /proc shows either another namespace's processes (/proc/self is not us)
    or only the namespace's own (--mount-proc: in a private mount namespace)."""
    assert procs.sees_every_process()
    got = subprocess.run(
        ["unshare", "--pid", "--fork", *proc_mount, sys.executable, "-c", SEES],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert got.stdout.strip() == "False"


def test_an_opener_the_daemon_cannot_name_is_not_visible() -> None:
    assert procs.visible(os.getpid())
    assert not procs.visible(0)  # FUSE's pid of a requester outside our pid namespace
    assert not procs.visible(-1)


def test_reader_fifos_are_refused_where_a_holder_could_be_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from fractalfs.fs import Operations

    fake = SimpleNamespace(  # what __init__ and _refuse_fifo touch
        persistence=SimpleNamespace(), slots={}, config=SimpleNamespace(fd_reserve=512)
    )
    ops = Operations(fake)  # type: ignore[arg-type]
    assert ops._refuse_fifo(os.getpid()) == ""
    assert "not in this daemon's /proc" in ops._refuse_fifo(0)
    monkeypatch.setattr(procs, "sees_every_process", lambda: False)
    assert "pid namespace" in ops._refuse_fifo(os.getpid())
    monkeypatch.undo()
    ops.keeper._failed = True  # it could not be started
    assert "keeper" in ops._refuse_fifo(os.getpid())


def test_holds_file_tells_reading_from_writing_and_checks_the_inode(tmp_path: Path) -> None:
    """One scan serves both FIFO routes: a reader FIFO's holders (read access) and a writer
    FIFO's opener (write access), by link text, then fdinfo (access, inode, mount)."""
    name = "0123456789abcdef0123456789abcdef"
    path = tmp_path / name
    path.write_bytes(b"")
    ino = os.stat(path).st_ino
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'ab'); sys.stdin.read()", path],
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not procs.holds_file(holder.pid, name, writing=True):
            assert time.monotonic() < deadline, "the holder never opened its file"
            time.sleep(0.01)
        with open(path, "rb") as own:
            mnt = procs.mount_id(own.fileno())
        assert procs.holds_file(holder.pid, name, ino, mnt, writing=True)
        assert not procs.holds_file(holder.pid, name, ino, mnt)  # not open for reading
        assert not procs.holds_file(holder.pid, name, ino + 1, mnt, writing=True)
        assert not procs.holds_file(holder.pid, name, ino, (mnt or 0) + 1, writing=True)
        assert not procs.holds_file(holder.pid, "f" * 32, writing=True)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


def test_opening_tells_an_open_from_another_call_and_from_running(tmp_path: Path) -> None:
    """fiforoute.opening: a thread preempted inside its open reads "running" in
    /proc/<pid>/syscall, like one in user code; only a thread blocked in another call (or
    gone) is known not to be opening. Taking "running" for "not opening" killed readers
    whose open had not finished yet on a loaded machine."""
    from fractalfs import fiforoute

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    in_open = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'rb')"])
    asleep = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while fiforoute.opening(in_open.pid) is not True:
            assert time.monotonic() < deadline, "never seen inside open(2)"
            time.sleep(0.01)
        while fiforoute.opening(asleep.pid) is not False:
            assert time.monotonic() < deadline, "never seen blocked in nanosleep"
            time.sleep(0.01)
        assert fiforoute.opening(spin.pid) is None  # never blocked: "running"
    finally:
        for p in (spin, in_open, asleep):
            p.kill()
            p.wait()
    assert fiforoute.opening(asleep.pid) is False  # gone


def test_out_of_descriptors_a_scan_of_proc_finds_nothing_instead_of_failing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon out of descriptors cannot list /proc: a writer's close (FLUSH) must not
    fail for it (it answered EIO, "unexpected error in flush"), nor a writer's open."""

    def emfile(path: str) -> list[str]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)

    monkeypatch.setattr(os, "listdir", emfile)
    assert procs.failing_in_group(os.getpgid(0), 0) is None
    assert procs._scan_groups() == {}


def _zombie_child_of_3(**popen: object) -> subprocess.Popen[bytes]:
    """A process whose child exits 3 and stays a zombie (never reaped): PF_EXITING with
    its status in /proc, as a process exiting at the moment of a FLUSH is."""
    code = "import os, time\nif os.fork() == 0:\n    os._exit(3)\ntime.sleep(30)\n"
    return subprocess.Popen([sys.executable, "-c", code], **popen)  # type: ignore[call-overload,no-any-return]


def _wait_zombie_of(parent: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                text = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            fields = text[text.rindex(b")") + 2 :].split()
            if int(fields[1]) == parent and fields[0] == b"Z":
                return
        time.sleep(0.02)
    raise AssertionError(f"no zombie child of {parent}")


def test_a_failing_holder_is_the_openers_descendant_not_any_process_of_its_group() -> None:
    """A shell script's commands share one process group: a sibling of the writer that
    exits non-zero (grep finding nothing) at the moment of a holder's FLUSH is no failing
    holder of the writer's file. A child of the opener exiting non-zero still is."""
    opener = subprocess.Popen(["sleep", "30"], process_group=0)
    procs_started = [opener]
    try:
        sibling = _zombie_child_of_3(process_group=opener.pid)
        procs_started.append(sibling)
        _wait_zombie_of(sibling.pid)
        assert procs.failing_in_group(opener.pid, opener.pid) is None
        # The same, forked by the opener itself: its holder failing.
        child_opener = _zombie_child_of_3(process_group=0)
        procs_started.append(child_opener)
        _wait_zombie_of(child_opener.pid)
        assert procs.failing_in_group(child_opener.pid, child_opener.pid) == 3 << 8
    finally:
        for p in procs_started:
            p.kill()
            p.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="the proc connector needs root")
def test_exit_events_are_only_whole_process_exits() -> None:
    """The daemon's proc connector socket gets no fork, exec or thread-exit events: the
    kernel's filter drops them, so a busy host's other programs do not wake the daemon.
    (Without the filter, each `sh` below sends a fork and an exec event too.)"""
    sock = procs.open_exit_events()
    if sock is None:
        pytest.skip("no proc connector here (not in the initial network namespace)")
    with sock:
        sock.settimeout(1.0)
        children = [subprocess.Popen(["sh", "-c", "exit 3"]) for _ in range(10)]
        for child in children:
            child.wait()
        thread = threading.Thread(target=time.sleep, args=(0.01,))
        thread.start()
        thread.join()
        pending = {child.pid for child in children}
        others = []
        while pending:
            data = sock.recv(4096)
            event = procs.parse_exit_event(data)
            if event is None:
                others.append(data[:64])
                continue
            if event[0] in pending:
                assert event[1] == 3 << 8
                pending.discard(event[0])
        assert others == [], "events other than a whole process's exit came through"
