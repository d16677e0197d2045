"""Exactly-once under failure on one host: killed writers, re-runs, divergence, fencing,
dead daemons. Every check compares sha256 of what the reader delivered with the stream."""

from __future__ import annotations

import functools
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fractalfs import fiforoute, testhooks
from fractalfs.testing import Node, free_port

from .conftest import (
    Cluster,
    Programs,
    SlowProxy,
    in_fuse_request,
    needs_fuse,
    new_edge,
    sh,
    sha_file,
    size,
    wait_for,
)

pytestmark = needs_fuse

SLOWCAT = [sys.executable, str(Path(__file__).with_name("slowcat.py"))]
MiB = 1 << 20


def paused_writer(programs: Programs, src: Path, dst: str, after: int) -> subprocess.Popen[bytes]:
    cmd = " ".join([*SLOWCAT, str(src), dst, "--pause-after", str(after)])
    proc = programs.start(f"exec {cmd}")
    assert proc.stdout is not None and proc.stdout.readline() == b"paused\n"
    return proc


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    path.write_bytes(os.urandom(12 * MiB + 333))
    return path


def three_nodes(cluster: Cluster, *extra: str) -> tuple:  # type: ignore[type-arg]
    cluster.start_discovery()
    args = ["--writer-lost-timeout", "20", *extra]
    return tuple(cluster.node(n, extra=args) for n in ("a", "b", "c"))


def test_killed_writer_is_not_an_end_and_a_rerun_completes_exactly_once(
    cluster: Cluster, programs: Programs, src: Path, tmp_path: Path
) -> None:
    a, b, c = three_nodes(cluster)
    edge = new_edge()
    out = tmp_path / "out"
    reader = programs.start(f"cat {c.path(edge)} > {out}")
    writer = paused_writer(programs, src, a.path(edge), 5 * MiB)
    wait_for(lambda: size(out) >= 5 * MiB, 10, "5 MiB delivered")
    os.killpg(writer.pid, signal.SIGKILL)
    time.sleep(1.0)
    assert reader.poll() is None, "a killed writer must not end the stream"
    assert out.stat().st_size == 5 * MiB
    sh(f"cat {src} > {b.path(edge)}")  # the re-run, on another node
    reader.communicate(timeout=30)
    assert reader.returncode == 0
    assert sha_file(out) == sha_file(src)  # nothing lost, nothing twice
    assert "replay of 5242880 bytes verified" in c.log.read_text()


def test_gnu_tool_exiting_nonzero_after_closing_is_not_an_end(
    cluster: Cluster, programs: Programs, src: Path, tmp_path: Path
) -> None:
    a, _, c = three_nodes(cluster)
    part = tmp_path / "part"
    part.write_bytes(src.read_bytes()[: 2 * MiB])
    edge = new_edge()
    out = tmp_path / "out"
    reader = programs.start(f"cat {c.path(edge)} > {out}")
    # cat copies part, then fails on the missing file: it closes stdout, then exits 1.
    failed = sh(f"cat {part} {tmp_path / 'missing'} > {a.path(edge)}", check=False)
    assert failed.returncode == 1
    time.sleep(1.0)
    # Not an end. (Whether the failed generation's bytes reached the reader before its
    # failure was known depends on timing; the re-run replays them either way.)
    assert reader.poll() is None and out.stat().st_size <= 2 * MiB
    sh(f"cat {src} > {a.path(edge)}")
    reader.communicate(timeout=30)
    assert reader.returncode == 0 and sha_file(out) == sha_file(src)


