"""Heartbeats that do not grow with the number of ends: the pure protocol (hypothesis) and
a real discovery answering a daemon-sized heartbeat."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fractalfs import testhooks
from fractalfs.discovery.client import DiscoveryClient
from fractalfs.discovery.heartbeat import (
    NODE_HEADER,
    PAGE,
    Acked,
    Delta,
    Ends,
    HeldEnds,
    accept,
    deltas,
    digest_of,
)
from fractalfs.edgeid import EdgeId
from fractalfs.pulse import Pulse
from fractalfs.testing import Discovery, Node

from .conftest import Cluster, Programs, sh, wait_for

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
    acked: Acked | None = None
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
                acked = Acked(dict(writers), tuple(readers), pages[-1].digest)  # as the client
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
    acked = Acked(dict(writers), tuple(readers), pages[-1].digest)
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


def _spin(seconds: float) -> None:
    """Keeps this thread (and a trio loop running in it) busy in pure Python: the loop
    reaches no checkpoint, as a daemon's loop saturated by work."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_busy_loop_pulses_a_stuck_one_does_not_and_a_pulse_brings_a_node_back(
    discovery: Discovery,
) -> None:
    """Busy is not dead: a daemon whose loop makes no heartbeat for 2.5 s (past the 1.5 s
    timeout) but makes progress is kept alive by its pulse thread. A loop stuck past
    ``loop_stall`` stops the pulse: the node is lost. When the loop moves again the pulse
    alone (no heartbeat) brings the node back with the ends its run held."""
    api = httpx.Client(base_url=discovery.url + "/v1", timeout=10, auth=discovery.auth)
    edge = EdgeId.new().hex
    readers = [EdgeId.new().hex for _ in range(3)]

    def states() -> list[str]:
        return [api.get(f"/edges/{edge}").json()["writer_state"]] + [
            api.get(f"/edges/{r}").json()["reader_state"] for r in readers
        ]

    def lost_events() -> int:
        events = api.get("/events", params={"after": 0}).json()["events"]
        return sum(e["kind"] in ("writer-lost", "reader-lost") for e in events)

    seen: dict[str, object] = {}

    async def main() -> None:
        client = DiscoveryClient(discovery.url, retry_for=2.0, auth=discovery.auth)
        pulse = Pulse(client.urls, "busy", "boot1", auth=client.auth, loop_stall=3.0)
        try:
            rec = await client.register_writer(edge, "busy", "h:1")
            for r in readers:
                await client.claim_reader(r, "busy")
            await client.heartbeat("busy", "boot1", {edge: rec["generation"]}, readers)
            async with trio.open_nursery() as nursery:
                await nursery.start(pulse.run)
                _spin(2.5)  # busy: no heartbeat, no checkpoint
                seen["busy"] = (states(), lost_events())
                await trio.sleep(0.3)  # progress
                _spin(6.0)  # stuck past loop_stall (3 s): the pulse stops
                seen["stuck"] = (states(), lost_events())
                await trio.sleep(0.3)
                with trio.move_on_after(5):  # the loop moves again: the pulse resumes
                    while True:
                        await trio.to_thread.run_sync(lambda: seen.update(back=states()))
                        if seen["back"] == ["open"] * 4:
                            break
                        await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
        finally:
            pulse.stop()
            await client.aclose()

    trio.run(main)
    assert seen["busy"] == (["open"] * 4, 0)  # not lost while busy
    assert seen["stuck"] == (["lost"] * 4, 4)  # lost while stuck
    assert seen["back"] == ["open"] * 4  # back, with its claims, by its pulse alone


def test_a_pulse_is_taken_only_from_the_run_that_heartbeat(discovery: Discovery) -> None:
    """A pulse does not introduce a node or a run: a restart is told by its heartbeat
    (which ends what the old run held), and a node that left stays gone."""
    api = httpx.Client(base_url=discovery.url + "/v1", timeout=10, auth=discovery.auth)
    busy = {NODE_HEADER: "p"}
    assert api.post("/nodes/p/pulse", json={"boot": "b1"}, headers=busy).json() == {"alive": False}
    api.post("/nodes/p/heartbeat", json={"boot": "b1", "writers": {}, "readers": []})
    assert api.post("/nodes/p/pulse", json={"boot": "b1"}, headers=busy).json()["alive"]
    assert not api.post("/nodes/p/pulse", json={"boot": "b2"}, headers=busy).json()["alive"]
    for bad in ({}, {"boot": 3}, {"boot": "x" * 1000}):
        resp = api.post("/nodes/p/pulse", json=bad, headers=busy)
        assert resp.status_code == 400 and "boot" in resp.json()["error"]
    api.post("/nodes/p/leave")
    assert not api.post("/nodes/p/pulse", json={"boot": "b1"}, headers=busy).json()["alive"]
    assert "p" not in [n["node"] for n in api.get("/nodes").json()["nodes"]]


