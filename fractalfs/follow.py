"""One discovery long-poll per daemon for every reader waiting on discovery.

A reader's pump waits for its edge to change (a writer registers, a generation ends). One
long-poll per waiting reader costs a connection and a request each, and at thousands of
readers the daemon spends its time in them. Instead the daemon follows discovery's feed of
changed edges (``GET /v1/changes``) with one request at a time and wakes the pumps of the
edges it names; a woken pump reads its edge once (a plain GET).

Correctness does not depend on the feed being complete: a pump registers before it reads
its edge, so a change after that read is in a later answer of the feed; a feed that breaks,
resyncs or names "all edges" wakes every pump, and a pump still looks at its edge after its
own wait runs out. While no pump waits, the feed is not followed (a daemon of writers only
asks nothing); it resumes from the position it stopped at. A discovery without the feed
(404) is asked the old way (a long-poll per edge).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from .discovery.client import DiscoveryClient, DiscoveryError, Unavailable
from .edgestate import backoff

log = logging.getLogger(__name__)

FEED_POLL = 25.0


class Follower:
    def __init__(self, discovery: DiscoveryClient, poll: float = FEED_POLL) -> None:
        self.discovery = discovery
        self.poll = poll
        self.live = False  # following now: a change after a pump registered will wake it
        self.supported = True  # False: discovery has no feed (an older server)
        self._waiters: dict[str, set[trio.Event]] = {}
        self._wanted = trio.Event()  # set when a pump waits: the feed is followed again

    def waiting(self) -> int:
        """Edges with a waiting pump (for tests: nothing leaks)."""
        return len(self._waiters)

    def _wake(self, edge: str) -> None:
        for event in self._waiters.pop(edge, ()):
            event.set()

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for events in waiters.values():
            for event in events:
                event.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        feed, seq, attempt = "", 0, 0
        while True:
            if self.live and not self._waiters:
                # Nobody waits (a daemon of writers only, or all paired): follow nothing.
                # The position is kept, so the first answer after a pump registers names
                # every edge changed since (or resyncs): nothing it must see is skipped.
                self._wanted = trio.Event()
                await self._wanted.wait()
            try:
                got = await self.discovery.changes(feed, seq, wait=self.poll if self.live else 0)
            except DiscoveryError as exc:
                if exc.status == 404:
                    log.info("discovery has no feed of changes: one long-poll per reader")
                    self.supported = self.live = False
                    self._wake_all()
                    return
                got = None
                log.info("discovery's feed of changes: %s", exc)
            except Unavailable as exc:
                got = None
                log.debug("discovery's feed of changes: %s", exc)
            if got is None:
                if self.live:
                    self.live = False
                    self._wake_all()  # they wait the old way until the feed is back
                await trio.sleep(backoff(attempt, cap=2.0))
                attempt += 1
                continue
            attempt = 0
            if got.get("resync") or got.get("feed") != feed or got.get("all"):
                self._wake_all()
            else:
                for edge in got.get("edges", ()):
                    self._wake(edge)
            feed, seq = str(got.get("feed", "")), int(got.get("seq", 0))
            self.live = True

    async def get(self, edge: str, *, wait: float, since: int) -> dict[str, Any]:
        """What ``discovery.get(edge, wait=, since=)`` answers: the edge's record once its
        version is above ``since``, or after ``wait`` seconds."""
        if not self.live or wait <= 0 or since < 0:
            # Discovery's own long-poll (it caps a wait at MAX_WAIT): one per pump.
            return await self.discovery.get(edge, wait=min(wait, self.poll), since=since)
        event = trio.Event()
        self._waiters.setdefault(edge, set()).add(event)
        self._wanted.set()
        try:
            rec = await self.discovery.get(edge)
            if int(rec.get("version", 0)) > since:
                return rec
            del rec  # a waiting reader holds no decoded record (thousands wait)
            with trio.move_on_after(wait):
                await event.wait()
            return await self.discovery.get(edge)
        finally:
            events = self._waiters.get(edge)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[edge]