def test_a_killed_child_holding_the_writers_file_is_not_an_end(
    cluster: Cluster, programs: Programs, src: Path, tmp_path: Path
) -> None:
    """An orchestrator opens the edge, hands the file to its producer and closes its own
    copy (``subprocess.Popen(stdout=f)``, or ``exec 3>E; producer >&3``). The producer is
    killed mid-stream while the orchestrator runs on: the last close was the dead
    producer's, yet the stream was taken as complete and the reader exited 0 with a
    truncated stream."""
    a, _, c = three_nodes(cluster)
    edge = new_edge()
    out = tmp_path / "out"
    reader = programs.start(f"cat {c.path(edge)} > {out}")
    script = (
        "import subprocess, sys, time\n"
        f"f = open({a.path(edge)!r}, 'wb')\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import os, time\\n"
        'os.write(1, b"x" * 100000)\\ntime.sleep(60)\'], stdout=f)\n'
        "f.close()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    orchestrator = programs.start(f"exec {sys.executable} -c {shlex.quote(script)}")
    assert orchestrator.stdout is not None
    child = int(orchestrator.stdout.readline())
    wait_for(lambda: size(out) >= 100000, 10, "the producer's bytes delivered")
    os.kill(child, signal.SIGKILL)
    time.sleep(1.5)
    assert orchestrator.poll() is None
    assert reader.poll() is None, "a killed producer must not end the stream"
    os.killpg(orchestrator.pid, signal.SIGKILL)
    sh(f"head -c 200000 {src} > {a.path(edge)}")  # the re-run
    reader.communicate(timeout=30)
    assert reader.returncode != 0  # its replay differs from the x's: EIO, never silent


def test_rerun_that_differs_fails_the_reader(
    cluster: Cluster, programs: Programs, src: Path, tmp_path: Path
) -> None:
    """The reader fails (a FUSE reader with EIO; a FIFO reader, the default, is killed:
    a FIFO carries no error, and EOF would look like the end)."""
    a, b, c = three_nodes(cluster)
    edge = new_edge()
    out = tmp_path / "out"
    reader = programs.start(f"exec cat {c.path(edge)} > {out}")
    writer = paused_writer(programs, src, a.path(edge), 3 * MiB)
    wait_for(lambda: size(out) >= 3 * MiB, 10, "3 MiB delivered")
    os.killpg(writer.pid, signal.SIGKILL)
    other = tmp_path / "other"
    other.write_bytes(os.urandom(6 * MiB))
    sh(f"cat {other} > {b.path(edge)}", check=False)
    reader.communicate(timeout=30)
    assert reader.returncode == -signal.SIGKILL
    assert out.read_bytes() == src.read_bytes()[: 3 * MiB]  # never a byte of the wrong stream
    assert "differ from the bytes already delivered" in c.log.read_text()


def test_no_rerun_within_the_writer_lost_timeout_fails_the_reader(
    cluster: Cluster, programs: Programs, src: Path
) -> None:
    """EIO for a FUSE reader; a FIFO reader (the default) is killed."""
    cluster.start_discovery()
    a = cluster.node("a")
    c = cluster.node("c", extra=["--writer-lost-timeout", "2"])
    edge = new_edge()
    reader = programs.start(f"exec cat {c.path(edge)} > /dev/null")
    writer = paused_writer(programs, src, a.path(edge), MiB)
    time.sleep(0.3)
    os.killpg(writer.pid, signal.SIGKILL)
    t0 = time.monotonic()
    reader.communicate(timeout=15)
    assert reader.returncode == -signal.SIGKILL
    assert 1.5 < time.monotonic() - t0 < 6


def test_stale_writer_is_fenced_off_when_its_node_returns(
    cluster: Cluster, programs: Programs, src: Path, tmp_path: Path
) -> None:
    """A node frozen (as if partitioned) past the liveness timeout loses its generation."""
    a, b, c = three_nodes(cluster)
    edge = new_edge()
    out = tmp_path / "out"
    reader = programs.start(f"cat {c.path(edge)} > {out}")
    cmd = " ".join([*SLOWCAT, str(src), a.path(edge), "--pause-after", str(2 * MiB)])
    writer = programs.start(f"exec {cmd} --resume-on-usr1")
    assert writer.stdout is not None and writer.stdout.readline() == b"paused\n"
    wait_for(lambda: size(out) >= 2 * MiB, 10, "2 MiB delivered")
    a.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: cluster.edge(edge)["writer_state"] == "lost", 5, "node a lost")
        sh(f"cat {src} > {b.path(edge)}")  # re-run elsewhere: generation 2
    finally:
        a.signal(signal.SIGCONT)
    reader.communicate(timeout=30)
    assert reader.returncode == 0 and sha_file(out) == sha_file(src)
    # The frozen writer wakes up: its next write must fail, not interleave.
    wait_for(lambda: "fenced off" in a.log.read_text(), 5, "generation 1 fenced off")
    os.kill(writer.pid, signal.SIGUSR1)  # it goes on writing
    _, err = writer.communicate(timeout=10)
    assert writer.returncode == 1 and b"write failed: EPIPE" in err, err
    assert sha_file(out) == sha_file(src)  # nothing of it reached the reader


