"""Persistent mode and the dynamic policy with real daemons and programs."""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fractalfs import spill
from fractalfs.testing import Node

from .conftest import Cluster, Programs, needs_fuse, new_edge, sh, size, wait_for

pytestmark = needs_fuse

SLOWCAT = f"{sys.executable} {Path(__file__).with_name('slowcat.py')}"
MiB = 1 << 20

CPU_BOUND = (
    "import hashlib, os, sys\n"
    "h = b'seed'\n"
    "out = os.fdopen(1, 'wb', 0)\n"
    "for i in range(int(sys.argv[1])):\n"
    "    for _ in range(20000):\n"
    "        h = hashlib.sha256(h).digest()\n"
    "    out.write(h * 2048)\n"
)


def cpu_bound_output(blocks: int) -> bytes:
    h, out = b"seed", []
    for _ in range(blocks):
        for _ in range(20000):
            h = hashlib.sha256(h).digest()
        out.append(h * 2048)
    return b"".join(out)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    path.write_bytes(os.urandom(24 * MiB + 7))
    return path


def test_persistent_writer_never_waits_for_a_reader(cluster: Cluster, src: Path) -> None:
    cluster.start_discovery()
    a = cluster.node("a", mode="persistent")
    b = cluster.node("b")
    edge = new_edge()
    sh(f"cat {src} > {a.path(edge)}", timeout=20)  # 24 MiB > the 8 MiB window: no block
    assert cluster.edge(edge)["mode"] == "persistent"
    assert sh(f"sha256sum < {b.path(edge)}").stdout.split()[0].decode() == (
        hashlib.sha256(src.read_bytes()).hexdigest()
    )


def test_rerun_reader_gets_the_whole_stream_without_rerunning_the_writer(
    cluster: Cluster, programs: Programs, src: Path, tmp_path: Path
) -> None:
    cluster.start_discovery()
    a = cluster.node("a", mode="persistent")
    b, c = cluster.node("b"), cluster.node("c")
    edge, out, runs = new_edge(), tmp_path / "out", tmp_path / "runs"
    writer = programs.start(
        f"echo run >> {runs}; exec {SLOWCAT} {src} {a.path(edge)} --chunk {MiB} --delay 0.03"
    )
    reader = programs.start(f"exec cat {b.path(edge)} > {tmp_path / 'partial'}")
    wait_for(lambda: size(tmp_path / "partial") >= 6 * MiB, 20, "6 MiB read")
    os.killpg(reader.pid, signal.SIGKILL)  # the reading program dies mid-stream
    time.sleep(0.3)
    assert writer.poll() is None  # a killed reader is not "no more please": no EPIPE
    rerun = programs.start(f"cat {c.path(edge)} > {out}")  # re-run on another node
    _, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    assert writer.wait(timeout=30) == 0
    assert out.read_bytes() == src.read_bytes()
    assert runs.read_text() == "run\n"  # the writer ran once


def test_completed_spill_is_served_after_the_writer_daemon_restarts(
    cluster: Cluster, src: Path
) -> None:
    cluster.start_discovery()
    a = cluster.node("a", mode="persistent")
    b = cluster.node("b")
    edge = new_edge()
    sh(f"cat {src} > {a.path(edge)}")
    # Completion is recorded once the daemon has seen the writer end well (<= 0.25 s).
    wait_for(lambda: cluster.edge(edge)["writer_state"] == "complete", 5, "completion")
    a.kill()  # SIGKILL: a crash, with the stream complete on disk
    a = cluster.node("a", mode="persistent")
    assert "served again" in a.log.read_text()
    got = sh(f"sha256sum < {b.path(edge)}", timeout=30).stdout.split()[0].decode()
    assert got == hashlib.sha256(src.read_bytes()).hexdigest()


