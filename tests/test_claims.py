"""Which reader claim an event of discovery's feed is about (in process, real store).

A node's event feed lags behind what its daemon asked discovery directly: a reader that
claims an edge learns its claim from the answer, and only later reads, on the feed, the
events that came before it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio
import trio.testing

from fractalfs.config import NodeConfig
from fractalfs.discovery.store import Store
from fractalfs.edgeid import EdgeId
from fractalfs.edges import ReaderState, WriterEnd, WriterState
from fractalfs.membership import claim_of
from fractalfs.node import Node


class StoreClient:
    """Discovery as far as a reader's claim uses it: a real SQLite store, in process."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def claim_reader(self, edge: str, node: str) -> dict[str, Any]:
        return self.store.claim_reader(edge, node).to_json()


def claim_event(store: Store, edge: EdgeId, node: str) -> dict[str, Any]:
    (event,) = [e for e in store.events(0) if e.kind == "reader" and e.data.get("node") == node][
        -1:
    ]
    return event.to_json()


async def test_a_lagging_claim_event_leaves_the_newer_reader_that_took_the_edge_back(
    tmp_path: Path,
) -> None:
    """Node x's reader is cut off and taken for lost; the stage re-runs on y, whose reader
    claims the edge and dies; the stage re-runs on x, whose new reader claims the edge
    back. Only then does x's feed bring y's claim: it is older than x's new claim and must
    not fail that reader (it failed it with EIO: a FIFO reader SIGKILLed, a stage failed
    for nothing). A claim newer than the reader's still fails it."""
    store = Store(":memory:")
    edge = EdgeId.new()
    store.claim_reader(edge.hex, "x")
    store.node_lost("x")
    store.claim_reader(edge.hex, "y")
    store.release_reader(edge.hex, "y", "failed", 0)
    node = Node(NodeConfig(str(tmp_path / "mnt"), node="x"), StoreClient(store), "127.0.0.1:1")  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        node._nursery = nursery
        reader = await node.open_reader(edge, os.getpid())
        nursery.cancel_scope.cancel()
    late = claim_event(store, edge, "y")
    node.membership._on_event(late)
    assert reader.state is ReaderState.WAITING, reader.error

    # y claims it again, after x's reader (x taken for lost once more): that one counts.
    store.node_lost("x")
    store.claim_reader(edge.hex, "y")
    node.membership._on_event(claim_event(store, edge, "y"))
    assert reader.state.value == "failed"  # (mypy narrowed state to WAITING above)
    assert reader.error is not None and "claimed it" in str(reader.error)


# -- the writer's side: a lagging feed's claim or loss of a reader the edge moved on from --


class WriterStoreClient(StoreClient):
    """Discovery as a writer's daemon asks it when an event of its reader comes: the
    edge's record now."""

    async def get(self, edge: str, **_: Any) -> dict[str, Any]:
        rec = self.store.get(edge)
        assert rec is not None
        return rec.to_json()


def last_event(store: Store, edge: EdgeId, kind: str, node: str) -> dict[str, Any]:
    got = [e for e in store.events(0) if e.edge == edge.hex and e.kind == kind]
    return [e for e in got if e.data.get("node") == node][-1].to_json()


def writer_on_w(tmp_path: Path, store: Store, edge: EdgeId) -> tuple[Node, WriterEnd]:
    rec = store.register_writer(edge.hex, "w", "127.0.0.1:1")
    client = WriterStoreClient(store)
    node = Node(NodeConfig(str(tmp_path / "mnt"), node="w"), client, "127.0.0.1:1")  # type: ignore[arg-type]
    writer = WriterEnd(edge, rec.generation, 1 << 20, os.getpid())
    writer.registered = rec.version
    node._slot(edge).writer = writer
    return node, writer