@pytest.mark.serial  # detection within 2.5 s
def test_writer_daemon_killed_then_rerun_on_another_node(
    cluster: Cluster, programs: Programs, src: Path, tmp_path: Path
) -> None:
    a, b, c = three_nodes(cluster)
    edge = new_edge()
    out = tmp_path / "out"
    reader = programs.start(f"cat {c.path(edge)} > {out}")
    writer = paused_writer(programs, src, a.path(edge), 4 * MiB)
    wait_for(lambda: size(out) >= 4 * MiB, 10, "4 MiB delivered")
    killed = time.time()
    a.kill()
    wait_for(
        lambda: cluster.edge(edge).get("writer_state") == "lost",
        10,
        "discovery to mark node a lost",
    )
    # Discovery's own time of the loss, not when this test's `status` poll saw it.
    detected = cluster.event_time(edge, "writer-lost") - killed
    assert detected < 2.5, f"node loss took {detected:.2f} s to detect"
    os.killpg(writer.pid, signal.SIGKILL)  # the program saw its daemon die
    sh(f"cat {src} > {b.path(edge)}")
    reader.communicate(timeout=30)
    assert reader.returncode == 0 and sha_file(out) == sha_file(src)


def test_reader_daemon_killed_releases_everyone_and_reruns_recover(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    a, b, c = three_nodes(cluster)
    edge = new_edge()
    out = tmp_path / "out"
    src = tmp_path / "src24"
    src.write_bytes(os.urandom(24 * MiB + 333))
    reader = programs.start(f"cat {c.path(edge)} > {out}")
    # Paced (~13 MB/s): the reader is killed with over a second of the stream still to come.
    cmd = " ".join([*SLOWCAT, str(src), a.path(edge), "--delay", "0.005"])
    writer = programs.start(f"exec {cmd}")
    # Past an acknowledgement, for certain: more than the write window (8 MiB) was read,
    # so the writer's daemon has freed acknowledged bytes, and only a re-run writer can
    # produce them again. (Before any ACK nothing is lost: the writer simply waits for the
    # next reader. Waiting for 1 MiB left that to timing: the first ACK had not reached
    # the writer's daemon in about 1 run in 8.)
    wait_for(lambda: size(out) >= 9 * MiB, 20, "9 MiB delivered")
    c.kill()
    reader.communicate(timeout=10)
    assert reader.returncode != 0  # the reading program gets an error, not a hang
    writer.communicate(timeout=10)  # done, or released with EPIPE: never stuck
    # Restarted at once, before discovery could notice the silence: the new run's first
    # heartbeat (a new boot id) releases what the old run held, so this is not EBUSY.
    c = cluster.node("c", extra=["--writer-lost-timeout", "20"])
    # Transient mode: a re-run reader needs a re-run writer.
    out2 = tmp_path / "out2"
    reader2 = programs.start(f"cat {c.path(edge)} > {out2}")
    time.sleep(0.5)
    sh(f"cat {src} > {a.path(edge)}")
    _, err = reader2.communicate(timeout=30)
    assert reader2.returncode == 0, err
    assert sha_file(out2) == sha_file(src)
    assert a.alive() and b.alive() and c.alive()  # a reset connection never kills a daemon


def test_reader_daemon_killed_after_its_writer_finished_fails_the_generation(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """Transient: the writing program finished (exit 0) while its reader's daemon held
    acknowledged bytes its program had not read; that daemon dies. The bytes are gone
    everywhere, yet the generation stayed "complete" in discovery for good: nothing said
    to re-run the writer, and a re-run reader waited, then got EIO. Now the generation
    fails, as a running writer would (EPIPE), and a re-run writer serves the re-run reader."""
    cluster.start_discovery()
    a = cluster.node("a")
    c = cluster.node("c", extra=["--writer-lost-timeout", "20"])
    edge = new_edge()
    src = tmp_path / "src"
    # Under the read buffer: the reader's daemon receives every byte and the END frame
    # (which it used to acknowledge at once, so the writer's daemon forgot the end).
    src.write_bytes(os.urandom(3 * MiB))
    slow = f"import time; f = open({c.path(edge)!r}, 'rb'); f.read({MiB}); time.sleep(60)"
    reader = programs.start(f"exec {sys.executable} -c {shlex.quote(slow)}")
    sh(f"cat {src} > {a.path(edge)}", timeout=20)  # exit 0: the generation is complete
    time.sleep(1.0)  # the END frame reaches the reader's daemon
    c.kill()
    os.killpg(reader.pid, signal.SIGKILL)  # its program goes with it
    reader.communicate(timeout=10)
    c = cluster.node("c", extra=["--writer-lost-timeout", "20"])
    _failed_then_rerun_serves_it(cluster, programs, tmp_path, edge, src, c, a)


def _failed_then_rerun_serves_it(
    cluster: Cluster,
    programs: Programs,
    tmp_path: Path,
    edge: str,
    src: Path,
    reader_node: Node,
    writer_node: Node,
) -> None:
    """The complete generation of ``edge`` turns failed in discovery; then a re-run reader
    on ``reader_node`` and a re-run writer on ``writer_node`` move ``src`` whole."""
    wait_for(
        lambda: cluster.edge(edge).get("writer_state") == "failed",
        5,
        "the complete generation failed in discovery",
    )
    out = tmp_path / "out"
    reader2 = programs.start(f"cat {reader_node.path(edge)} > {out}")
    time.sleep(0.5)
    sh(f"cat {src} > {writer_node.path(edge)}")  # the re-run writer
    _, err = reader2.communicate(timeout=30)
    assert reader2.returncode == 0, err
    assert sha_file(out) == sha_file(src)


def test_reader_dials_before_the_writer_daemon_heard_its_generation(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """Discovery wakes the waiting reader as soon as it records a writer; the writer's own
    daemon learns its generation only when the answer arrives (here 0.3 s later). A reader
    that dials in between must be served, not told that generation is gone."""
    disc = cluster.start_discovery()
    host, port = disc.url.removeprefix("http://").rsplit(":", 1)
    proxy = SlowProxy((host, int(port)), delay=0.3)
    try:
        a = Node(tmp_path, "a", proxy.url, extra=["--mode", "transient"])
        cluster.nodes.append(a)
        a.start(timeout=30)
        b = cluster.node("b")
        edge = new_edge()
        reader = programs.start(f"cat {b.path(edge)}")
        time.sleep(0.5)  # the reader's daemon is long-polling discovery
        sh(f"echo paired > {a.path(edge)}", timeout=30)
        assert reader.communicate(timeout=15)[0] == b"paired\n"
    finally:
        proxy.close()


def opening(pid: int) -> bool:
    """``pid`` is inside open(2)/openat(2)."""
    return fiforoute.open_flags(pid) is not None


def test_an_open_waiting_for_discovery_can_be_interrupted(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """Defect 11: opens retried discovery for up to discovery_retry (30 s) without looking
    at the opener's signals; pyfuse3 ignores FUSE_INTERRUPT, so the program could not even
    be killed meanwhile."""
    disc = cluster.start_discovery()
    a = cluster.node("a")
    disc.stop()
    writer = programs.start(f"exec cat > {a.path(new_edge())}")
    reader = programs.start(f"exec cat {a.path(new_edge())} > {tmp_path / 'out'}")
    # Both routes register at LOOKUP (FIFOs for writers and readers, the default), and a
    # LOOKUP waiting on discovery holds the mount root's lookup lock: the second program
    # waits for that lock, not in a request of its own (DEVELOPERS.md). Both are in open(2).
    for pid in (writer.pid, reader.pid):
        wait_for(functools.partial(opening, pid), 5, "the open waits for discovery")
    time.sleep(0.5)  # well inside the 30 s of retries
    assert any(in_fuse_request(proc.pid) for proc in (writer, reader))
    for proc in (writer, reader):
        assert proc.poll() is None and opening(proc.pid)
        proc.send_signal(signal.SIGTERM)
    for proc in (writer, reader):
        assert proc.wait(timeout=3) == -signal.SIGTERM


def test_same_node_rerun_reader_after_a_killed_one_fails_the_generation(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """Transient, writer and reader on one node: the writing program finished, its reader
    was killed after the END (bytes it had not read were freed as the same-node pull took
    them). A re-run reader asks for offset 0. Over TCP that fails the generation
    (BAD_OFFSET); the same-node pull only gave the generation up on this reader's side:
    discovery said "complete" for good, nothing asked for a re-run of the writer, and the
    re-run reader waited for --writer-lost-timeout, then was killed."""
    cluster.start_discovery()
    a = cluster.node("a", extra=["--writer-lost-timeout", "20"])
    edge = new_edge()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB))  # under the read buffer: the END is taken at once
    slow = f"import time; f = open({a.path(edge)!r}, 'rb'); f.read({MiB}); time.sleep(60)"
    reader = programs.start(f"exec {sys.executable} -c {shlex.quote(slow)}")
    sh(f"cat {src} > {a.path(edge)}", timeout=20)  # exit 0: the generation is complete
    wait_for(lambda: cluster.edge(edge).get("writer_state") == "complete", 5, "complete")
    time.sleep(0.5)
    os.killpg(reader.pid, signal.SIGKILL)  # not an early close: a failure
    reader.communicate(timeout=10)
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "failed", 5, "reader released")
    out = tmp_path / "out"
    reader2 = programs.start(f"cat {a.path(edge)} > {out}")
    wait_for(
        lambda: cluster.edge(edge).get("writer_state") == "failed",
        5,
        "the complete generation failed in discovery",
    )
    sh(f"cat {src} > {a.path(edge)}")  # the re-run writer
    _, err = reader2.communicate(timeout=30)
    assert reader2.returncode == 0, err
    assert sha_file(out) == sha_file(src)


def test_same_node_early_close_after_the_end_lets_the_writer_end_go(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """A reader on the writer's node closes early (head -c) after the END arrived: the
    writer's end is done (no reader wants more), yet nothing reaped it on the same-node
    path (the TCP path reaps when its connection ends): the edge stayed listed, and held,
    on the node for good, one per such edge."""
    cluster.start_discovery()
    a = cluster.node("a")
    edge = new_edge()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB))
    sh(f"cat {src} > {a.path(edge)}", timeout=20)
    got = sh(f"head -c 10 {a.path(edge)}", timeout=20).stdout
    assert got == src.read_bytes()[:10]
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "closed", 5, "reader released")
    wait_for(lambda: edge not in os.listdir(a.mountpoint), 5, "the done writer end reaped")


