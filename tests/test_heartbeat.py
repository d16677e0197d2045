"""Heartbeats that do not grow with the number of ends: the pure protocol (hypothesis) and
a real discovery answering a daemon-sized heartbeat."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fractalfs.discovery.client import DiscoveryClient
from fractalfs.discovery.heartbeat import (
    NODE_HEADER,
    PAGE,
    Delta,
    Ends,
    HeldEnds,
    accept,
    deltas,
    digest_of,
)
from fractalfs.edgeid import EdgeId
from fractalfs.testing import Discovery

EDGES = [EdgeId.new().hex for _ in range(40)]

states = st.tuples(
    st.dictionaries(st.sampled_from(EDGES), st.integers(1, 3), max_size=20),
    st.sets(st.sampled_from(EDGES), max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(states, min_size=1, max_size=8), st.lists(st.booleans(), min_size=8, max_size=8))
def test_deltas_converge_and_resync(
    sequence: list[tuple[dict[str, int], set[str]]], forget: list[bool]
) -> None:
    """Whatever the daemon's ends do, and whenever discovery forgets them, discovery ends up
    with exactly the daemon's set after at most one resync."""
    acked: Ends | None = None
    held: Ends | None = None
    for (writers, readers), lose in zip(sequence, forget, strict=False):
        if lose:
            held = None  # discovery restarted, or another replica answers
        for _ in range(2):
            pages = deltas(acked, writers, readers)
            ok = True
            for page in pages:
                page = Delta.from_json(json.loads(json.dumps(page.to_json())))  # the wire
                held = accept(held, page)
                if held is None:
                    ok = False
                    break
            if ok:
                acked = Ends(dict(writers), set(readers), pages[-1].digest)
                break
            acked = None
        assert held is not None
        assert held.writers == writers and held.readers == readers
        assert held.digest == digest_of(writers, readers)


def test_steady_state_beat_is_empty_and_big_sets_are_paged() -> None:
    writers = {EdgeId.new().hex: 1 for _ in range(2500)}
    readers = [EdgeId.new().hex for _ in range(2500)]
    pages = deltas(None, writers, readers)
    assert len(pages) == 5 and pages[0].reset and not pages[1].reset
    assert all(p.size() <= PAGE for p in pages)
    assert all(len(json.dumps(p.to_json())) < 64 * 1024 for p in pages)
    acked = Ends(dict(writers), set(readers), pages[-1].digest)
    again = deltas(acked, writers, readers)
    assert len(again) == 1 and again[0].size() == 0
    assert len(json.dumps(again[0].to_json())) < 300  # the same size at 5 ends or 5,000


def test_bad_deltas_are_refused() -> None:
    too_many = [EdgeId.new().hex] * (PAGE + 1)
    for bad in (
        {},
        {"base": "zz", "digest": "0"},
        {"base": "0", "digest": "0", "reset": 1},
        {"base": "0", "digest": "0", "writers": {"x": 1}},
        {"base": "0", "digest": "0", "readers": too_many},
    ):
        with pytest.raises(ValueError):
            Delta.from_json(bad)


def test_a_big_node_is_checked_in_a_rotating_window() -> None:
    held = HeldEnds()
    writers = {EdgeId.new().hex: 1 for _ in range(2500)}
    pages = deltas(None, writers, [])
    first = [held.receive("n", "b", p, everything=False) for p in pages]
    for page, got in zip(pages, first, strict=True):
        assert got is not None and set(page.writers) <= set(got[0])  # new ends: at once
        assert len(got[0]) <= 2 * PAGE  # and at most one window besides
    quiet = deltas(Ends(dict(writers), set(), pages[-1].digest), writers, [])[0]
    seen: set[str] = set()
    for _ in range(3):
        got = held.receive("n", "b", quiet, everything=False)
        assert got is not None and len(got[0]) <= PAGE
        seen |= set(got[0])
    assert seen == set(writers)  # every end checked within ends / PAGE beats


async def test_five_thousand_ends_keep_a_node_alive(discovery: Discovery) -> None:
    """Above ~1,800 ends the old full-list heartbeat passed the 64 KiB body limit (413),
    and the node was declared lost."""
    client = DiscoveryClient(discovery.url, retry_for=2.0, auth=discovery.auth)
    try:
        edge = EdgeId.new().hex
        rec = await client.register_writer(edge, "big", "h:1")
        writers = {EdgeId.new().hex: 1 for _ in range(2499)} | {edge: rec["generation"]}
        readers = [EdgeId.new().hex for _ in range(2500)]
        stale = await client.heartbeat("big", "boot1", writers, readers)
        assert len(stale) == 2499 and edge not in stale  # unknown to discovery: fenced
        for _ in range(3):
            await client.heartbeat("big", "boot1", writers, readers)
    finally:
        await client.aclose()
    nodes = httpx.get(discovery.url + "/v1/nodes", auth=discovery.auth).json()["nodes"]
    assert [n["alive"] for n in nodes if n["node"] == "big"] == [True]
    rec = httpx.get(f"{discovery.url}/v1/edges/{edge}", auth=discovery.auth).json()
    assert rec["writer_state"] == "open"


def test_busy_is_not_dead(discovery: Discovery) -> None:
    """The liveness rule: a node is lost after 1.5 s with no request of any kind from it.
    A daemon too busy to heartbeat on time still registers, long-polls and reports
    progress; each of those requests (it names its node in a header) keeps it alive."""
    api = httpx.Client(base_url=discovery.url + "/v1", timeout=10, auth=discovery.auth)
    edge = EdgeId.new().hex
    api.post(f"/edges/{edge}/writer", json={"node": "busy", "endpoint": "h:1"})
    api.post("/nodes/busy/heartbeat", json={"boot": "b", "writers": {edge: 1}, "readers": []})
    busy = {NODE_HEADER: "busy"}
    end = time.monotonic() + 4.0  # well past the 1.5 s timeout, with no heartbeat
    while time.monotonic() < end:
        api.get(f"/edges/{EdgeId.new().hex}", headers=busy)
        time.sleep(0.3)
    assert api.get(f"/edges/{edge}").json()["writer_state"] == "open"
    # Silent for real: lost.
    start = time.monotonic()
    while api.get(f"/edges/{edge}").json()["writer_state"] != "lost":
        assert time.monotonic() - start < 5, "a silent node was never declared lost"
        time.sleep(0.1)
    assert time.monotonic() - start < 2.5
