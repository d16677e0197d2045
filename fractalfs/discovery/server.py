"""The discovery server: an aiohttp JSON API over :class:`~.store.Store`.

Versioned paths (``/v1/...``). Every body is a bounded JSON object, every id is checked, and
every bad request gets a 4xx with a one-line reason in ``{"error": ...}``. Waiting is a
long-poll (``?wait=SECONDS&since=VERSION``) answered the moment the edge changes, so a reader
learns of its writer in one round trip instead of upstream's 1 s sleep loop.

The server runs on its own asyncio loop: in the foreground (``fractalfs discovery``) or in a
thread of the node daemon (:class:`EmbeddedDiscovery`), never on the daemon's trio loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import secrets
import signal
import ssl
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from ..auth import check_basic
from ..edgeid import EdgeId
from . import guard, limits, schema, upkeep
from .backend import DiscoveryStore, open_store
from .etcd import cap_event_data
from .heartbeat import NODE_HEADER, Delta, HeldEnds
from .limits import DEFAULT_LIMITS, Limits
from .store import Conflict, Edge, NotFound

log = logging.getLogger(__name__)

API = "/v1"
MAX_BODY = 64 * 1024
MAX_WAIT = 60.0
MAX_NAME = 255
NODE_EVENTS = schema.NODE_EVENTS
NODE_TIMEOUT = 1.5  # a node silent this long is lost (daemons heartbeat every 0.5 s)
PULSE_REFRESH = 0.5  # a pulse refreshes a live node's record at most this often
MAX_ENDS = 100_000
LIMITS = web.AppKey("limits", Limits)
MAX_INT = 2**63 - 1  # SQLite INTEGER; anything larger is a client's mistake, not a 500
MAX_PAGE = 10_000
FEED = 20_000  # edge changes the feed remembers (GET /v1/changes); older positions resync

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


class BadRequest(Exception):
    """The client's request is malformed (HTTP 400)."""


class Changes:
    """Wakes long-polls: one asyncio.Event per change epoch for waiters on anything (event
    streams), and one per edge for waiters on that edge, so a change of one edge does not
    wake (and re-query for) the waiters of every other edge."""

    def __init__(self, max_waiters: int = Limits.max_waiters) -> None:
        self._event = asyncio.Event()
        self.held = 0  # long-polls waiting now (capped: max_waiters)
        self.max_waiters = max_waiters
        self._edges: dict[str, tuple[asyncio.Event, int]] = {}  # edge -> (event, waiters)
        # The feed of changed edges (GET /v1/changes): one long-poll per daemon learns
        # which edges changed, instead of one long-poll per waiting reader. Positions are
        # this process's own (``feed`` names it): another replica's answer a resync.
        self.feed = secrets.token_hex(8)
        self.seq = 0
        self._feed: deque[tuple[int, str]] = deque(maxlen=FEED)  # (seq, edge or "*")

    def notify(self, edge: str | None = None, *, feed: bool = True) -> None:
        """A change of ``edge`` (None: of any number of edges; "": an event only).
        ``feed`` False: a change no reader's pump looks at (the reader side of the edge:
        a claim, a release, its node lost or back); the edge's own waiters are woken,
        the feed of changes does not name it."""
        if edge != "" and feed:
            self.seq += 1
            self._feed.append((self.seq, "*" if edge is None else edge))
        self._event.set()
        self._event = asyncio.Event()
        if edge is None:
            for event, _ in self._edges.values():
                event.set()
            self._edges.clear()
        elif edge in self._edges:
            self._edges.pop(edge)[0].set()

    def _edge_event(self, edge: str) -> asyncio.Event:
        event, waiters = self._edges.get(edge, (asyncio.Event(), 0))
        self._edges[edge] = (event, waiters + 1)
        return event

    def _done_waiting(self, edge: str, event: asyncio.Event) -> None:
        got = self._edges.get(edge)
        if got is not None and got[0] is event:
            if got[1] <= 1:
                del self._edges[edge]
            else:
                self._edges[edge] = (event, got[1] - 1)

    def changed_since(self, after: int) -> tuple[list[str], bool] | None:
        """The edges changed after position ``after`` (and whether "every edge" is among
        them), or None if the feed no longer reaches back that far."""
        if after > self.seq or (self._feed and self._feed[0][0] > after + 1):
            return None
        if not self._feed and after < self.seq:
            return None
        edges: dict[str, None] = {}
        every = False
        for seq, edge in reversed(self._feed):
            if seq <= after:
                break
            if edge == "*":
                every = True
            else:
                edges[edge] = None
        return list(edges), every

    def waiting(self) -> int:
        """Edges with a waiter (for tests: nothing leaks)."""
        return len(self._edges)

    async def wait_until(
        self,
        ready: Callable[[], bool | Awaitable[bool]],
        timeout: float,
        edge: str | None = None,
    ) -> None:
        """Returns once ``ready()`` (a plain or an async predicate) is true, or after
        ``timeout`` seconds; looks again at each change (of ``edge``, if given)."""
        if self.held >= self.max_waiters:
            return  # too many held already: answer now, the client polls again
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.held += 1

        async def check() -> bool:
            got = ready()
            return bool(await got) if inspect.isawaitable(got) else bool(got)

        try:
            while not await check():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                event = self._event if edge is None else self._edge_event(edge)
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except TimeoutError:
                    return
                finally:
                    if edge is not None:
                        self._done_waiting(edge, event)
        finally:
            self.held -= 1


