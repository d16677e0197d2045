"""Readers through a kernel FIFO (``fifo_readers``, the default): a program sees a FIFO
once it opened the edge, and a stream that did not complete never ends in EOF: bytes still
in the pipe are not delivered, and a reader whose stream failed, or whose daemon died, is
killed rather than given an EOF that would look like the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fractalfs import testhooks
from fractalfs.testing import Node

from .conftest import (
    Cluster,
    Pair,
    Programs,
    needs_fuse,
    new_edge,
    sh,
    sha_file,
    size,
    wait_for,
    waiting_to_read,
)

pytestmark = needs_fuse

SLOWCAT = [sys.executable, str(Path(__file__).with_name("slowcat.py"))]
MiB = 1 << 20
KEEPERS = 2  # keepers a daemon runs (fifokeeper.COPIES)


def _paused_stream(
    cluster: Cluster,
    programs: Programs,
    tmp_path: Path,
    total: int,
    resume_on_usr1: bool = False,
    **reader_node: Any,
) -> tuple[Node, subprocess.Popen[bytes], subprocess.Popen[bytes], Path]:
    """A writer on node a paused after its first MiB of ``total`` random bytes (for good,
    or until SIGUSR1 with ``resume_on_usr1``), and a ``cat`` reader on node b
    (``reader_node``: its options) that has that MiB. Returns node b, the writer, the
    reader and the reader's output; the source is ``tmp_path / "src"``."""
    cluster.start_discovery()
    a = cluster.node("a")
    b = cluster.node("b", **reader_node)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(total))
    edge = new_edge()
    cmd = " ".join([*SLOWCAT, str(src), a.path(edge), "--pause-after", str(MiB)])
    writer = programs.start(f"exec {cmd}" + (" --resume-on-usr1" if resume_on_usr1 else ""))
    assert writer.stdout is not None and writer.stdout.readline() == b"paused\n"
    out = tmp_path / "out"
    reader = programs.start(f"exec cat {b.path(edge)} > {out}")
    wait_for(lambda: size(out) >= MiB, 10, "the first MiB")
    return b, writer, reader, out


def _read_through_a_fifo(written: str, read: str, data: bytes) -> None:
    """``data`` written to the edge at ``written`` arrives, then EOF, through a FIFO opened
    at ``read`` (the same edge on the reader's node)."""
    sh(f"printf {data.decode()} > {written}")
    fd = os.open(read, os.O_RDONLY)
    try:
        assert stat.S_ISFIFO(os.fstat(fd).st_mode)
        assert stat.S_ISREG(os.stat(read).st_mode)  # stat, ls: the regular file, as before
        assert os.read(fd, 100) == data
        assert os.read(fd, 100) == b""
    finally:
        os.close(fd)


def test_an_open_reader_sees_a_fifo_and_stat_the_regular_file(pair: Pair) -> None:
    _, w, r = pair.paths()
    _read_through_a_fifo(w, r, b"hello")


def test_a_reader_opening_with_o_direct_reads_through_fuse(pair: Pair, tmp_path: Path) -> None:
    """A FIFO cannot be opened with O_DIRECT (EINVAL, as a mkfifo FIFO): `dd iflag=direct`
    got that error at its open, where the regular file reads."""
    _, w, r = pair.paths()
    src, out = tmp_path / "src", tmp_path / "out"
    src.write_bytes(os.urandom(3 * MiB + 123))
    sh(f"dd if={r} of={out} iflag=direct bs=1M status=none & sleep 0.3; cat {src} > {w}; wait $!")
    assert sha_file(out) == sha_file(src)


