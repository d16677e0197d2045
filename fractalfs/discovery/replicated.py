"""A stateless discovery replica in front of etcd.

What a single SQLite discovery keeps in its memory, a replica keeps in etcd, so any replica
can answer any request and any number of them can run at once:

* a node is alive while its lease lives: each heartbeat (to whichever replica) keeps it
  alive, and when the node falls silent for the lease's TTL etcd deletes ``n/<node>``;
  every replica's watch sees the delete and marks the node's open ends lost (the marking is
  a compare-and-swap per edge, so two replicas doing it at once change each edge once);
* long-polls and SSE streams are woken by one etcd watch per replica on the whole prefix,
  so a change written through one replica wakes the waiters of every other one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from .etcd import EtcdStore, EtcdUnavailable, prefix_end
from .limits import DEFAULT_LIMITS, Limits
from .server import NODE_TIMEOUT, DiscoveryApp, Handler
from .upkeep import RETENTION

log = logging.getLogger(__name__)

MIN_TTL = 2  # etcd rounds a shorter lease up (its minimum is 1.5 x the election timeout)
STORE_THREADS = 64  # etcd calls in flight at once; each may wait out an election
T = TypeVar("T")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@web.middleware
async def _unavailable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No etcd member answered: 503, which tells a node to try another replica."""
    try:
        return await handler(request)
    except EtcdUnavailable as exc:
        return web.json_response({"error": str(exc)}, status=503)


class EtcdDiscoveryApp(DiscoveryApp):
    store: EtcdStore

    def __init__(
        self,
        store: EtcdStore,
        node_timeout: float = NODE_TIMEOUT,
        retention: float = RETENTION,
        secret: bytes | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(store, node_timeout, retention, secret, limits)
        self.ttl = max(MIN_TTL, math.ceil(node_timeout))
        self._tasks: list[asyncio.Task[None]] = []
        self.watching = asyncio.Event()
        self._pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="etcd")

    async def _do(self, call: Callable[..., T], *args: Any) -> T:
        """Every etcd call runs in a worker thread: a request waiting out an election
        (or a dead member's timeout) holds one thread, not the replica's loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(call, *args))

    def app(self) -> web.Application:
        app = super().app()
        # Outermost: the guard reads the store too (who is an edge's writer).
        app.middlewares.insert(0, _unavailable)
        app.on_cleanup.append(self._stop_pool)  # last: after every task that calls etcd
        return app

    async def _stop_pool(self, app: web.Application) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _start_liveness(self, app: web.Application) -> None:
        self._tasks = [
            asyncio.create_task(self._watch_forever()),
            asyncio.create_task(self._lose_orphans()),
        ]

    async def _stop_liveness(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _seen(self, node: str, boot: str) -> None:
        before = await self._do(self.store.node_heartbeat, node, boot, self.ttl)
        if boot and before and before != boot:
            # A new run of the daemon: the old one's ends are gone.
            await self._lose(node, "restarted")
        self.last_seen[node] = asyncio.get_running_loop().time()
        self.lost.discard(node)

    async def _takes_pulse(self, node: str, boot: str) -> bool:
        # Another replica may have taken the node's heartbeats: etcd's lease decides, and
        # _seen tells a new run (as a heartbeat does).
        return True

    async def _alive(self, node: str) -> None:
        # Any request keeps the lease alive too, but at most once per half second.
        now = asyncio.get_running_loop().time()
        if now - self.last_seen.get(node, 0.0) >= 0.5:
            self.last_seen[node] = now
            await self._do(self.store.node_heartbeat, node, "", self.ttl)

    async def leave(self, request: web.Request) -> web.Response:
        resp = await super().leave(request)
        await self._do(self.store.node_leave, self._node_name(request))
        return resp

    async def list_nodes(self, request: web.Request) -> web.Response:
        live = await self._do(self.store.live_nodes)
        names = sorted(set(live) | set(self.last_seen))
        return web.json_response({"nodes": [{"node": n, "alive": n in live} for n in names]})

    async def _lose_orphans(self) -> None:
        """Ends held by nodes that never heartbeat again after discovery started (e.g. the
        whole cluster restarted) are lost once a lease would have expired."""
        await asyncio.sleep(self.ttl + 1)
        holding = await self._do(self.store.nodes_with_open_ends)
        for node in holding - set(await self._do(self.store.live_nodes)):
            await self._lose(node, "silent", "no lease")

    async def _watch_forever(self) -> None:
        """One watch on the whole prefix, resumed after the last revision seen on another
        member when the one it was on goes away."""
        revision = 0
        member = 0
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                url = self.store.endpoints[member % len(self.store.endpoints)] + "/v3/watch"
                try:
                    revision = await self._watch(http, url, revision)
                except (aiohttp.ClientError, OSError, ValueError) as exc:
                    log.info("etcd watch on %s ended (%s); next member", url, exc)
                member += 1
                self._changed()  # whatever happened in between: let the waiters look again
                await asyncio.sleep(0.05)

    async def _watch(self, http: aiohttp.ClientSession, url: str, revision: int) -> int:
        prefix = self.store.prefix
        create: dict[str, Any] = {
            "key": _b64(prefix),
            "range_end": _b64(prefix_end(prefix)),
            "progress_notify": True,
        }
        if revision:
            create["start_revision"] = str(revision + 1)
        async with http.post(url, json={"create_request": create}) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            async for line in resp.content:
                if not line.strip():
                    continue
                msg = json.loads(line)
                if "error" in msg:
                    raise ValueError(str(msg["error"]))
                result = msg.get("result", {})
                if result.get("compact_revision"):
                    return 0  # history we missed is gone: start from now
                if result.get("created") and not revision:
                    revision = int(result["header"]["revision"])
                    self.watching.set()
                revision = await self._apply(result.get("events", []), revision)
        return revision

    async def _apply(self, events: list[dict[str, Any]], revision: int) -> int:
        edges: set[str] = set()
        head = False
        for ev in events:
            kv = ev["kv"]
            revision = max(revision, int(kv.get("mod_revision", 0)))
            key = base64.b64decode(kv["key"]).decode()[len(self.store.prefix) :]
            if key.startswith("n/") and ev.get("type") == "DELETE":
                # Every replica sees this; marking the ends lost is idempotent. The node
                # may have heartbeaten a new lease since (the watch can lag): then it is
                # alive, and losing its ends now would undo that heartbeat's "back".
                if not await self._do(self.store.node_is_live, key[2:]):
                    await self._lose(key[2:], "silent", "its lease expired")
            elif key.startswith("e/"):
                edges.add(key[2:])
            elif key == "head":
                head = True
        for edge in edges:
            self._changed(edge)  # its waiters, and the event streams
        if head and not edges:
            self._changed("")  # an event without an edge change: the event streams only
        return revision
