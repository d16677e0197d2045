"""What a reader's daemon does next, decided without I/O.

:class:`ReaderMachine` takes what the daemon observes — discovery's record of the edge, how a
pull from a writer ended, the clock — and returns the next action. Every fault of the
failure model is a transition here, unit-tested on its own; :mod:`fractalfs.node` only
carries the actions out.

Faults and what the machine makes of them:

* connection lost, writer still registered as open   -> redial the same generation and
  resume at the received offset (bounded backoff with jitter, up to ``reconnect_for``);
* the writer's node is silent (discovery says ``lost``) -> wait: the node may come back
  and re-assert its generation, then resume; a newer generation means a re-run;
* the writing program failed, or its daemon no longer serves the generation -> wait for a
  re-run writer (a newer generation) for at most ``writer_lost_timeout``, then EIO;
* a *complete* generation whose writer's daemon holds no writer of the edge (a new run of
  it: the rest of the stream went with the old one), or whose record has no endpoint any
  more (discovery saw that daemon restart or leave) -> have discovery fail it
  (:class:`Unfinished`), then wait for the re-run as above;
* a failed generation whose daemon still serves it (a persistent spill, also one found
  after a restart) -> read its prefix once, then wait for a re-run as above;
* a re-run writer (newer generation) after bytes were delivered -> read it from offset 0,
  *verify* the replayed prefix against the digest of what was delivered, then go on;
  a mismatch is EIO ("diverged"), never silent corruption;
* the edge was removed -> ECANCELED.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

_RNG = random.Random()


class PullOutcome(Enum):
    END = "end"  # the end marker arrived and was verified
    LOST = "lost"  # could not connect, or the connection broke: redial
    GONE = "gone"  # that generation is not served any more: wait for a re-run
    UNHELD = "unheld"  # the writer's daemon holds no writer of the edge at all (NO_EDGE)
    REMOVED = "removed"
    DIVERGED = "diverged"  # a re-run writer's replay differs from what was delivered
    CLOSED = "closed"  # our program closed its end


@dataclass(frozen=True, slots=True)
class EdgeView:
    """The part of discovery's edge record the reader decides on."""

    exists: bool
    version: int
    generation: int
    writer_state: str  # none | open | complete | failed | lost
    writer_node: str = ""
    writer_endpoint: str = ""
    reason: str = ""

    @classmethod
    def from_json(cls, rec: dict[str, Any]) -> EdgeView:
        return cls(
            exists=bool(rec.get("exists", True)),
            version=int(rec.get("version", 0)),
            generation=int(rec.get("generation", 0)),
            writer_state=str(rec.get("writer_state", "none")),
            writer_node=str(rec.get("writer_node", "")),
            writer_endpoint=str(rec.get("writer_endpoint", "")),
            reason=str(rec.get("reason", "")),
        )


@dataclass(frozen=True, slots=True)
class Query:
    """Ask discovery for the edge; with ``since`` >= 0, wait (up to ``wait`` s) for a change."""

    since: int = -1
    wait: float = 0.0
    delay: float = 0.0  # sleep this long first (backoff)


@dataclass(frozen=True, slots=True)
class Connect:
    generation: int
    node: str
    endpoint: str
    replay: bool  # a new generation: read from 0 and verify the delivered prefix


@dataclass(frozen=True, slots=True)
class Unfinished:
    """Tell discovery that this reader lacks the END of complete ``generation``, whose
    writer's daemon no longer holds it (``writer/gone``); then look at the record again."""

    generation: int


@dataclass(frozen=True, slots=True)
class Fail:
    errno: int
    reason: str


@dataclass(frozen=True, slots=True)
class Done:
    pass


Action = Query | Connect | Unfinished | Fail | Done


def backoff(
    attempt: int, rng: random.Random | None = None, base: float = 0.05, cap: float = 1.0
) -> float:
    """Bounded exponential backoff with full jitter."""
    return (rng or _RNG).uniform(0, min(cap, base * (2**attempt)))