READ_SOME = (
    "import os, stat, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "assert stat.S_ISFIFO(os.fstat(fd).st_mode)\n"
    "got = b''\n"
    "while len(got) < 1000:\n"
    "    got += os.read(fd, 1000 - len(got))\n"
    "print(len(got), flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_killed_reader_gets_the_bytes_left_in_its_pipe_again_exactly_once(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """Bytes in the reader's pipe were handed out, not consumed: the reader's daemon reports
    only what the program read (written - FIONREAD), and a re-run reads the whole stream."""
    cluster.start_discovery()
    a = cluster.node("a", mode="persistent")
    b = cluster.node("b", mode="persistent")
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB + 5))
    edge = new_edge()
    sh(f"cat {src} > {a.path(edge)}")
    script = tmp_path / "read_some.py"
    script.write_text(READ_SOME)
    reader = programs.start(f"exec {sys.executable} {script} {b.path(edge)}")
    assert reader.stdout is not None and reader.stdout.readline() == b"1000\n"
    time.sleep(2.5)  # progress goes to discovery every second
    assert cluster.edge(edge)["bytes_delivered"] == 1000  # not 1000 + the pipe's MiB
    os.kill(reader.pid, signal.SIGKILL)
    reader.communicate(timeout=10)
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "failed", 10, "reader failed")
    assert cluster.edge(edge)["bytes_delivered"] == 1000
    out = tmp_path / "out"
    sh(f"cat {b.path(edge)} > {out}", timeout=60)
    assert sha_file(out) == sha_file(src)


def _daemon_dies_and_its_reader_with_it(
    node: Node,
    reader: subprocess.Popen[bytes],
    writer: subprocess.Popen[bytes],
    stop: bool = False,
) -> None:
    """SIGKILLs (``stop``: SIGTERMs) ``node``'s daemon mid-stream: its FIFO reader must die
    by SIGKILL (the keeper, or the daemon before it lets the write end go), never read EOF
    and exit 0 with a short stream. Then stops the writer."""
    if stop:
        node.stop()
    else:
        node.kill()
    reader.communicate(timeout=10)
    assert reader.returncode == -signal.SIGKILL
    os.kill(writer.pid, signal.SIGKILL)
    writer.communicate(timeout=10)


def test_a_reader_whose_daemon_is_killed_mid_stream_is_killed_not_given_eof(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """The keeper holds the FIFO's write end past the daemon's death and kills the reader:
    a program must never exit 0 with a short stream."""
    b, writer, reader, _out = _paused_stream(cluster, programs, tmp_path, 4 * MiB)
    wait_for(lambda: waiting_to_read(reader.pid), 5, "the reader waiting for more")
    _daemon_dies_and_its_reader_with_it(b, reader, writer)  # 1 MiB of 4 read


def test_a_failed_stream_kills_its_reader(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """No re-run writer within the writer-lost timeout: a FUSE reader gets EIO, a FIFO
    reader is killed (a FIFO has no way to carry the error, and EOF would be the end)."""
    _b, writer, reader, out = _paused_stream(
        cluster, programs, tmp_path, 2 * MiB, extra=["--writer-lost-timeout", "1"]
    )
    os.kill(writer.pid, signal.SIGKILL)  # a failed generation; no re-run comes
    reader.communicate(timeout=20)
    assert reader.returncode == -signal.SIGKILL
    assert size(out) == MiB


def test_a_reader_whose_daemon_stops_mid_stream_is_killed(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """SIGTERM to the reader's daemon: a FUSE reader gets EIO; a FIFO reader of a stream
    that is not complete is killed before the daemon lets its write end go."""
    b, writer, reader, _out = _paused_stream(cluster, programs, tmp_path, 2 * MiB)
    _daemon_dies_and_its_reader_with_it(b, reader, writer, stop=True)


def test_a_reader_fifo_that_cannot_be_opened_is_not_an_empty_stream(
    cluster: Cluster, programs: Programs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon could not open the reader FIFO's write end (here: out of descriptors),
    yet the LOOKUP handed the FIFO out: gzip's non-blocking open then read EOF at once (a
    FIFO no writer ever opened) and wrote an empty archive, exit 0; a blocking `cat`
    waited in open(2) for good. Now that open reads through FUSE (or fails with an
    errno): the whole stream or an error, never a short one."""
    # No reserve: the daemon tries the FIFO and runs out of descriptors in the keeper's
    # hand-back (with one, it would not try: see the test after these).
    monkeypatch.setenv("FRACTALFS_FD_RESERVE", "0")
    cluster.start_discovery()
    # Persistent: the failed reader may have taken (and a transient writer freed) bytes.
    a = cluster.node("a", mode="persistent")
    warm = _warm_up(programs, a)
    edge = new_edge()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * 1024))
    sh(f"cat {src} > {a.path(edge)}")  # a complete stream, waiting for its reader
    out = tmp_path / "out.gz"
    # One descriptor left: enough to look at /proc, not for both ends the FIFO needs.
    with _one_descriptor_left(cluster, a, warm):
        res = sh(f"timeout 20 gzip -c {a.path(edge)} > {out}", check=False)
    assert "cannot open the reader's FIFO: [Errno 24]" in a.log.read_text()  # the case
    got = subprocess.run(["gzip", "-dc", str(out)], capture_output=True, check=False).stdout
    assert res.returncode != 0 or got == src.read_bytes(), (res.returncode, len(got))
    if res.returncode != 0:
        # Nothing was lost: the stream is still there for the next reader.
        again = sh(f"timeout 20 cat {a.path(edge)}").stdout
        assert again == src.read_bytes()