def test_daemon_killed_with_both_ends_fails_the_complete_generation(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """Transient, writer and reader on one node: the writing program finished (exit 0),
    its reader had not read it all, and the daemon dies: the keeper kills the reader, and
    the bytes are gone with the daemon. Nothing failed the generation: discovery said
    "complete" for good, so nothing asked for a re-run of the writer, and a re-run reader
    waited --writer-lost-timeout, then was killed. Discovery now fails it when the node
    comes back as a new run (or leaves)."""
    cluster.start_discovery()
    a = cluster.node("a", extra=["--writer-lost-timeout", "20"])
    edge = new_edge()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB))
    slow = f"import time; f = open({a.path(edge)!r}, 'rb'); f.read({MiB}); time.sleep(60)"
    reader = programs.start(f"exec {sys.executable} -c {shlex.quote(slow)}")
    sh(f"cat {src} > {a.path(edge)}", timeout=20)  # exit 0: the generation is complete
    wait_for(lambda: cluster.edge(edge).get("writer_state") == "complete", 5, "complete")
    a.kill()
    reader.communicate(timeout=10)
    assert reader.returncode == -signal.SIGKILL  # the keeper: never EOF of a lost stream
    a = cluster.node("a", extra=["--writer-lost-timeout", "20"])
    _failed_then_rerun_serves_it(cluster, programs, tmp_path, edge, src, a, a)


