"""A pipeline re-run at once after an early close: the first run's reader's "closed"
reaches discovery after the re-run writer registered (README "Early close"). It is not
that writer's "no more": the reader had pulled the first run's generation."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fractalfs import testhooks
from fractalfs.config import NodeConfig
from fractalfs.discovery.store import Store
from fractalfs.edgeid import EdgeId
from fractalfs.edges import WriterEnd
from fractalfs.node import Node as Daemon
from fractalfs.testing import Node

from .conftest import Cluster, Programs, needs_fuse, new_edge, sh, wait_for

RELEASE_DELAY = 3.0  # the test hook's hold on the reader's release to discovery
RERUN_BYTES = 30_000_000  # more than the write window: the re-run writer waits for a reader


def _logged(node: Node, *lines: str) -> bool:
    text = node.log.read_text()
    return any(line in text for line in lines)


@needs_fuse
@pytest.mark.parametrize("route", ["fifo", "fuse"])
def test_a_late_close_of_the_previous_reader_does_not_stop_a_rerun_writer(
    store_cluster: Cluster,
    programs: Programs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    route: str,
) -> None:
    """`yes > E` / `head -c 10 E`, then the writer re-run at once: its generation
    registers while the reader's daemon still holds the first reader's release (a test
    hook: RELEASE_DELAY s). The late `reader-closed` event was taken by the re-run
    writer's daemon for its "no more": the re-run writer died of SIGPIPE, and the re-run
    reader waited for good. It now reads the re-run's whole stream, and the writer exits
    0."""
    config = tmp_path / "fractalfs.toml"
    on = str(route == "fifo").lower()
    config.write_text(f"fifo_writers = {on}\nfifo_readers = {on}\n")
    extra = ["--config", str(config)]
    a = store_cluster.node("a", extra=extra)
    monkeypatch.setenv(testhooks.ENV, "1")
    monkeypatch.setenv(testhooks.READER_RELEASE_DELAY_ENV, str(RELEASE_DELAY))
    b = store_cluster.node("b", extra=extra)
    edge = new_edge()

    first = programs.start(f"exec yes > {a.path(edge)}")
    wait_for(lambda: store_cluster.edge(edge).get("writer_state") == "open", 10, "the writer")
    assert sh(f"head -c 10 {b.path(edge)}", timeout=30).stdout == b"y\n" * 5
    _, err = first.communicate(timeout=30)
    assert first.returncode == -signal.SIGPIPE, (first.returncode, err)

    rerun = programs.start(f"yes abcdefghi | head -c {RERUN_BYTES} > {a.path(edge)}")
    wait_for(
        lambda: store_cluster.edge(edge).get("generation") == 2, 10, "the re-run writer", [rerun]
    )
    # The case: the re-run registered before the first reader's end was recorded. Read
    # from discovery's event order, not from a later `status` poll: under load the polls
    # took longer than the hook's hold, and the record said "closed" (a failed make test).
    assert store_cluster.discovery is not None
    events = httpx.get(
        f"{store_cluster.discovery.url}/v1/events",
        params={"after": 0},
        auth=store_cluster.discovery.auth,
        timeout=10,
    ).json()["events"]
    mine = [(e["seq"], e["kind"]) for e in events if e["edge"] == edge]
    writers = [seq for seq, kind in mine if kind == "writer"]
    closed = [seq for seq, kind in mine if kind == "reader-closed"]
    assert len(writers) == 2 and (not closed or writers[1] < closed[0]), mine
    assert _logged(b, "a reader's release waits")
    wait_for(
        lambda: store_cluster.edge(edge).get("reader_state") == "closed", 30, "the late release"
    )
    # The writer's daemon has the late event (and took it, or not, for its "no more").
    wait_for(
        lambda: _logged(a, "closed early (discovery)", "closed early: not generation 2's"),
        10,
        "the reader-closed event at the writer's daemon",
    )
    reader = programs.start(f"exec md5sum < {b.path(edge)}")
    try:
        _, err = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, (rerun.returncode, err)
        out, err = reader.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the re-run pipeline did not finish")
    want = sh(f"yes abcdefghi | head -c {RERUN_BYTES} | md5sum").stdout.split()[0]
    assert out.split()[0] == want, err


async def test_a_reader_closed_event_stops_only_a_writer_of_the_generation_its_reader_pulled(
    tmp_path: Path,
) -> None:
    """In process, a real store: which `reader-closed` events a writer's daemon takes for
    its "no more". All are recorded after the writer registered (seq > its registration's)."""
    store = Store(":memory:")
    daemon = Daemon(NodeConfig(str(tmp_path / "mnt"), node="a"), None, "127.0.0.1:1")  # type: ignore[arg-type]

    def takes(pulled: int) -> bool:
        edge = EdgeId.new()
        claim = store.claim_reader(edge.hex, "r").reader_claim
        store.register_writer(edge.hex, "a", "h:1")
        store.close_writer(edge.hex, 1, "failed", 100, "SIGPIPE")
        rec = store.register_writer(edge.hex, "a", "h:1")  # the re-run: generation 2
        writer = WriterEnd(edge, rec.generation, 1 << 20, os.getpid())
        writer.registered = rec.version
        daemon._slot(edge).writer = writer
        store.release_reader(edge.hex, "r", "closed", 10, claim=claim, generation=pulled)
        (event,) = [e for e in store.events(0) if e.edge == edge.hex][-1:]
        daemon.membership._on_event(event.to_json())
        return writer.reader_closed

    assert not takes(1)  # the previous run's reader, late: not this writer's "no more"
    assert takes(2)  # its own reader, closed before it connected
    assert takes(3)  # (a newer one's: this writer is fenced off anyway)
    assert takes(0)  # one that pulled none: it may have closed before any writer came


@needs_fuse
def test_a_late_done_of_the_previous_reader_does_not_deliver_a_rerun_writer(
    cluster: Cluster, programs: Programs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cat src > E` / `cat E`, then the writer re-run at once (transient): its generation
    registers and completes while the first reader's "done" is still on its way (a test
    hook holds it RELEASE_DELAY s). The late `reader-done` event, as long as the re-run's
    stream, was taken by the re-run writer's daemon for its own delivery: it dropped the
    stream unread, discovery kept it "complete" (status: delivered), and the re-run reader
    waited for a writer until --writer-lost-timeout, then was killed, at every re-run.
    The event names the generation its reader pulled: only that generation's counts."""
    cluster.start_discovery()
    a = cluster.node("a", extra=["--writer-lost-timeout", "8"])
    monkeypatch.setenv(testhooks.ENV, "1")
    monkeypatch.setenv(testhooks.READER_RELEASE_DELAY_ENV, str(RELEASE_DELAY))
    b = cluster.node("b", extra=["--writer-lost-timeout", "8"])
    edge, src = new_edge(), tmp_path / "src"
    src.write_bytes(os.urandom(1 << 20))  # under the write window: the writer ends at once
    sh(f"cat {src} > {a.path(edge)}")
    assert sh(f"cat {b.path(edge)}", timeout=30).stdout == src.read_bytes()
    sh(f"cat {src} > {a.path(edge)}")  # the re-run's writer: complete, nobody read it yet
    assert cluster.edge(edge).get("generation") == 2
    assert cluster.edge(edge).get("reader_state") == "open"  # the first reader's end: late
    wait_for(lambda: cluster.edge(edge).get("reader_state") == "done", 30, "the late release")
    time.sleep(1.0)  # its reader-done event reaches the writer's daemon
    reader = programs.start(f"exec cat {b.path(edge)}")  # the re-run's reader
    try:
        out, err = reader.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the re-run reader did not finish")
    assert reader.returncode == 0, err
    assert out == src.read_bytes()