def _edge_id(request: web.Request) -> str:
    text = request.match_info["edge"]
    if not EdgeId.is_valid(text):
        raise BadRequest(f"{text!r} is not an edge id (32 lowercase hex digits)")
    return text


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    raw = await limits.read_body(request, request.app[LIMITS].body_timeout)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = body.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value) or len(value) > MAX_NAME:
        raise BadRequest(f"field {key!r} must be a non-empty string of at most {MAX_NAME} chars")
    return value


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise BadRequest(f"field {key!r} must be an integer from 0 to 2**63-1")
    return value


def _bounded(data: dict[str, Any]) -> bool:
    """A flat object whose numbers fit SQLite and JSON consumers (node event details)."""
    for value in data.values():
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            return False
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            return False
    return True


def _query_number(request: web.Request, key: str, default: float, cap: float) -> float:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"query {key!r} must be a number") from None
    if not 0 <= value <= cap:
        raise BadRequest(f"query {key!r} must be between 0 and {cap:g}")
    return value


def _edge_json(edge: str, record: Edge | None) -> dict[str, Any]:
    if record is None:
        return {"id": edge, "exists": False, "version": 0, "generation": 0}
    out = record.to_json()
    out["exists"] = True
    return out


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except Conflict as exc:
        return web.json_response({"error": str(exc)}, status=409)
    except NotFound as exc:
        return web.json_response({"error": str(exc)}, status=404)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)


