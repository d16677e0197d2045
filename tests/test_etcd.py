"""Discovery on etcd: the store against a real etcd member, and stateless replicas."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fractalfs.discovery.etcd import EtcdStore, cap_event_data, parse_url
from fractalfs.discovery.store import Conflict, NotFound, stops_writers
from fractalfs.etcdtesting import EtcdCluster, Replica, have_etcd, put_v4_edge

from .conftest import new_edge
from .test_store import early_close_cases, release_generation_cases, reread_cases

pytestmark = pytest.mark.skipif(not have_etcd(), reason="needs etcd (apt install etcd-server)")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd1"), members=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def url(etcd: EtcdCluster) -> str:
    return f"{etcd.url}/t{secrets.token_hex(4)}"  # a fresh prefix per test


@pytest.fixture
def store(url: str) -> Iterator[EtcdStore]:
    s = EtcdStore.from_url(url)
    yield s
    s.close()


def test_parse_url() -> None:
    assert parse_url("etcd://a:1,b:2/x/y") == (["http://a:1", "http://b:2"], "x/y/")
    assert parse_url("etcd://a") == (["http://a:2379"], "fractalfs/")
    for bad in ("http://a:1", "etcd://", "etcd://a:x"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_event_data_is_capped() -> None:
    assert cap_event_data({"a": 1}) == {"a": 1}
    assert cap_event_data({"a": "x" * 60_000})["truncated"] is True


def test_generations_fencing_and_events(store: EtcdStore) -> None:
    edge = new_edge()
    assert store.get(edge) is None
    first = store.register_writer(edge, "n1", "h:1")
    assert (first.generation, first.writer_state) == (1, "open")
    with pytest.raises(Conflict):
        store.register_writer(edge, "n2", "h:2")  # an open writer elsewhere keeps it
    second = store.register_writer(edge, "n1", "h:1")  # a restarted daemon supersedes
    assert second.generation == 2 and second.version > first.version
    with pytest.raises(Conflict, match="stale"):
        store.close_writer(edge, 1, "complete", 5)  # fenced: etcd's compare decides
    store.claim_reader(edge, "n2")
    with pytest.raises(Conflict):
        store.claim_reader(edge, "n3")
    done = store.close_writer(edge, 2, "complete", 5)
    assert done.state == "complete" and done.bytes_written == 5
    assert store.get(edge) == done
    kinds = [e.kind for e in store.events(0)]
    assert kinds == ["writer", "writer", "reader", "complete"]
    assert store.last_seq() == store.events(0)[-1].seq
    assert [e.kind for e in store.events(store.events(0)[1].seq)] == ["reader", "complete"]
    with pytest.raises(NotFound):
        store.record(new_edge(), "resumed", {})
    store.delete(edge)
    assert store.get(edge) is None
    assert store.events(0)[-1].kind == "deleted"


def test_node_lost_and_back(store: EtcdStore) -> None:
    a, b = new_edge(), new_edge()
    store.register_writer(a, "n1", "h:1")
    store.claim_reader(b, "n1")
    assert store.nodes_with_open_ends() == {"n1"}
    assert len(store.node_lost("n1")) == 2
    assert store.node_lost("n1") == []  # twice (two replicas) changes nothing more
    assert store.get(a).writer_state == "lost"  # type: ignore[union-attr]
    assert store.node_alive("n1", {a: 1, new_edge(): 1}, [b]) != []
    assert store.get(a).writer_state == "open"  # type: ignore[union-attr]
    assert store.get(b).reader_state == "open"  # type: ignore[union-attr]
    assert store.node_alive("n1", {a: 7}, []) == [a]  # not its generation: fenced


def test_two_replicas_racing_never_share_a_generation(url: str) -> None:
    """Two stores (two discovery replicas) register writers of one edge at once, each as
    a restarted daemon of the same node: every registration gets its own generation."""
    edge = new_edge()
    got: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        s = EtcdStore.from_url(url)
        try:
            for _ in range(15):
                gen = s.register_writer(edge, "n1", "h:1").generation
                with lock:
                    got.append(gen)
        finally:
            s.close()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 46))


@pytest.fixture
def replicas(url: str, tmp_path: Path) -> Iterator[list[Replica]]:
    reps = [Replica(tmp_path, url, f"replica{i}") for i in range(2)]
    for i, r in enumerate(reps):
        r.listen = "127.0.0.1:0"
        r.log = tmp_path / f"replica{i}.log"
    try:
        for r in reps:
            r.start()
        yield reps
    finally:
        for r in reps:
            r.stop()


def test_a_change_through_one_replica_wakes_a_long_poll_on_the_other(
    replicas: list[Replica],
) -> None:
    a, b = (httpx.Client(base_url=r.url + "/v1", timeout=15, auth=r.auth) for r in replicas)
    edge = new_edge()
    b.post(f"/edges/{edge}/reader", json={"node": "n2"}).raise_for_status()
    since = b.get(f"/edges/{edge}").json()["version"]
    answered: list[dict[str, object]] = []

    def poll() -> None:
        answered.append(b.get(f"/edges/{edge}", params={"wait": 10, "since": since}).json())

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    start = time.monotonic()
    a.post(f"/edges/{edge}/writer", json={"node": "n1", "endpoint": "h:1"}).raise_for_status()
    t.join()
    assert answered[0]["generation"] == 1
    assert time.monotonic() - start < 1.0


def test_a_silent_node_is_lost_by_its_lease_and_comes_back(replicas: list[Replica]) -> None:
    a, b = (httpx.Client(base_url=r.url + "/v1", timeout=15, auth=r.auth) for r in replicas)
    edge = new_edge()
    a.post(f"/edges/{edge}/writer", json={"node": "n1", "endpoint": "h:1"}).raise_for_status()
    # Heartbeats alternate between the replicas: neither may think the node is silent.
    for i in range(8):
        hb = {"boot": "b1", "writers": {edge: 1}, "readers": []}
        (a, b)[i % 2].post("/nodes/n1/heartbeat", json=hb).raise_for_status()
        time.sleep(0.5)
    assert a.get(f"/edges/{edge}").json()["writer_state"] == "open"
    assert {"node": "n1", "alive": True} in b.get("/nodes").json()["nodes"]
    deadline = time.monotonic() + 6
    while b.get(f"/edges/{edge}").json()["writer_state"] != "lost":
        assert time.monotonic() < deadline, "the lease did not expire"
        time.sleep(0.2)
    hb = {"boot": "b1", "writers": {edge: 1}, "readers": []}
    assert b.post("/nodes/n1/heartbeat", json=hb).json()["stale"] == []
    assert a.get(f"/edges/{edge}").json()["writer_state"] == "open"
    # A new run of the daemon: the old run's writer is gone at once (failed: no reader
    # elsewhere may hold its END; see test_a_writer_whose_daemon_restarted_...).
    b.post("/nodes/n1/heartbeat", json={"boot": "b2", "writers": {}, "readers": []})
    assert a.get(f"/edges/{edge}").json()["writer_state"] == "failed"


def test_pages_and_pruning(store: EtcdStore) -> None:
    edges = sorted(new_edge() for _ in range(7))
    for edge in edges:
        store.claim_reader(edge, "n2")
    assert [e.id for e in store.edges_page("", 3)] == edges[:3]
    assert [e.id for e in store.edges_page(edges[2], 10)] == edges[3:]
    store.release_reader(edges[0], "n2", "done", 0)
    assert store.prune(time.time() - 3600) == 0
    assert store.prune(time.time() + 1) == 1
    assert store.get(edges[0]) is None and store.get(edges[1]) is not None


def test_discovery_refuses_a_bad_or_unreachable_store(tmp_path: Path) -> None:
    import subprocess
    import sys

    from fractalfs.testing import free_port

    def run(store: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "fractalfs", "discovery", "--listen", "127.0.0.1:0"]
        return subprocess.run([*cmd, "--store", store], capture_output=True, text=True, timeout=60)

    bad = run("http://x:2379")
    assert bad.returncode == 2 and "is not etcd://HOST:PORT" in bad.stderr
    down = run(f"etcd://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert down.stderr.startswith("fractalfs: discovery cannot start: no etcd member answered")
    assert "Traceback" not in down.stderr


def test_open_ends_are_indexed_by_node(store: EtcdStore) -> None:
    a, b = new_edge(), new_edge()
    store.register_writer(a, "n1", "h:1")
    store.claim_reader(a, "n1")  # a same-node pair: both ends on n1
    store.claim_reader(b, "n2")
    assert store.nodes_with_open_ends() == {"n1", "n2"}
    assert store._held_by("n1") == [a]
    store.close_writer(a, 1, "complete", 0)
    assert store._held_by("n1") == [a]  # its reader is still open
    store.release_reader(a, "n1", "done", 0)
    assert store._held_by("n1") == [] and store.nodes_with_open_ends() == {"n2"}
    assert [e.id for e in store.node_lost("n2")] == [b]
    assert store.nodes_with_open_ends() == set()
    store.claim_reader(b, "n3")  # lost reader: another node may claim it
    store.delete(b)
    assert store.nodes_with_open_ends() == set()


def test_a_restarted_writer_node_fails_the_complete_streams_no_reader_read_whole(
    store: EtcdStore,
) -> None:
    """See tests/test_store.py: the same rule, found through the u/<node>/ index."""
    names = ["unread", "same-node", "reading", "done", "closed", "persistent", "elsewhere"]
    ids = {name: new_edge() for name in names}
    for name, e in ids.items():
        store.register_writer(e, "b" if name == "elsewhere" else "a", "h:1")
        store.close_writer(e, 1, "complete", 10)
    store.set_mode(ids["persistent"], 1, "persistent", "configured persistent")
    store.claim_reader(ids["same-node"], "a")  # lost with the writer's daemon
    for name in ("reading", "done", "closed"):
        store.claim_reader(ids[name], "r")
    store.release_reader(ids["done"], "r", "done", 10)
    store.release_reader(ids["closed"], "r", "closed", 3)
    assert store.nodes_with_open_ends() == {"a", "r"}  # the index of open ends: unchanged
    # Silent: it may come back with all it held. Only its reader is lost meanwhile.
    assert [e.id for e in store.node_lost("a")] == [ids["same-node"]]
    assert {store.get(e).writer_state for e in ids.values()} == {"complete"}  # type: ignore[union-attr]
    changed = {e.id for e in store.node_lost("a", "restarted")}
    assert changed == {ids["unread"], ids["same-node"], ids["reading"]}
    failed = {e.edge for e in store.events(0) if e.kind == "failed"}
    assert failed == {ids["unread"], ids["same-node"]}
    # Its reader on another node is told (writer-gone); only it knows if it had the END.
    assert [e.edge for e in store.events(0) if e.kind == "writer-gone"] == [ids["reading"]]
    # ... and its record says so (no daemon serves it), for a reader that missed the event.
    assert store.get(ids["reading"]).writer_endpoint == ""  # type: ignore[union-attr]
    assert store.get(ids["done"]).writer_endpoint != ""  # type: ignore[union-attr]
    rec = store.get(ids["same-node"])
    assert rec is not None and rec.writer_state == "failed" and "restarted" in rec.reason
    # A live reader elsewhere may hold it all (its END arrived): not failed for it.
    for name in ("reading", "done", "closed", "persistent", "elsewhere"):
        assert store.get(ids[name]).writer_state == "complete"  # type: ignore[union-attr]
    # It lacked the END: the generation fails. Only that reader, for that generation.
    assert store.writer_gone(ids["reading"], "x", 1).writer_state == "complete"
    assert store.writer_gone(ids["reading"], "r", 2).writer_state == "complete"
    for name in ("done", "closed", "persistent", "elsewhere"):
        assert store.writer_gone(ids[name], "r", 1).writer_state == "complete"
    rec = store.writer_gone(ids["reading"], "r", 1)
    assert rec.writer_state == "failed" and "had not received all" in rec.reason
    assert store.node_lost("a", "left") == []  # nothing left to fail or tell
    assert store._undelivered_by("a") == []


def test_a_reader_that_finished_while_its_node_was_lost_is_recorded_done(
    store: EtcdStore,
) -> None:
    """See tests/test_store.py: a release from a node taken for lost still counts."""
    edge = new_edge()
    claim = store.claim_reader(edge, "r").reader_claim
    store.node_lost("r")
    assert store.release_reader(edge, "r", "done", 0, claim=claim).reader_state == "done"
    assert store.nodes_with_open_ends() == set()


def test_a_writer_whose_daemon_restarted_before_its_end_was_recorded_is_failed(
    store: EtcdStore,
) -> None:
    """See tests/test_store.py, same name."""
    alone, read = new_edge(), new_edge()
    for edge in (alone, read):
        store.register_writer(edge, "w", "h:1")
    store.claim_reader(read, "r")
    store.node_lost("w")
    store.node_lost("w", "restarted")
    assert store.get(alone).writer_state == "failed"  # type: ignore[union-attr]
    rec = store.get(read)
    assert rec is not None and rec.writer_state == "lost" and rec.writer_endpoint == "", rec
    assert store.node_lost("w", "restarted") == []
    assert store.writer_gone(read, "r", 1).writer_state == "failed"


def test_a_claims_version_is_its_events_seq(store: EtcdStore) -> None:
    """A reader's claim answers the edge's version; its daemon takes an event of the edge
    at or below it for older than the claim (Membership._on_event, tests/test_claims.py).
    That holds only if the claim's event has that very seq, as in the SQLite store."""
    edge = new_edge()
    store.claim_reader(edge, "x")
    store.node_lost("x")
    other = store.claim_reader(edge, "y")
    store.release_reader(edge, "y", "failed", 0)
    mine = store.claim_reader(edge, "x")
    claims = [e for e in store.events(0) if e.edge == edge and e.kind == "reader"]
    assert [(e.data["node"], e.seq) for e in claims][-2:] == [
        ("y", other.version),
        ("x", mine.version),
    ]