def _warm_up(programs: Programs, node: Node) -> str:
    """One stream through ``node``: its keeper runs and discovery's connections are pooled.
    Returns the edge."""
    warm = new_edge()
    first = programs.start(f"cat {node.path(warm)}")
    sh(f"echo warm > {node.path(warm)}")
    assert first.communicate(timeout=10)[0] == b"warm\n"
    return warm


@contextlib.contextmanager
def _one_descriptor_left(cluster: Cluster, node: Node, warm: str) -> Iterator[None]:
    """``node``'s daemon may open one more descriptor while the block runs. The warm-up's
    aftermath (its ends' releases, recorded in discovery over pooled connections) opens
    descriptors for a moment: counted free while in use, or in use once the limit is set,
    they made the open read /proc with none left (EMFILE: FUSE without trying the FIFO)
    under load. So this first waits until it settled and nothing changes."""
    pid = node.pid
    wait_for(lambda: cluster.edge(warm).get("reader_state") == "done", 10, "warm-up settled")
    wait_for(lambda: _steady_fds(pid), 20, "the daemon's descriptors steady")
    held = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = next(n for n in range(len(held) + 1) if n not in held)
    soft, hard = sh(f"prlimit --pid {pid} --nofile -o SOFT,HARD --noheadings").stdout.split()
    sh(f"prlimit --pid {pid} --nofile={lowest_free + 1}:{hard.decode()}")
    try:
        yield
    finally:
        sh(f"prlimit --pid {pid} --nofile={soft.decode()}:{hard.decode()}")


def _steady_fds(pid: int, over: float = 0.5) -> bool:
    """Whether process ``pid`` holds the same descriptors ``over`` seconds apart."""
    before = os.listdir(f"/proc/{pid}/fd")
    time.sleep(over)
    return sorted(before) == sorted(os.listdir(f"/proc/{pid}/fd"))


