"""Discovery's durable state: edges, their writer generations, and an event log.

The store is plain synchronous SQLite (WAL, one connection, owned by one thread): every
operation is one short transaction, so a restart of discovery loses no registration and
generations only ever grow. Every change appends an event; an edge's ``version`` is the
sequence number of the last event that touched it, which is what long-polls wait on.

This is the embedded backend behind :class:`Store`'s method set; an etcd backend would map
generations to revisions, long-polls to watches and node liveness to leases.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .schema import EventKind, LossCause, ReaderState, WriterState

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS edges (
    id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL DEFAULT 0,
    writer_node TEXT NOT NULL DEFAULT '',
    writer_endpoint TEXT NOT NULL DEFAULT '',
    writer_state TEXT NOT NULL DEFAULT 'none',
    bytes_written INTEGER NOT NULL DEFAULT 0,
    reader_node TEXT NOT NULL DEFAULT '',
    reader_state TEXT NOT NULL DEFAULT 'none',
    bytes_delivered INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    mode TEXT NOT NULL DEFAULT '',
    mode_reason TEXT NOT NULL DEFAULT '',
    reader_claim INTEGER NOT NULL DEFAULT 0,
    reader_no_writer INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    boot TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    edge TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
"""

# Everything a request touches is found by an index, not a scan of all history.
INDEXES = """
CREATE INDEX IF NOT EXISTS edges_writer ON edges (writer_node, writer_state);
CREATE INDEX IF NOT EXISTS edges_reader ON edges (reader_node, reader_state);
CREATE INDEX IF NOT EXISTS edges_done ON edges (reader_state, updated);
"""

# 1: no mode columns; 2: no reader_claim; 3: no nodes table; 4: no reader_no_writer, and
# a reader that failed (killed, non-zero exit) may be recorded "closed" (before f9138f0)
SCHEMA_VERSION = 5

READER_STATES = frozenset(ReaderState)
EVENTS_KEPT = 100_000


def writer_there(edge: Edge) -> bool:
    """A reader claiming ``edge`` now has a writer: one writing (or its node silent, it may
    come back), or a complete stream. A failed generation is none: its reader waits for a
    re-run. (A complete stream an earlier reader finished with counts too: the record's
    ``reader_state`` may be that of a reader of an older generation, so it cannot tell.)"""
    return edge.writer_state in (WriterState.OPEN, WriterState.LOST, WriterState.COMPLETE)


def claim_fields(edge: Edge) -> dict[str, Any]:
    """What a reader's claim of ``edge`` records besides its node and state: whether it
    came with no writer there (see :func:`stops_writers`)."""
    return {"reader_no_writer": int(not writer_there(edge))}


def writer_came(edge: Edge) -> dict[str, Any]:
    """What a writer coming to ``edge`` (a new generation, a complete spill served again)
    records of its reader: a reader still holding its claim has seen a writer now."""
    if edge.reader_state in (ReaderState.OPEN, ReaderState.LOST) and edge.reader_no_writer:
        return {"reader_no_writer": 0}
    return {}


def release_data(node: str, delivered: int, generation: int) -> dict[str, Any]:
    """A reader's release event: with the generation it last pulled (none: left out). A
    writer's daemon takes a ``reader-closed`` for its "no more" only if that reader pulled
    its generation or none (it may have closed before the writer came): one recorded late,
    after a re-run writer registered, is the previous generation's (Membership)."""
    data: dict[str, Any] = {"node": node, "bytes": delivered}
    if generation:
        data["generation"] = generation
    return data


def stops_writers(edge: Edge) -> bool:
    """The edge's reader closed early ("no more") before any writer came for it, and no
    reader claimed the edge since: every writer that registers gets EPIPE/SIGPIPE, as a
    pipe's writer whose reader left does. A reader that closed after a writer came (even
    unread: `: < E` after `echo x > E` completed) told that writer, and a later one is a
    re-run for the next reader; a failed reader wants the stream. Records of schema 4 and
    older have no ``reader_no_writer`` (0): they never stop a writer (a failed reader was
    recorded "closed" then)."""
    return edge.reader_state == ReaderState.CLOSED and bool(edge.reader_no_writer)