def test_reader_killed_after_the_end_then_a_rerun_reader_over_tcp(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """The END_ACK waits for the reading program: killed (not an early close) after the
    END arrived, with bytes it had not read, its daemon sends nothing, and the writer's
    daemon keeps the transient end. A re-run reader asks for offset 0, below what was
    freed: the generation fails (BAD_OFFSET) and a re-run writer serves it whole."""
    cluster.start_discovery()
    a = cluster.node("a")
    c = cluster.node("c", extra=["--writer-lost-timeout", "20"])
    edge = new_edge()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB))
    slow = f"import time; f = open({c.path(edge)!r}, 'rb'); f.read({MiB}); time.sleep(60)"
    reader = programs.start(f"exec {sys.executable} -c {shlex.quote(slow)}")
    sh(f"cat {src} > {a.path(edge)}", timeout=20)
    time.sleep(1.0)  # the END frame reaches the reader's daemon
    os.killpg(reader.pid, signal.SIGKILL)
    reader.communicate(timeout=10)
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "failed", 5, "reader released")
    assert cluster.edge(edge).get("writer_state") == "complete"  # no END_ACK, no CLOSE
    out = tmp_path / "out"
    reader2 = programs.start(f"cat {c.path(edge)} > {out}")
    wait_for(lambda: cluster.edge(edge).get("writer_state") == "failed", 5, "generation failed")
    sh(f"cat {src} > {a.path(edge)}")  # the re-run writer
    _, err = reader2.communicate(timeout=30)
    assert reader2.returncode == 0, err
    assert sha_file(out) == sha_file(src)


