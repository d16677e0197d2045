"""One discovery long-poll per daemon for every reader waiting on discovery.

A reader's pump waits for its edge to change (a writer registers, a generation ends). One
long-poll per waiting reader costs a connection and a request each, and at thousands of
readers the daemon spends its time in them. Instead the daemon follows discovery's feed of
changed edges (``GET /v1/changes``) with one request at a time and wakes the pumps of the
edges it names; a woken pump reads its edge once (a plain GET).

A waiting reader has no task at all: its pump parks it here (:class:`Parked`) and ends;
the feed naming its edge, or its wait running out, starts the pump again.

Correctness does not depend on the feed being complete: a pump registers before it reads
its edge, so a change after that read is in a later answer of the feed; a feed that
resyncs or names "all edges" wakes every pump, a feed that breaks wakes the pumps waiting
in :meth:`Follower.get` (parked readers wait for the feed to resume from its position),
and a pump still looks at its edge after its own wait runs out. While no pump waits, the
feed is not followed (a daemon of writers only asks nothing); it resumes from the position
it stopped at. A discovery without the feed
(404) is asked the old way (a long-poll per edge).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

import trio

from .discovery.client import DiscoveryClient, DiscoveryError, Unavailable
from .edgeid import EdgeId
from .edgestate import backoff

log = logging.getLogger(__name__)

FEED_POLL = 25.0


class _Waiter(Protocol):
    def set(self) -> None: ...


def _woken(token: Parked, expired: bool) -> None:
    """A :class:`Parked` entry's ``resume`` once it was woken or let go (never called)."""


class Parked:
    """A waiting reader with no task: the feed naming its edge, a broken feed, or its
    deadline calls ``resume(self, expired)`` once (``expired`` True when the deadline ran
    out), with what the pump left here (``reader``, ``machine``, ``query``) to start
    again from. Before it is parked it is only watched: a change meanwhile marks it
    ``woken`` (the pump then looks at its edge again instead of parking). About 70 bytes
    where a waiting pump task held several KiB (its frames, cancel scopes and an Event),
    and a partial of the resume call with its arguments 270 more: ``resume`` is one
    callable shared by every parked reader; ``woken`` is ``resume`` being
    :func:`_woken`, and its deadline is its bucket's (:meth:`Follower.park`): a float and
    two slots more were 40 bytes per waiting reader."""

    __slots__ = ("edge", "machine", "query", "reader", "resume")

    def __init__(self, edge: EdgeId) -> None:
        self.edge = edge
        self.resume: Callable[[Parked, bool], None] | None = None  # None: watched only
        self.reader: Any = None
        self.machine: Any = None
        self.query: Any = None

    @property
    def woken(self) -> bool:
        return self.resume is _woken

    def set(self) -> None:
        self._fire(False)

    def _fire(self, expired: bool) -> None:
        resume = self.resume
        if resume is _woken:
            return
        self.resume = _woken
        if resume is not None:
            resume(self, expired)


#: A parked reader's wait ends up to this much late (and at most 2% of the wait): its
#: deadline is rounded up, so readers parked about together share one (see park).
MAX_LATE = 1.0