@dataclass(slots=True)
class ReaderMachine:
    reconnect_for: float = 60.0
    writer_lost_timeout: float = 120.0
    long_poll: float = 25.0
    # One generator for every machine by default: a Random holds 2.5 KiB of state, and a
    # daemon runs one machine per waiting reader.
    rng: random.Random = field(default_factory=lambda: _RNG)

    generation: int = 0  # the generation we are reading (0: none yet)
    version: int = -1  # discovery version of the last record seen
    # Generations that will never serve us; replaced, never changed in place (the empty
    # one is shared: a daemon runs one machine per waiting reader).
    dead: frozenset[int] = frozenset()
    lost_since: float | None = None  # connection lost at
    writer_gone_since: float | None = None  # no usable writer since
    attempt: int = 0
    seen_edge: bool = False
    trying: int = 0  # the generation of the last Connect
    trying_complete: bool = False  # ... and whether the record called it complete

    def start(self) -> Action:
        return Query()

    def first_wait(self, query: Query) -> int | None:
        """The version of the edge if this machine has only seen its edge (at that
        version) with no writer yet and ``query`` is the wait that followed: then
        :meth:`waiting_first` makes both again from that number. None otherwise. Most
        waiting readers are there, and a daemon keeps thousands of them parked: an int
        instead of the machine and its query (190 bytes)."""
        if self.version < 0 or (self, query) != self.waiting_first(self.version):
            return None
        return self.version

    def waiting_first(self, version: int) -> tuple[ReaderMachine, Query]:
        """A machine with this one's settings that saw its edge at ``version`` with no
        writer yet (:meth:`on_record`), and the query it waits with then."""
        again = ReaderMachine(
            self.reconnect_for,
            self.writer_lost_timeout,
            self.long_poll,
            self.rng,
            version=version,
            seen_edge=True,
        )
        return again, Query(version, self.long_poll)

    def on_record(self, view: EdgeView, now: float, received: int) -> Action:
        if not view.exists:
            if self.seen_edge:
                return Fail(errno.ECANCELED, "the edge was removed")
            return Query(view.version, self.long_poll)
        self.seen_edge = True
        self.version = view.version
        gen = view.generation
        usable = view.writer_state in ("open", "complete") and gen not in self.dead
        # A failed generation whose daemon still holds its bytes (a persistent spill) can
        # serve its prefix: read it once, then wait for the re-run as usual.
        prefix = view.writer_state == "failed" and bool(view.writer_endpoint)
        complete = usable and view.writer_state == "complete" and gen >= self.generation
        # Its daemon run is gone: nobody serves it. Complete, or lost with that run (its
        # end never recorded: the END may have come, only we know).
        run_gone = view.writer_state == "lost" and gen >= self.generation and gen not in self.dead
        if (complete or run_gone) and not view.writer_endpoint:
            self.dead = self.dead | {gen}
            return Unfinished(gen)
        if (usable or (prefix and gen not in self.dead)) and gen >= self.generation:
            if usable:
                self.writer_gone_since = None
            replay = gen != self.generation and received > 0
            self.trying = gen
            self.trying_complete = view.writer_state == "complete"
            return Connect(gen, view.writer_node, view.writer_endpoint, replay)
        if view.writer_state == "none" and not self.generation:
            return Query(view.version, self.long_poll)  # the writer has not come yet
        if view.writer_state == "failed" and gen == self.generation:
            self.dead = self.dead | {gen}
        # No usable writer (its node went silent, its program failed, or it is stale):
        # wait for it to come back or be re-run, but not forever.
        if self.writer_gone_since is None:
            self.writer_gone_since = now
        left = self.writer_lost_timeout - (now - self.writer_gone_since)
        if left <= 0:
            why = view.reason or f"writer generation {gen} is {view.writer_state}"
            return Fail(
                errno.EIO, f"no writer came back within {self.writer_lost_timeout:g} s ({why})"
            )
        return Query(view.version, min(self.long_poll, left))

    def on_connected(self, generation: int) -> None:
        """A pull got through the handshake: the writer serves us."""
        self.generation = generation
        self.lost_since = None
        self.attempt = 0

    def on_pull(self, outcome: PullOutcome, detail: str, now: float) -> Action:
        if outcome in (PullOutcome.END, PullOutcome.CLOSED):
            return Done()
        if outcome is PullOutcome.REMOVED:
            return Fail(errno.ECANCELED, "the edge was removed")
        if outcome is PullOutcome.DIVERGED:
            return Fail(errno.EIO, f"replay diverged: {detail}")
        if outcome in (PullOutcome.GONE, PullOutcome.UNHELD):
            self.dead = self.dead | {self.trying}
            self.lost_since = None
            self.attempt = 0
            if outcome is PullOutcome.UNHELD and self.trying_complete:
                # Complete, and its daemon (a new run) holds nothing: our END will never
                # come, and discovery cannot know that (only we know we lack it).
                return Unfinished(self.trying)
            return Query()  # look at the record now: maybe a re-run is already there
        if self.lost_since is None:
            self.lost_since = now
        if now - self.lost_since > self.reconnect_for:
            return Fail(errno.EIO, f"lost the writer for {self.reconnect_for:g} s: {detail}")
        delay = backoff(self.attempt, self.rng)
        self.attempt += 1
        return Query(delay=delay)