@pytest.mark.parametrize("told", ["event", "event-late", "missed", "missed-moved"])
def test_writer_daemon_restarted_before_a_reader_elsewhere_had_the_end_fails_the_generation(
    store_cluster: Cluster,
    programs: Programs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    told: str,
) -> None:
    """Transient: the writing program finished (complete), but its reader on another node
    had not received the END when the writer's daemon restarted: the rest of the stream
    died with that daemon. The reader's daemon (only it knows it lacks the END) has
    discovery fail the generation, so that the writer is re-run; the reader waits for that
    re-run, verifies the replayed prefix and gets the whole stream exactly once. (It got
    EIO after --writer-lost-timeout, and the generation stayed "complete".)

    ``event``: the reader's daemon learns it from discovery's writer-gone event (a restart
    on another port: its redials are refused, only the event tells). ``missed``: its
    daemon ignores writer-gone events (a test hook, as a broken feed or a pruned log); the
    restart is on the same port, whose new run answers it holds no writer of the edge, and
    that makes the same call. ``missed-moved``: the same, restarted on another port: its
    redials are refused, and the record (no endpoint since the restart) tells it.
    (``missed`` got EIO after --writer-lost-timeout on 3f3e30c.) ``event-late``: as
    ``event``, the daemon restarted only after discovery took the node for lost (on etcd,
    its lease expired and took the boot id with it: the new run looked like a new node,
    nothing was failed, and the reader waited; 0fa3b97). On SQLite and on etcd."""
    cluster = store_cluster
    # The writer's window takes the whole stream, so its program finishes; the reader's
    # side (program, FIFO, read buffer, sockets: well under 96 MiB) cannot: no END there.
    writer_args = ["--write-window", str(128 * MiB)]
    if told.startswith("missed"):
        monkeypatch.setenv(testhooks.ENV, "1")
        monkeypatch.setenv(testhooks.DROP_EVENTS_ENV, "writer-gone")
    if told == "missed":
        writer_args += ["--data-listen", f"127.0.0.1:{free_port()}"]
    a = cluster.node("a", extra=writer_args)
    c = cluster.node("c", extra=["--writer-lost-timeout", "60"])
    edge = new_edge()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(96 * MiB + 5))
    out, go = tmp_path / "out", tmp_path / "go"
    slow = (
        "import os, shutil, sys, time\n"
        "f = open(sys.argv[1], 'rb'); o = open(sys.argv[2], 'wb')\n"
        f"o.write(f.read({MiB})); o.flush()\n"
        "while not os.path.exists(sys.argv[3]): time.sleep(0.05)\n"
        "shutil.copyfileobj(f, o)\n"
    )
    reader = programs.start(
        f"exec {sys.executable} -c {shlex.quote(slow)} {c.path(edge)} {out} {go}"
    )
    sh(f"cat {src} > {a.path(edge)}", timeout=60)  # exit 0: the generation is complete
    assert cluster.edge(edge)["writer_state"] == "complete"
    a.kill()
    if told == "event-late":
        assert cluster.discovery is not None
        log = cluster.discovery.log
        wait_for(lambda: "node a lost" in log.read_text(), 20, "discovery to lose node a")
    a = cluster.node("a", extra=writer_args)  # a new run: the rest is gone
    if told.startswith("missed"):
        # Its daemon, its buffers full, reads the connection again (and finds it broken)
        # only when the program reads on.
        go.touch()
    wait_for(
        lambda: cluster.edge(edge).get("writer_state") == "failed", 10, "the generation failed"
    )
    go.touch()
    sh(f"cat {src} > {a.path(edge)}", timeout=60)  # the re-run writer
    _, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert sha_file(out) == sha_file(src)
    assert cluster.edge(edge)["state"] == "delivered"


