"""Discovery's state in etcd, through etcd's v3 JSON gateway (``/v3/kv/txn`` and friends).

Keys under one prefix (default ``fractalfs/``)::

    e/<edge>          the edge record (JSON); its mod revision is the edge's ``version``
    ev/<time><rand>   one event (JSON); its create revision is the event's ``seq``
    head              rewritten with every event: its mod revision is the newest event's seq
    h/<node>/<edge>:w an index: <node> holds an open writer (":r" reader) of <edge>
    u/<node>/<edge>   an index: <node> wrote <edge> complete, not read whole yet (undelivered,
                      or still being read on another node: read_elsewhere)
    l/<node>/<edge>   an index: <node>'s writer of <edge> is lost (silent), still served
    n/<node>          a live node: {"boot", "lease"}, attached to the node's lease
    b/<node>          the node's last boot id, without a lease: a run that starts after
                      the lease expired is still told from the one before (a restart)

Every change is a read, then one transaction that compares the edge key's mod revision with
the one read and writes the edge, its event and ``head`` together: two discovery replicas
racing on one edge cannot both win, so generations only grow and a stale generation is
refused by etcd (fencing). Node liveness is a lease per node, kept alive by its heartbeats:
when a node falls silent etcd deletes its key, and every replica's watch sees it.

The client is synchronous (httpx), like the SQLite store, so both stores have the same
methods; a request costs about 1 ms per round trip on loopback. A replica runs every call
in a worker thread (:meth:`.replicated.EtcdDiscoveryApp._do`): a call waiting out an
election holds a thread, never the replica's loop. Each try on a member is short (0.5 s,
growing with each further try) and asks for a member with a leader, so a member that lost
its leader answers at once or is given up on quickly for the next one. A retried
transaction whose first try was applied after all is recognised by its value (see
``_mutate``). The watch that wakes long-polls is asynchronous and lives in
:mod:`.replicated`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import urlsplit

import httpx

from .store import (
    READER_STATES,
    Conflict,
    Edge,
    Event,
    NotFound,
    claim_fields,
    gone_reason,
    read_elsewhere,
    release_data,
    undelivered,
    unfinished_for,
    writer_came,
    writer_run_gone,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "fractalfs/"
RETRY_FOR = 10.0  # how long a request tries the members before it gives up
TRY_TIMEOUT = 0.5  # seconds the first try on a member may take; x1.5 for each next try
MAX_TRY_TIMEOUT = 5.0
# grpc-gateway passes Grpc-Metadata-* headers as gRPC metadata; "hasleader" is what etcd's
# own client sends for WithRequireLeader: a member without a leader refuses at once (503)
# instead of holding the request until its own timeout (5 s and more).
REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}
EVENT_RETENTION = 3600.0  # seconds an event stays readable through /v1/events
MAX_EVENT_DATA = 4096  # bytes of JSON an event's data may take; more is summarised
TXN_OPS = 100  # etcd's default --max-txn-ops is 128
ID_SPACE = 16**32  # edge ids: 32 hex digits
_EDGE_FIELDS = tuple(f for f in Edge.__dataclass_fields__ if f not in ("id", "version"))


class EtcdUnavailable(Exception):
    """No etcd member answered before the deadline."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    """The smallest key greater than every key starting with ``prefix``."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def parse_url(url: str) -> tuple[list[str], str]:
    """``etcd://h1:2379,h2:2379/prefix`` -> (["http://h1:2379", ...], "prefix/")."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.netloc:
        raise ValueError(f"{url!r} is not etcd://HOST:PORT[,HOST:PORT...][/PREFIX]")
    endpoints = []
    for hostport in parts.netloc.split(","):
        host, sep, port = hostport.rpartition(":")
        if not sep:
            host, port = hostport, "2379"
        if not host or not port.isdigit():
            raise ValueError(f"bad etcd member {hostport!r} in {url!r}")
        endpoints.append(f"http://{host}:{port}")
    prefix = parts.path.strip("/")
    return endpoints, (prefix + "/") if prefix else DEFAULT_PREFIX


def _edge_value(edge: Edge) -> str:
    data = asdict(edge)
    return json.dumps({k: data[k] for k in _EDGE_FIELDS})


def _edge_from(kv: dict[str, Any], edge: str) -> Edge:
    """A record of an older shape lacks newer fields: they take their defaults (see
    store.stops_writers: a reader "closed" before ``reader_no_writer`` never stops a
    writer)."""
    fields = json.loads(_unb64(kv["value"]))
    return Edge.from_fields({**fields, "id": edge, "version": int(kv["mod_revision"])})


def cap_event_data(data: dict[str, Any]) -> dict[str, Any]:
    """Events stay small: data over :data:`MAX_EVENT_DATA` bytes is replaced by its size."""
    size = len(json.dumps(data))
    return data if size <= MAX_EVENT_DATA else {"truncated": True, "bytes": size}


class Gateway:
    """Blocking calls to etcd's JSON gateway, failing over between members."""

    def __init__(
        self, endpoints: list[str], retry_for: float = RETRY_FOR, try_timeout: float = TRY_TIMEOUT
    ) -> None:
        self.endpoints = endpoints
        self.retry_for = retry_for
        self.try_timeout = try_timeout
        self._current = 0
        # Called from several worker threads at once (httpx's pool is thread-safe).
        self._http = httpx.Client(
            timeout=httpx.Timeout(MAX_TRY_TIMEOUT, connect=1.0),
            headers=REQUIRE_LEADER,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    def close(self) -> None:
        self._http.close()

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + self.retry_for
        tries = 0
        while True:
            current = self._current
            url = self.endpoints[current] + path
            # Short tries fail over fast; longer ones still let a loaded member answer.
            limit = min(self.try_timeout * 1.5**tries, MAX_TRY_TIMEOUT)
            limit = max(0.05, min(limit, deadline - time.monotonic()))
            try:
                resp = self._http.post(url, json=body, timeout=httpx.Timeout(limit, connect=limit))
                if resp.status_code < 500:
                    data: dict[str, Any] = resp.json()
                    if resp.status_code >= 400 or "error" in data:
                        raise ValueError(f"etcd refused {path}: {data.get('message', data)}")
                    return data
                why = resp.text[:200]
            except httpx.TransportError as exc:  # refused, reset, timed out
                why = str(exc) or type(exc).__name__
            # This member is down or has no leader: try the next one (unless another thread
            # moved on already).
            if self._current == current:
                self._current = (current + 1) % len(self.endpoints)
            tries += 1
            if tries == 1:
                log.debug("etcd member %s: %s; trying the next one", url, why)
            if time.monotonic() > deadline:
                raise EtcdUnavailable(f"no etcd member answered {path}: {why}")
            if tries % len(self.endpoints) == 0:
                time.sleep(0.05)

    def range(self, key: str, end: str | None = None, **opts: Any) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"key": _b64(key), **opts}
        if end is not None:
            body["range_end"] = _b64(end)
        return list(self.call("/v3/kv/range", body).get("kvs", []))

    def txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]]
    ) -> tuple[bool, dict[str, Any]]:
        got = self.call("/v3/kv/txn", {"compare": compare, "success": success})
        return bool(got.get("succeeded", False)), got