def test_a_claims_events_name_it(store: EtcdStore) -> None:
    """A writer's daemon checks a lagging feed's claim or loss of its reader against the
    record's current claim (Membership.claim_of, tests/test_claims.py): etcd's claim id is
    random, so its ``reader`` and ``reader-lost`` events carry it."""
    from fractalfs.membership import claim_of

    edge = new_edge()
    first = store.claim_reader(edge, "x")
    store.node_lost("x", "restarted")
    again = store.claim_reader(edge, "x")
    events = [e.to_json() for e in store.events(0) if e.edge == edge]
    named = [(e["kind"], claim_of(e)) for e in events if e["kind"].startswith("reader")]
    assert first.reader_claim != again.reader_claim
    assert named == [
        ("reader", first.reader_claim),
        ("reader-lost", first.reader_claim),
        ("reader", again.reader_claim),
    ]


def test_a_restart_after_the_nodes_lease_expired_is_still_a_restart(store: EtcdStore) -> None:
    """A daemon killed and started again more than its lease's TTL later (a slow restart,
    a loaded host): etcd deleted ``n/<node>`` with the lease, and with it the boot id.
    The new run's heartbeat was then taken for the node coming back (make test, loaded:
    "node a is back"), not for a restart: the old run's complete generations kept their
    endpoint and no writer-gone was told, its lost writers stayed lost for good. The boot
    id outlives the lease; a node that left is forgotten (its next run is a new node)."""
    node = f"n{os.urandom(4).hex()}"
    assert store.node_heartbeat(node, "run-1", 2) == ""
    lease = store.live_nodes()[node]["lease"]
    store.gateway.call("/v3/lease/revoke", {"ID": str(lease)})  # expired
    assert node not in store.live_nodes()
    assert store.node_heartbeat(node, "run-2", 2) == "run-1"
    assert store.node_heartbeat(node, "run-2", 2) == "run-2"
    store.node_leave(node)
    assert store.node_heartbeat(node, "run-3", 2) == ""