@pytest.mark.serial  # the killed writer's end must be recorded within the 2 s grace
def test_a_rerun_writer_elsewhere_waits_for_the_killed_writers_end_to_be_recorded(
    cluster: Cluster, programs: Programs, src: Path, tmp_path: Path
) -> None:
    """A supervisor re-runs a killed writer at once, on another node, before the killed
    one's daemon told discovery that its generation failed (here: that daemon is stopped
    0.5 s, as on a busy host, or behind a discovery replica that is gone). The re-run's
    open waits for that (up to 2 s, README "Errors"), as a re-run reader's does; it got
    EBUSY at once, and the re-run failed for nothing."""
    a, b, c = three_nodes(cluster)
    edge = new_edge()
    out = tmp_path / "out"
    reader = programs.start(f"exec cat {c.path(edge)} > {out}")
    writer = paused_writer(programs, src, a.path(edge), 2 * MiB)
    wait_for(lambda: size(out) >= 2 * MiB, 10, "2 MiB delivered")
    a.signal(signal.SIGSTOP)
    try:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
        rerun = programs.start(f"cat {src} > {b.path(edge)}")
        time.sleep(0.5)
    finally:
        a.signal(signal.SIGCONT)
    _, err = rerun.communicate(timeout=30)
    assert rerun.returncode == 0, err
    reader.communicate(timeout=30)
    assert reader.returncode == 0 and sha_file(out) == sha_file(src)
    assert cluster.edge(edge).get("generation") == 2


@pytest.mark.parametrize("nodes", ["same-node", "two-nodes"])
def test_a_reader_killed_after_reading_it_all_is_rerun_with_its_writer(
    cluster: Cluster, programs: Programs, tmp_path: Path, nodes: str
) -> None:
    """Transient: a reading program read every byte (so its daemon acknowledged the END:
    delivered, the writer's daemon let the stream go), then was killed before it
    finished (`sort E` sorting, a stage killed after reading its input whole). Its
    re-run needs a re-run writer: the re-run reader asks discovery to fail the complete
    generation it cannot get. On the writer's own node discovery refused that (a reader
    there was taken for one that died with its daemon): the generation stayed complete,
    nothing asked for a re-run writer, and every re-run reader was killed after
    --writer-lost-timeout."""
    cluster.start_discovery()
    a = cluster.node("a", extra=["--writer-lost-timeout", "20"])
    c = a if nodes == "same-node" else cluster.node("c", extra=["--writer-lost-timeout", "20"])
    edge, src, n = new_edge(), tmp_path / "src", 3 * MiB
    src.write_bytes(os.urandom(n))
    sh(f"cat {src} > {a.path(edge)}", timeout=20)  # complete: the daemon holds the stream
    reads = f"import sys, time; f = open({c.path(edge)!r}, 'rb'); f.read({n}); time.sleep(60)"
    reader = programs.start(f"exec {sys.executable} -c {shlex.quote(reads)}")
    wait_for(lambda: cluster.edge(edge).get("bytes_delivered") == n, 10, "every byte read")
    os.killpg(reader.pid, signal.SIGKILL)  # killed before it finished: a failure
    reader.communicate(timeout=10)
    wait_for(lambda: cluster.edge(edge).get("reader_state") in ("done", "failed"), 10, "its end")
    out = tmp_path / "out"
    reader2 = programs.start(f"cat {c.path(edge)} > {out}")  # the re-run reader
    wait_for(
        lambda: cluster.edge(edge).get("writer_state") == "failed",
        10,
        "the complete generation failed in discovery (a re-run writer wanted)",
        [reader2],
    )
    sh(f"cat {src} > {a.path(edge)}")  # the re-run writer
    _, err = reader2.communicate(timeout=30)
    assert reader2.returncode == 0, err
    assert sha_file(out) == sha_file(src)