class Follower:
    def __init__(self, discovery: DiscoveryClient, poll: float = FEED_POLL) -> None:
        self.discovery = discovery
        self.poll = poll
        self.live = False  # following now: a change after a pump registered will wake it
        self.supported = True  # False: discovery has no feed (an older server)
        # Edge -> its waiter, or a set of them (one is the rule: a set is 216 bytes). Keyed
        # by the EdgeId the reader holds (the feed's names are parsed): no text per reader.
        self._waiters: dict[EdgeId, _Waiter | set[_Waiter]] = {}
        self._wanted = trio.Event()  # set when a pump waits: the feed is followed again
        # Parked readers by deadline (rounded up: see park), and a heap of the deadlines.
        self._due: dict[float, list[Parked]] = {}
        self._deadlines: list[float] = []
        self._earlier = trio.Event()  # a parked reader's deadline is the earliest now

    def waiting(self) -> int:
        """Edges with a waiting pump (for tests: nothing leaks)."""
        return len(self._waiters)

    def _add(self, edge: EdgeId, waiter: _Waiter) -> None:
        have = self._waiters.get(edge)
        if have is None:
            self._waiters[edge] = waiter
        elif isinstance(have, set):
            have.add(waiter)
        else:
            self._waiters[edge] = {have, waiter}

    def _remove(self, edge: EdgeId, waiter: _Waiter) -> None:
        have = self._waiters.get(edge)
        if have is waiter:
            del self._waiters[edge]
        elif isinstance(have, set):
            have.discard(waiter)
            if not have:
                del self._waiters[edge]

    def _of(self, edge: EdgeId) -> list[_Waiter]:
        have = self._waiters.get(edge)
        return [] if have is None else list(have) if isinstance(have, set) else [have]

    def _wake(self, edge: EdgeId) -> None:
        have = self._waiters.pop(edge, None)
        for event in have if isinstance(have, set) else () if have is None else (have,):
            event.set()

    def _wake_all(self, parked: bool = True) -> None:
        """Wakes every waiter; with ``parked`` False, the parked readers stay parked."""
        waiters, self._waiters = self._waiters, {}
        for edge, have in waiters.items():
            for event in have if isinstance(have, set) else (have,):
                if parked or not isinstance(event, Parked):
                    event.set()
                else:
                    self._add(edge, event)

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
                    # Pumps waiting in get() wait the old way until the feed is back.
                    # Parked readers stay parked: the feed resumes from its position
                    # (or resyncs) and names every edge changed meanwhile; ten thousand
                    # readers each asking for their edge at once would only load a
                    # discovery that is already failing.
                    self._wake_all(parked=False)
                await trio.sleep(backoff(attempt, cap=2.0))
                attempt += 1
                continue
            attempt = 0
            if got.get("resync") or got.get("feed") != feed or got.get("all"):
                self._wake_all()
            else:
                for name in got.get("edges", ()):
                    if isinstance(name, str) and EdgeId.is_valid(name):
                        self._wake(EdgeId.parse(name))
            feed, seq = str(got.get("feed", "")), int(got.get("seq", 0))
            self.live = True

    def can_park(self, wait: float, since: int) -> bool:
        """A parked reader is woken by the feed; while the feed is broken it stays parked
        (the feed resumes from its position), but without a feed (an older discovery)
        pumps long-poll their edges."""
        return self.supported and wait > 0 and since >= 0

    def watch(self, edge: EdgeId) -> Parked:
        """Registers a waiter of ``edge`` before the pump reads it: a change after that
        read wakes it (see the module docstring). Then :meth:`park` or :meth:`unwatch`."""
        token = Parked(edge)
        self._add(edge, token)
        self._wanted.set()
        return token

    def unwatch(self, token: Parked) -> None:
        token.resume = _woken
        token.reader = token.machine = token.query = None
        self._discard(token)

    def _discard(self, token: _Waiter | Parked) -> None:
        if isinstance(token, Parked):
            self._remove(token.edge, token)

    def park(
        self,
        token: Parked,
        wait: float,
        resume: Callable[[Parked, bool], None],
        reader: object,
        machine: object,
        query: object,
    ) -> None:
        """The pump's task ends; ``resume(token, expired)`` starts it again once the edge
        changed (``expired`` False) or after ``wait`` seconds (True), from ``reader``,
        ``machine`` and ``query`` (kept in ``token`` meanwhile)."""
        if token.woken:  # (a caller parks only a token not woken)
            return
        token.resume = resume
        token.reader, token.machine, token.query = reader, machine, query
        due = trio.current_time() + wait
        tick = min(MAX_LATE, wait / 50)
        if tick > 0:
            due = math.ceil(due / tick) * tick
        bucket = self._due.get(due)
        if bucket is None:
            bucket = self._due[due] = []
            first = not self._deadlines or due < self._deadlines[0]
            heapq.heappush(self._deadlines, due)
            if first:
                self._earlier.set()
        bucket.append(token)

    def forget(self, edge: EdgeId) -> None:
        """The reader of ``edge`` is gone: its parked entry lets go of it now."""
        for token in self._of(edge):
            if isinstance(token, Parked):
                self.unwatch(token)

    def parked(self) -> int:
        """Readers parked (for tests and memory figures)."""
        return sum(not t.woken for bucket in self._due.values() for t in bucket)

    async def expire_parked(self) -> None:
        """Resumes parked readers whose wait ran out (one task for all of them)."""
        while True:
            now = trio.current_time()
            while self._deadlines and self._deadlines[0] <= now:
                for token in self._due.pop(heapq.heappop(self._deadlines), ()):
                    if not token.woken:
                        self._discard(token)
                        token._fire(True)
            self._earlier = trio.Event()
            at = self._deadlines[0] if self._deadlines else now + 3600
            with trio.move_on_at(at):
                await self._earlier.wait()

    async def get(self, edge: EdgeId, *, wait: float, since: int) -> dict[str, Any]:
        """What ``discovery.get(edge, wait=, since=)`` answers: the edge's record once its
        version is above ``since``, or after ``wait`` seconds."""
        if not self.live or wait <= 0 or since < 0:
            # Discovery's own long-poll (it caps a wait at MAX_WAIT): one per pump.
            return await self.discovery.get(edge.hex, wait=min(wait, self.poll), since=since)
        event = trio.Event()
        self._add(edge, event)
        self._wanted.set()
        try:
            rec = await self.discovery.get(edge.hex)
            if int(rec.get("version", 0)) > since:
                return rec
            del rec  # a waiting reader holds no decoded record (thousands wait)
            with trio.move_on_after(wait):
                await event.wait()
            return await self.discovery.get(edge.hex)
        finally:
            self._remove(edge, event)