def test_a_clean_stop_right_after_writers_exited_keeps_their_streams(
    cluster: Cluster,
) -> None:
    """``printf ... > E`` returns once its bytes are in the FIFO, before the daemon drained
    them. A clean stop (SIGTERM) right after must drain and settle those streams, not
    abort them: after a restart each is served whole (before, a stop within milliseconds
    failed the generation, 0 bytes spilled, and the reader waited for a re-run)."""
    cluster.start_discovery()
    a = cluster.node("a", mode="persistent")
    edges = [new_edge() for _ in range(12)]
    script = "; ".join(f"printf 'line {i}\\n' > {a.path(e)}" for i, e in enumerate(edges))
    sh(script)
    a.stop()  # at once: some FIFOs still hold their bytes
    a = cluster.node("a", mode="persistent")
    for i, e in enumerate(edges):
        got = sh(f"timeout 10 cat {a.path(e)}", timeout=30, check=False)
        assert (got.returncode, got.stdout) == (0, f"line {i}\n".encode()), (i, got.stderr)


def test_dynamic_policy_chooses_by_cost(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    cluster.start_discovery()
    a = cluster.node("a", mode="dynamic")
    b = cluster.node("b")
    cheap = new_edge()
    reader = programs.start(f"cat {b.path(cheap)} > /dev/null")
    sh(f"head -c 1G /dev/zero > {a.path(cheap)}", timeout=60)
    reader.communicate(timeout=60)
    rec = cluster.edge(cheap)
    assert rec["mode"] == "transient", rec

    expensive = new_edge()
    blocks = 200
    out = tmp_path / "out"
    reader = programs.start(f"cat {b.path(expensive)} > {out}")
    sh(f'{sys.executable} -c "{CPU_BOUND}" {blocks} > {a.path(expensive)}', timeout=60)
    _, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert out.read_bytes() == cpu_bound_output(blocks)  # the switch lost and duplicated nothing
    rec = cluster.edge(expensive)
    assert rec["mode"] == "persistent" and "replay" in str(rec["mode_reason"]), rec


def test_dynamic_spills_instead_of_blocking_on_an_absent_reader(
    cluster: Cluster, src: Path
) -> None:
    cluster.start_discovery()
    a, b = cluster.node("a", mode="dynamic"), cluster.node("b")
    edge = new_edge()
    sh(f"cat {src} > {a.path(edge)}", timeout=20)
    rec = cluster.edge(edge)
    assert rec["mode"] == "persistent" and "instead of blocking" in str(rec["mode_reason"])
    assert sh(f"cat {b.path(edge)}").stdout == src.read_bytes()


@pytest.fixture
def tiny_spill(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_spill_disk_is_a_write_error(cluster: Cluster, tiny_spill: Path) -> None:
    cluster.start_discovery()
    a = cluster.node("a", mode="persistent", extra=["--spill-dir", str(tiny_spill)])
    edge = new_edge()
    got = sh(f"head -c 16M /dev/urandom > {a.path(edge)}", check=False, timeout=20)
    # A FIFO writer (the default) gets a pipe's EPIPE/SIGPIPE: head dies of SIGPIPE
    # (status 141, never success), and the daemon's log names the errno (README).
    assert got.returncode == 128 + signal.SIGPIPE, got
    assert "No space left on device" in a.log.read_text()
    assert a.alive()


def test_dynamic_switch_on_a_full_disk_stays_transient_and_loses_nothing(
    cluster: Cluster, programs: Programs, tiny_spill: Path, src: Path
) -> None:
    """The reader is absent: the policy spills instead of blocking, but the 8 MiB already
    in memory do not fit the 4 MiB spill disk. The edge stays transient (the writer
    blocks, no error) and the reader that comes gets every byte."""
    cluster.start_discovery()
    a = cluster.node("a", mode="dynamic", extra=["--spill-dir", str(tiny_spill)])
    b = cluster.node("b")
    edge = new_edge()
    writer = programs.start(f"cat {src} > {a.path(edge)}")
    wait_for(
        lambda: "spill failed" in str(cluster.edge(edge).get("mode_reason")),
        10,
        "the switch to fail",
        running=[writer],
    )
    assert writer.poll() is None  # blocked on the window, as any transient writer
    assert cluster.edge(edge)["mode"] == "transient"
    got = sh(f"sha256sum < {b.path(edge)}").stdout.split()[0].decode()
    assert got == hashlib.sha256(src.read_bytes()).hexdigest()
    assert writer.wait(timeout=10) == 0
    assert a.log.read_text().count("cannot spill") == 1  # not retried every second
    assert not list(tiny_spill.glob("*.spill"))


def test_spill_garbage_collection(cluster: Cluster, tmp_path: Path) -> None:
    """Spill files go on rm, after retention once delivered, and oldest-delivered-first over
    the quota; one a reader may still need (not yet delivered) is never deleted."""
    quota, retention = tmp_path / "quota.toml", tmp_path / "retention.toml"
    quota.write_text(f"spill_quota = {5 * MiB}\n")
    retention.write_text("spill_retention = 1.5\n")
    cluster.start_discovery()
    q = cluster.node("q", mode="persistent", extra=["--config", str(quota)])
    r = cluster.node("r", mode="persistent", extra=["--config", str(retention)])
    b = cluster.node("b")

    def spills(node: Node) -> set[str]:
        return {p.name.split(".")[0] for p in (node.state / "spill").glob("*.spill")}

    def write(node: Node, *edges: str) -> None:
        for edge in edges:
            sh(f"head -c {2 * MiB} /dev/urandom > {node.path(edge)}")

    def deliver(*edges: str) -> None:
        for edge in edges:
            assert len(sh(f"cat {b.path(edge)}").stdout) == 2 * MiB

    removed, kept, old, mid, new = (new_edge() for _ in range(5))
    write(q, removed, kept, old, mid, new)
    sh(f"rm {q.path(removed)}")
    assert spills(q) == {kept, old, mid, new}  # rm deletes at once
    time.sleep(1.5)  # 8 MiB over a 5 MiB quota, but nothing was delivered: all kept
    assert spills(q) == {kept, old, mid, new}
    deliver(old, mid, new)  # 6 MiB delivered: the oldest goes, 4 MiB are under the quota
    wait_for(lambda: old not in spills(q), 5, "the oldest delivered spill collected")
    time.sleep(1.5)
    assert spills(q) == {kept, mid, new}

    early, late = new_edge(), new_edge()
    write(r, early, late)
    time.sleep(2.0)  # past retention, but not delivered: kept
    assert spills(r) == {early, late}
    deliver(early)
    wait_for(lambda: spills(r) == {late}, 5, "a delivered spill collected after retention")
    deliver(late, kept)  # the ones kept still serve their readers


def test_incomplete_spill_prefix_is_served_after_the_writer_daemon_crashes(
    cluster: Cluster, programs: Programs, src: Path, tmp_path: Path
) -> None:
    """The writer's daemon crashes mid-stream: its program lost the mount, so that
    generation failed, but the restarted daemon serves the prefix in its spill file; a
    reader gets it at once, then verifies it against the re-run and completes."""
    cluster.start_discovery()
    a = cluster.node("a", mode="persistent")
    b = cluster.node("b")
    edge, out = new_edge(), tmp_path / "out"
    # 8 MiB: a FIFO writer's last MiB or two (its pipe, the append in flight) may not be
    # in the spill when the daemon dies; at least 5 MiB of the prefix are.
    cmd = f"exec {SLOWCAT} {src} {a.path(edge)} --pause-after {8 * MiB}"
    writer = programs.start(cmd)
    assert writer.stdout is not None and writer.stdout.readline() == b"paused\n"
    a.kill()  # a crash, mid-stream, no reader yet
    os.killpg(writer.pid, signal.SIGKILL)
    a = cluster.node("a", mode="persistent")
    assert "incomplete (failed) spill" in a.log.read_text()
    reader = programs.start(f"cat {b.path(edge)} > {out}")
    wait_for(lambda: size(out) >= 5 * MiB, 10, "the prefix from the spill", [reader])
    time.sleep(0.5)
    assert reader.poll() is None  # a prefix, not an end: it waits for the re-run
    sh(f"cat {src} > {a.path(edge)}")  # the re-run (generation 2) supersedes the spill
    _, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    assert out.read_bytes() == src.read_bytes()
    assert "replay of" in b.log.read_text()  # the prefix was verified, not trusted
    wait_for(lambda: not list((a.state / "spill").glob(f"{edge}.1.*")), 5, "old spill gone")


def test_a_spill_whose_reader_program_did_not_read_it_all_is_kept(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Defect 6: garbage collection took "the reader's daemon acknowledged every byte"
    for delivered. A reader program that read all but the last byte and exited 0 left a
    spill that retention then deleted: the re-run reader found no writer (README: a spill
    a reader may need is never deleted)."""
    retention = tmp_path / "retention.toml"
    retention.write_text("spill_retention = 0.5\n")
    cluster.start_discovery()
    a = cluster.node("a", mode="persistent", extra=["--config", str(retention)])
    b = cluster.node("b")
    edge, n = new_edge(), 2 * MiB
    data = os.urandom(n)
    (tmp_path / "src").write_bytes(data)
    sh(f"cat {tmp_path / 'src'} > {a.path(edge)}")
    partial = (
        "import sys, time\n"
        f"f = open({b.path(edge)!r}, 'rb', buffering=0)\n"
        f"got = 0\n"
        f"while got < {n - 1}:\n"
        f"    got += len(f.read({n - 1} - got))\n"
        # The END frame arrives with the last byte's frame; let the daemon acknowledge it.
        "time.sleep(0.5)\n"
    )
    sh(f"{sys.executable} -c {shlex.quote(partial)}")
    wait_for(lambda: cluster.edge(edge)["reader_state"] == "closed", 5, "the reader closed")
    time.sleep(2.5)  # retention (0.5 s) and two collection passes (1 s each) went by
    assert list((a.state / "spill").glob(f"{edge}.*"))
    out = sh(f"cat {b.path(edge)}", timeout=20).stdout  # the re-run reader
    assert out == data
    # Now a program read it all: delivered, and collected after retention.
    wait_for(
        lambda: not list((a.state / "spill").glob(f"{edge}.*")), 10, "the delivered spill gone"
    )


def test_a_spill_discovery_does_not_know_is_kept_after_a_restart(
    cluster: Cluster, src: Path
) -> None:
    """Defect 7: a restarted daemon unlinked every spill discovery answered 404 for (here
    its database was wiped): the only copy of a complete stream was deleted."""
    disc = cluster.start_discovery()
    a = cluster.node("a", mode="persistent")
    edge = new_edge()
    sh(f"cat {src} > {a.path(edge)}")
    wait_for(lambda: cluster.edge(edge)["writer_state"] == "complete", 5, "completion")
    a.kill()
    disc.stop()
    disc.db.unlink()  # the database is gone; discovery comes back empty, same port
    for wal in disc.db.parent.glob("discovery.db-*"):
        wal.unlink()
    disc.start()
    a = cluster.node("a", mode="persistent")
    wait_for(lambda: "kept on disk, not served" in a.log.read_text(), 5, "the spill kept")
    kept = list((a.state / "spill").glob(f"{edge}.*"))
    assert len(kept) == 1 and kept[0].stat().st_size > src.stat().st_size


@pytest.mark.parametrize("restart", ["none", "restarted", "restarted-after-chmod"])
def test_a_rerun_writers_spill_is_not_taken_for_delivered_by_the_last_runs_reader(
    cluster: Cluster, tmp_path: Path, restart: str
) -> None:
    """A whole pipeline re-run on a delivered edge, its writer first: discovery's record
    still says the reader is done (the first run's). Garbage collection took that for
    the re-run's delivery and deleted its spill 0.3 s after it completed (over the quota;
    else after retention), unread; the re-run reader then found no writer, the
    generation stayed complete, and the reader was killed after --writer-lost-timeout,
    again with each re-run of it (README: a spill a reader may need is never deleted).

    ``restarted``: the writer's daemon killed and restarted between the re-run's writer
    and its reader (a crash, a reboot). The restored spill took that "reader done" for
    its own delivery, since an earlier run of the daemon may have sent its END. Whether
    the END went out is kept with the spill (a mode bit: spill.SENT_BIT).
    ``restarted-after-chmod``: the spill directory's files also made executable while the
    daemon was down (an operator's ``chmod -R 700``, or a copy from a file system that
    shows every file executable). The mark was the owner-execute bit, which such a chmod
    set; it is now one no blanket chmod sets (the sticky bit; ``chmod 700`` clears it:
    the spill is then only kept)."""
    config = tmp_path / "gc.toml"
    config.write_text("spill_quota = 1\nspill_retention = 0.5\n")
    cluster.start_discovery()
    args = ["--config", str(config), "--writer-lost-timeout", "5"]
    a = cluster.node("a", mode="persistent", extra=args)
    b = cluster.node("b", extra=["--writer-lost-timeout", "5"])
    edge, src = new_edge(), tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB + 5))
    sh(f"cat {src} > {a.path(edge)}")
    assert sh(f"cat {b.path(edge)}").stdout == src.read_bytes()  # delivered: reader done
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "done", 5, "the reader done")
    sh(f"cat {src} > {a.path(edge)}")  # the re-run's writer (generation 2) comes first
    if restart != "none":
        wait_for(lambda: cluster.edge(edge).get("writer_state") == "complete", 5, "completion")
        a.kill()  # SIGKILL: the re-run's spill is complete on disk, unread
        if restart == "restarted-after-chmod":
            sh(f"chmod -R 700 {a.state / 'spill'}")  # an operator tidies the spill directory
        a = cluster.node("a", mode="persistent", extra=args)
        assert "served again" in a.log.read_text()
    time.sleep(3.5)  # two delivery checks (every 2 s) and collection passes (every 1 s)
    assert list((a.state / "spill").glob(f"{edge}.2.*")), "the re-run's unread spill went"
    got = sh(f"cat {b.path(edge)}", timeout=30)  # the re-run's reader
    assert got.stdout == src.read_bytes()


def test_a_rerun_reader_after_the_delivered_spill_was_collected_asks_for_a_rerun_writer(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """A persistent spill is collected after spill_retention once delivered; a reader
    stage re-run after that (killed after it read its input whole, or re-run by hand)
    found no writer, and discovery kept the generation complete: nothing asked for a
    re-run writer, and every re-run reader was killed after --writer-lost-timeout. Its
    reader now has the generation failed (as in transient mode), and the re-run writer
    serves it."""
    retention = tmp_path / "retention.toml"
    retention.write_text("spill_retention = 0.5\n")
    cluster.start_discovery()
    args = ["--config", str(retention), "--writer-lost-timeout", "20"]
    a = cluster.node("a", mode="persistent", extra=args)
    b = cluster.node("b", extra=["--writer-lost-timeout", "20"])
    edge, src = new_edge(), tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB + 1))
    sh(f"cat {src} > {a.path(edge)}")
    assert sh(f"cat {b.path(edge)}").stdout == src.read_bytes()
    wait_for(
        lambda: not list((a.state / "spill").glob(f"{edge}.*")), 10, "the delivered spill gone"
    )
    out = tmp_path / "out"
    reader = programs.start(f"cat {b.path(edge)} > {out}")  # the reader stage re-run
    wait_for(
        lambda: cluster.edge(edge).get("writer_state") == "failed",
        10,
        "the collected generation failed in discovery (a re-run writer wanted)",
        [reader],
    )
    sh(f"cat {src} > {a.path(edge)}")  # the re-run writer
    _, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    assert out.read_bytes() == src.read_bytes()


def test_a_restored_spill_its_reader_read_whole_is_still_collected(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The other side of the above: a spill whose END went out before its daemon was
    killed (marked on the file) is taken as delivered by its reader's "done" after the
    restart, and collected after retention, not kept for good."""
    config = tmp_path / "gc.toml"
    config.write_text("spill_retention = 3\n")
    cluster.start_discovery()
    a = cluster.node("a", mode="persistent", extra=["--config", str(config)])
    b = cluster.node("b")
    edge, src = new_edge(), tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB + 5))
    sh(f"cat {src} > {a.path(edge)}")
    assert sh(f"cat {b.path(edge)}").stdout == src.read_bytes()
    a.kill()  # before retention passed: the spill is on disk
    (spilled,) = (a.state / "spill").glob(f"{edge}.1.*")
    assert spilled.stat().st_mode & spill.SENT_BIT, "its END sent is not marked on the file"
    a = cluster.node("a", mode="persistent", extra=["--config", str(config)])
    assert "served again" in a.log.read_text()
    wait_for(
        lambda: not list((a.state / "spill").glob(f"{edge}.*")), 15, "the delivered spill gone"
    )