def undelivered(edge: Edge) -> bool:
    """A complete generation whose bytes only its writer's daemon still holds: not
    persistent (a spill is served again after a restart, see ``restore_writer``), and no
    live reader (none came, or it was lost or failed; a reader on the writer's own node
    is lost with it). When that daemon restarts or leaves, the stream is gone: the
    generation fails, so that a re-run of the writer is asked for, instead of "complete"
    for good while a re-run reader waits. A live reader elsewhere ("open") may hold the
    whole stream already (its END arrived), so it is not failed for it: a re-run there
    would have no reader."""
    return (
        edge.writer_state == WriterState.COMPLETE
        and edge.mode != "persistent"
        and edge.reader_state in (ReaderState.NONE, ReaderState.LOST, ReaderState.FAILED)
    )


def read_elsewhere(edge: Edge) -> bool:
    """A complete transient generation whose reader, on another node than its writer, is
    still reading: when the writer's daemon run is gone, the reader's daemon decides
    whether the stream is lost (it had not received the END) or delivered."""
    return (
        edge.writer_state == WriterState.COMPLETE
        and edge.mode != "persistent"
        and edge.reader_state == ReaderState.OPEN
        and edge.reader_node not in ("", edge.writer_node)
    )


def read_again(edge: Edge) -> bool:
    """A complete generation, in either mode, whose reader (on any node) is reading."""
    return (
        edge.writer_state == WriterState.COMPLETE
        and edge.reader_state == ReaderState.OPEN
        and edge.reader_node != ""
    )


def read_elsewhere_unsettled(edge: Edge) -> bool:
    """As :func:`read_elsewhere`, for a generation whose end its daemon had not recorded
    (open, or lost by silence): that daemon may have sent the END before it went."""
    return (
        edge.writer_state in (WriterState.OPEN, WriterState.LOST)
        and edge.mode != "persistent"
        and edge.reader_state == ReaderState.OPEN
        and edge.reader_node not in ("", edge.writer_node)
    )


def unfinished_for(edge: Edge, node: str, generation: int) -> bool:
    """The reader on ``node`` of ``edge`` may fail ``generation`` as unfinished: complete,
    or lost with its daemon run (no endpoint: see :func:`writer_run_gone`), and read there.
    Also a complete generation read on its writer's own node, or a persistent one: the
    stream was delivered to an earlier reader and let go (transient: at once; persistent:
    its spill collected after retention), and that reader's program was killed before it
    finished, or its stage is re-run by hand: the re-run needs a re-run writer. (On the
    writer's node the asking daemon is the writer's, alive, holding no writer of it.)"""
    gone = (
        read_elsewhere(edge)
        or (read_again(edge) and (edge.writer_node == node or edge.mode == "persistent"))
        or (
            edge.writer_state == WriterState.LOST
            and not edge.writer_endpoint
            and read_elsewhere_unsettled(edge)
        )
    )
    return edge.generation == generation and gone and edge.reader_node == node


def gone_reason(edge: Edge) -> str:
    return (
        f"the daemon on node {edge.writer_node} that held the stream is gone; the reader on "
        f"node {edge.reader_node} had not received all of it"
    )


