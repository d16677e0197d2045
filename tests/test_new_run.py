"""A daemon's new run whose writer opens before discovery heard the run's first heartbeat
(discovery was away when the daemon started: the mount does not wait for it). That
heartbeat tells discovery of the restart, which fails what the old run held: never the
new run's own writer."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fractalfs import testhooks
from fractalfs.testing import Node

from .conftest import Cluster, Programs, needs_fuse, new_edge, wait_for

pytestmark = needs_fuse


def _b_restarted_unannounced(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> tuple[Node, Node, float]:
    """Nodes a and b, b crashed (discovery still knows its run: a graceful stop leaves)
    and started again with its heartbeats failing for 3 s (as with discovery away)."""
    cluster.start_discovery()
    a = cluster.node("a")
    cluster.node("b").kill()
    monkeypatch.setenv(testhooks.ENV, "1")
    monkeypatch.setenv(testhooks.HOLD_HEARTBEATS_ENV, "3")
    t0 = time.monotonic()
    return a, cluster.node("b"), t0


def _inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two 1 MiB halves of a stream and where it is read to."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_bytes(os.urandom(1 << 20))
    two.write_bytes(os.urandom(1 << 20))
    return one, two, tmp_path / "out"


@pytest.mark.parametrize("reader_first", [True, False])
def test_a_writer_opened_before_its_runs_first_heartbeat_is_not_the_old_runs(
    cluster: Cluster,
    programs: Programs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reader_first: bool,
) -> None:
    """Node b crashed and runs again, its heartbeats failing for its first 3 s (a test
    hook, as with discovery away). A writer opened on b then registered a generation of
    the new run; the late first heartbeat (a new boot: "restarted") took it for the old
    run's: failed in discovery while it streamed, or (its reader open on a) "lost" and
    back with no endpoint, which no reconnection can dial."""
    a, b, t0 = _b_restarted_unannounced(cluster, monkeypatch)
    edge = new_edge()
    one, two, out = _inputs(tmp_path)
    if reader_first:
        reader = programs.start(f"exec cat {a.path(edge)} > {out}")
        wait_for(lambda: cluster.edge(edge).get("reader_state") == "open", 10, "the reader")
    writer = programs.start(f"{{ cat {one}; sleep 6; cat {two}; }} > {b.path(edge)}")
    wait_for(lambda: time.monotonic() - t0 > 4.5, 10, "b's first heartbeat")
    if not reader_first:
        reader = programs.start(f"exec cat {a.path(edge)} > {out}")
    rec = cluster.edge(edge)
    assert writer.poll() is None, "the writer outlived the held heartbeats"
    assert (rec.get("writer_state"), rec.get("generation")) == ("open", 1), rec
    assert rec.get("writer_endpoint"), rec
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    _, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert out.read_bytes() == one.read_bytes() + two.read_bytes()


def test_a_reader_opened_before_its_runs_first_heartbeat_is_not_the_old_runs(
    cluster: Cluster, programs: Programs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, the new run's end a reader: claimed before the run's first heartbeat,
    then taken for the old run's ("lost" with it) while it streamed."""
    a, b, t0 = _b_restarted_unannounced(cluster, monkeypatch)
    edge = new_edge()
    one, two, out = _inputs(tmp_path)
    reader = programs.start(f"exec cat {b.path(edge)} > {out}")
    writer = programs.start(f"{{ cat {one}; sleep 6; cat {two}; }} > {a.path(edge)}")
    wait_for(lambda: time.monotonic() - t0 > 4.5, 10, "b's first heartbeat")
    assert writer.poll() is None, "the writer outlived the held heartbeats"
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    _, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert out.read_bytes() == one.read_bytes() + two.read_bytes()
    assert cluster.edge(edge).get("reader_state") == "done"
