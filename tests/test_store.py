"""Discovery's SQLite store on its own: generations, claims, events, durability."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fractalfs.discovery.backend import DiscoveryStore
from fractalfs.discovery.store import (
    SCHEMA_VERSION,
    Conflict,
    Edge,
    NotFound,
    Store,
    stops_writers,
)

E = "0123456789abcdef0123456789abcdef"


def test_generations_grow_and_survive_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "d.db")
    assert store.register_writer(E, "a", "h:1").generation == 1
    store.close_writer(E, 1, "complete", 10)
    assert store.register_writer(E, "b", "h:2").generation == 2
    store.close()
    again = Store(tmp_path / "d.db")
    rec = again.get(E)
    assert rec is not None and rec.generation == 2 and rec.writer_node == "b"
    assert again.register_writer(E, "b", "h:2").generation == 3  # same node: superseded


KILLED_MID_STREAM = """
import os, signal, sys
from fractalfs.discovery.store import Store
store = Store(sys.argv[1])
e = "0123456789abcdef0123456789abcdef"
store.register_writer(e, "w", "h:1")
store.claim_reader(e, "x")
store.progress(e, 1000)
print(store.claim_reader(e, "x").version, flush=True)
store._db.execute("DELETE FROM events")  # the log pruned to nothing (retention)
os.kill(os.getpid(), signal.SIGKILL)  # mid-stream: no close, no checkpoint
"""


def test_event_seqs_and_claims_keep_growing_after_a_kill_and_a_restart(tmp_path: Path) -> None:
    """Daemons compare event seqs with their claims' and their generations' versions
    (Membership: a lagging feed's claim or loss), and follow the log from the last seq
    they saw. A discovery SIGKILLed mid-stream and started again from its file, even with
    its event log pruned empty, must go on above every seq it gave out: a reused seq
    would make a new claim look older than a stale event, or hide events from a node's
    feed."""
    import subprocess
    import sys

    db = tmp_path / "d.db"
    got = subprocess.run(
        [sys.executable, "-c", KILLED_MID_STREAM, str(db)], capture_output=True, text=True
    )
    assert got.returncode == -9, got.stderr
    before = int(got.stdout)
    again = Store(db)
    rec = again.get(E)
    assert rec is not None and rec.version == before and rec.reader_claim == before
    assert again.last_seq() in (0, before)  # the log may be empty: health says so
    again.node_lost("x", "restarted")
    claim = again.claim_reader(E, "y")
    assert claim.version > before and claim.reader_claim > before
    lost, event = [e for e in again.events(before) if e.kind.startswith("reader")]
    assert before < lost.seq < event.seq == claim.reader_claim
    assert lost.data["claim"] == before  # the loss names the claim it ended


def test_boot_ids_survive_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "d.db")
    store.set_boot("a", "run-1")
    store.set_boot("b", "run-1")
    store.set_boot("a", "run-2")
    store.forget_boot("b")
    store.close()
    assert Store(tmp_path / "d.db").boots() == {"a": "run-2"}


def test_open_writer_on_another_node_conflicts() -> None:
    store = Store(":memory:")
    store.register_writer(E, "a", "h:1")
    with pytest.raises(Conflict, match="open writer on node a"):
        store.register_writer(E, "b", "h:2")


def test_stale_generation_cannot_close() -> None:
    store = Store(":memory:")
    store.register_writer(E, "a", "h:1")
    store.close_writer(E, 1, "failed", 5, "killed")
    store.register_writer(E, "b", "h:2")
    with pytest.raises(Conflict, match="stale"):
        store.close_writer(E, 1, "complete", 5)
    with pytest.raises(ValueError):
        store.close_writer(E, 2, "open", 5)


def test_reader_claims() -> None:
    store = Store(":memory:")
    assert store.claim_reader(E, "r1").reader_state == "open"
    with pytest.raises(Conflict):
        store.claim_reader(E, "r2")
    assert store.release_reader(E, "r2", "closed", 0).reader_node == "r1"  # late release
    store.release_reader(E, "r1", "done", 7)
    rec = store.claim_reader(E, "r2")
    assert rec.reader_node == "r2"


def test_a_late_release_of_an_older_claim_on_the_same_node_keeps_the_newer_claim() -> None:
    """Defect 5: the release matched on the node only, so a late release of a reader the
    node had replaced wiped the new claim, and a reader elsewhere could open the edge."""
    store = Store(":memory:")
    old = store.claim_reader(E, "r1").reader_claim
    new = store.claim_reader(E, "r1").reader_claim  # a re-run reader on the same node
    assert old and new and new != old
    rec = store.release_reader(E, "r1", "closed", 0, claim=old)  # the old one's, late
    assert rec.reader_state == "open" and rec.reader_claim == new
    with pytest.raises(Conflict):
        store.claim_reader(E, "r2")
    assert store.release_reader(E, "r1", "done", 5, claim=new).reader_state == "done"
    assert store.claim_reader(E, "r2").reader_node == "r2"


def test_events_and_versions() -> None:
    store = Store(":memory:")
    a = store.register_writer(E, "a", "h:1")
    b = store.claim_reader(E, "r")
    assert 0 < a.version < b.version == store.last_seq()
    store.delete(E)
    kinds = [e.kind for e in store.events(0)]
    assert kinds == ["writer", "reader", "deleted"]
    assert store.events(b.version)[0].kind == "deleted"
    with pytest.raises(NotFound):
        store.delete(E)


def test_states_read_like_words() -> None:
    store = Store(":memory:")
    assert store.claim_reader(E, "r").state == "waiting-for-writer"
    assert store.register_writer(E, "a", "h:1").state == "streaming"
    assert store.close_writer(E, 1, "complete", 3).state == "complete"
    assert store.release_reader(E, "r", "done", 3).state == "delivered"


def test_lost_node_comes_back_or_is_fenced() -> None:
    store = Store(":memory:")
    other = "f" * 32
    store.register_writer(E, "a", "h:1")
    store.claim_reader(E, "r")
    store.register_writer(other, "a", "h:1")
    lost = store.node_lost("a")
    assert {e.id for e in lost} == {E, other}
    assert store.get(E).writer_state == "lost"  # type: ignore[union-attr]
    assert store.node_lost("r", "restarted")[0].reader_state == "lost"
    # The event says how sure the loss is: a silent node may come back, a restarted one not.
    causes = {(e.kind, e.data["cause"]) for e in store.events(0) if e.kind.endswith("-lost")}
    assert causes == {("writer-lost", "silent"), ("reader-lost", "restarted")}
    # Meanwhile the other edge's writer was re-run elsewhere: generation 2 on node b.
    store.register_writer(other, "b", "h:2")
    stale = store.node_alive("a", {E: 1, other: 1}, [])
    assert stale == [other]
    assert store.get(E).writer_state == "open"  # type: ignore[union-attr]
    store.node_alive("r", {}, [E])
    assert store.get(E).reader_state == "open"  # type: ignore[union-attr]
    assert store.nodes_with_open_ends() == {"a", "b", "r"}


def test_a_restarted_writer_node_fails_the_complete_streams_no_reader_read_whole() -> None:
    """A complete transient generation lives in its writer's daemon until a reader read
    it: a restarted (or departed) daemon took it along, so it fails; a silent node may
    come back with it. Delivered, closed early and persistent ones stay complete, and so
    does one a live reader on another node reads."""
    store = Store(":memory:")
    names = ["unread", "same-node", "reading", "done", "closed", "persistent", "elsewhere"]
    ids = {name: f"{i:032x}" for i, name in enumerate(names, 1)}
    for name, e in ids.items():
        store.register_writer(e, "b" if name == "elsewhere" else "a", "h:1")
        store.close_writer(e, 1, "complete", 10)
    store.set_mode(ids["persistent"], 1, "persistent", "configured persistent")
    store.claim_reader(ids["same-node"], "a")  # lost with the writer's daemon
    for name in ("reading", "done", "closed"):
        store.claim_reader(ids[name], "r")
    store.release_reader(ids["done"], "r", "done", 10)
    store.release_reader(ids["closed"], "r", "closed", 3)
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
    assert rec.reader_state == "lost"
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


def test_a_database_from_before_the_mode_columns_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE edges (id TEXT PRIMARY KEY, generation INTEGER NOT NULL DEFAULT 0,"
        " writer_node TEXT NOT NULL DEFAULT '', writer_endpoint TEXT NOT NULL DEFAULT '',"
        " writer_state TEXT NOT NULL DEFAULT 'none', bytes_written INTEGER NOT NULL DEFAULT 0,"
        " reader_node TEXT NOT NULL DEFAULT '', reader_state TEXT NOT NULL DEFAULT 'none',"
        " bytes_delivered INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',"
        " version INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL);"
        f"INSERT INTO edges (id, generation, created, updated) VALUES ('{E}', 4, 0, 0);"
    )
    old.commit()
    old.close()
    store = Store(path)
    assert store.get(E).generation == 4  # type: ignore[union-attr]
    store.register_writer(E, "a", "h:1")
    assert store.set_mode(E, 5, "persistent", "configured").mode == "persistent"


def test_restored_spills_complete_or_failed_prefix() -> None:
    store = Store(":memory:")
    other = "e" * 32
    store.register_writer(E, "a", "h:1")
    store.register_writer(other, "a", "h:1")
    store.node_lost("a", "restarted")
    assert store.restore_writer(E, 1, "a", "h:2").writer_state == "complete"
    rec = store.restore_writer(other, 1, "a", "h:2", complete=False)
    assert (rec.writer_state, rec.writer_endpoint) == ("failed", "h:2")
    assert "prefix" in rec.reason


def test_every_event_the_store_writes_is_a_typed_kind() -> None:
    from fractalfs.discovery.schema import EventKind

    store = Store(":memory:")
    store.register_writer(E, "w", "h:1")
    store.claim_reader(E, "r")
    store.set_mode(E, 1, "persistent", "test")
    store.node_lost("w", "silent")
    store.node_alive("w", {E: 1}, [])
    store.node_lost("r", "left")
    store.register_writer(E, "w", "h:1")
    store.close_writer(E, 2, "complete", 3)
    store.claim_reader(E, "r2")
    store.release_reader(E, "r2", "done", 3)
    store.restore_writer(E, 2, "w", "h:1", True)
    store.record(E, "resumed", {})
    store.delete(E)
    kinds = {e.kind for e in store.events(0)}
    assert kinds <= set(EventKind), kinds - set(EventKind)
    assert len(kinds) >= 10


def test_a_reader_that_finished_while_its_node_was_lost_is_recorded_done() -> None:
    """A reader whose node discovery took for silent (a stall, a cut link to discovery)
    finishes meanwhile: its release must still be recorded. Ignored, the heartbeat of the
    node that comes back no longer names the reader, so the edge stayed 'lost' for good
    and its completion (delivered: the spill's garbage collection) was never recorded."""
    store = Store(":memory:")
    claim = store.claim_reader(E, "r").reader_claim
    store.register_writer(E, "a", "h:1")
    store.close_writer(E, 1, "complete", 3)
    assert store.node_lost("r")[0].reader_state == "lost"
    assert store.release_reader(E, "r", "done", 3, claim=claim).state == "delivered"
    store.node_alive("r", {}, [])
    assert store.get(E).reader_state == "done"  # type: ignore[union-attr]
    # A lost reader whose edge another node claimed since stays the other node's.
    other = "e" * 32
    old = store.claim_reader(other, "r").reader_claim
    store.node_lost("r")
    store.claim_reader(other, "r2")
    assert store.release_reader(other, "r", "closed", 0, claim=old).reader_node == "r2"


@pytest.mark.parametrize("lost_first", [False, True])
def test_a_writer_whose_daemon_restarted_before_its_end_was_recorded_is_failed(
    lost_first: bool,
) -> None:
    """The writing program exited 0 with its last bytes still in its daemon (or its FIFO),
    and the daemon died (SIGKILL, or stopped, taken for lost by silence, then killed)
    before it told discovery how the writer ended. The generation stayed "lost" for good
    when the node came back as a new run: a finished stage's output that asks for no
    re-run; its reader waited --writer-lost-timeout and was killed, again and again. Now
    it fails (no reader elsewhere that may hold the END), or its reader's daemon is told
    (writer-gone, no endpoint) and decides."""
    store = Store(":memory:")
    alone, read = "1" * 32, "2" * 32
    for edge in (alone, read):
        store.register_writer(edge, "w", "h:1")
    store.claim_reader(read, "r")
    if lost_first:
        store.node_lost("w")  # silent: it may come back
        assert {store.get(e).writer_state for e in (alone, read)} == {"lost"}  # type: ignore[union-attr]
    store.node_lost("w", "restarted")
    rec = store.get(alone)
    assert rec is not None and rec.writer_state == "failed", rec
    rec = store.get(read)
    assert rec is not None and rec.writer_state == "lost" and rec.writer_endpoint == "", rec
    assert store.events(0)[-1].kind == "writer-gone"
    assert store.node_lost("w", "restarted") == []  # told once
    # Its reader lacks the END: it fails the generation; another node may not.
    assert store.writer_gone(read, "x", 1).writer_state == "lost"
    assert store.writer_gone(read, "r", 1).writer_state == "failed"
    # A node that is only silent keeps its generation (it may come back).
    other = "3" * 32
    store.register_writer(other, "v", "h:2")
    store.node_lost("v")
    store.node_lost("v")
    rec = store.get(other)
    assert rec is not None and rec.writer_state == "lost" and rec.writer_endpoint == "h:2"


def early_close_cases(store: DiscoveryStore, new_edge: Callable[[], str]) -> None:
    """Which early closes stop the writers that register after them: only a reader's that
    closed with no writer there for it. Shared by the SQLite and the etcd store tests."""

    def closed(edge: str) -> Edge:
        store.claim_reader(edge, "r")
        return store.release_reader(edge, "r", "closed", 0)

    # `: < E` first: "no more" for every writer after it, re-runs too, until a claim.
    edge = new_edge()
    assert stops_writers(closed(edge))
    assert store.register_writer(edge, "a", "h:1").to_json()["stops_writers"] is True
    store.close_writer(edge, 1, "failed", 0, "SIGPIPE")
    assert stops_writers(store.register_writer(edge, "a", "h:1"))  # the re-run
    assert not stops_writers(store.claim_reader(edge, "r"))  # a re-run reader's claim
    # `echo x > E` completed, then `: < E` (closed unread): a writer had come; the re-run
    # writer is not stopped. The defect: it was, by the 0 bytes read.
    edge = new_edge()
    store.register_writer(edge, "a", "h:1")
    store.close_writer(edge, 1, "complete", 2)
    rec = closed(edge)
    assert rec.reader_state == "closed" and rec.bytes_delivered == 0 and not stops_writers(rec)
    assert store.register_writer(edge, "a", "h:1").to_json()["stops_writers"] is False
    # ... and again, with the writer still writing at the claim, or coming during it.
    edge = new_edge()
    store.register_writer(edge, "a", "h:1")
    assert not stops_writers(closed(edge))
    edge = new_edge()
    store.claim_reader(edge, "r")
    assert store.get(edge).reader_no_writer == 1  # type: ignore[union-attr]
    store.register_writer(edge, "a", "h:1")
    assert not stops_writers(store.release_reader(edge, "r", "closed", 0))
    # A writer on a silent node may come back: it is there.
    edge = new_edge()
    store.register_writer(edge, "a", "h:1")
    store.node_lost("a")
    assert not stops_writers(closed(edge))
    store.node_alive("a", {edge: 1}, [])
    # A failed generation is no writer: its reader waits for a re-run.
    edge = new_edge()
    store.register_writer(edge, "a", "h:1")
    store.close_writer(edge, 1, "failed", 5, "killed")
    assert stops_writers(closed(edge))
    # A re-run writer after an unread close with a writer there, and a reader that reads
    # some of it and closes: that reader had a writer (the record's reader_state was the
    # older reader's "closed" at its claim).
    edge = new_edge()
    store.register_writer(edge, "a", "h:1")
    store.close_writer(edge, 1, "complete", 2)
    closed(edge)
    store.register_writer(edge, "a", "h:1")
    store.close_writer(edge, 2, "complete", 2)
    assert not stops_writers(closed(edge))
    # A reader that failed stops nobody.
    edge = new_edge()
    store.claim_reader(edge, "r")
    assert not stops_writers(store.release_reader(edge, "r", "failed", 0))
    # A complete spill served again during the claim is a writer that came.
    edge = new_edge()
    store.register_writer(edge, "a", "h:1")
    store.node_lost("a", "restarted")
    store.claim_reader(edge, "r")
    store.restore_writer(edge, 1, "a", "h:2")
    assert not stops_writers(store.release_reader(edge, "r", "closed", 0))


def test_only_a_reader_that_closed_before_any_writer_came_stops_later_writers() -> None:
    ids = iter(f"{i:032x}" for i in range(1, 100))
    early_close_cases(Store(":memory:"), lambda: next(ids))


def release_generation_cases(store: DiscoveryStore, new_edge: Callable[[], str]) -> None:
    """A reader's release event names the generation the reader last pulled, for the
    writers' daemons (a late "closed" is not a re-run writer's "no more"); none: left
    out. Shared by the SQLite and the etcd store tests."""

    def closed_event(edge: str) -> dict[str, object]:
        (event,) = [e for e in store.events(0) if e.edge == edge and e.kind == "reader-closed"]
        return event.data

    # `yes > E` / `head -c 10 E`; the re-run writer registers before the release lands.
    edge = new_edge()
    claim = store.claim_reader(edge, "r").reader_claim
    store.register_writer(edge, "a", "h:1")
    store.close_writer(edge, 1, "failed", 100, "SIGPIPE")
    assert store.register_writer(edge, "a", "h:1").generation == 2
    rec = store.release_reader(edge, "r", "closed", 10, claim=claim, generation=1)
    assert rec.reader_state == "closed" and rec.generation == 2 and not stops_writers(rec)
    assert closed_event(edge) == {"node": "r", "bytes": 10, "generation": 1}
    # A reader that pulled nothing (closed before any writer came): no generation.
    edge = new_edge()
    store.claim_reader(edge, "r")
    store.release_reader(edge, "r", "closed", 0)
    assert closed_event(edge) == {"node": "r", "bytes": 0}


def test_a_release_event_names_the_generation_its_reader_pulled() -> None:
    ids = iter(f"{i:032x}" for i in range(1, 100))
    release_generation_cases(Store(":memory:"), lambda: next(ids))


V4_EDGES = (
    "CREATE TABLE edges (id TEXT PRIMARY KEY, generation INTEGER NOT NULL DEFAULT 0,"
    " writer_node TEXT NOT NULL DEFAULT '', writer_endpoint TEXT NOT NULL DEFAULT '',"
    " writer_state TEXT NOT NULL DEFAULT 'none', bytes_written INTEGER NOT NULL DEFAULT 0,"
    " reader_node TEXT NOT NULL DEFAULT '', reader_state TEXT NOT NULL DEFAULT 'none',"
    " bytes_delivered INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',"
    " mode TEXT NOT NULL DEFAULT '', mode_reason TEXT NOT NULL DEFAULT '',"
    " reader_claim INTEGER NOT NULL DEFAULT 0, version INTEGER NOT NULL DEFAULT 0,"
    " created REAL NOT NULL, updated REAL NOT NULL);"
)


def write_v4_store(path: Path, edge: str) -> None:
    """A discovery database as schema 4 wrote it, holding ``edge`` whose reader was
    recorded "closed" with 0 bytes and no writer: before f9138f0 that was also how a
    reader killed while it waited (a failure) was recorded."""
    import sqlite3

    db = sqlite3.connect(path)
    db.executescript(
        V4_EDGES + "CREATE TABLE nodes (name TEXT PRIMARY KEY, boot TEXT NOT NULL);"
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL,"
        " edge TEXT NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL);"
        "INSERT INTO events (time, edge, kind, data) VALUES (0, 'x', 'reader', '{}');"
        "INSERT INTO edges (id, reader_node, reader_state, reader_claim, version, created,"
        f" updated) VALUES ('{edge}', 'r', 'closed', 1, 1, 0, 0);"
        "PRAGMA user_version = 4;"
    )
    db.commit()
    db.close()


def test_a_closed_reader_recorded_by_schema_4_never_stops_a_writer(tmp_path: Path) -> None:
    """Schema 4 recorded a failed reader "closed" too, and no sign whether a writer had
    come: after the upgrade such a record stopped the next writer (0 bytes read)."""
    import sqlite3

    path = tmp_path / "v4.db"
    write_v4_store(path, E)
    store = Store(path)
    rec = store.get(E)
    assert rec is not None and rec.reader_state == "closed" and not stops_writers(rec)
    assert store.register_writer(E, "a", "h:1").to_json()["stops_writers"] is False
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    db.close()
    # New records in the migrated file follow the new rule.
    store = Store(path)
    other = "e" * 32
    store.claim_reader(other, "r")
    assert stops_writers(store.release_reader(other, "r", "closed", 0))


def test_a_record_with_fields_of_a_newer_version_is_read() -> None:
    """A store a newer version wrote (a field this one does not know) is read, not
    refused: Edge(**fields) raised TypeError (a 500 for every request on that edge)."""
    rec = Edge.from_fields({"id": E, "generation": 3, "reader_state": "open", "novel": 1})
    assert (rec.id, rec.generation, rec.reader_state) == (E, 3, "open")


def test_a_database_of_a_newer_schema_keeps_its_version(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "d.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    store = Store(path)
    store.claim_reader(E, "r")
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    db.close()


def test_a_close_before_any_writer_survives_a_restart_of_discovery(tmp_path: Path) -> None:
    store = Store(tmp_path / "d.db")
    store.claim_reader(E, "r")
    store.release_reader(E, "r", "closed", 0)
    store.close()
    again = Store(tmp_path / "d.db")
    assert again.register_writer(E, "a", "h:1").to_json()["stops_writers"] is True


def reread_cases(store: DiscoveryStore, new_edge: Callable[[], str]) -> None:
    """writer/gone from a live reader that cannot get a complete generation: its stream
    was delivered to an earlier reader and let go (transient), or its spill collected
    (persistent). The generation fails (a re-run writer is wanted) on any node, the
    writer's own included; a transient one read on another node as before; never for
    another node, another generation, a reader not open, or a generation not complete."""

    def complete(writer_node: str, mode: str = "") -> str:
        edge = new_edge()
        store.register_writer(edge, writer_node, "h:1")
        store.close_writer(edge, 1, "complete", 10)
        if mode:
            store.set_mode(edge, 1, mode, f"configured {mode}")
        return edge

    same = complete("a")
    store.claim_reader(same, "a")
    assert store.writer_gone(same, "b", 1).writer_state == "complete"  # not its reader
    assert store.writer_gone(same, "a", 2).writer_state == "complete"  # not its generation
    assert store.writer_gone(same, "a", 1).writer_state == "failed"
    persistent = complete("a", "persistent")
    store.claim_reader(persistent, "r")
    assert store.writer_gone(persistent, "r", 1).writer_state == "failed"
    persistent_here = complete("a", "persistent")
    store.claim_reader(persistent_here, "a")
    assert store.writer_gone(persistent_here, "a", 1).writer_state == "failed"
    done = complete("a")
    store.claim_reader(done, "a")
    store.release_reader(done, "a", "done", 10)
    assert store.writer_gone(done, "a", 1).writer_state == "complete"  # it had it all
    unclaimed = complete("a", "persistent")
    assert store.writer_gone(unclaimed, "a", 1).writer_state == "complete"
    running = new_edge()
    store.register_writer(running, "a", "h:1")
    store.claim_reader(running, "a")
    assert store.writer_gone(running, "a", 1).writer_state == "open"  # it serves it


def test_a_live_reader_that_cannot_get_a_complete_generation_fails_it() -> None:
    ids = iter(f"{i:032x}" for i in range(1, 100))
    reread_cases(Store(":memory:"), lambda: next(ids))