def test_etcd_down_is_503_also_where_the_guard_reads_the_edge(tmp_path: Path) -> None:
    """The guard reads the edge for a writer's close or mode; with etcd gone that must be
    503 (the node tries another replica), not a 500 (the node gives the close up)."""
    from fractalfs import auth
    from fractalfs.testing import shared_secret_file

    cluster = EtcdCluster(tmp_path / "etcd", members=1)
    cluster.start()
    rep = Replica(tmp_path, cluster.url)
    rep.listen = "127.0.0.1:0"
    try:
        rep.start()
        node = auth.node_credentials(auth.load_secret(str(shared_secret_file())), "a")
        edge = new_edge()
        with httpx.Client(base_url=rep.url + "/v1", timeout=20, auth=node) as http:
            w = {"node": "a", "endpoint": "h:1"}
            assert http.post(f"/edges/{edge}/writer", json=w).status_code == 200
            cluster.kill(0)
            close = {"generation": 1, "state": "complete", "bytes": 0}
            resp = http.post(f"/edges/{edge}/writer/close", json=close)
            assert resp.status_code == 503, resp.text
    finally:
        rep.stop()
        cluster.stop()


def test_pages_read_a_span_of_ids_not_the_whole_range(store: EtcdStore) -> None:
    """etcd 3.4 walks its index over the whole range of a limited range request: a page
    is read from a span of ids sized by the density seen so far. Whatever that estimate,
    paging lists every edge once, in order; once it is known a page reads about a page."""
    from fractalfs.discovery.etcd import _put

    edges = sorted(new_edge() for _ in range(400))
    for i in range(0, len(edges), 100):  # records as a registration writes them
        store.gateway.txn(
            [],
            [_put(store._key(e), '{"created": 1.0, "updated": 1.0}') for e in edges[i : i + 100]],
        )
    calls: list[int] = []
    call = store.gateway.call

    def counted(path: str, body: dict) -> dict:  # type: ignore[type-arg]
        got = call(path, body)
        calls.append(int(got.get("count", 0)))
        return got

    store.gateway.call = counted  # type: ignore[method-assign]
    for density in (0.0, 1e-40, 1e-30, 1.0):  # unknown, far too sparse, close, far too dense
        store._density = density
        seen: list[str] = []
        after = ""
        while page := store.edges_page(after, 7):
            assert len(page) == 7 or len(seen) + len(page) == len(edges)
            seen += [e.id for e in page]
            after = page[-1].id
        assert seen == edges, density
    store._density = 0.0
    calls.clear()
    store.edges_page("", 10)  # the first page of a replica: the whole range, once
    assert calls == [len(edges)]
    calls.clear()
    for _ in range(5):
        store.edges_page(edges[100], 10)
    assert max(calls) < 60, calls  # it was 299 (every edge after edges[100]) per page


