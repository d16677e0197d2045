"""Which reader claim an event of discovery's feed is about (in process, real store).

A node's event feed lags behind what its daemon asked discovery directly: a reader that
claims an edge learns its claim from the answer, and only later reads, on the feed, the
events that came before it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from fractalfs.config import NodeConfig
from fractalfs.discovery.store import Store
from fractalfs.edgeid import EdgeId
from fractalfs.edges import ReaderState
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