def test_a_writer_fifo_that_cannot_be_opened_writes_through_fuse(
    cluster: Cluster, programs: Programs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keeper could not hand the daemon the end it drains (here: the daemon is out of
    descriptors): the writer's open must neither hang in open(2) (a FIFO nobody reads) nor
    lose the stream. It writes through FUSE instead."""
    # No reserve: the daemon tries the FIFO and runs out of descriptors in the keeper's
    # hand-back (with one, it would not try: see the test after these).
    monkeypatch.setenv("FRACTALFS_FD_RESERVE", "0")
    cluster.start_discovery()
    a = cluster.node("a")
    warm = _warm_up(programs, a)
    edge = new_edge()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * 1024))
    # One descriptor left: not enough for the keeper's socketpair and the end it sends.
    with _one_descriptor_left(cluster, a, warm):
        res = sh(f"timeout 20 cat {src} > {a.path(edge)}", check=False)
    assert "writer FIFOs: FUSE writes instead" in a.log.read_text()  # the case
    assert res.returncode == 0, res
    assert sh(f"timeout 20 cat {a.path(edge)}").stdout == src.read_bytes()


def test_a_writer_whose_daemon_dies_before_its_open_fails_at_once(
    cluster: Cluster, programs: Programs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon dies between answering a writer FIFO's LOOKUP and the program's open of
    the FIFO (a test hook closes the daemon's read end before the answer and kills it
    0.3 s later): no reader of the FIFO is left, and the open waited for one for good.
    The keeper holds a read end until the program holds the FIFO, and for a second after
    the daemon's death: the open completes and the program's writes then fail with
    EPIPE/SIGPIPE."""
    monkeypatch.setenv(testhooks.ENV, "1")
    monkeypatch.setenv(testhooks.WRITER_LOOKUP_DIES_ENV, "1")
    cluster.start_discovery()
    a = cluster.node("a")
    warm = programs.start(f"exec cat {a.path(new_edge())}")  # the FIFO route is ready
    wait_for(lambda: _in_pipe_read(warm.pid), 10, "a reader FIFO", [warm])
    os.kill(warm.pid, signal.SIGKILL)
    warm.communicate(timeout=10)
    writer = programs.start(f"exec yes > {a.path(new_edge())}")
    _, err = writer.communicate(timeout=20)
    assert "the daemon dies after this writer's LOOKUP" in a.log.read_text()  # the case
    assert writer.returncode == -signal.SIGPIPE, (writer.returncode, err)


def test_a_writer_open_refused_leaves_the_keepers_no_end_of_its_fifo(
    cluster: Cluster, programs: Programs
) -> None:
    """A writer FIFO's drain end is opened by a keeper, which keeps a dup of it until the
    program holds the FIFO. An open the node then refuses (EBUSY: a writer already holds
    the edge here) gets no FIFO: the keepers' dups of its end must go with it, not stay
    for the keeper's life (one descriptor, and a FIFO, per refused open)."""
    cluster.start_discovery()
    a = cluster.node("a")
    warm = programs.start(f"exec cat {a.path(new_edge())}")  # the FIFO route is ready
    wait_for(lambda: _in_pipe_read(warm.pid), 10, "a reader FIFO", [warm])
    os.kill(warm.pid, signal.SIGKILL)
    warm.communicate(timeout=10)
    wait_for(lambda: _keepers_hold(a, 0), 10, "the keepers letting the warm-up go")
    edge = new_edge()
    holder = programs.start(f"exec sleep 60 > {a.path(edge)}")
    fifo = f"/proc/{holder.pid}/fd/1"
    wait_for(lambda: stat.S_ISFIFO(os.stat(fifo).st_mode), 10, "the writer's FIFO", [holder])
    wait_for(lambda: _keepers_hold(a, 0), 10, "the keepers letting the held FIFO go")
    for _ in range(3):
        res = sh(f"echo more > {a.path(edge)}", check=False)
        assert res.returncode != 0 and b"busy" in res.stderr, res  # the case: refused
    wait_for(lambda: _keepers_hold(a, 0), 5, "the keepers letting the refused FIFOs go")


def test_a_daemon_near_its_descriptor_limit_hands_out_fuse_opens_not_fifos(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A FIFO costs the daemon descriptors for its life; a daemon out of them cannot read
    /proc/<pid>/fd and would take a reader holding its FIFO for one that never opened it
    (and kill it). Near the limit, opens get FUSE instead: the whole stream, no FIFO."""
    cluster.start_discovery()
    a = cluster.node("a")
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB + 5))
    pid = a.pid
    soft, hard = sh(f"prlimit --pid {pid} --nofile -o SOFT,HARD --noheadings").stdout.split()
    # Below the default reserve (512): every new FIFO would eat into it.
    sh(f"prlimit --pid {pid} --nofile=500:{hard.decode()}")
    try:
        edge = new_edge()
        fd = os.open(a.path(edge), os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert stat.S_ISREG(os.fstat(fd).st_mode)  # FUSE, not a FIFO
        finally:
            os.close(fd)
        edge = new_edge()
        writer = subprocess.Popen(f"exec cat {src} > {a.path(edge)}", shell=True)
        try:
            got = sh(f"timeout 20 cat {a.path(edge)}").stdout
        finally:
            writer.wait(timeout=20)
    finally:
        sh(f"prlimit --pid {pid} --nofile={soft.decode()}:{hard.decode()}")
    assert writer.returncode == 0
    assert got == src.read_bytes()
    log = a.log.read_text()
    assert "reader FIFOs: FUSE reads instead: too close to the descriptor limit (500)" in log
    assert "writer FIFOs: FUSE writes instead: too close to the descriptor limit (500)" in log


# -- the keeper: it opens the write ends, and is replaced when it dies or stops -----------


def _keepers(node: Node) -> set[int]:
    """The pids of ``node``'s FIFO keepers (its children running fractalfs.fifokeeper)."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == node.pid and b"fractalfs.fifokeeper" in cmdline and not _zombie(int(name)):
            found.add(int(name))
    return found


def _keeper(node: Node) -> int:
    """The pid of one of ``node``'s FIFO keepers (-1: none)."""
    return min(_keepers(node), default=-1)


def _replaced(node: Node, old: int) -> bool:
    """``old`` is gone and as many keepers run as before it went."""
    now = _keepers(node)
    return old not in now and len(now) >= KEEPERS


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_no_thread_of_the_daemon_opens_a_file_on_its_own_mount(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """The reader FIFO's write end and the writer FIFO's read end are opened by the
    keeper process: a daemon SIGKILLed while one of its own threads waits in a request to
    its own mount cannot exit (its mount hangs instead of failing with ENOTCONN). The
    writer (`printf > E`) and the reader both take the FIFO route here."""
    a = cluster.node("a")
    trace = tmp_path / "trace"
    tracer = programs.start(f"exec strace -f -qq -e trace=open,openat -o {trace} -p {a.pid}")
    wait_for(lambda: _traced_by(a.pid, tracer.pid), 10, "strace attached to every thread")
    edge = new_edge()
    w = os.open(a.path(edge), os.O_WRONLY | os.O_TRUNC)
    try:
        assert stat.S_ISFIFO(os.fstat(w).st_mode)  # the writer FIFO route was taken
        os.write(w, b"hello")
    finally:
        os.close(w)
    fd = os.open(a.path(edge), os.O_RDONLY)
    try:
        assert stat.S_ISFIFO(os.fstat(fd).st_mode)  # the FIFO route was taken
        assert os.read(fd, 100) == b"hello"
    finally:
        os.close(fd)
    time.sleep(0.5)
    os.kill(tracer.pid, signal.SIGTERM)
    tracer.communicate(timeout=10)
    opens = [line for line in trace.read_text().splitlines() if str(a.mountpoint) in line]
    assert not opens, opens


def _traced_by(pid: int, tracer: int) -> bool:
    """Every thread of ``pid`` is traced by ``tracer`` (TracerPid in its status)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                line = next(x for x in f if x.startswith("TracerPid:"))
            if int(line.split()[1]) != tracer:
                return False
    except (OSError, StopIteration, ValueError):
        return False
    return bool(tasks)


def _stream_with_keeper_trouble(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> tuple[Node, subprocess.Popen[bytes], subprocess.Popen[bytes], Path, Path]:
    """A writer on node a paused after 1 MiB of 2 (SIGUSR1 resumes it) and a ``cat`` on
    node b that has that MiB through its FIFO. Returns b, writer, reader, source, output."""
    b, writer, reader, out = _paused_stream(cluster, programs, tmp_path, 2 * MiB, True)
    return b, writer, reader, tmp_path / "src", out


def test_a_killed_keeper_is_replaced_and_the_new_one_holds_live_streams(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """A keeper killed mid-stream: the daemon starts another and hands it the live write
    ends, so the daemon's death (with the other original keeper) still kills the reader
    instead of giving it EOF."""
    b, writer, reader, _src, _out = _stream_with_keeper_trouble(cluster, programs, tmp_path)
    first = _keepers(b)
    assert len(first) == KEEPERS
    old = min(first)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: _replaced(b, old), 10, "a new keeper")
    time.sleep(0.5)  # the live write end reaches it
    for pid in first - {old}:  # only the new keeper is left to hold the stream
        os.kill(pid, signal.SIGKILL)
    _daemon_dies_and_its_reader_with_it(b, reader, writer)  # 1 MiB of 2 read


@pytest.mark.parametrize("order", ["keeper-then-daemon", "daemon-then-keeper", "keeper-0.5s"])
def test_a_keeper_and_its_daemon_killed_together_kill_the_reader(
    cluster: Cluster, programs: Programs, tmp_path: Path, order: str
) -> None:
    """A keeper and its daemon SIGKILLed in the same instant, in either order, or the
    daemon half a second after the keeper (before a ping could notice): with a single
    keeper the reader read EOF and `cat` exited 0 with 1 MiB of 2. The other keeper holds
    every live write end and kills the reader."""
    b, writer, reader, _src, _out = _stream_with_keeper_trouble(cluster, programs, tmp_path)
    keeper = _keeper(b)
    assert keeper > 0
    if order == "daemon-then-keeper":
        os.kill(b.pid, signal.SIGKILL)
        os.kill(keeper, signal.SIGKILL)
    else:
        os.kill(keeper, signal.SIGKILL)
        if order == "keeper-0.5s":
            time.sleep(0.5)
        os.kill(b.pid, signal.SIGKILL)
    _daemon_dies_and_its_reader_with_it(b, reader, writer)  # 1 MiB of 2 read


@contextlib.contextmanager
def _keeper_stopped(node: Node) -> Iterator[int]:
    """One of ``node``'s keepers stopped (SIGSTOP) for the block; its pid. Resumed after
    (if it still exists), whatever happened."""
    stopped = _keeper(node)
    assert stopped > 0
    os.kill(stopped, signal.SIGSTOP)
    try:
        yield stopped
    finally:
        with contextlib.suppress(OSError):
            os.kill(stopped, signal.SIGCONT)


def test_a_stopped_keeper_does_not_hold_the_reader_when_its_daemon_dies(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """A keeper stopped (SIGSTOP) when its daemon is killed: with a single keeper the
    reader stayed blocked until the keeper was resumed. The other keeper kills it."""
    b, writer, reader, _src, _out = _stream_with_keeper_trouble(cluster, programs, tmp_path)
    with _keeper_stopped(b):
        _daemon_dies_and_its_reader_with_it(b, reader, writer)  # 1 MiB of 2 read


def test_a_daemon_stopped_with_a_stopped_keeper_kills_the_reader_and_leaves_no_keeper(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """SIGTERM to a daemon one of whose keepers is stopped: the other keeper kills the
    reader of the unfinished stream, and the stopped one is killed rather than left
    holding pipes (a complete stream's reader would wait for its EOF until resumed)."""
    b, writer, reader, _src, _out = _stream_with_keeper_trouble(cluster, programs, tmp_path)
    with _keeper_stopped(b) as stopped:
        _daemon_dies_and_its_reader_with_it(b, reader, writer, stop=True)
        wait_for(lambda: _zombie(stopped), 15, "the stopped keeper killed")


def test_a_stopped_keeper_is_replaced_and_complete_streams_end(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """A keeper stopped (SIGSTOP) holds its dups of the write ends: a complete stream's
    EOF would wait for it forever. The daemon notices that it stopped answering, kills it
    and starts another: the reader ends with every byte."""
    b, writer, reader, src, out = _stream_with_keeper_trouble(cluster, programs, tmp_path)
    old = _keeper(b)
    os.kill(old, signal.SIGSTOP)
    try:
        os.kill(writer.pid, signal.SIGUSR1)  # the rest, then the end
        writer.communicate(timeout=20)
        assert writer.returncode == 0
        reader.communicate(timeout=20)
        assert reader.returncode == 0
        assert sha_file(out) == sha_file(src)
        wait_for(lambda: _replaced(b, old), 10, "a new keeper")
        assert not os.path.exists(f"/proc/{old}") or _zombie(old)
        # The route still works, through the new keeper.
        edge = b.path(new_edge())
        _read_through_a_fifo(edge, edge, b"again")
    finally:
        with contextlib.suppress(OSError):
            os.kill(old, signal.SIGCONT)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


CHILD_DIES = (
    "import os, signal, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "os.read(fd, 1000)\n"
    "if os.fork() == 0:\n"
    "    os.read(fd, 1000)\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "os.close(fd)\n"
    "os.wait()\n"
    "print('child gone', flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_forked_child_dying_with_the_read_end_while_the_opener_runs_is_an_early_close(
    pair: Pair, programs: Programs, tmp_path: Path
) -> None:
    """The opener decides, as on FUSE: the last read end closed by a child killed while the
    program that opened the edge runs on means "no more" (the writer gets SIGPIPE), not a
    failure kept for a re-run. The daemon learns of the close only afterwards (POLLERR),
    when such a child may be reaped already: no rule could tell its death from a close."""
    _, w, r = pair.paths()
    writer = programs.start(f"exec yes > {w}")
    script = tmp_path / "child_dies.py"
    script.write_text(CHILD_DIES)
    reader = programs.start(f"exec {sys.executable} {script} {r}")
    assert reader.stdout is not None and reader.stdout.readline() == b"child gone\n"
    writer.communicate(timeout=20)
    assert writer.returncode == -signal.SIGPIPE
    assert reader.poll() is None  # the opener runs on


def test_a_reader_closing_before_it_read_anything_stops_the_writer(
    cluster: Cluster, programs: Programs
) -> None:
    """`: < E` while `yes > E` runs: on a FIFO, yes dies of SIGPIPE at once. The daemon
    never sees the shell hold the FIFO; the shell's exit status (0) says it went as one
    that closed early does: yes dies of SIGPIPE too."""
    cluster.start_discovery()
    a = cluster.node("a")
    b = cluster.node("b")
    edge = new_edge()
    writer = programs.start(f"exec yes > {a.path(edge)}")
    time.sleep(1)  # the writer is registered and writing
    sh(f": < {b.path(edge)}")
    writer.communicate(timeout=5)
    assert writer.returncode == -signal.SIGPIPE


def _in_pipe_read(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "pipe_read" in Path(f"/proc/{pid}/wchan").read_text()
    return False


def test_a_waiting_reader_killed_before_its_first_byte_lets_its_edge_go(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """A FIFO reader waiting for a writer has no pour task (it is parked until its first
    byte): its program dying is still seen at once (the write end's POLLERR), so its claim
    is released and a re-run reader gets the whole stream."""
    cluster.start_discovery()
    a = cluster.node("a")
    b = cluster.node("b")
    edge = new_edge()
    reader = programs.start(f"exec cat {b.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "open", 10, "reader open")
    wait_for(lambda: _in_pipe_read(reader.pid), 5, "the reader blocked in its FIFO")
    time.sleep(0.5)  # its daemon saw it open the FIFO: parked (no pour task)
    os.kill(reader.pid, signal.SIGKILL)
    reader.communicate(timeout=10)
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "failed", 10, "reader failed")
    src = tmp_path / "src"
    src.write_bytes(os.urandom(MiB + 3))
    out = tmp_path / "out"
    rerun = programs.start(f"exec cat {b.path(edge)} > {out}")
    sh(f"cat {src} > {a.path(edge)}")
    rerun.communicate(timeout=30)
    assert rerun.returncode == 0
    assert sha_file(out) == sha_file(src)


def test_a_reader_waiting_for_its_first_byte_when_its_daemon_stops_is_killed(
    cluster: Cluster, programs: Programs
) -> None:
    """SIGTERM to the daemon of a FIFO reader parked before its first byte: the reader is
    killed, never given an EOF (an empty stream that would look complete)."""
    cluster.start_discovery()
    b = cluster.node("b")
    edge = new_edge()
    reader = programs.start(f"exec cat {b.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "open", 10, "reader open")
    wait_for(lambda: _in_pipe_read(reader.pid), 5, "the reader blocked in its FIFO")
    time.sleep(0.5)  # its daemon saw it open the FIFO: parked (no pour task)
    b.stop()
    reader.communicate(timeout=10)
    assert reader.returncode == -signal.SIGKILL


# -- descriptors: one per reader FIFO in the daemon ---------------------------------------


def _fifo_ends(pid: int) -> int:
    """How many descriptors process ``pid`` holds on reader FIFOs (``MOUNT/.fifo/<ino>``)."""
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            held += "/.fifo/" in os.readlink(f"/proc/{pid}/fd/{fd}")
    return held


def _keepers_hold(node: Node, n: int) -> bool:
    """Every keeper of ``node`` (as many as it runs) holds ``n`` reader FIFO ends."""
    pids = _keepers(node)
    return len(pids) == KEEPERS and all(_fifo_ends(pid) == n for pid in pids)


def test_a_waiting_fifo_reader_costs_its_daemon_one_descriptor_and_a_new_keeper_gets_it(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """The daemon held two descriptors per reader FIFO (its write end and a dup kept to
    hand a replacement keeper): ~8,750 waiting readers fit under a 20,000 limit instead of
    10,000. It holds its write end only, and that is what a new keeper is handed."""
    cluster.start_discovery()
    a = cluster.node("a")
    b = cluster.node("b")
    n = 12
    edges = [new_edge() for _ in range(n)]
    outs = [tmp_path / f"out{i}" for i in range(n)]
    readers = [
        programs.start(f"exec cat {b.path(e)} > {out}") for e, out in zip(edges, outs, strict=True)
    ]
    wait_for(lambda: _fifo_ends(b.pid) == n, 20, "every reader's FIFO open")
    time.sleep(0.5)  # nothing more comes (a dup per FIFO would make it 2 n)
    assert _fifo_ends(b.pid) == n
    wait_for(lambda: _keepers_hold(b, n), 10, "every keeper holding every FIFO")
    old = _keeper(b)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: _replaced(b, old), 10, "a new keeper")
    wait_for(lambda: _keepers_hold(b, n), 10, "the new keeper holding every FIFO")
    assert _fifo_ends(b.pid) == n
    for i, edge in enumerate(edges):
        sh(f"printf 'stream {i}' > {a.path(edge)}")
    for i, (reader, out) in enumerate(zip(readers, outs, strict=True)):
        reader.communicate(timeout=30)
        assert reader.returncode == 0
        assert out.read_bytes() == f"stream {i}".encode()
    wait_for(lambda: _fifo_ends(b.pid) == 0, 10, "the daemon let every FIFO go")
    wait_for(lambda: _keepers_hold(b, 0), 10, "the keepers letting every FIFO go")


PER_ROUND = 6  # edges opened and finished per round of keeper kills


def test_keepers_replaced_while_streams_finish_are_never_handed_another_fifo(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """A replacement keeper is handed the daemon's own write ends while streams finish:
    a write end closed by a finished stream and its number reused (by the next FIFO) must
    never be handed in its place, or the new keeper would hold another reader's FIFO
    after its stream ended (that reader would wait for EOF for good) or nothing of the
    one it should. Keepers are killed again and again while edges open and finish.
    (It also hung 1 run in 4 under load with the daemon's loop in a read of /dev/fuse
    with nothing queued: see fractalfs/fusewatch.py.)"""
    cluster.start_discovery()
    a = cluster.node("a")
    b = cluster.node("b")
    stop = time.monotonic() + 12
    kills = 0
    rounds = 0
    while time.monotonic() < stop:
        edges = [new_edge() for _ in range(PER_ROUND)]
        outs = [tmp_path / f"out{rounds}-{i}" for i in range(len(edges))]
        readers = [
            programs.start(f"exec cat {b.path(e)} > {out}")
            for e, out in zip(edges, outs, strict=True)
        ]
        # Killed once the readers hold their FIFOs: while their streams finish.
        wait_for(lambda: _fifo_ends(b.pid) >= PER_ROUND, 20, "the readers' FIFOs")
        writers = [
            programs.start(f"exec printf 'round {rounds} edge {i}' > {a.path(e)}")
            for i, e in enumerate(edges)
        ]
        keeper = _keeper(b)
        if keeper > 0:
            os.kill(keeper, signal.SIGKILL)  # replaced while these finish
            kills += 1
        for proc in writers:
            proc.communicate(timeout=30)
            assert proc.returncode == 0
        for i, (reader, out) in enumerate(zip(readers, outs, strict=True)):
            reader.communicate(timeout=30)
            assert reader.returncode == 0, f"round {rounds} edge {i}"
            assert out.read_bytes() == f"round {rounds} edge {i}".encode()
        rounds += 1
    assert kills >= 3
    wait_for(lambda: _fifo_ends(b.pid) == 0, 10, "the daemon let every FIFO go")
    wait_for(lambda: _keepers_hold(b, 0), 10, "the keepers letting every FIFO go")


def test_every_inode_fits_32_bits(pair: Pair) -> None:
    """A 32-bit program built without large-file support gets EOVERFLOW from stat or fstat
    of an inode number of 2^32 or more: the edge, its FIFO and the mount's own entries all
    stay below (FIFO inodes numbered from 2^40 did not)."""
    _, w, r = pair.paths()
    sh(f"printf hello > {w}")
    fd = os.open(r, os.O_RDONLY)
    try:
        assert stat.S_ISFIFO(os.fstat(fd).st_mode)
        assert 0 < os.fstat(fd).st_ino < 1 << 32
        assert 0 < os.stat(r).st_ino < 1 << 32
        assert os.read(fd, 100) == b"hello"
    finally:
        os.close(fd)
    mount = os.path.dirname(r)
    assert all(e.inode() < 1 << 32 for e in os.scandir(mount))


def test_inode_numbers_wrap_round_past_those_in_use() -> None:
    from fractalfs.fs import FIFO_INO, INO_END, free_ino

    edges, lookups = {INO_END - 1: 1, FIFO_INO: 2}, {FIFO_INO + 1: 1}
    assert free_ino(INO_END - 3, FIFO_INO, INO_END, edges, lookups) == INO_END - 2
    assert free_ino(INO_END - 2, FIFO_INO, INO_END, edges, lookups) == FIFO_INO + 2
    assert free_ino(10, 3, FIFO_INO, edges, lookups) == 11
    assert free_ino(FIFO_INO - 1, 3, FIFO_INO, edges, lookups) == 3