def test_a_stopped_reader_daemon_is_lost_then_back_with_every_claim(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """A reader daemon stopped for 3 s (SIGSTOP: a VM pause) is declared lost; once it runs
    again every claim it held is open again within a second or two, nothing
    is re-run, and every stream arrives exactly."""
    cluster.start_discovery()
    a = cluster.node("a")
    b = cluster.node("b")
    assert cluster.discovery is not None
    api = httpx.Client(
        base_url=cluster.discovery.url + "/v1", timeout=10, auth=cluster.discovery.auth
    )

    def all_readers(state: str) -> bool:
        return all(api.get(f"/edges/{e}").json().get("reader_state") == state for e in edges)

    edges = [EdgeId.new().hex for _ in range(20)]
    outs = [tmp_path / f"out{i}" for i in range(len(edges))]
    readers = [
        programs.start(f"exec cat {b.path(e)} > {o}") for e, o in zip(edges, outs, strict=True)
    ]
    wait_for(lambda: all_readers("open"), 20, "every reader registered")
    b.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: all_readers("lost"), 5, "discovery to mark b's readers lost")
        time.sleep(1.0)
    finally:
        woken = time.time()
        b.signal(signal.SIGCONT)
    wait_for(lambda: all_readers("open"), 10, "b's readers open again")
    # Discovery's own times of the claims coming back, not when this test saw all 20 (a
    # poll is 20 requests: most of a second beside another suite).
    back = max(cluster.event_time(e, "reader-back") for e in edges) - woken
    data = [os.urandom(100_000 + i) for i in range(len(edges))]
    for i, (e, d) in enumerate(zip(edges, data, strict=True)):
        (tmp_path / f"src{i}").write_bytes(d)
        sh(f"cat {tmp_path / f'src{i}'} > {a.path(e)}")
    for r in readers:
        r.communicate(timeout=30)
        assert r.returncode == 0
    assert [o.read_bytes() for o in outs] == data
    assert back < 2.0, f"b's claims took {back:.1f} s to come back"


def test_discoverys_own_stall_is_not_a_nodes_silence(tmp_path: Path) -> None:
    """Discovery's loop held for 2 s (a listing of every edge, a slow disk) reads nothing
    meanwhile: the heartbeats wait in its sockets. The nodes are not declared lost for
    that; a node silent for real still is, within the timeout."""
    import asyncio

    from fractalfs.discovery.server import DiscoveryApp
    from fractalfs.discovery.store import Store

    async def main() -> tuple[set[str], set[str]]:
        app = DiscoveryApp(Store(tmp_path / "d.db"))
        loop = asyncio.get_running_loop()
        app.last_seen["n"] = loop.time()
        checker = asyncio.create_task(app._check_liveness())
        await asyncio.sleep(0.3)
        app.last_seen["n"] = loop.time()

        def seen(hops: int = 3) -> None:
            # The node's request, read after the stall: its handler runs a few loop
            # iterations later (protocol, then a task), after the check woke.
            if hops:
                loop.call_soon(seen, hops - 1)
            else:
                app.last_seen["n"] = loop.time()

        def hold() -> None:
            time.sleep(2.0)  # the loop is held: no request is read, no check runs
            seen()

        loop.call_soon(hold)
        await asyncio.sleep(2.6)
        after_stall = set(app.lost)
        await asyncio.sleep(2.0)  # silent for real
        checker.cancel()
        return after_stall, set(app.lost)

    after_stall, later = asyncio.run(main())
    assert after_stall == set()
    assert later == {"n"}


SLOW_WRITER = (
    "import sys, time; d = open(sys.argv[1], 'rb').read(); out = open(sys.argv[2], 'wb')\n"
    "for i in range(0, len(d), 32768):\n"
    "    out.write(d[i : i + 32768]); out.flush(); time.sleep(0.05)\n"
)