def test_pulses_alone_keep_a_nodes_lease_on_any_replica(replicas: list[Replica]) -> None:
    """A daemon whose loop is too busy to heartbeat still pulses (fractalfs.pulse): on etcd
    a pulse to either replica keeps the node's lease; without them the lease expires."""
    a, b = (httpx.Client(base_url=r.url + "/v1", timeout=15, auth=r.auth) for r in replicas)
    edge = new_edge()
    a.post(f"/edges/{edge}/writer", json={"node": "n1", "endpoint": "h:1"}).raise_for_status()
    a.post("/nodes/n1/heartbeat", json={"boot": "b1", "writers": {edge: 1}, "readers": []})
    end = time.monotonic() + 5.0  # past the 2 s lease, pulses only
    i = 0
    while time.monotonic() < end:
        got = (a, b)[i % 2].post("/nodes/n1/pulse", json={"boot": "b1"})
        assert got.status_code == 200 and got.json()["alive"], got.text
        i += 1
        time.sleep(0.4)
    assert b.get(f"/edges/{edge}").json()["writer_state"] == "open"
    deadline = time.monotonic() + 6
    while b.get(f"/edges/{edge}").json()["writer_state"] != "lost":
        assert time.monotonic() < deadline, "the lease did not expire"
        time.sleep(0.2)


def test_only_a_reader_that_closed_before_any_writer_came_stops_later_writers(
    store: EtcdStore,
) -> None:
    early_close_cases(store, new_edge)


def test_a_release_event_names_the_generation_its_reader_pulled(store: EtcdStore) -> None:
    release_generation_cases(store, new_edge)


def test_a_closed_reader_recorded_in_the_old_shape_never_stops_a_writer(
    store: EtcdStore,
) -> None:
    """An edge key as schema 4 wrote it (no ``reader_no_writer``): its "closed" reader may
    have been a failure (recorded so before f9138f0), and whether a writer had come is
    unknown. It stopped the next writer that read 0 bytes; it never does now."""
    edge = new_edge()
    put_v4_edge(store, edge)
    rec = store.get(edge)
    assert rec is not None and rec.reader_state == "closed" and not stops_writers(rec)
    assert store.register_writer(edge, "a", "h:1").to_json()["stops_writers"] is False
    # A newer version's field in a key is read past, not refused.
    other = new_edge()
    put_v4_edge(store, other, novel=1)
    assert store.get(other) is not None


def test_a_live_reader_that_cannot_get_a_complete_generation_fails_it(store: EtcdStore) -> None:
    reread_cases(store, new_edge)
