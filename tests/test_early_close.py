"""How a stream ends when its reader stops early, at the edges of the rules: a reopen that
reaches its FIFO only after the linger's grace ran out, and a reader that closed before
any writer came (README "Early close")."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest

from fractalfs import testhooks
from fractalfs.discovery.etcd import EtcdStore
from fractalfs.etcdtesting import EtcdCluster, Replica, have_etcd, put_v4_edge
from fractalfs.testing import Node

from .conftest import Cluster, Programs, needs_fuse, new_edge, sh, sha_file, wait_for
from .test_interop import ENDINGS, run_ending
from .test_store import write_v4_store

pytestmark = needs_fuse

# Opens its input, closes it unread, and opens it again 0.1 s later, the second time
# O_NONBLOCK (as gzip does), so that a FIFO without a writer reads EOF at once instead of
# waiting for good; then reads it all.
REOPEN_LATE = (
    "import hashlib, os, sys, time; f = open(sys.argv[1], 'rb'); time.sleep(0.3);"
    " f.close(); time.sleep(0.1); fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK);"
    " os.set_blocking(fd, True); f = os.fdopen(fd, 'rb'); d = f.read();"
    " print(len(d), hashlib.md5(d).hexdigest())"
)
REOPEN_BYTES = 30_000_000


def test_a_reopen_reaching_its_fifo_after_the_grace_reads_the_whole_stream(
    cluster: Cluster, programs: Programs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reopen's LOOKUP gets the lingering FIFO before the 0.5 s grace ran out, but the
    program's open reaches the FIFO only after (a test hook answers that LOOKUP 0.8 s
    late). The grace's end took it for "no more": the write end closed and the program
    read the pipe's bytes, or none, and EOF, exit 0 (a silent truncation), and the writer
    died of SIGPIPE."""
    cluster.start_discovery()
    a = cluster.node("a")
    monkeypatch.setenv(testhooks.ENV, "1")
    monkeypatch.setenv(testhooks.LINGER_LOOKUP_DELAY_ENV, "0.8")
    b = cluster.node("b")
    edge = new_edge()
    writer = programs.start(f"yes abcdefghi | head -c {REOPEN_BYTES} > {a.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("writer_state") == "open", 10, "the writer")
    reader = programs.start(f"exec {sys.executable} -c {shlex.quote(REOPEN_LATE)} {b.path(edge)}")
    out, err = reader.communicate(timeout=60)
    assert "a lingering FIFO's LOOKUP waits" in b.log.read_text()  # the case
    want = sh(f"yes abcdefghi | head -c {REOPEN_BYTES} | md5sum").stdout.split()[0]
    assert out.split() == [str(REOPEN_BYTES).encode(), want], (out, err)
    _, err = writer.communicate(timeout=20)
    assert writer.returncode == 0, err


# -- a reader that closed before any writer came -------------------------------------------


def _whole_stream(a: Node, b: Node, edge: str, tmp_path: Path) -> None:
    """3 MiB written on ``a`` and read on ``b``, all of it: the edge is not stopped."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 << 20))
    sh(f"cat {src} > {a.path(edge)}", timeout=30)
    out = tmp_path / "out"
    sh(f"cat {b.path(edge)} > {out}", timeout=30)
    assert sha_file(out) == sha_file(src)


def _nodes(cluster: Cluster, tmp_path: Path, route: str) -> tuple[Node, Node]:
    """Two daemons, both reader and writer routes on FIFOs ("fifo") or on FUSE ("fuse")."""
    config = tmp_path / "fractalfs.toml"
    on = str(route == "fifo").lower()
    config.write_text(f"fifo_writers = {on}\nfifo_readers = {on}\n")
    extra = ["--config", str(config)]
    return cluster.node("a", extra=extra), cluster.node("b", extra=extra)


def _ends_at_once(programs: Programs, cmd: str) -> float:
    """Runs the writer ``cmd``; it must die of SIGPIPE, as a FIFO's writer whose reader
    went does. Returns how long it ran."""
    t0 = time.monotonic()
    writer = programs.start(cmd)
    _, err = writer.communicate(timeout=30)
    took = time.monotonic() - t0
    assert writer.returncode == -signal.SIGPIPE, (writer.returncode, err)
    return took


@pytest.mark.parametrize("route", ["fifo", "fuse"])
@pytest.mark.parametrize("where", ["other-node", "same-node"])
def test_a_reader_that_closed_before_any_writer_came_stops_the_writers_at_once(
    store_cluster: Cluster, programs: Programs, tmp_path: Path, route: str, where: str
) -> None:
    """`: < E` first, `yes > E` after: the reader's "no more" had no data connection to
    travel on, and `yes` ran on for a re-run reader (filled its window and blocked, or
    spilled). Discovery keeps it (the reader "closed", not "failed"): the writer, and a
    re-run of it, die of SIGPIPE at once. A re-run reader claims the edge anew and reads
    the next writer's whole stream."""
    a, b = _nodes(store_cluster, tmp_path, route)
    w = a if where == "other-node" else b
    edge = new_edge()
    sh(f": < {b.path(edge)}")
    wait_for(
        lambda: store_cluster.edge(edge).get("reader_state") == "closed", 10, "the early close"
    )
    for _ in ("the writer", "its re-run"):
        took = _ends_at_once(programs, f"exec yes > {w.path(edge)}")
        assert took < 10, f"the writer ran {took:.1f} s"
    # A writer that wrote all it had before its daemon took a byte (a FIFO writer's pipe:
    # it exits 0) did not complete the stream: its generation fails, and the re-run reader
    # below does not get an empty stream for the whole.
    sh(f"exec printf x > {w.path(edge)}", check=False)
    wait_for(
        lambda: store_cluster.edge(edge).get("writer_state") == "failed", 10, "a failed generation"
    )
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 << 20))
    out = tmp_path / "out"
    rerun = programs.start(f"exec cat {b.path(edge)} > {out}")
    wait_for(
        lambda: store_cluster.edge(edge).get("reader_state") == "open", 10, "the re-run reader"
    )
    sh(f"cat {src} > {w.path(edge)}", timeout=30)
    _, err = rerun.communicate(timeout=30)
    assert rerun.returncode == 0, err
    assert sha_file(out) == sha_file(src)