def _slow_streams(
    a: Node, b: Node, programs: Programs, tmp_path: Path, n: int = 3
) -> tuple[list[str], list[bytes], list[Path], list[subprocess.Popen[bytes]]]:
    """``n`` streams from ``a`` to ``b`` of 3 MiB each, written over ~5 s; returns once
    every reader has bytes."""
    edges = [EdgeId.new().hex for _ in range(n)]
    data = [os.urandom(3 * 1024 * 1024 + i) for i in range(n)]
    outs = [tmp_path / f"out{i}" for i in range(n)]
    procs = []
    for i, (e, d, o) in enumerate(zip(edges, data, outs, strict=True)):
        src = tmp_path / f"src{i}"
        src.write_bytes(d)
        procs.append(programs.start(f"exec cat {b.path(e)} > {o}"))
        code = shlex.quote(SLOW_WRITER)
        procs.append(programs.start(f"exec python3 -c {code} {src} {a.path(e)}"))
    wait_for(lambda: all(o.exists() and o.stat().st_size > 0 for o in outs), 20, "bytes")
    return edges, data, outs, procs


def _losses(api: httpx.Client) -> list[dict[str, object]]:
    events = api.get("/events", params={"after": 0}).json()["events"]
    return [e for e in events if e["kind"] in ("writer-lost", "reader-lost")]


def test_a_busy_daemon_is_not_lost_and_its_streams_are_exact(
    cluster: Cluster, programs: Programs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Busy is not dead, with real daemons: the writer daemon's loop is held 3 s (twice the
    timeout) without a checkpoint while three streams flow (the test hook: as thousands of
    opens at once). Its pulse thread keeps it alive: no loss, and every stream is exact."""
    disc = cluster.start_discovery()
    b = cluster.node("b")
    monkeypatch.setenv(testhooks.ENV, "1")
    a = cluster.node("a")
    api = httpx.Client(base_url=disc.url + "/v1", timeout=10, auth=disc.auth)
    edges, data, outs, procs = _slow_streams(a, b, programs, tmp_path)
    a.signal(signal.SIGUSR2)
    wait_for(lambda: "the loop runs again" in a.log.read_text(), 15, "the busy loop")
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == 0
    assert [o.read_bytes() for o in outs] == data
    assert "the loop is busy for 3.0 s" in a.log.read_text()
    assert _losses(api) == []
    assert [api.get(f"/edges/{e}").json()["generation"] for e in edges] == [1, 1, 1]


def test_a_stopped_writer_daemon_is_lost_then_back_and_its_streams_are_exact(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """A daemon stopped (SIGSTOP: no thread runs, no pulse) past the timeout is lost; its
    loss as a silent node fails nothing: after SIGCONT its writers are back and every
    stream completes exactly, with no re-run."""
    disc = cluster.start_discovery()
    b = cluster.node("b")
    a = cluster.node("a")
    api = httpx.Client(base_url=disc.url + "/v1", timeout=10, auth=disc.auth)
    edges, data, outs, procs = _slow_streams(a, b, programs, tmp_path)
    a.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: len(_losses(api)) >= len(edges), 5, "a declared lost")
        time.sleep(1.0)
    finally:
        a.signal(signal.SIGCONT)
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == 0
    assert [o.read_bytes() for o in outs] == data
    lost = _losses(api)
    assert {e["kind"] for e in lost} == {"writer-lost"}
    assert all(e["data"]["cause"] == "silent" for e in lost)  # type: ignore[index]
    assert [api.get(f"/edges/{e}").json()["generation"] for e in edges] == [1, 1, 1]


def test_deltas_of_edge_ids_are_those_of_their_texts() -> None:
    """A daemon passes its readers' EdgeIds (no text per reader each beat): the pages
    are the same as for their texts, digests included, and a steady beat is empty."""
    ids = [EdgeId.new() for _ in range(30)]
    writers = {EdgeId.new().hex: 2}
    first, later = ids[:20], ids[10:]
    for acked_ids in (None, first):
        acked_text = None
        acked_id = None
        if acked_ids is not None:
            pages = deltas(None, writers, [e.hex for e in acked_ids])
            acked_text = Acked(dict(writers), tuple(e.hex for e in acked_ids), pages[-1].digest)
            acked_id = Acked(dict(writers), tuple(acked_ids), pages[-1].digest)
        by_text = deltas(acked_text, writers, [e.hex for e in later])
        by_id = deltas(acked_id, writers, later)
        assert [sorted(p.readers) for p in by_id] == [sorted(p.readers) for p in by_text]
        assert [sorted(p.gone_readers) for p in by_id] == [
            sorted(p.gone_readers) for p in by_text
        ]
        assert [p.digest for p in by_id] == [p.digest for p in by_text]
        assert by_id[-1].digest == digest_of(writers, [e.hex for e in later])
        steady = deltas(Acked(dict(writers), tuple(later), by_id[-1].digest), writers, later)
        assert len(steady) == 1 and steady[0].size() == 0