class DiscoveryApp:
    def __init__(
        self,
        store: DiscoveryStore,
        node_timeout: float = NODE_TIMEOUT,
        retention: float = upkeep.RETENTION,
        secret: bytes | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.store = store
        self.retention = retention
        self._upkeep: asyncio.Task[None] | None = None
        self.secret = secret  # None: no authentication (loopback or --insecure only)
        self.limits = limits
        self.subscribers = 0
        self.changes = Changes(limits.max_waiters)
        self.node_timeout = node_timeout
        self.last_seen: dict[str, float] = {}
        self.lost: set[str] = set()
        self.boots: dict[str, str] = {}  # node -> boot id of the daemon run heard from last
        self.held = HeldEnds()  # what each node's run holds, from its heartbeats
        self._checker: asyncio.Task[None] | None = None

    async def _do(self, call: Callable[..., T], *args: Any) -> T:
        """Runs one store call. SQLite answers in microseconds: on the loop. A store across
        the network (etcd, :mod:`.replicated`) runs it in a worker thread instead, so that
        one slow answer (an election) does not hold every other request."""
        return call(*args)

    async def _start_liveness(self, app: web.Application) -> None:
        # Nodes that held ends before a restart get one timeout to say they are still there.
        now = asyncio.get_running_loop().time()
        for node in await self._do(self.store.nodes_with_open_ends):
            self.last_seen.setdefault(node, now)
        # And the run each was: a daemon restarted while discovery was down is a restart.
        self.boots = {**await self._do(self.store.boots), **self.boots}
        self._checker = asyncio.create_task(self._check_liveness())

    async def _stop_liveness(self, app: web.Application) -> None:
        if self._checker is not None:
            self._checker.cancel()

    async def _start_upkeep(self, app: web.Application) -> None:
        self._upkeep = asyncio.create_task(upkeep.prune_forever(self, self.retention))

    async def _stop_upkeep(self, app: web.Application) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()

    async def _check_liveness(self) -> None:
        loop = asyncio.get_running_loop()
        every = self.node_timeout / 6
        last = loop.time()
        skipped = False
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            late, last = now - last - every, now
            if late > every / 2 and not skipped:
                # Discovery's own loop was held (a listing of 10,000 edges, a slow disk,
                # no CPU): the requests that came meanwhile wait unread in its sockets, and
                # this check runs before their handlers. Its silence is not theirs: read
                # them first, judge at the next tick (at most one tick in a row is skipped,
                # so a real death is seen one tick later, not a stall later).
                skipped = True
                continue
            skipped = False
            for node, seen in list(self.last_seen.items()):
                if node not in self.lost and now - seen > self.node_timeout:
                    await self._lose(node, "silent", f"silent for {now - seen:.1f} s")

    async def _lose(self, node: str, cause: str, why: str = "") -> None:
        self.lost.add(node)
        if cause != "silent":
            self.held.forget(node)
        changed = await self._do(self.store.node_lost, node, cause)
        log.warning("node %s lost (%s); %d edges affected", node, why or cause, len(changed))
        # Each edge it changed, by name: waiters (and the feed's followers) of other edges
        # are not woken; the event streams are woken by any change.
        self._ends_changed(
            node,
            [e.id for e in changed if e.writer_node == node],
            [e.id for e in changed if e.reader_node == node],
        )

    def _changed(self, edge: str | None = None, *, feed: bool = True) -> None:
        self.changes.notify(edge, feed=feed)

    def _ends_changed(self, node: str, writers: Iterable[str], readers: Iterable[str]) -> None:
        """``node``'s ends changed (lost, back): each edge by name, and in the feed only
        where the writer's side changed (a reader's pump looks at nothing else). At
        10,000 ends, "every edge changed" woke every waiting reader of every daemon."""
        writers = set(writers)
        for edge in writers:
            self._changed(edge)
        for edge in readers:
            if edge not in writers:
                self._changed(edge, feed=False)
        self._changed("")  # the event streams

    def app(self) -> web.Application:
        @web.middleware
        async def sign_of_life(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._sign_of_life(request, handler)

        # The guard first: a sign of life counts only from a node that proved who it is.
        middlewares: list[Any] = [sign_of_life, _errors]
        if self.secret is not None:
            get = functools.partial(self._do, self.store.get)
            guarded = guard.middleware(self.secret, get, self.limits.body_timeout)
            middlewares.insert(0, guarded)
        app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
        app[LIMITS] = self.limits
        r = app.router
        r.add_get(f"{API}/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_get("/", self.status_page)
        r.add_get(f"{API}/edges", self.list_edges)
        r.add_get(f"{API}/edges/{{edge}}", self.get_edge)
        r.add_get(f"{API}/changes", self.edge_changes)
        r.add_delete(f"{API}/edges/{{edge}}", self.delete_edge)
        r.add_post(f"{API}/edges/{{edge}}/writer", self.register_writer)
        r.add_post(f"{API}/edges/{{edge}}/writer/close", self.close_writer)
        r.add_post(f"{API}/edges/{{edge}}/writer/gone", self.writer_gone)
        r.add_post(f"{API}/edges/{{edge}}/reader", self.claim_reader)
        r.add_post(f"{API}/edges/{{edge}}/reader/close", self.release_reader)
        r.add_post(f"{API}/edges/{{edge}}/progress", self.progress)
        r.add_post(f"{API}/edges/{{edge}}/mode", self.set_mode)
        r.add_post(f"{API}/edges/{{edge}}/writer/restore", self.restore_writer)
        r.add_get(f"{API}/events", self.events)
        r.add_get(f"{API}/events/stream", self.event_stream)
        r.add_post(f"{API}/edges/{{edge}}/event", self.node_event)
        r.add_get(f"{API}/nodes", self.list_nodes)
        r.add_post(f"{API}/nodes/{{node}}/heartbeat", self.heartbeat)
        r.add_post(f"{API}/nodes/{{node}}/leave", self.leave)
        r.add_post(f"{API}/nodes/{{node}}/pulse", self.pulse)
        app.on_startup.append(self._start_liveness)
        app.on_cleanup.append(self._stop_liveness)
        app.on_startup.append(self._start_upkeep)
        app.on_cleanup.append(self._stop_upkeep)
        return app

    async def _sign_of_life(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Busy is not dead: any request a daemon makes (a registration, a long-poll, a
        progress report) shows it is alive, not only its heartbeat, which a daemon busy
        with thousands of edges may send late."""
        node = request.headers.get(NODE_HEADER)
        who = request.get("principal")  # unset on open routes (/v1/health) even with a secret
        if self.secret is not None and (who is None or not who.may_act_as(node or "")):
            node = None  # with a secret, only a node's own credential shows it alive
        if node and node in self.last_seen and node not in self.lost:
            await self._alive(node)
        return await handler(request)

    async def _alive(self, node: str) -> None:
        self.last_seen[node] = asyncio.get_running_loop().time()

    def _node_name(self, request: web.Request) -> str:
        name = request.match_info["node"]
        if not 0 < len(name) <= MAX_NAME:
            raise BadRequest(f"node name must be 1 to {MAX_NAME} characters")
        return name

    async def heartbeat(self, request: web.Request) -> web.Response:
        node = self._node_name(request)
        body = await _body(request)
        writers = body.get("writers", {})
        readers = body.get("readers", [])
        if not isinstance(writers, dict) or len(writers) > MAX_ENDS:
            raise BadRequest("field 'writers' must be an object of edge id -> generation")
        if not isinstance(readers, list) or len(readers) > MAX_ENDS:
            raise BadRequest("field 'readers' must be a list of edge ids")
        for edge, gen in writers.items():
            if (
                not EdgeId.is_valid(edge)
                or not isinstance(gen, int)
                or isinstance(gen, bool)
                or not 0 <= gen <= MAX_INT
            ):
                raise BadRequest(f"bad writer entry {edge!r}: {gen!r}")
        for edge in readers:
            if not isinstance(edge, str) or not EdgeId.is_valid(edge):
                raise BadRequest(f"bad reader entry {edge!r}")
        boot = body.get("boot", "")
        if not isinstance(boot, str) or len(boot) > MAX_NAME:
            raise BadRequest("field 'boot' must be a string")
        delta = Delta.from_json(body["delta"]) if "delta" in body else None
        was_lost = node in self.lost
        await self._seen(node, boot)
        if delta is not None:  # only what changed since the last beat: see heartbeat.py
            checked = self.held.receive(node, boot, delta, everything=was_lost)
            if checked is None:
                return web.json_response({"stale": [], "resync": True})
            writers, readers = checked
        before = await self._do(self.store.last_seq)
        stale = await self._do(self.store.node_alive, node, writers, readers)
        if was_lost:
            log.info("node %s is back", node)
        if await self._do(self.store.last_seq) != before:
            self._ends_changed(node, writers, readers)
        return web.json_response({"stale": stale})

    async def pulse(self, request: web.Request) -> web.Response:
        """``{"boot": B}``: run B of the node is alive (from a thread of its daemon, on time
        however busy its loop is: see :mod:`fractalfs.pulse`). A node declared lost that
        pulses is back: the ends its run held (as its heartbeats told) are open again.
        A run discovery has not heard a heartbeat from is not taken (``alive: false``):
        the heartbeat introduces a run (and tells a restart)."""
        node = self._node_name(request)
        body = await _body(request)
        boot = body.get("boot", "")
        if not isinstance(boot, str) or not 0 < len(boot) <= MAX_NAME:
            raise BadRequest(f"field 'boot' must be a string of 1 to {MAX_NAME} characters")
        if not await self._takes_pulse(node, boot):
            return web.json_response({"alive": False})
        was_lost = node in self.lost
        now = asyncio.get_running_loop().time()
        if was_lost or now - self.last_seen.get(node, 0.0) >= PULSE_REFRESH:
            await self._seen(node, boot)
        if was_lost:
            await self._back(node, boot)
        return web.json_response({"alive": True})

    async def _takes_pulse(self, node: str, boot: str) -> bool:
        return node in self.last_seen and self.boots.get(node) == boot

    async def _back(self, node: str, boot: str) -> None:
        """``node`` was declared lost and is alive: what its run held is open again."""
        ends = self.held.known(node, boot)
        if ends is None:  # not known here: its next heartbeat resyncs and re-asserts all
            log.info("node %s is back (pulse); its ends come with its next heartbeat", node)
            return
        before = await self._do(self.store.last_seq)
        readers = sorted(ends.readers)
        await self._do(self.store.node_alive, node, dict(ends.writers), readers)
        log.info(
            "node %s is back (pulse); %d ends re-asserted",
            node,
            len(ends.writers) + len(ends.readers),
        )
        if await self._do(self.store.last_seq) != before:
            self._ends_changed(node, ends.writers, readers)

    async def _seen(self, node: str, boot: str) -> None:
        """A heartbeat from ``node``'s daemon run ``boot``: it is alive."""
        if boot and self.boots.get(node, boot) != boot:
            # A new run of the daemon: whatever the old one held is gone with it.
            await self._lose(node, "restarted")
        if boot and self.boots.get(node) != boot:
            self.boots[node] = boot
            await self._do(self.store.set_boot, node, boot)
        self.last_seen[node] = asyncio.get_running_loop().time()
        self.lost.discard(node)

    async def leave(self, request: web.Request) -> web.Response:
        node = self._node_name(request)
        self.last_seen.pop(node, None)
        self.boots.pop(node, None)
        await self._do(self.store.forget_boot, node)
        await self._lose(node, "left")
        self.lost.discard(node)
        return web.json_response({"node": node})

    async def list_nodes(self, request: web.Request) -> web.Response:
        now = asyncio.get_running_loop().time()
        return web.json_response(
            {
                "nodes": [
                    {"node": n, "alive": n not in self.lost, "last_seen_ago": round(now - t, 3)}
                    for n, t in sorted(self.last_seen.items())
                ]
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import GaugeMetricFamily

        app = self
        all_edges = await self._do(self.store.edges)
        last_seq = await self._do(self.store.last_seq)

        class Collector:
            def collect(self) -> Any:
                by_state = GaugeMetricFamily(
                    "fractalfs_discovery_edges", "Edges by state", labels=["state"]
                )
                counts: dict[str, int] = {}
                for edge in all_edges:
                    counts[edge.state] = counts.get(edge.state, 0) + 1
                for state, n in sorted(counts.items()):
                    by_state.add_metric([state], n)
                yield by_state
                nodes = GaugeMetricFamily(
                    "fractalfs_discovery_nodes", "Nodes by liveness", labels=["alive"]
                )
                alive = sum(1 for n in app.last_seen if n not in app.lost)
                nodes.add_metric(["true"], alive)
                nodes.add_metric(["false"], len(app.last_seen) - alive)
                yield nodes
                events = GaugeMetricFamily("fractalfs_discovery_last_event", "Event log head")
                events.add_metric([], last_seq)
                yield events

        registry = CollectorRegistry()
        registry.register(Collector())
        return web.Response(
            body=generate_latest(registry), content_type="text/plain", charset="utf-8"
        )

    async def status_page(self, request: web.Request) -> web.Response:
        page = (Path(__file__).parent / "static" / "status.html").read_text()
        return web.Response(text=page, content_type="text/html")

    async def health(self, request: web.Request) -> web.Response:
        """Open to anyone (load balancers, probes); the event log's head (how much the
        cluster does) only to whoever proves the secret."""
        if self.secret is not None:
            header = request.headers.get("Authorization", "")
            if check_basic(self.secret, header) is None:
                return web.json_response({"ok": True})
        return web.json_response({"ok": True, "last_event": await self._do(self.store.last_seq)})

    async def list_edges(self, request: web.Request) -> web.Response:
        """Every edge, or with ``?limit=N[&after=ID]`` one page in id order and the id to
        continue after (``next``, null on the last page)."""
        if "limit" not in request.query:
            edges = await self._do(self.store.edges)
            return web.json_response({"edges": [_edge_json(e.id, e) for e in edges]})
        limit = int(_query_number(request, "limit", 1000, MAX_PAGE))
        after = request.query.get("after", "")
        if after and not EdgeId.is_valid(after):
            raise BadRequest(f"query 'after' must be an edge id, not {after!r}")
        page = await self._do(self.store.edges_page, after, max(limit, 1))
        more = len(page) == max(limit, 1)
        return web.json_response(
            {"edges": [_edge_json(e.id, e) for e in page], "next": page[-1].id if more else None}
        )

    async def get_edge(self, request: web.Request) -> web.Response:
        edge = _edge_id(request)
        wait = _query_number(request, "wait", 0.0, MAX_WAIT)
        since = _query_number(request, "since", -1, 2**62)
        if wait > 0:

            async def changed() -> bool:
                rec = await self._do(self.store.get, edge)
                return (rec.version if rec else 0) > since

            await self.changes.wait_until(changed, wait, edge)
        return web.json_response(_edge_json(edge, await self._do(self.store.get, edge)))

    async def edge_changes(self, request: web.Request) -> web.Response:
        """``GET /v1/changes?feed=F&after=SEQ&wait=S``: which edges changed after position
        SEQ of feed F, answered the moment one does (or after S seconds, with none).

        ``{"feed": F, "seq": N, "edges": [ids], "all": bool, "resync": bool}``: continue
        with ``after=N``. ``all``: a change touched edges it does not name (a node was
        lost). ``resync``: F is not this server's feed (a restart, another replica) or SEQ
        is too old; the caller looks at every edge it waits for once, then follows from N.
        """
        changes = self.changes
        after = int(_query_number(request, "after", -1, 2**62))
        wait = _query_number(request, "wait", 0.0, MAX_WAIT)
        if request.query.get("feed", "") != changes.feed or after < 0:
            return web.json_response(
                {
                    "feed": changes.feed,
                    "seq": changes.seq,
                    "edges": [],
                    "all": False,
                    "resync": True,
                }
            )
        if wait > 0:
            await changes.wait_until(lambda: changes.seq > after, wait)
        got = changes.changed_since(after)
        if got is None:
            return web.json_response(
                {
                    "feed": changes.feed,
                    "seq": changes.seq,
                    "edges": [],
                    "all": False,
                    "resync": True,
                }
            )
        edges, every = got
        return web.json_response(
            {
                "feed": changes.feed,
                "seq": changes.seq,
                "edges": edges,
                "all": every,
                "resync": False,
            }
        )

    async def delete_edge(self, request: web.Request) -> web.Response:
        edge = _edge_id(request)
        await self._do(self.store.delete, edge)
        self._changed(edge)
        return web.json_response({"id": edge, "deleted": True})

    async def register_writer(self, request: web.Request) -> web.Response:
        edge = _edge_id(request)
        body = await _body(request)
        mode = body.get("mode")
        if mode is not None and mode not in ("transient", "persistent"):
            raise BadRequest("field 'mode' must be transient or persistent")
        reason = _str(body, "reason", required=False)
        rec = await self._do(
            self.store.register_writer, edge, _str(body, "node"), _str(body, "endpoint")
        )
        if mode is not None:  # the new generation's mode, in the same request (one, not two)
            rec = await self._do(self.store.set_mode, edge, rec.generation, mode, reason)
        self._changed(edge)
        return web.json_response(_edge_json(edge, rec))

    async def close_writer(self, request: web.Request) -> web.Response:
        edge = _edge_id(request)
        body = await _body(request)
        rec = await self._do(
            self.store.close_writer,
            edge,
            _int(body, "generation"),
            _str(body, "state"),
            _int(body, "bytes"),
            _str(body, "reason", required=False),
        )
        self._changed(edge)
        return web.json_response(_edge_json(edge, rec))

    async def writer_gone(self, request: web.Request) -> web.Response:
        """``{"node": N, "generation": G}``: the reader on N lacks the END of complete
        generation G, whose writer's daemon run is gone (a ``writer-gone`` event told it):
        G fails, so that the writer is re-run."""
        edge = _edge_id(request)
        body = await _body(request)
        rec = await self._do(
            self.store.writer_gone, edge, _str(body, "node"), _int(body, "generation")
        )
        self._changed(edge)
        return web.json_response(_edge_json(edge, rec))

    async def claim_reader(self, request: web.Request) -> web.Response:
        edge = _edge_id(request)
        body = await _body(request)
        rec = await self._do(self.store.claim_reader, edge, _str(body, "node"))
        self._changed(edge, feed=False)  # no reader's pump looks at the reader side
        return web.json_response(_edge_json(edge, rec))

    async def release_reader(self, request: web.Request) -> web.Response:
        edge = _edge_id(request)
        body = await _body(request)
        claim = _int(body, "claim") if "claim" in body else 0
        generation = _int(body, "generation") if "generation" in body else 0
        rec = await self._do(
            self.store.release_reader,
            edge,
            _str(body, "node"),
            _str(body, "state"),
            _int(body, "bytes"),
            claim,
            generation,
        )
        self._changed(edge, feed=False)  # no reader's pump looks at the reader side
        return web.json_response(_edge_json(edge, rec))

    async def set_mode(self, request: web.Request) -> web.Response:
        edge = _edge_id(request)
        body = await _body(request)
        mode = _str(body, "mode")
        if mode not in ("transient", "persistent"):
            raise BadRequest("field 'mode' must be transient or persistent")
        rec = await self._do(
            self.store.set_mode,
            edge,
            _int(body, "generation"),
            mode,
            _str(body, "reason", required=False),
        )
        self._changed(edge)
        return web.json_response(_edge_json(edge, rec))

    async def restore_writer(self, request: web.Request) -> web.Response:
        edge = _edge_id(request)
        body = await _body(request)
        complete = body.get("complete", True)
        if not isinstance(complete, bool):
            raise BadRequest("field 'complete' must be true or false")
        rec = await self._do(
            self.store.restore_writer,
            edge,
            _int(body, "generation"),
            _str(body, "node"),
            _str(body, "endpoint"),
            complete,
        )
        self._changed(edge)
        return web.json_response(_edge_json(edge, rec))

    async def progress(self, request: web.Request) -> web.Response:
        edge = _edge_id(request)
        body = await _body(request)
        await self._do(self.store.progress, edge, _int(body, "bytes"))
        return web.json_response({"id": edge})

    async def node_event(self, request: web.Request) -> web.Response:
        edge = _edge_id(request)
        body = await _body(request)
        kind = _str(body, "kind")
        if kind not in NODE_EVENTS:
            raise BadRequest(f"field 'kind' must be one of {sorted(NODE_EVENTS)}")
        data = body.get("data", {})
        if not isinstance(data, dict) or not _bounded(data):
            raise BadRequest("field 'data' must be an object of strings, numbers and booleans")
        data = cap_event_data(data)
        await self._do(self.store.record, edge, kind, data)
        self._changed(edge)
        return web.json_response({"id": edge})

    async def event_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: every event from ``Last-Event-ID`` (or ``?after=``) on."""
        after = int(_query_number(request, "after", -1, 2**62))
        last_id = request.headers.get("Last-Event-ID", "")
        if last_id.isascii() and last_id.isdigit() and len(last_id) <= 18:
            after = int(last_id)
        elif last_id:
            raise BadRequest("header 'Last-Event-ID' must be an event number")
        if after < 0:
            after = await self._do(self.store.last_seq)  # only what happens from now on
        if self.subscribers >= self.limits.max_subscribers:
            return web.json_response(
                {"error": f"too many event-stream subscribers ({self.subscribers})"}, status=503
            )
        self.subscribers += 1
        try:
            return await self._stream_events(request, after)
        finally:
            self.subscribers -= 1

    async def _stream_events(self, request: web.Request, after: int) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        await resp.write(b"retry: 1000\n\n")
        while True:
            for event in await self._do(self.store.events, after):
                payload = json.dumps(event.to_json())
                await resp.write(
                    f"id: {event.seq}\nevent: {event.kind}\ndata: {payload}\n\n".encode()
                )
                after = event.seq
            await self.changes.wait_until(functools.partial(self._newer_than, after), 15.0)
            if await self._do(self.store.last_seq) <= after:
                await resp.write(b": keep-alive\n\n")

    async def _newer_than(self, seq: int) -> bool:
        return await self._do(self.store.last_seq) > seq

    async def events(self, request: web.Request) -> web.Response:
        after = int(_query_number(request, "after", 0, 2**62))
        wait = _query_number(request, "wait", 0.0, MAX_WAIT)
        if wait > 0:
            await self.changes.wait_until(functools.partial(self._newer_than, after), wait)
        events = await self._do(self.store.events, after)
        # "last" is where the next request continues: the last event returned (more may
        # be pending beyond one page), or the head when there is nothing after ``after``
        # (also when the log restarted below it).
        last = events[-1].seq if events else await self._do(self.store.last_seq)
        return web.json_response({"events": [e.to_json() for e in events], "last": last})


def parse_listen(text: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``:PORT``; raises ValueError with a reason."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} out of range in {text!r}")
    return host, number


def make_app(
    store: DiscoveryStore,
    retention: float = upkeep.RETENTION,
    secret: bytes | None = None,
    lim: Limits = DEFAULT_LIMITS,
) -> DiscoveryApp:
    from .etcd import EtcdStore

    if isinstance(store, EtcdStore):
        from .replicated import EtcdDiscoveryApp

        return EtcdDiscoveryApp(store, retention=retention, secret=secret, limits=lim)
    return DiscoveryApp(store, retention=retention, secret=secret, limits=lim)


async def start(
    store: DiscoveryStore,
    host: str,
    port: int,
    secret: bytes | None = None,
    lim: Limits = DEFAULT_LIMITS,
    retention: float = upkeep.RETENTION,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, str]:
    """Starts serving; returns the runner and the URL actually bound (port 0 resolved).

    ``ssl_context``: serve HTTPS (``--tls-dir``, see :mod:`fractalfs.tls`)."""
    app = make_app(store, retention, secret, lim).app()
    admission = app[limits.ADMISSION] = limits.Admission(lim)  # the guard calls its prove
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=1.0, keepalive_timeout=lim.keepalive_timeout
    )
    await runner.setup()
    assert runner.server is not None
    admission.install(runner.server)
    site: web.TCPSite
    if ssl_context is not None:  # its TLS handshakes count against the cap too
        site = limits.TlsSite(runner, host, port, admission, ssl_context)
    else:
        site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    scheme = "https" if ssl_context is not None else "http"
    return runner, f"{scheme}://{shown}:{bound[1]}"


async def serve_forever(
    db: str,
    host: str,
    port: int,
    ready: Callable[[str], None] | None = None,
    secret: bytes | None = None,
    lim: Limits = DEFAULT_LIMITS,
    retention: float = upkeep.RETENTION,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    store = open_store(db)
    runner, url = await start(store, host, port, secret, lim, retention, ssl_context)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)  # graceful: close the store, exit 0
    if ready:
        ready(url)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
        store.close()


class EmbeddedDiscovery:
    """A discovery server on its own asyncio loop in a daemon thread of the node process."""

    def __init__(
        self,
        db: str,
        host: str,
        port: int,
        secret: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._args = (db, host, port)
        self._secret = secret
        self._ssl = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)
        self.url = ""
        self.error: BaseException | None = None

    def start(self) -> str:
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise self.error
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        db, host, port = self._args
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            store = open_store(db)
            runner, self.url = await start(store, host, port, self._secret, ssl_context=self._ssl)
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            store.close()