@pytest.mark.parametrize("route", ["fifo", "fuse"])
def test_an_unread_close_after_a_writer_came_does_not_stop_the_rerun(
    store_cluster: Cluster, programs: Programs, tmp_path: Path, route: str
) -> None:
    """`echo x > E` completed, then `: < E` (reads nothing, closes, exits 0), then the
    pipeline re-run writer first: the re-run writer died of SIGPIPE at its first write
    (discovery had the reader "closed" with 0 bytes, as one that closed before any writer
    came), where on a FIFO nothing stops it. Discovery now records that a writer had
    come: the re-run writes its whole stream, and the re-run reader reads it."""
    a, b = _nodes(store_cluster, tmp_path, route)
    edge = new_edge()
    sh(f"echo x > {a.path(edge)}")
    wait_for(lambda: store_cluster.edge(edge).get("writer_state") == "complete", 10, "the end")
    sh(f": < {b.path(edge)}")
    wait_for(
        lambda: store_cluster.edge(edge).get("reader_state") == "closed", 10, "the early close"
    )
    _whole_stream(a, b, edge, tmp_path)


@pytest.mark.parametrize("store", ["sqlite", "etcd"])
def test_a_closed_reader_an_older_version_recorded_does_not_stop_writers(
    cluster: Cluster, programs: Programs, tmp_path: Path, store: str
) -> None:
    """A discovery store written by schema 4 (before f9138f0 a reader killed while it
    waited was recorded "closed" too): after the upgrade, that record stopped the next
    writer (SIGPIPE at its first write) because its reader had read 0 bytes."""
    edge = new_edge()
    etcd: EtcdCluster | None = None
    try:
        if store == "sqlite":
            (tmp_path / "discovery").mkdir()
            write_v4_store(tmp_path / "discovery" / "discovery.db", edge)
            cluster.start_discovery()
        else:
            if not have_etcd():
                pytest.skip("needs etcd (apt install etcd-server)")
            etcd = EtcdCluster(tmp_path / "etcd", members=1)
            etcd.start()
            url = f"{etcd.url}/t{os.getpid()}"
            old = EtcdStore.from_url(url)
            put_v4_edge(old, edge)
            old.close()
            cluster.discovery = Replica(tmp_path, url)
            cluster.discovery.start()
        assert cluster.edge(edge).get("reader_state") == "closed"
        a, b = _nodes(cluster, tmp_path, "fifo")
        _whole_stream(a, b, edge, tmp_path)
    finally:
        cluster.close()  # the daemons before their discovery, before its etcd
        if etcd is not None:
            etcd.stop()


@pytest.mark.parametrize("route", ["fifo", "fuse"])
def test_a_reader_killed_before_any_writer_came_is_no_early_close(
    cluster: Cluster, programs: Programs, tmp_path: Path, route: str
) -> None:
    """A reader SIGKILLed while waiting for its writer failed: that is no "no more". The
    writer that comes later writes its whole stream (exit 0) and a re-run reader reads it."""
    cluster.start_discovery()
    a, b = _nodes(cluster, tmp_path, route)
    edge = new_edge()
    reader = programs.start(f"exec cat {b.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "open", 10, "the reader")
    time.sleep(0.5)  # inside its read (FUSE) or holding its FIFO
    os.kill(reader.pid, signal.SIGKILL)
    reader.communicate(timeout=10)
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "failed", 10, "the failure")
    _whole_stream(a, b, edge, tmp_path)