def writer_run_gone(
    edge: Edge, node: str, cause: str
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The change that fails ``edge``'s open (or lost) generation written on ``node``,
    whose daemon run is gone (``cause``: it restarted or left). Whatever its program did,
    the bytes its daemon had not passed on went with that run: a program that exited 0
    meanwhile (its exit never recorded) must be re-run as one that failed would be, and a
    generation left "lost" would ask for no re-run (its reader waited, then failed)."""
    why = f"node {node} {cause}: the daemon run that held generation {edge.generation} is gone"
    data = {"node": node, "generation": edge.generation, "cause": cause}
    if read_elsewhere_unsettled(edge):
        # Its reader's daemon may hold the whole stream (the END came before the writer's
        # daemon recorded it): it decides, as for a complete one (Store.writer_gone). No
        # endpoint: no daemon serves it (a reader that misses the event sees it there).
        fields = {"writer_state": WriterState.LOST, "writer_endpoint": "", "reason": why}
        return EventKind.WRITER_GONE, data, fields
    fields = {"writer_state": WriterState.FAILED, "reason": why}
    return EventKind.FAILED, {**data, "bytes": edge.bytes_written, "reason": why}, fields


class Conflict(Exception):
    """The request contradicts the edge's current state (HTTP 409)."""


class NotFound(Exception):
    """No such edge (HTTP 404)."""


@dataclass(frozen=True, slots=True)
class Edge:
    id: str
    generation: int = 0
    writer_node: str = ""
    writer_endpoint: str = ""
    writer_state: str = "none"
    bytes_written: int = 0
    reader_node: str = ""
    reader_state: str = "none"
    bytes_delivered: int = 0
    reason: str = ""
    mode: str = ""
    mode_reason: str = ""
    reader_claim: int = 0  # the event seq of the current reader's claim: names that claim
    reader_no_writer: int = 0  # 1: no writer came during the current reader's claim
    version: int = 0
    created: float = 0.0
    updated: float = 0.0

    @property
    def state(self) -> str:
        """One word for people: waiting, streaming, complete, delivered, failed."""
        if self.reader_state == "done":
            return "delivered"
        if self.writer_state == "failed" or self.reader_state == "failed":
            return "failed"
        if self.writer_state == "lost" or self.reader_state == "lost":
            return "node-lost"
        if self.writer_state == "none":
            return "waiting-for-writer"
        if self.writer_state == "complete":
            return "complete"
        return "streaming" if self.reader_state == "open" else "waiting-for-reader"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state
        out["stops_writers"] = stops_writers(self)
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Edge:
        """From a stored record; fields this version does not know (a newer one wrote
        them) are left out rather than refused."""
        return cls(**{k: v for k, v in fields.items() if k in _FIELDS})


_FIELDS = frozenset(Edge.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    time: float
    edge: str
    kind: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Edges, node names and endpoints are for the cluster only: 0600 (SQLite gives
            # its -wal and -shm files the database's mode).
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._db.executescript(INDEXES)

    def _migrate(self) -> None:
        """Brings a database written by an older version up to the current columns (a
        new database has them all: CREATE TABLE). Before schema 4 the version was not
        always recorded, so each step also looks for its column."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            log.warning(
                "%s was written by a newer fractalfs (schema %d, this one knows %d): "
                "fields it added are ignored",
                self.path,
                version,
                SCHEMA_VERSION,
            )
            return
        have = {row[1] for row in self._db.execute("PRAGMA table_info(edges)")}
        for column in ("mode", "mode_reason"):
            if column not in have:
                self._db.execute(f"ALTER TABLE edges ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
        if "reader_claim" not in have:
            self._db.execute("ALTER TABLE edges ADD COLUMN reader_claim INTEGER NOT NULL DEFAULT 0")
        if version < 5 and "reader_no_writer" not in have:
            # 4 -> 5. Every record's 0: a "closed" reader written before never stops a
            # writer (it may have been a failure, and whether a writer had come is unknown).
            self._db.execute(
                "ALTER TABLE edges ADD COLUMN reader_no_writer INTEGER NOT NULL DEFAULT 0"
            )
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    # -- reads ---------------------------------------------------------------------------

    def get(self, edge: str) -> Edge | None:
        row = self._db.execute("SELECT * FROM edges WHERE id = ?", (edge,)).fetchone()
        return Edge.from_fields(dict(row)) if row else None

    def edges(self) -> list[Edge]:
        rows = self._db.execute("SELECT * FROM edges ORDER BY created").fetchall()
        return [Edge.from_fields(dict(r)) for r in rows]

    def events(self, after: int, limit: int = 1000) -> list[Event]:
        rows = self._db.execute(
            "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [
            Event(r["seq"], r["time"], r["edge"], r["kind"], json.loads(r["data"])) for r in rows
        ]

    def last_seq(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)

    # -- writes --------------------------------------------------------------------------

    def register_writer(self, edge: str, node: str, endpoint: str) -> Edge:
        """Takes the next generation of ``edge`` for a writer on ``node``.

        A writer that is still open on another node keeps the edge (Conflict); an open writer
        on the same node is a daemon that restarted and lost it, so it is superseded.
        """
        with self._tx():
            cur = self._get_or_new(edge)
            if cur.writer_state == WriterState.OPEN and cur.writer_node != node:
                raise Conflict(f"edge {edge} has an open writer on node {cur.writer_node}")
            gen = cur.generation + 1
            return self._update(
                cur,
                "writer",
                {"generation": gen, "node": node, "endpoint": endpoint},
                generation=gen,
                writer_node=node,
                writer_endpoint=endpoint,
                writer_state="open",
                bytes_written=0,
                reason="",
                **writer_came(cur),
            )

    def close_writer(
        self, edge: str, generation: int, state: str, written: int, reason: str = ""
    ) -> Edge:
        if state not in (WriterState.COMPLETE, WriterState.FAILED):
            raise ValueError(f"writer state {state!r} is not complete or failed")
        with self._tx():
            cur = self._current(edge, generation)
            return self._update(
                cur,
                state,
                {
                    "generation": generation,
                    "bytes": written,
                    "reason": reason,
                    "duration": round(time.time() - cur.updated, 3),
                },
                writer_state=state,
                bytes_written=written,
                reason=reason,
            )

    def writer_gone(self, edge: str, node: str, generation: int) -> Edge:
        """The reader on ``node`` had not received the END of the complete ``generation``
        when the daemon that held it went away: the generation fails (a re-run writer is
        wanted; the reader waits for it). Anything else: nothing changes."""
        with self._tx():
            cur = self._require(edge)
            if not unfinished_for(cur, node, generation):
                return cur
            why = gone_reason(cur)
            data = {"generation": generation, "bytes": cur.bytes_written, "reason": why}
            return self._update(
                cur, EventKind.FAILED, data, writer_state=WriterState.FAILED, reason=why
            )

    def claim_reader(self, edge: str, node: str) -> Edge:
        with self._tx():
            cur = self._get_or_new(edge)
            if cur.reader_state == ReaderState.OPEN and cur.reader_node != node:
                raise Conflict(f"edge {edge} has an open reader on node {cur.reader_node}")
            seq = self._event(edge, EventKind.READER, {"node": node})
            return self._set(
                cur,
                seq,
                reader_node=node,
                reader_state="open",
                bytes_delivered=0,
                reader_claim=seq,
                **claim_fields(cur),
            )

    def release_reader(
        self, edge: str, node: str, state: str, delivered: int, claim: int = 0, generation: int = 0
    ) -> Edge:
        """The reader of ``node`` closed. ``claim`` (the ``reader_claim`` its claim
        returned) names which of that node's claims: a late release of an older one must
        not end a newer reader on the same node (0: any claim of ``node``). ``generation``:
        the one it last pulled, carried by the event (see :func:`release_data`)."""
        if state not in READER_STATES - {ReaderState.NONE, ReaderState.OPEN}:
            raise ValueError(f"reader state {state!r} is not done, closed or failed")
        with self._tx():
            cur = self._require(edge)
            # Also a reader its node was taken for lost with (silent: stalled or cut off
            # from discovery): it finished meanwhile, and the node's heartbeat, back, no
            # longer names it; ignored, the edge would stay "lost" for good.
            held = (ReaderState.OPEN, ReaderState.LOST)
            if cur.reader_node != node or cur.reader_state not in held:
                return cur  # a newer reader owns the edge; this release is late
            if claim and cur.reader_claim != claim:
                return cur  # a newer claim of the same node
            return self._update(
                cur,
                f"reader-{state}",
                release_data(node, delivered, generation),
                reader_state=state,
                bytes_delivered=delivered,
            )

    def node_lost(self, node: str, cause: str = LossCause.SILENT) -> list[Edge]:
        """``node``'s open ends are lost. ``cause`` says how sure that is: ``silent`` (it
        stopped heartbeating and may come back), ``restarted`` or ``left`` (its daemon is
        gone, and whatever the old one held with it)."""
        changed = []
        with self._tx():
            for cur in self._held_by(node):
                if cur.writer_node == node and cur.writer_state == "open":
                    if cause == LossCause.SILENT:
                        cur = self._update(
                            cur,
                            EventKind.WRITER_LOST,
                            {"node": node, "generation": cur.generation, "cause": cause},
                            writer_state="lost",
                            reason=f"node {node} stopped responding",
                        )
                    else:
                        kind, data, fields = writer_run_gone(cur, node, cause)
                        cur = self._update(cur, kind, data, **fields)
                    changed.append(cur)
                if cur.reader_node == node and cur.reader_state == "open":
                    changed.append(
                        self._update(
                            cur,
                            EventKind.READER_LOST,
                            {"node": node, "cause": cause, "claim": cur.reader_claim},
                            reader_state=ReaderState.LOST,
                        )
                    )
            if cause != LossCause.SILENT:
                for cur in self._lost_writers_by(node):  # lost earlier, by silence
                    kind, data, fields = writer_run_gone(cur, node, cause)
                    changed.append(self._update(cur, kind, data, **fields))
                for cur in self._complete_by(node):
                    if read_elsewhere(cur):
                        data = {"node": node, "generation": cur.generation, "cause": cause}
                        # No daemon serves it now: a reader that misses the event sees it
                        # in the record (edgestate: complete, no endpoint).
                        changed.append(
                            self._update(cur, EventKind.WRITER_GONE, data, writer_endpoint="")
                        )
                for cur in self._undelivered_by(node):
                    why = f"node {node} {cause} before a reader read the whole stream"
                    data = {"generation": cur.generation, "bytes": cur.bytes_written}
                    changed.append(
                        self._update(
                            cur,
                            EventKind.FAILED,
                            {**data, "reason": why},
                            writer_state="failed",
                            reason=why,
                        )
                    )
        return changed

    def node_alive(self, node: str, writers: dict[str, int], readers: list[str]) -> list[str]:
        """A heartbeat: ``node`` holds these writer generations and readers.

        Lost ends it still holds are open again. Returns the edges whose writer generation
        it holds is no longer the edge's current one: that writer is fenced off.
        """
        stale = []
        with self._tx():
            for edge, gen in writers.items():
                cur = self.get(edge)
                if cur is None or cur.generation != gen or cur.writer_node != node:
                    stale.append(edge)
                elif cur.writer_state == "lost":
                    self._update(
                        cur,
                        "writer-back",
                        {"node": node, "generation": gen},
                        writer_state="open",
                        reason="",
                    )
            for edge in readers:
                cur = self.get(edge)
                if cur is not None and cur.reader_node == node and cur.reader_state == "lost":
                    self._update(cur, "reader-back", {"node": node}, reader_state="open")
        return stale

    def nodes_with_open_ends(self) -> set[str]:
        rows = self._db.execute(
            "SELECT writer_node FROM edges WHERE writer_state = 'open' "
            "UNION SELECT reader_node FROM edges WHERE reader_state = 'open'"
        ).fetchall()
        return {r[0] for r in rows if r[0]}

    def set_mode(self, edge: str, generation: int, mode: str, reason: str) -> Edge:
        with self._tx():
            cur = self._current(edge, generation)
            return self._update(
                cur,
                "mode",
                {"generation": generation, "mode": mode, "reason": reason},
                mode=mode,
                mode_reason=reason,
            )

    def restore_writer(
        self, edge: str, generation: int, node: str, endpoint: str, complete: bool = True
    ) -> Edge:
        """A restarted node serves the spill of ``generation`` again: a complete stream, or
        the prefix of one whose writer died with the daemon (a failed generation)."""
        with self._tx():
            cur = self._current(edge, generation)
            return self._update(
                cur,
                "restored",
                {"generation": generation, "node": node, "complete": complete},
                writer_node=node,
                writer_endpoint=endpoint,
                writer_state="complete" if complete else "failed",
                reason="" if complete else "its writer died with its daemon; prefix served",
                **(writer_came(cur) if complete else {}),
            )

    def record(self, edge: str, kind: str, data: dict[str, Any]) -> None:
        """An event a node observed (a resume after a fault, a diverged replay)."""
        with self._tx():
            self._require(edge)
            self._event(edge, kind, data)

    def progress(self, edge: str, delivered: int) -> None:
        """Records bytes delivered; not an event (it would wake every long-poll)."""
        self._db.execute(
            "UPDATE edges SET bytes_delivered = ?, updated = ? WHERE id = ?",
            (delivered, time.time(), edge),
        )

    def delete(self, edge: str) -> None:
        with self._tx():
            self._require(edge)
            self._db.execute("DELETE FROM edges WHERE id = ?", (edge,))
            self._event(edge, EventKind.DELETED, {})

    # -- daemon runs -----------------------------------------------------------------------
    # The boot id of each node's daemon run discovery heard from last. Kept on disk: a
    # discovery restarted between two runs of a daemon must still tell the second from the
    # first, or the first run's open writers stay "open" for good (a re-run gets EBUSY).

    def boots(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self._db.execute("SELECT name, boot FROM nodes")}

    def set_boot(self, node: str, boot: str) -> None:
        self._db.execute(
            "INSERT INTO nodes (name, boot) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET boot = excluded.boot",
            (node, boot),
        )

    def forget_boot(self, node: str) -> None:
        self._db.execute("DELETE FROM nodes WHERE name = ?", (node,))

    # -- history ---------------------------------------------------------------------------

    def _held_by(self, node: str) -> list[Edge]:
        rows = self._db.execute(
            "SELECT * FROM edges WHERE writer_node = ? AND writer_state = 'open' "
            "UNION SELECT * FROM edges WHERE reader_node = ? AND reader_state = 'open'",
            (node, node),
        ).fetchall()
        return [Edge.from_fields(dict(r)) for r in rows]

    def _undelivered_by(self, node: str) -> list[Edge]:
        """Complete generations written on ``node`` whose bytes only its daemon held (see
        :func:`undelivered`)."""
        return [e for e in self._complete_by(node) if undelivered(e)]

    def _lost_writers_by(self, node: str) -> list[Edge]:
        rows = self._db.execute(
            "SELECT * FROM edges WHERE writer_node = ? AND writer_state = 'lost' "
            "AND writer_endpoint != ''",
            (node,),
        ).fetchall()
        return [Edge.from_fields(dict(r)) for r in rows]

    def _complete_by(self, node: str) -> list[Edge]:
        rows = self._db.execute(
            "SELECT * FROM edges WHERE writer_node = ? AND writer_state = 'complete'", (node,)
        ).fetchall()
        return [Edge.from_fields(dict(r)) for r in rows]

    def edges_page(self, after: str, limit: int) -> list[Edge]:
        """Up to ``limit`` edges with ids after ``after``, in id order."""
        rows = self._db.execute(
            "SELECT * FROM edges WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        ).fetchall()
        return [Edge.from_fields(dict(r)) for r in rows]

    def prune(self, before: float) -> int:
        """Forgets edges delivered before ``before`` (seconds since the epoch)."""
        cur = self._db.execute(
            "DELETE FROM edges WHERE reader_state = 'done' AND updated < ?", (before,)
        )
        return cur.rowcount

    # -- internals -----------------------------------------------------------------------

    def _tx(self) -> _Tx:
        # BEGIN IMMEDIATE takes the write lock up front: read-modify-write is atomic.
        self._db.execute("BEGIN IMMEDIATE")
        return _Tx(self._db)

    def _require(self, edge: str) -> Edge:
        cur = self.get(edge)
        if cur is None:
            raise NotFound(f"no edge {edge}")
        return cur

    def _current(self, edge: str, generation: int) -> Edge:
        """The edge, if ``generation`` is still its current one (else: fenced, Conflict)."""
        cur = self._require(edge)
        if cur.generation != generation:
            raise Conflict(
                f"generation {generation} of edge {edge} is stale (now {cur.generation})"
            )
        return cur

    def _get_or_new(self, edge: str) -> Edge:
        cur = self.get(edge)
        if cur is not None:
            return cur
        now = time.time()
        self._db.execute(
            "INSERT INTO edges (id, created, updated) VALUES (?, ?, ?)", (edge, now, now)
        )
        return Edge(id=edge, created=now, updated=now)

    def _event(self, edge: str, kind: str, data: dict[str, Any]) -> int:
        cur = self._db.execute(
            "INSERT INTO events (time, edge, kind, data) VALUES (?, ?, ?, ?)",
            (time.time(), edge, kind, json.dumps(data)),
        )
        seq = int(cur.lastrowid or 0)
        if seq % 1000 == 0:
            self._db.execute("DELETE FROM events WHERE seq <= ?", (seq - EVENTS_KEPT,))
        return seq

    def _update(self, cur: Edge, kind: str, data: dict[str, Any], **fields: Any) -> Edge:
        return self._set(cur, self._event(cur.id, kind, data), **fields)

    def _set(self, cur: Edge, seq: int, **fields: Any) -> Edge:
        fields["version"] = seq
        fields["updated"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(f"UPDATE edges SET {cols} WHERE id = ?", (*fields.values(), cur.id))
        new = self.get(cur.id)
        assert new is not None
        return new


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