async def test_a_lagging_claim_event_leaves_the_connection_of_the_reader_that_took_the_edge_back(
    tmp_path: Path,
) -> None:
    """The writer on w streams to x's reader; x is taken for lost, the stage re-runs on y,
    whose reader claims the edge and dies; the stage re-runs on x, whose new reader claims
    the edge back and connects to w. Only then does w's feed bring the loss and y's claim:
    y's claim is older than the reader w serves, and must not cut its connection (it did:
    the reader redialled). A claim of another node that is the edge's current one still
    drops a connection of the reader lost (it may be one that outlived a partition)."""
    store = Store(":memory:")
    edge = EdgeId.new()
    node, writer = writer_on_w(tmp_path, store, edge)
    store.claim_reader(edge.hex, "x")
    store.node_lost("x")
    store.claim_reader(edge.hex, "y")
    store.release_reader(edge.hex, "y", "failed", 0)
    store.claim_reader(edge.hex, "x")  # the new reader on x, which connects to w now
    async with trio.open_nursery() as nursery:
        node._nursery = nursery
        connection = writer.connection = trio.CancelScope()
        node.membership._on_event(last_event(store, edge, "reader-lost", "x"))  # late
        node.membership._on_event(last_event(store, edge, "reader", "y"))  # late
        await trio.testing.wait_all_tasks_blocked()
        assert not connection.cancel_called
        node.membership._on_event(last_event(store, edge, "reader", "x"))
        await trio.testing.wait_all_tasks_blocked()
        assert not connection.cancel_called

        # x is lost again and y's claim is the current one: a connection w still serves
        # may be x's, cut off: it goes, as before.
        store.node_lost("x")
        store.claim_reader(edge.hex, "y")
        node.membership._on_event(last_event(store, edge, "reader-lost", "x"))
        node.membership._on_event(last_event(store, edge, "reader", "y"))
        await trio.testing.wait_all_tasks_blocked()
        assert connection.cancel_called
        nursery.cancel_scope.cancel()


async def test_a_lagging_reader_lost_event_does_not_fail_the_generation_a_newer_reader_reads(
    tmp_path: Path,
) -> None:
    """x's daemon restarts before its reader read a byte; the restarted daemon's reader
    claims the edge again and acknowledges bytes the transient writer frees. Only then does
    w's feed bring the loss of x's first reader: it is not the reader w serves, and must
    not fail the generation (it did: acknowledged bytes "lost with the reader's node", the
    writer failed, one needless re-run). The loss of the reader w serves still fails it."""
    store = Store(":memory:")
    edge = EdgeId.new()
    node, writer = writer_on_w(tmp_path, store, edge)
    store.claim_reader(edge.hex, "x")
    store.node_lost("x", "restarted")
    store.claim_reader(edge.hex, "x")  # the new run's reader: it reads and acknowledges
    writer.end = writer.acked = writer.base = 4096
    async with trio.open_nursery() as nursery:
        node._nursery = nursery
        node.membership._on_event(last_event(store, edge, "reader-lost", "x"))  # late
        await trio.testing.wait_all_tasks_blocked()
        assert writer.state is WriterState.OPEN, writer.abort_reason

        # Now the new run goes too: that loss is the reader's, and its bytes are gone.
        store.node_lost("x", "restarted")
        node.membership._on_event(last_event(store, edge, "reader-lost", "x"))
        await trio.testing.wait_all_tasks_blocked()
        assert writer.state.value == "aborted"  # (mypy narrowed state to OPEN above)
        nursery.cancel_scope.cancel()


def test_a_claims_events_name_it() -> None:
    """The SQLite store's claim id is its event's seq; its ``reader-lost`` events name the
    claim lost (etcd: tests/test_etcd.py)."""
    store = Store(":memory:")
    edge = EdgeId.new()
    first = store.claim_reader(edge.hex, "x")
    store.node_lost("x", "restarted")
    again = store.claim_reader(edge.hex, "x")
    events = [e.to_json() for e in store.events(0) if e.edge == edge.hex]
    named = [(e["kind"], claim_of(e)) for e in events]
    assert named == [
        ("reader", first.reader_claim),
        ("reader-lost", first.reader_claim),
        ("reader", again.reader_claim),
    ]