def _put(key: str, value: str, lease: int = 0) -> dict[str, Any]:
    put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


Change = Callable[[Edge], "tuple[str, dict[str, Any], dict[str, Any]] | None"]


class EtcdStore:
    """The :class:`~.backend.DiscoveryStore` methods, on etcd."""

    def __init__(self, endpoints: list[str], prefix: str = DEFAULT_PREFIX) -> None:
        self.endpoints = endpoints
        self.prefix = prefix
        self.gateway = Gateway(endpoints)
        self._events_written = 0
        self._density = 0.0  # edges per id, from the last page's range (0: not known yet)

    @classmethod
    def from_url(cls, url: str) -> EtcdStore:
        endpoints, prefix = parse_url(url)
        return cls(endpoints, prefix)

    def close(self) -> None:
        self.gateway.close()

    def check(self, within: float = 5.0) -> None:
        """Raises EtcdUnavailable if no member answers within ``within`` seconds."""
        retry_for, self.gateway.retry_for = self.gateway.retry_for, within
        try:
            self.gateway.call("/v3/maintenance/status", {})
        finally:
            self.gateway.retry_for = retry_for

    def _key(self, edge: str) -> str:
        return f"{self.prefix}e/{edge}"

    # -- reads ---------------------------------------------------------------------------

    def _kv(self, edge: str) -> dict[str, Any] | None:
        kvs = self.gateway.range(self._key(edge))
        return kvs[0] if kvs else None

    def get(self, edge: str) -> Edge | None:
        kv = self._kv(edge)
        return _edge_from(kv, edge) if kv else None

    def edges(self) -> list[Edge]:
        start = f"{self.prefix}e/"
        out = []
        for kv in self.gateway.range(start, prefix_end(start)):
            out.append(_edge_from(kv, _unb64(kv["key"])[len(start) :]))
        return sorted(out, key=lambda e: e.created)

    def events(self, after: int, limit: int = 1000) -> list[Event]:
        start = f"{self.prefix}ev/"
        kvs = self.gateway.range(
            start,
            prefix_end(start),
            min_create_revision=str(after + 1),
            sort_target="CREATE",
            sort_order="ASCEND",
            limit=str(limit),
        )
        out = []
        for kv in kvs:
            ev = json.loads(_unb64(kv["value"]))
            out.append(
                Event(int(kv["create_revision"]), ev["time"], ev["edge"], ev["kind"], ev["data"])
            )
        return out

    def last_seq(self) -> int:
        kvs = self.gateway.range(f"{self.prefix}head")
        return int(kvs[0]["mod_revision"]) if kvs else 0

    def nodes_with_open_ends(self) -> set[str]:
        start = f"{self.prefix}h/"
        keys = self.gateway.range(start, prefix_end(start), keys_only=True)
        return {_unb64(kv["key"])[len(start) :].rsplit("/", 1)[0] for kv in keys}

    def _held_by(self, node: str) -> list[str]:
        """The edges ``node`` holds an open end of, from the index (not a scan)."""
        start = f"{self.prefix}h/{node}/"
        keys = self.gateway.range(start, prefix_end(start), keys_only=True)
        return sorted({_unb64(kv["key"])[len(start) :].split(":")[0] for kv in keys})

    def _lost_writers_by(self, node: str) -> list[str]:
        """The edges whose writer on ``node`` is lost (silent) and still has its endpoint."""
        start = f"{self.prefix}l/{node}/"
        keys = self.gateway.range(start, prefix_end(start), keys_only=True)
        return sorted(_unb64(kv["key"])[len(start) :] for kv in keys)

    def _undelivered_by(self, node: str) -> list[str]:
        """The edges ``node`` wrote complete that no reader read whole (store.undelivered)."""
        start = f"{self.prefix}u/{node}/"
        keys = self.gateway.range(start, prefix_end(start), keys_only=True)
        return sorted(_unb64(kv["key"])[len(start) :] for kv in keys)

    def _index_ops(self, old: Edge | None, new: Edge | None) -> list[dict[str, Any]]:
        def held(e: Edge | None) -> set[str]:
            if e is None:
                return set()
            out = set()
            if e.writer_state == "open" and e.writer_node:
                out.add(f"{self.prefix}h/{e.writer_node}/{e.id}:w")
            if e.reader_state == "open" and e.reader_node:
                out.add(f"{self.prefix}h/{e.reader_node}/{e.id}:r")
            if (undelivered(e) or read_elsewhere(e)) and e.writer_node:
                out.add(f"{self.prefix}u/{e.writer_node}/{e.id}")
            if e.writer_state == "lost" and e.writer_endpoint and e.writer_node:
                out.add(f"{self.prefix}l/{e.writer_node}/{e.id}")
            return out

        before, after = held(old), held(new)
        ops = [{"request_delete_range": {"key": _b64(k)}} for k in sorted(before - after)]
        return ops + [_put(k, "") for k in sorted(after - before)]

    # -- the one way to change an edge ---------------------------------------------------

    def _event_ops(self, edge: str, kind: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        now = time.time()
        key = f"{self.prefix}ev/{time.time_ns():020d}{os.urandom(4).hex()}"
        value = json.dumps({"time": now, "edge": edge, "kind": kind, "data": cap_event_data(data)})
        self._events_written += 1
        if self._events_written % 500 == 0:
            self._prune_events()
        return [_put(key, value), _put(f"{self.prefix}head", "")]

    def _prune_events(self) -> None:
        start = f"{self.prefix}ev/"
        cutoff = f"{start}{int((time.time() - EVENT_RETENTION) * 1e9):020d}"
        self.gateway.call("/v3/kv/deleterange", {"key": _b64(start), "range_end": _b64(cutoff)})

    def _mutate(
        self, edge: str, change: Change, *, create: bool = False, event: bool = True
    ) -> Edge:
        """Reads ``edge``, asks ``change`` what to do, and writes it if nobody wrote first.

        ``change`` returns (event kind, event data, new fields) or None for "nothing to do";
        it may raise Conflict. A lost race re-reads and asks again. A try that timed out
        may still have been applied, and its retry then fails its compare: if the edge now
        holds exactly the value this call wrote (``updated`` makes it unique), it was ours.
        """
        written = ""
        for _ in range(64):
            kv = self._kv(edge)
            key = self._key(edge)
            if kv is not None and written and _unb64(kv["value"]) == written:
                return _edge_from(kv, edge)
            if kv is None:
                if not create:
                    raise NotFound(f"no edge {edge}")
                now = time.time()
                cur = Edge(id=edge, created=now, updated=now)
                compare = {"key": _b64(key), "target": "VERSION", "result": "EQUAL", "version": "0"}
            else:
                cur = _edge_from(kv, edge)
                compare = {
                    "key": _b64(key),
                    "target": "MOD",
                    "result": "EQUAL",
                    "mod_revision": kv["mod_revision"],
                }
            step = change(cur)
            if step is None:
                return cur
            kind, data, fields = step
            new = replace(cur, updated=time.time(), **fields)
            written = _edge_value(new)
            ops = [_put(key, written), *self._index_ops(cur, new)]
            if event:
                ops += self._event_ops(edge, kind, data)
            ok, got = self.gateway.txn([compare], ops)
            if ok:
                return replace(new, version=int(got["header"]["revision"]))
        raise Conflict(f"edge {edge} changes too fast; try again")

    # -- writes --------------------------------------------------------------------------

    def register_writer(self, edge: str, node: str, endpoint: str) -> Edge:
        def change(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]]:
            if cur.writer_state == "open" and cur.writer_node != node:
                raise Conflict(f"edge {edge} has an open writer on node {cur.writer_node}")
            gen = cur.generation + 1
            return (
                "writer",
                {"generation": gen, "node": node, "endpoint": endpoint},
                {
                    "generation": gen,
                    "writer_node": node,
                    "writer_endpoint": endpoint,
                    "writer_state": "open",
                    "bytes_written": 0,
                    "reason": "",
                    **writer_came(cur),
                },
            )

        return self._mutate(edge, change, create=True)

    def _current(self, cur: Edge, generation: int) -> None:
        if cur.generation != generation:
            raise Conflict(
                f"generation {generation} of edge {cur.id} is stale (now {cur.generation})"
            )

    def close_writer(
        self, edge: str, generation: int, state: str, written: int, reason: str = ""
    ) -> Edge:
        if state not in ("complete", "failed"):
            raise ValueError(f"writer state {state!r} is not complete or failed")

        def change(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]]:
            self._current(cur, generation)
            data = {
                "generation": generation,
                "bytes": written,
                "reason": reason,
                "duration": round(time.time() - cur.updated, 3),
            }
            return state, data, {"writer_state": state, "bytes_written": written, "reason": reason}

        return self._mutate(edge, change)

    def writer_gone(self, edge: str, node: str, generation: int) -> Edge:
        def change(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
            if not unfinished_for(cur, node, generation):
                return None
            why = gone_reason(cur)
            data = {"generation": generation, "bytes": cur.bytes_written, "reason": why}
            return "failed", data, {"writer_state": "failed", "reason": why}

        return self._mutate(edge, change)

    def claim_reader(self, edge: str, node: str) -> Edge:
        def change(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]]:
            if cur.reader_state == "open" and cur.reader_node != node:
                raise Conflict(f"edge {edge} has an open reader on node {cur.reader_node}")
            claim = secrets.randbits(62) or 1
            fields = {
                "reader_node": node,
                "reader_state": "open",
                "bytes_delivered": 0,
                # Names this claim, so a late release of an older one cannot end it (the
                # SQLite store uses its event's seq; here the event's revision comes after,
                # so the event names it).
                "reader_claim": claim,
                **claim_fields(cur),
            }
            return "reader", {"node": node, "claim": claim}, fields

        return self._mutate(edge, change, create=True)

    def release_reader(
        self, edge: str, node: str, state: str, delivered: int, claim: int = 0, generation: int = 0
    ) -> Edge:
        if state not in READER_STATES - {"none", "open"}:
            raise ValueError(f"reader state {state!r} is not done, closed or failed")

        def change(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
            # Also one its node was taken for lost with: see store.Store.release_reader.
            if cur.reader_node != node or cur.reader_state not in ("open", "lost"):
                return None  # a newer reader owns the edge; this release is late
            if claim and cur.reader_claim != claim:
                return None  # a newer claim of the same node
            data = release_data(node, delivered, generation)
            return f"reader-{state}", data, {"reader_state": state, "bytes_delivered": delivered}

        return self._mutate(edge, change)

    def node_lost(self, node: str, cause: str = "silent") -> list[Edge]:
        changed = []
        for e in self._many(self._held_by(node)).values():
            if e.writer_node == node and e.writer_state == "open":

                def writer_lost(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
                    if cur.writer_node != node or cur.writer_state != "open":
                        return None
                    if cause != "silent":  # see store.Store.node_lost
                        return writer_run_gone(cur, node, cause)
                    data = {"node": node, "generation": cur.generation, "cause": cause}
                    fields = {"writer_state": "lost", "reason": f"node {node} stopped responding"}
                    return "writer-lost", data, fields

                changed.append(self._mutate(e.id, writer_lost))
            if e.reader_node == node and e.reader_state == "open":

                def reader_lost(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
                    if cur.reader_node != node or cur.reader_state != "open":
                        return None
                    data = {"node": node, "cause": cause, "claim": cur.reader_claim}
                    return "reader-lost", data, {"reader_state": "lost"}

                changed.append(self._mutate(e.id, reader_lost))
        if cause != "silent":  # see store.Store.node_lost
            for e in self._many(self._lost_writers_by(node)).values():

                def run_gone(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
                    lost = cur.writer_state == "lost" and cur.writer_endpoint
                    if cur.writer_node != node or not lost:
                        return None
                    return writer_run_gone(cur, node, cause)

                changed.append(self._mutate(e.id, run_gone))
            why = f"node {node} {cause} before a reader read the whole stream"
            complete = self._many(self._undelivered_by(node)).values()
            for e in complete:
                if not read_elsewhere(e):
                    continue

                def gone(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
                    if cur.writer_node != node or not read_elsewhere(cur):
                        return None
                    data = {"node": node, "generation": cur.generation, "cause": cause}
                    return "writer-gone", data, {"writer_endpoint": ""}  # see store.Store

                changed.append(self._mutate(e.id, gone))
            for e in complete:

                def lost_stream(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
                    if cur.writer_node != node or not undelivered(cur):
                        return None
                    data = {"generation": cur.generation, "bytes": cur.bytes_written, "reason": why}
                    return "failed", data, {"writer_state": "failed", "reason": why}

                changed.append(self._mutate(e.id, lost_stream))
        return changed

    def _many(self, edges: list[str]) -> dict[str, Edge]:
        """Reads many edges in few round trips (one transaction of ranges per chunk)."""
        out: dict[str, Edge] = {}
        for i in range(0, len(edges), TXN_OPS):
            chunk = edges[i : i + TXN_OPS]
            ops = [{"request_range": {"key": _b64(self._key(e))}} for e in chunk]
            _, got = self.gateway.txn([], ops)
            for edge, resp in zip(chunk, got.get("responses", []), strict=False):
                kvs = resp.get("response_range", {}).get("kvs", [])
                if kvs:
                    out[edge] = _edge_from(kvs[0], edge)
        return out

    def node_alive(self, node: str, writers: dict[str, int], readers: list[str]) -> list[str]:
        known = self._many(sorted(set(writers) | set(readers)))
        stale = []
        for edge, gen in writers.items():
            cur = known.get(edge)
            if cur is None or cur.generation != gen or cur.writer_node != node:
                stale.append(edge)
            elif cur.writer_state == "lost":

                def back(
                    c: Edge, gen: int = gen
                ) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
                    if c.generation != gen or c.writer_node != node or c.writer_state != "lost":
                        return None
                    data = {"node": node, "generation": gen}
                    return "writer-back", data, {"writer_state": "open", "reason": ""}

                self._mutate(edge, back)
        for edge in readers:
            cur = known.get(edge)
            if cur is not None and cur.reader_node == node and cur.reader_state == "lost":

                def reader_back(c: Edge) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
                    if c.reader_node != node or c.reader_state != "lost":
                        return None
                    return "reader-back", {"node": node}, {"reader_state": "open"}

                self._mutate(edge, reader_back)
        return stale

    def set_mode(self, edge: str, generation: int, mode: str, reason: str) -> Edge:
        def change(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]]:
            self._current(cur, generation)
            data = {"generation": generation, "mode": mode, "reason": reason}
            return "mode", data, {"mode": mode, "mode_reason": reason}

        return self._mutate(edge, change)

    def restore_writer(
        self, edge: str, generation: int, node: str, endpoint: str, complete: bool = True
    ) -> Edge:
        def change(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]]:
            self._current(cur, generation)
            data = {"generation": generation, "node": node, "complete": complete}
            fields = {
                "writer_node": node,
                "writer_endpoint": endpoint,
                "writer_state": "complete" if complete else "failed",
                "reason": "" if complete else "its writer died with its daemon; prefix served",
                **(writer_came(cur) if complete else {}),
            }
            return "restored", data, fields

        return self._mutate(edge, change)

    def record(self, edge: str, kind: str, data: dict[str, Any]) -> None:
        key = self._key(edge)
        exists = {"key": _b64(key), "target": "VERSION", "result": "GREATER", "version": "0"}
        ok, _ = self.gateway.txn([exists], self._event_ops(edge, kind, data))
        if not ok:
            raise NotFound(f"no edge {edge}")

    def progress(self, edge: str, delivered: int) -> None:
        """Bytes delivered; no event. The edge's version moves, which a long-poll on the
        edge sees as a change: it answers with the same states and the client waits again."""

        def change(cur: Edge) -> tuple[str, dict[str, Any], dict[str, Any]]:
            return "", {}, {"bytes_delivered": delivered}

        with contextlib.suppress(NotFound):
            self._mutate(edge, change, event=False)

    def delete(self, edge: str) -> None:
        kv = self._kv(edge)
        if kv is None:
            raise NotFound(f"no edge {edge}")
        key = _b64(self._key(edge))
        same = {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": kv["mod_revision"]}
        ops = [
            {"request_delete_range": {"key": key}},
            *self._index_ops(_edge_from(kv, edge), None),
            *self._event_ops(edge, "deleted", {}),
        ]
        ok, _ = self.gateway.txn([same], ops)
        if not ok and self._kv(edge) is not None:
            self.delete(edge)  # it changed meanwhile: again, with what it is now
        # (gone: deleted by this call's first try, which timed out, or by another at once)

    # -- history ---------------------------------------------------------------------------

    def edges_page(self, after: str, limit: int) -> list[Edge]:
        """The first ``limit`` edges with ids after ``after``, at a cost of O(page).

        etcd 3.4 answers a limited range with the count of the *whole* range, walking its
        index over every key in it: a page of 100 cost 100-300 ms with 200,000 edges (2-3 ms
        for a range holding about 100). Edge ids are 32 random hex digits, evenly spread, so
        the page is read from a span of ids sized by the density of edges seen in earlier
        answers (each range's ``count`` over its span), widened while it holds too few.
        Only the first page a replica serves reads to the end of the keyspace.
        """
        start = f"{self.prefix}e/"
        out: list[dict[str, Any]] = []
        pos = int(after, 16) + 1 if after else 0
        while len(out) < limit and pos < ID_SPACE:
            want = limit - len(out)
            if self._density > 0:
                span = max(1, int(want * 1.25 / self._density))
                end = min(ID_SPACE, pos + span)
            else:
                end = ID_SPACE
            body = {
                "key": _b64(f"{start}{pos:032x}"),
                "range_end": _b64(f"{start}{end:032x}" if end < ID_SPACE else prefix_end(start)),
                "limit": str(want),
            }
            got = self.gateway.call("/v3/kv/range", body)
            kvs = got.get("kvs", [])
            out.extend(kvs)
            count = int(got.get("count", 0))
            if count > len(kvs):  # the page ends inside this span: the count covers it all
                self._density = count / (end - pos)
                break
            if count or end == ID_SPACE:
                self._density = max(count, 1) / (end - pos)
            else:
                self._density /= 4  # an empty span: the edges are sparser than thought
            pos = end
        return [_edge_from(kv, _unb64(kv["key"])[len(start) :]) for kv in out[:limit]]

    def prune(self, before: float) -> int:
        """Forgets edges delivered before ``before``; each delete compares the revision
        read, so a re-run that took the edge meanwhile keeps it."""
        pruned = 0
        for e in self.edges():
            if e.reader_state == "done" and e.updated < before:
                key = _b64(self._key(e.id))
                same = {
                    "key": key,
                    "target": "MOD",
                    "result": "EQUAL",
                    "mod_revision": str(e.version),
                }
                ops = [{"request_delete_range": {"key": key}}, *self._index_ops(e, None)]
                ok, _ = self.gateway.txn([same], ops)
                pruned += ok
        return pruned

    # -- node liveness: one lease per node -----------------------------------------------

    def _node_key(self, node: str) -> str:
        return f"{self.prefix}n/{node}"

    def _boot_key(self, node: str) -> str:
        return f"{self.prefix}b/{node}"

    def node_heartbeat(self, node: str, boot: str, ttl: int) -> str:
        """Keeps ``node``'s lease alive (a new one if it expired); returns the boot id the
        node had before ("" if it never was, or left). The boot id outlives the lease
        (``b/<node>``): a daemon started again after its lease expired is a restart."""
        kvs = self.gateway.range(self._node_key(node))
        before: dict[str, Any] = json.loads(_unb64(kvs[0]["value"])) if kvs else {}
        lease = int(before.get("lease", 0))
        if lease and (not boot or before.get("boot") == boot):
            got = self.gateway.call("/v3/lease/keepalive", {"ID": str(lease)})
            if int(got.get("result", {}).get("TTL", 0)) > 0:
                return str(before.get("boot", ""))
        if not before:  # its lease expired, or it never was
            kept = self.gateway.range(self._boot_key(node))
            if kept:
                before = {"boot": _unb64(kept[0]["value"])}
        lease = int(self.gateway.call("/v3/lease/grant", {"TTL": str(ttl)})["ID"])
        info = json.dumps({"boot": boot or before.get("boot", ""), "lease": lease})
        puts = [_put(self._node_key(node), info, lease)]
        if boot and boot != before.get("boot"):
            puts.append(_put(self._boot_key(node), boot))
        self.gateway.txn([], puts)
        if before.get("lease"):
            with contextlib.suppress(ValueError):  # it may have expired already
                self.gateway.call("/v3/lease/revoke", {"ID": str(before["lease"])})
        return str(before.get("boot", ""))

    def boots(self) -> dict[str, str]:
        return {node: str(info.get("boot", "")) for node, info in self.live_nodes().items()}

    def set_boot(self, node: str, boot: str) -> None:
        """Nothing to do: :meth:`node_heartbeat` keeps the boot id in ``n/<node>``."""

    def forget_boot(self, node: str) -> None:
        """The node left (or stayed lost past the retention): ``n/<node>`` goes with its
        lease (:meth:`node_leave`), ``b/<node>`` here."""
        self.gateway.txn([], [{"request_delete_range": {"key": _b64(self._boot_key(node))}}])

    def node_leave(self, node: str) -> None:
        self.gateway.call("/v3/kv/deleterange", {"key": _b64(self._boot_key(node))})
        kvs = self.gateway.range(self._node_key(node))
        if kvs:
            lease = json.loads(_unb64(kvs[0]["value"])).get("lease", 0)
            self.gateway.call("/v3/lease/revoke", {"ID": str(lease)})

    def node_is_live(self, node: str) -> bool:
        return bool(self.gateway.range(self._node_key(node)))

    def live_nodes(self) -> dict[str, dict[str, Any]]:
        start = f"{self.prefix}n/"
        return {
            _unb64(kv["key"])[len(start) :]: json.loads(_unb64(kv["value"]))
            for kv in self.gateway.range(start, prefix_end(start))
        }
