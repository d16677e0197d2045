"""The node daemon as a process: signals, stale mounts, discovery restarts, embedded mode."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import signal
import sys
import time
from pathlib import Path

from fractalfs.testing import is_mounted

from .conftest import Cluster, Programs, needs_fuse, new_edge, sh, wait_for

pytestmark = needs_fuse


def test_sigterm_wakes_blocked_programs_and_unmounts(cluster: Cluster, programs: Programs) -> None:
    node = cluster.node("a")  # embedded discovery
    reader = programs.start(f"exec cat {node.path(new_edge())}")
    writer = programs.start(f"exec dd if=/dev/zero of={node.path(new_edge())} bs=1M status=none")
    time.sleep(0.7)
    assert reader.poll() is None and writer.poll() is None
    t0 = time.monotonic()
    node.signal(signal.SIGTERM)
    assert node.proc is not None
    assert node.proc.wait(timeout=10) == 0
    reader.wait(timeout=5)
    writer.wait(timeout=5)
    assert time.monotonic() - t0 < 5
    assert reader.returncode != 0 and writer.returncode != 0
    assert not is_mounted(node.mountpoint)


def test_stale_mount_of_a_crashed_daemon_is_cleaned_up(cluster: Cluster) -> None:
    cluster.start_discovery()
    node = cluster.node("a")
    node.kill()  # SIGKILL: the mount stays behind, dead
    assert is_mounted(node.mountpoint)
    # The kernel answers from the root's cached attributes for their timeout (1 s): the
    # start-up's own lookups may have just refreshed them.
    deadline = time.monotonic() + 3
    while True:
        try:
            os.stat(node.mountpoint)
        except OSError as exc:
            err = exc.errno
            break
        assert time.monotonic() < deadline, "a dead daemon's mount still answers"
        time.sleep(0.1)
    assert err == errno.ENOTCONN
    again = cluster.node("a")
    assert again.mountpoint == node.mountpoint
    edge = new_edge()
    sh(f"echo back > {again.path(edge)}")
    assert sh(f"cat {again.path(edge)}").stdout == b"back\n"


def test_discovery_restart_between_two_edges(cluster: Cluster, programs: Programs) -> None:
    disc = cluster.start_discovery()
    a, b = cluster.node("a"), cluster.node("b")
    first = new_edge()
    reader = programs.start(f"cat {b.path(first)}")
    sh(f"seq 1 1000 > {a.path(first)}")
    assert reader.communicate(timeout=20)[0] == sh("seq 1 1000").stdout

    disc.kill()  # SIGKILL: no chance to flush anything but what SQLite committed
    disc.start()
    second = new_edge()
    reader = programs.start(f"cat {b.path(second)}")
    sh(f"seq 1 2000 > {a.path(second)}", timeout=40)
    assert reader.communicate(timeout=40)[0] == sh("seq 1 2000").stdout
    status = sh(f"{sys.executable} -m fractalfs status --discovery {disc.url}").stdout.decode()
    assert first in status and second in status


def test_reader_waits_while_discovery_is_down(cluster: Cluster, programs: Programs) -> None:
    disc = cluster.start_discovery()
    a, b = cluster.node("a"), cluster.node("b")
    edge = new_edge()
    reader = programs.start(f"cat {b.path(edge)}")
    time.sleep(0.5)
    disc.kill()
    time.sleep(1.0)
    disc.start()
    sh(f"echo after the outage > {a.path(edge)}", timeout=40)
    assert reader.communicate(timeout=40)[0] == b"after the outage\n"


def test_an_end_during_a_long_discovery_outage_is_recorded_when_it_is_back(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """Discovery is down for longer than a request retries (1 s here, 30 s by default)
    when the stream ends: the data plane delivers it, and both ends' outcome reaches
    discovery once it is back, so status and completion events are not stuck."""
    conf = tmp_path / "retry.toml"
    conf.write_text("discovery_retry = 1.0\n")
    disc = cluster.start_discovery()
    a = cluster.node("a", extra=["--config", str(conf)])
    b = cluster.node("b", extra=["--config", str(conf)])
    edge = new_edge()
    reader = programs.start(f"cat {b.path(edge)}")
    writer = programs.start(f"{{ echo one; sleep 2; echo two; }} > {a.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("state") == "streaming", 10, "pairing")
    disc.kill()
    assert reader.communicate(timeout=20)[0] == b"one\ntwo\n"
    assert writer.wait(timeout=10) == 0
    time.sleep(2.0)  # every first attempt has given up by now
    disc.start()

    def recorded() -> bool:
        rec = cluster.edge(edge)
        return rec.get("state") == "delivered" and rec.get("writer_state") == "complete"

    wait_for(recorded, 15, "both ends recorded")  # each retries on its own backoff
    assert cluster.edge(edge)["bytes_delivered"] == 8


def test_a_daemon_restarted_while_discovery_was_down_is_a_restart(
    cluster: Cluster, programs: Programs
) -> None:
    """Discovery and the writer's daemon both restart; the daemon's new run heartbeats
    before discovery's liveness check could find the old one silent. Discovery must still
    tell the new run from the old (it keeps each node's boot id on disk): the old run's
    writer is gone, so a re-run writer on another node takes the edge instead of EBUSY."""
    disc = cluster.start_discovery()
    a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
    edge = new_edge()
    writer = programs.start(f"exec sleep 600 > {a.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("writer_state") == "open", 10, "the writer")
    disc.kill()
    a.kill()
    os.killpg(writer.pid, signal.SIGKILL)
    writer.communicate(timeout=10)
    # A new run, started as discovery comes back: it retries discovery for 3 s, and its
    # first heartbeat comes well within discovery's first 1.5 s.
    restart = concurrent.futures.ThreadPoolExecutor(1).submit(cluster.node, "a")
    disc.start()
    a = restart.result(timeout=30)
    reader = programs.start(f"cat {b.path(edge)}")
    sh(f"echo again > {c.path(edge)}", timeout=40)  # EBUSY while the old writer was "open"
    assert reader.communicate(timeout=30)[0] == b"again\n"
    assert a.alive() and b.alive() and c.alive()