async def test_a_lagging_removal_leaves_the_ends_the_edge_got_after_it(tmp_path: Path) -> None:
    """``rm`` of an edge on another node, then the pipeline re-run at once: the edge
    starts afresh, and this node's new writer registers before its feed brings the
    removal. That removal is older than the writer, and must not end it (it aborted it:
    EPIPE to a re-run that had just begun, and a reader killed with ECANCELED). A removal
    after the writer registered still ends it."""
    store = Store(":memory:")
    edge = EdgeId.new()
    store.register_writer(edge.hex, "w", "127.0.0.1:1")
    store.delete(edge.hex)
    late = [e for e in store.events(0) if e.kind == "deleted"][-1].to_json()
    node, writer = writer_on_w(tmp_path, store, edge)  # the re-run's writer
    async with trio.open_nursery() as nursery:
        node._nursery = nursery
        node.membership._on_event(late)
        assert writer.state is WriterState.OPEN, writer.abort_reason
        store.delete(edge.hex)
        node.membership._on_event([e for e in store.events(0) if e.kind == "deleted"][-1].to_json())
        assert writer.state.value == "aborted"  # (mypy narrowed state to OPEN above)
        nursery.cancel_scope.cancel()


async def test_a_lagging_reader_done_does_not_mark_a_newer_generation_delivered(
    tmp_path: Path,
) -> None:
    """Generation 1's reader read it whole ("reader-done"); the stage is re-run anyway
    (FRACTAL re-runs a subgraph) and generation 2, as long, completes here before this
    node's feed brings generation 1's "reader-done". That is not generation 2's reader:
    taking it for delivered let its end go (a reader still reading it then finds nobody
    holding it: the generation fails, one more re-run) and frees its spill for collection."""
    store = Store(":memory:")
    edge = EdgeId.new()
    store.register_writer(edge.hex, "w", "127.0.0.1:1")
    store.claim_reader(edge.hex, "x")
    store.close_writer(edge.hex, 1, "complete", 4096)
    store.release_reader(edge.hex, "x", "done", 4096)
    late = [e for e in store.events(0) if e.kind == "reader-done"][-1].to_json()
    node, writer = writer_on_w(tmp_path, store, edge)  # generation 2
    assert writer.generation == 2
    writer.end = 4096
    writer.state = WriterState.COMPLETE
    writer.on_end_sent()  # to generation 2's reader: only an event of that reader counts
    node.membership._on_event(late)
    assert not writer.delivered
    store.claim_reader(edge.hex, "x")
    store.close_writer(edge.hex, 2, "complete", 4096)
    store.release_reader(edge.hex, "x", "done", 4096)
    node.membership._on_event([e for e in store.events(0) if e.kind == "reader-done"][-1].to_json())
    assert writer.delivered


async def test_a_lagging_writer_event_of_a_removed_edge_does_not_fence_its_new_writer(
    tmp_path: Path,
) -> None:
    """Generations start again at 1 on an edge removed and made afresh. A writer event of
    the edge before its removal (generation 2) that this node's feed brings after the new
    writer registered (generation 1) is older than that writer, and must not fence it
    off (it did: EPIPE to the re-run, "a newer writer generation took the edge over")."""
    store = Store(":memory:")
    edge = EdgeId.new()
    store.register_writer(edge.hex, "v", "127.0.0.1:2")
    store.close_writer(edge.hex, 1, "failed", 0)
    store.register_writer(edge.hex, "v", "127.0.0.1:2")
    late = [e for e in store.events(0) if e.kind == "writer"][-1].to_json()
    assert late["data"]["generation"] == 2
    store.delete(edge.hex)
    node, writer = writer_on_w(tmp_path, store, edge)
    assert writer.generation == 1
    node.membership._on_event(late)
    assert writer.state is WriterState.OPEN, writer.abort_reason