def test_a_removed_edge_forgets_an_early_close(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """`rm` after an early close made before any writer came: the edge starts afresh, and
    its next writer is not stopped (it writes its whole stream for a reader that comes
    after it, as on a new edge)."""
    cluster.start_discovery()
    a, b = _nodes(cluster, tmp_path, "fifo")
    edge = new_edge()
    sh(f": < {b.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "closed", 10, "the early close")
    sh(f"rm {a.path(edge)}")
    _whole_stream(a, b, edge, tmp_path)


@pytest.mark.parametrize("route", ["fifo", "fuse"])
def test_a_reader_that_never_reached_its_writer_stops_it_through_discovery(
    cluster: Cluster, programs: Programs, tmp_path: Path, route: str
) -> None:
    """The writer registered first, the reader came and closed early (`: < E`), but its
    daemon never connected to the writer's (here: the writer's node advertises an address
    nothing listens on): the "no more" had no connection to travel on, and `yes` ran on
    for a re-run reader. The reader's early close, recorded in discovery once the reader
    gave up waiting for a connection, reaches the writer's daemon as an event."""
    cluster.start_discovery()
    config = tmp_path / "fractalfs.toml"
    on = str(route == "fifo").lower()
    config.write_text(f"fifo_writers = {on}\nfifo_readers = {on}\n")
    extra = ["--config", str(config)]
    a = cluster.node("a", extra=[*extra, "--advertise", "127.0.0.2"])  # unreachable
    b = cluster.node("b", extra=extra)
    edge = new_edge()
    writer = programs.start(f"exec yes > {a.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("writer_state") == "open", 10, "the writer")
    sh(f": < {b.path(edge)}")
    _, err = writer.communicate(timeout=30)
    assert writer.returncode == -signal.SIGPIPE, (writer.returncode, err)
    assert "its reader closed early (discovery)" in a.log.read_text()  # the case


@pytest.mark.parametrize("route", ["fifo", "fuse"])
def test_a_rerun_writer_after_an_early_close_with_a_writer_is_not_stopped(
    cluster: Cluster, programs: Programs, tmp_path: Path, route: str
) -> None:
    """`yes > E` and `head -c 10 E`: the reader closed early after reading, and its writer
    got its "no more" (SIGPIPE) over the data connection. That close was made with a writer
    there: it is no "no more" for the next generation. A pipeline re-run whose writer
    registers first writes its whole stream for the reader that comes after (it died of
    SIGPIPE at its first write, and the re-run reader waited for a writer that was gone)."""
    cluster.start_discovery()
    a, b = _nodes(cluster, tmp_path, route)
    edge = new_edge()
    writer = programs.start(f"exec yes > {a.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("writer_state") == "open", 10, "the writer")
    assert sh(f"head -c 10 {b.path(edge)}").stdout == b"y\n" * 5
    writer.communicate(timeout=30)
    assert writer.returncode == -signal.SIGPIPE
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "closed", 10, "the early close")
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 << 20))
    rerun = programs.start(f"exec cat {src} > {a.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("generation") == 2, 10, "the re-run writer")
    out = tmp_path / "out"
    reader = programs.start(f"exec cat {b.path(edge)} > {out}")
    _, err = rerun.communicate(timeout=30)
    assert rerun.returncode == 0, (rerun.returncode, err)
    _, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    assert sha_file(out) == sha_file(src)


# Opens its input and closes it unread, then runs on.
# Holds the edge unread long enough for its daemon to see it held (an opener never seen
# holding its FIFO, closed within microseconds, keeps the stream: see README), closes it,
# then lets the peeking program go (argv[2]) and runs on.
CLOSE_UNREAD = (
    "import pathlib, sys, time\n"
    "f = open(sys.argv[1], 'rb'); time.sleep(0.5); f.close()\n"
    "pathlib.Path(sys.argv[2]).touch(); time.sleep(60)\n"
)
# Waits for the trigger file, opens and closes the edge unread (during the reader's
# linger: its LOOKUP gets the lingering FIFO), then blocks in the open of another FIFO.
PEEK_THEN_BLOCK = (
    "import os, sys, time\n"
    "while not os.path.exists(sys.argv[3]): time.sleep(0.005)\n"
    "time.sleep(0.1); os.close(os.open(sys.argv[1], os.O_RDONLY))\n"
    "os.open(sys.argv[2], os.O_RDONLY)\n"
)


def test_a_reopener_blocked_elsewhere_does_not_hold_the_linger_for_good(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """A program closed the edge unread and runs on; another opened and closed it during
    the linger (its LOOKUP got the lingering FIFO), then blocked in the open of some other
    FIFO. The late-reopen wait took that open for one still on its way to our FIFO and
    waited for good: no "no more" ever, `yes` ran on. Past RUNNING_FOR it is decided."""
    cluster.start_discovery()
    a, b = _nodes(cluster, tmp_path, "fifo")
    edge = new_edge()
    other = tmp_path / "other-fifo"
    os.mkfifo(other)
    go = tmp_path / "go"
    writer = programs.start(f"exec yes > {a.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("writer_state") == "open", 10, "the writer")
    peek = programs.start(
        f"exec {sys.executable} -c {shlex.quote(PEEK_THEN_BLOCK)} {b.path(edge)} {other} {go}"
    )
    reader = programs.start(
        f"exec {sys.executable} -c {shlex.quote(CLOSE_UNREAD)} {b.path(edge)} {go}"
    )
    _, err = writer.communicate(timeout=40)
    assert writer.returncode == -signal.SIGPIPE, (writer.returncode, err)
    assert peek.poll() is None and reader.poll() is None  # both ran on meanwhile


# Reads its input; an error ends the read, the file is closed, and the program runs on.
READ_THEN_RUN_ON = (
    "import sys, time\n"
    "try:\n    open(sys.argv[1], 'rb').read()\nexcept OSError as e:\n    print(e, flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_reader_its_daemon_failed_is_no_early_close(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """The writer died before writing a byte; the reader's daemon waited for a re-run for
    `writer_lost_timeout` and failed the reader (EIO; on the FIFO route its program is
    killed: "failed" by its status). A program that survives that error and runs on
    closed the edge unread, still running: recorded "closed", and the re-run writer died
    of SIGPIPE at its first write. A reader its daemon failed is "failed"."""
    cluster.start_discovery()
    config = tmp_path / "fractalfs.toml"
    config.write_text("fifo_writers = false\nfifo_readers = false\nwriter_lost_timeout = 2\n")
    extra = ["--config", str(config)]
    a, b = cluster.node("a", extra=extra), cluster.node("b", extra=extra)
    edge = new_edge()
    reader = programs.start(
        f"exec {sys.executable} -c {shlex.quote(READ_THEN_RUN_ON)} {b.path(edge)}"
    )
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "open", 10, "the reader")
    sh(
        f"exec {sys.executable} -c 'import os; os.kill(os.getpid(), 9)' > {a.path(edge)}",
        check=False,
    )
    wait_for(lambda: cluster.edge(edge).get("reader_state") not in ("open", ""), 20, "the release")
    assert cluster.edge(edge).get("reader_state") == "failed"
    src = tmp_path / "src"
    src.write_bytes(os.urandom(1 << 20))
    rerun = programs.start(f"exec cat {src} > {a.path(edge)}")
    out = tmp_path / "out"
    wait_for(lambda: cluster.edge(edge).get("generation") == 2, 10, "the re-run writer")
    again = programs.start(f"exec cat {b.path(edge)} > {out}")
    _, err = rerun.communicate(timeout=30)
    assert rerun.returncode == 0, (rerun.returncode, err)
    _, err = again.communicate(timeout=30)
    assert again.returncode == 0, err
    assert sha_file(out) == sha_file(src)
    assert reader.poll() is None


@pytest.mark.parametrize("route", ["fifo", "fuse"])
def test_endings_with_discovery_on_each_store(
    store_cluster: Cluster, tmp_path: Path, route: str
) -> None:
    """A few of test_interop's endings (its daemons share a SQLite discovery) with
    discovery on SQLite and on etcd: output and exit statuses as on a `mkfifo` FIFO, and
    again on the pipeline's re-run on the same edges."""
    a, b = _nodes(store_cluster, tmp_path, route)
    for n, name in enumerate(
        ("head -c N", "Ctrl-C, reader first", "grep -m1", "pipefail: cat | head -1")
    ):
        ending = ENDINGS[name]
        f, f2 = tmp_path / f"f{n}", tmp_path / f"g{n}"
        os.mkfifo(f)
        os.mkfifo(f2)
        fifo = {"w": str(f), "w2": str(f2), "r": str(f), "r2": str(f2)}
        ref = run_ending(ending, fifo, tmp_path / f"fifo-part{n}")
        e, e2 = new_edge(), new_edge()
        edge = {"w": a.path(e), "w2": a.path(e2), "r": b.path(e), "r2": b.path(e2)}
        assert run_ending(ending, edge, tmp_path / f"edge-part{n}") == ref, name
        assert run_ending(ending, edge, tmp_path / f"rerun-part{n}") == ref, name
