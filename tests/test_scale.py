"""Discovery's cost follows live work: waiters woken per edge, paged edge lists, capped
events, pruned history."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest

from fractalfs.discovery.server import Changes
from fractalfs.discovery.store import Store
from fractalfs.edgeid import EdgeId
from fractalfs.testing import Discovery, Process, operator_auth

from .conftest import new_edge


def test_a_change_wakes_only_the_waiters_of_its_edge() -> None:
    async def main() -> None:
        changes = Changes()
        woken: list[str] = []
        edges = [new_edge() for _ in range(1000)]

        async def waiter(edge: str) -> None:
            checks = 0

            def ready() -> bool:
                nonlocal checks
                checks += 1
                return checks > 1  # the first look is before any change

            # Far past the test: a waiter timed out during a stall of the test process is
            # no wake by another edge's change (106 of 999 "woken" so at load ~3,000).
            await changes.wait_until(ready, 300.0, edge)
            woken.append(edge)

        tasks = [asyncio.create_task(waiter(e)) for e in edges]
        await asyncio.sleep(0.05)
        assert changes.waiting() == 1000
        changes.notify(edges[7])
        await asyncio.sleep(0.05)
        assert woken == [edges[7]]  # not the other 999
        changes.notify()  # a change of many edges (a node lost) wakes everyone
        await asyncio.gather(*tasks)
        assert len(woken) == 1000 and changes.waiting() == 0

        # Waiters that time out leave nothing behind.
        await asyncio.gather(*(changes.wait_until(lambda: False, 0.01, e) for e in edges[:50]))
        assert changes.waiting() == 0

    asyncio.run(main())


def test_history_is_pruned_and_queries_use_indexes(tmp_path: Path) -> None:
    store = Store(tmp_path / "d.db")
    try:
        done, live = new_edge(), new_edge()
        for edge in (done, live):
            store.register_writer(edge, "n1", "h:1")
            store.claim_reader(edge, "n2")
        store.release_reader(done, "n2", "done", 0)
        assert store.prune(time.time() - 3600) == 0  # delivered, but within the retention
        assert store.prune(time.time() + 1) == 1
        assert [e.id for e in store.edges()] == [live]
        plan = store._db.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM edges "
            "WHERE writer_node = ? AND writer_state = 'open'",
            ("n1",),
        ).fetchall()
        assert "USING INDEX" in str([tuple(r) for r in plan])
        assert [e.id for e in store.node_lost("n1")] == [live]
    finally:
        store.close()


def test_edges_are_paged_and_events_capped(discovery: Discovery) -> None:
    api = httpx.Client(base_url=discovery.url + "/v1", timeout=10, auth=discovery.auth)
    edges = sorted(new_edge() for _ in range(25))
    for edge in edges:
        api.post(f"/edges/{edge}/reader", json={"node": "n"}).raise_for_status()
    got: list[str] = []
    after = ""
    while True:
        page = api.get("/edges", params={"limit": 10, "after": after}).json()
        assert len(page["edges"]) <= 10
        got += [e["id"] for e in page["edges"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert got == edges
    assert len(api.get("/edges").json()["edges"]) == 25  # no limit: everything, as before
    bad = api.get("/edges", params={"limit": 10, "after": "x"})
    assert bad.status_code == 400 and "edge id" in bad.json()["error"]
    api.post(f"/edges/{edges[0]}/event", json={"kind": "resumed", "data": {"x": "y" * 50_000}})
    last = api.get("/events").json()["events"][-1]
    assert last["kind"] == "resumed" and last["data"]["truncated"] is True


def test_a_discovery_forgets_delivered_edges_after_its_retention(tmp_path: Path) -> None:
    proc = Process(
        [
            "discovery",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "d.db"),
            "--retention",
            "0.5",
        ],
        tmp_path / "d2.log",
    )
    line = proc.start()
    url = line.split(" listening on ")[1].split()[0]
    try:
        api = httpx.Client(base_url=url + "/v1", timeout=10, auth=operator_auth())
        edge, live = new_edge(), new_edge()
        for e in (edge, live):
            api.post(f"/edges/{e}/reader", json={"node": "n"}).raise_for_status()
        api.post(f"/edges/{edge}/reader/close", json={"node": "n", "state": "done", "bytes": 0})
        deadline = time.monotonic() + 10
        while edge in {e["id"] for e in api.get("/edges").json()["edges"]}:
            assert time.monotonic() < deadline, "the delivered edge was never forgotten"
            time.sleep(0.1)
        assert live in {e["id"] for e in api.get("/edges").json()["edges"]}
    finally:
        proc.stop()


def test_the_feed_of_changes_names_the_edges_that_changed(discovery: Discovery) -> None:
    with httpx.Client(base_url=discovery.url + "/v1", timeout=10, auth=discovery.auth) as api:
        # A new follower (no feed, or another server's) is told to resync, with the position.
        first = api.get("/changes", params={"feed": "", "after": 0}).json()
        assert first["resync"] is True and first["edges"] == []
        feed, seq = first["feed"], first["seq"]
        quiet = api.get("/changes", params={"feed": feed, "after": seq}).json()
        assert quiet == {"feed": feed, "seq": seq, "edges": [], "all": False, "resync": False}
        one, two = new_edge(), new_edge()
        api.post(f"/edges/{one}/reader", json={"node": "n"}).raise_for_status()
        api.post(f"/edges/{two}/reader", json={"node": "n"}).raise_for_status()
        api.post(f"/edges/{one}/writer", json={"node": "n", "endpoint": "h:1"}).raise_for_status()
        got = api.get("/changes", params={"feed": feed, "after": seq}).json()
        # Only what a reader's pump looks at (the writer's side): a claim is not named.
        assert got["edges"] == [one] and not got["resync"]
        assert got["seq"] == seq + 1
        # A long-poll is answered the moment an edge changes, naming only that one.
        t0 = time.monotonic()
        with httpx.Client(base_url=discovery.url + "/v1", timeout=10, auth=discovery.auth) as other:
            import threading

            # The long-poll is answered as the delete changes the edge, before the delete's
            # own answer: the timer's thread must finish with ``other`` before it closes (it
            # raised in the thread, an unhandled httpx error, when the block left first).
            deleted: list[int] = []
            timer = threading.Timer(
                0.3, lambda: deleted.append(other.delete(f"/edges/{two}").status_code)
            )
            timer.start()
            try:
                waited = api.get(
                    "/changes", params={"feed": feed, "after": got["seq"], "wait": 5}
                ).json()
            finally:
                timer.join(timeout=10)
        assert waited["edges"] == [two] and time.monotonic() - t0 < 3
        assert len(deleted) == 1 and deleted[0] < 300, deleted
        # A position from the future, or a wrong feed, is a resync.
        assert api.get("/changes", params={"feed": feed, "after": 10**9}).json()["resync"]
        assert api.get("/changes", params={"feed": "x", "after": 0}).json()["resync"]
        # Like every route but /v1/health, the feed requires the cluster secret.
        anon = httpx.get(discovery.url + "/v1/changes", params={"feed": feed, "after": 0})
        assert anon.status_code == 401


def test_the_feed_forgets_old_positions_and_marks_many_edge_changes() -> None:
    changes = Changes()
    edges = [new_edge() for _ in range(3)]
    for edge in edges:
        changes.notify(edge)
    changes.notify("")  # an event only: no edge changed
    assert changes.changed_since(0) == (edges[::-1], False)  # newest first
    changes.notify(edges[0])  # changed again: named once
    assert changes.changed_since(1) == ([edges[0], edges[2], edges[1]], False)
    changes.notify()  # a node lost: every edge
    assert changes.changed_since(4) == ([], True)
    assert changes.changed_since(changes.seq) == ([], False)
    changes._feed = type(changes._feed)(list(changes._feed)[-2:], maxlen=2)
    assert changes.changed_since(0) is None  # too old: the caller resyncs


def test_one_signal_check_per_program_for_all_its_blocked_handlers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    import trio
    import trio.testing

    from fractalfs import procs
    from fractalfs.edges import EdgeError, Notifier, wait_or_interrupt

    checks: list[int] = []
    pending = False

    def signal_pending(pid: int, tgid: int = 0) -> bool:
        checks.append(pid)
        return pending

    monkeypatch.setattr(procs, "signal_pending", signal_pending)

    async def main() -> None:
        nonlocal pending
        notifier = Notifier()
        interrupted: list[int] = []

        async def handler(pid: int) -> None:
            try:
                while True:
                    await wait_or_interrupt(notifier, pid, 0.05)
            except EdgeError as exc:
                assert exc.errno == errno.EINTR
                interrupted.append(pid)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(handler, 1000 + i % 2)  # 200 handlers of two programs
            await trio.sleep(0.5)
            ticks = len(checks) / 2
            assert 3 <= ticks <= 12, checks[:20]  # two reads a tick, not 200
            pending = True
        assert len(interrupted) == 200

    # Virtual time: on the real clock a test process starved for 0.5 s (make test beside a
    # 10,000-edge scale run, load ~3,000) woke main before any poll ran (0 ticks).
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_lost_node_names_its_edges_in_the_feed(tmp_path: Path) -> None:
    """Losing a node wakes the waiters of its edges only, not every waiting reader."""
    from fractalfs.discovery.server import DiscoveryApp

    store = Store(tmp_path / "d.db")
    try:
        app = DiscoveryApp(store)
        held, other = new_edge(), new_edge()
        store.register_writer(held, "lost", "h:1")
        store.claim_reader(other, "alive")
        seq = app.changes.seq
        asyncio.run(app._lose("lost", "left"))
        assert app.changes.changed_since(seq) == ([held], False)
        seq = app.changes.seq
        asyncio.run(app._lose("nobody", "left"))  # nothing held: no edge changed
        assert app.changes.changed_since(seq) == ([], False)
        # A node of 10,000 waiting readers lost and back: no reader's pump looks at the
        # reader's side, so the feed names none of them (each such change woke every
        # reader of every daemon: "every edge changed").
        readers = [new_edge() for _ in range(50)]
        for edge in readers:
            store.claim_reader(edge, "busy")
        seq = app.changes.seq
        asyncio.run(app._lose("busy", "silent"))
        assert app.changes.changed_since(seq) == ([], False)
        assert store.get(readers[0]).reader_state == "lost"  # type: ignore[union-attr]
        assert app.changes.waiting() == 0
    finally:
        store.close()


def test_the_signal_watch_keeps_its_scans_to_a_tenth_of_the_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time as _time

    import trio

    from fractalfs import procs
    from fractalfs.edges import Notifier, wait_or_interrupt

    checks = 0

    def slow(pid: int) -> bool:
        nonlocal checks
        checks += 1
        _time.sleep(0.001)  # a /proc read on a busy machine
        return False

    monkeypatch.setattr(procs, "signal_pending", slow)

    async def main() -> None:
        notifier = Notifier()

        async def handler(pid: int) -> None:
            while True:
                await wait_or_interrupt(notifier, pid, 0.005)

        async with trio.open_nursery() as nursery:
            for pid in range(1000, 1050):  # 50 programs: a scan takes ~50 ms
                nursery.start_soon(handler, pid)
            await trio.sleep(2.0)
            nursery.cancel_scope.cancel()

    t0 = _time.monotonic()
    trio.run(main)
    scanning = checks * 0.001
    assert scanning < 0.25 * (_time.monotonic() - t0), checks  # not back to back


def test_the_feed_is_not_followed_while_no_reader_waits() -> None:
    """A daemon of writers only has no pump waiting: it asks discovery's feed nothing (a
    thousand opens elsewhere cost it no request each). A pump that starts waiting resumes
    the feed from the position it stopped at, and is woken by a change after it."""
    import trio

    from fractalfs.follow import Follower

    edge = EdgeId.new()

    class Fake:
        def __init__(self) -> None:
            self.feed_calls: list[int] = []
            self.seq = 1
            self.version = 1
            self.changed = trio.Event()

        async def changes(self, feed: str, after: int, *, wait: float = 0.0) -> dict[str, object]:
            self.feed_calls.append(after)
            if after >= self.seq:
                with trio.move_on_after(wait):
                    await self.changed.wait()
            self.changed = trio.Event()
            return {"feed": "f", "seq": self.seq, "edges": [edge.hex] if after < self.seq else []}

        async def get(self, name: str, *, wait: float = 0.0, since: int = -1) -> dict[str, object]:
            return {"id": name, "version": self.version}

        def change(self) -> None:  # discovery records a change of the edge
            self.seq += 1
            self.version += 1
            self.changed.set()

    async def main() -> None:
        fake = Fake()
        follower = Follower(fake, poll=0.05)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower.run)
            await trio.sleep(0.5)  # ten polls' worth of time with nobody waiting
            assert len(fake.feed_calls) == 1, fake.feed_calls  # the first, to go live
            fake.seq += 5  # changes meanwhile, nobody waiting for them

            async def waiter() -> None:
                rec = await follower.get(edge, wait=5.0, since=fake.version)
                assert rec["version"] == fake.version

            with trio.fail_after(2):
                async with trio.open_nursery() as inner:
                    inner.start_soon(waiter)
                    await trio.sleep(0.2)
                    assert fake.feed_calls[1] == 1  # resumed from where it stopped
                    fake.change()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_parked_reader_is_resumed_by_its_edge_its_deadline_or_not_at_all() -> None:
    """A waiting reader has no task (parked with the follower): the feed naming its edge
    resumes it, its wait running out resumes it as expired, a reader gone is let go of,
    and a change between the watch and the park is not missed."""
    import trio

    from fractalfs.follow import Follower

    edges = [EdgeId.new() for _ in range(4)]

    class Fake:
        def __init__(self) -> None:
            self.named: list[str] = []
            self.changed = trio.Event()

        async def changes(self, feed: str, after: int, *, wait: float = 0.0) -> dict[str, object]:
            if not self.named:
                with trio.move_on_after(wait):
                    await self.changed.wait()
            self.changed = trio.Event()
            named, self.named = self.named, []
            return {"feed": "f", "seq": after + 1, "edges": named}

        def change(self, edge: EdgeId) -> None:
            self.named.append(edge.hex)
            self.changed.set()

    async def main() -> None:
        fake = Fake()
        follower = Follower(fake, poll=5.0)  # type: ignore[arg-type]
        resumed: dict[EdgeId, bool] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower.run)
            nursery.start_soon(follower.expire_parked)
            with trio.fail_after(2):
                while not follower.live:
                    await trio.sleep(0.01)
            tokens = [follower.watch(e) for e in edges]
            fake.change(edges[3])  # between the watch and the park: marks it woken
            with trio.fail_after(2):
                while not tokens[3].woken:
                    await trio.sleep(0.01)
            for e, token, wait in zip(edges[:3], tokens[:3], (30.0, 0.3, 30.0), strict=True):

                def resume(token: object, expired: bool, e: EdgeId = e) -> None:
                    resumed[e] = expired

                follower.park(token, wait, resume, None, None, None)
            assert follower.parked() == 3
            fake.change(edges[0])
            follower.forget(edges[2])
            await trio.sleep(0.6)
            assert resumed == {edges[0]: False, edges[1]: True}  # edges[2]: let go of
            assert follower.parked() == 0 and follower.waiting() == 0
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_readers_parked_about_together_share_a_deadline_never_early_little_late() -> None:
    """Parked readers' deadlines are rounded up (follow.MAX_LATE, at most 2% of the
    wait): a hundred parked within half a second share one or two deadlines (no float
    and heap entry each), none is resumed before its wait ran out, none more than
    MAX_LATE (or 2%) after."""
    import trio
    import trio.testing

    from fractalfs.follow import MAX_LATE, Follower

    class Fake:
        async def changes(self, feed: str, after: int, *, wait: float = 0.0) -> dict[str, object]:
            await trio.sleep(wait)
            return {"feed": "f", "seq": 1, "edges": []}

    async def main() -> None:
        follower = Follower(Fake(), poll=5.0)  # type: ignore[arg-type]
        late: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower.expire_parked)
            for wait in (120.0, 120.0, 2.0):
                start = trio.current_time()
                for _ in range(100):

                    def resume(
                        _token: object, expired: bool, due: float = trio.current_time() + wait
                    ) -> None:
                        assert expired
                        late.append(trio.current_time() - due)

                    follower.park(follower.watch(EdgeId.new()), wait, resume, None, None, None)
                    await trio.sleep(0.005)
                assert trio.current_time() - start == pytest.approx(0.5)
                # One tick of the rounding is a second at 120 s, 0.04 s at 2 s.
                assert len(follower._due) <= (2 if wait > 50 else 0.5 / (wait / 50) + 2)
                with trio.fail_after(wait + 10):
                    while follower.parked():
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert len(late) == 300
        assert min(late) >= 0
        assert max(late[:200]) <= MAX_LATE + 0.011  # (the expiry's own step)
        assert max(late[200:]) <= 2.0 / 50 + 0.011

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_broken_feed_leaves_parked_readers_parked_and_a_resync_wakes_them() -> None:
    """Ten thousand parked readers each asking for their edge when the feed breaks would
    only load a failing discovery: they stay parked; the feed coming back from another
    discovery run (a resync) wakes every one of them."""
    import trio

    from fractalfs.discovery.client import Unavailable
    from fractalfs.follow import Follower

    class Fake:
        def __init__(self) -> None:
            self.feed = "f1"
            self.down = False

        async def changes(self, feed: str, after: int, *, wait: float = 0.0) -> dict[str, object]:
            if self.down:
                raise Unavailable("down")
            if feed == self.feed:
                await trio.sleep(min(wait, 0.05))
            return {"feed": self.feed, "seq": 1, "edges": []}

    async def main() -> None:
        fake = Fake()
        follower = Follower(fake, poll=5.0)  # type: ignore[arg-type]
        resumed: list[bool] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower.run)
            with trio.fail_after(2):
                while not follower.live:
                    await trio.sleep(0.01)
            for _ in range(3):
                follower.park(
                    follower.watch(EdgeId.new()),
                    30.0,
                    lambda _token, expired: resumed.append(expired),
                    None,
                    None,
                    None,
                )
            fake.down = True
            with trio.fail_after(2):
                while follower.live:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert resumed == [] and follower.parked() == 3
            fake.feed, fake.down = "f2", False  # discovery restarted: resync
            with trio.fail_after(5):
                while len(resumed) < 3:
                    await trio.sleep(0.01)
            assert resumed == [False] * 3
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_reader_open_asks_discovery_once_and_a_change_during_its_claim_is_seen(
    tmp_path: Path,
) -> None:
    """A reader's open costs one request (its claim, whose answer is the pump's first look;
    the follower watched the edge before it), then the reader parks with no request, and
    its daemon's progress reports say nothing of it while it read nothing. Four requests
    each (claim, a look, a look before parking, progress 0) loaded discovery and the daemon
    with thousands of opens. A change the feed names while the claim is in flight is not lost:
    the pump looks again before it parks."""
    import trio

    from fractalfs.config import NodeConfig
    from fractalfs.node import Node

    quiet, racing = EdgeId.new(), EdgeId.new()

    class Fake:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str]] = []
            self.seq = 1
            self.versions = {quiet.hex: 1, racing.hex: 1}
            self.named: list[str] = []
            self.fed = trio.Event()

        def record(self, name: str) -> dict[str, object]:
            return {"id": name, "version": self.versions[name], "reader_claim": 7}

        async def claim_reader(self, name: str, node: str) -> dict[str, object]:
            self.calls.append(("claim", name))
            self.versions[name] += 1
            rec = self.record(name)
            if name == racing.hex:  # a change of the edge, named by the feed meanwhile
                self.versions[name] += 1
                self.seq += 1
                self.named.append(name)
                self.fed.set()
                await trio.sleep(0.2)
            return rec

        async def get(self, name: str, *, wait: float = 0.0, since: int = -1) -> dict[str, object]:
            self.calls.append(("get", name))
            return self.record(name)

        async def progress(self, name: str, delivered: int) -> None:
            self.calls.append(("progress", name))

        async def changes(self, feed: str, after: int, *, wait: float = 0.0) -> dict[str, object]:
            if after >= self.seq:
                with trio.move_on_after(wait):
                    await self.fed.wait()
            self.fed = trio.Event()
            named, self.named = self.named, []
            return {"feed": "f", "seq": self.seq, "edges": named}

    async def main() -> None:
        fake = Fake()
        config = NodeConfig(str(tmp_path / "mnt"), node="n", spill_dir=str(tmp_path / "spill"))
        node = Node(config, fake, "127.0.0.1:1")  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            node._nursery = nursery
            nursery.start_soon(node.follower.run)
            nursery.start_soon(node.follower.expire_parked)
            nursery.start_soon(node.membership._report_progress)  # every second
            await trio.sleep(0.1)  # the feed's first answer (a resync) came: it is live
            with trio.fail_after(5):
                await node.open_reader(quiet, os.getpid())
                while node.follower.parked() < 1:
                    await trio.sleep(0.01)
                assert fake.calls == [("claim", quiet.hex)]
                await node.open_reader(racing, os.getpid())
                while node.follower.parked() < 2:
                    await trio.sleep(0.01)
            # The change seen (a look), then the look before parking, as any woken pump.
            assert fake.calls[1:] == [("claim", racing.hex)] + [("get", racing.hex)] * 2
            assert node.follower.waiting() == 2  # each parked once
            await trio.sleep(1.5)  # a progress report came and went: nothing read, no news
            assert len(fake.calls) == 4, fake.calls
            nursery.cancel_scope.cancel()

    trio.run(main)
