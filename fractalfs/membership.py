"""A node's membership in the cluster: heartbeats, discovery's event log, progress.

The heartbeat tells discovery which ends this daemon holds (and fences off writer
generations discovery no longer has); the event follower carries removals and losses made
elsewhere to the ends here; progress reports what readers delivered. Moved out of
:class:`fractalfs.node.Node` unchanged (``heartbeat_once``, ``_heartbeat``,
``_watch_events``, ``_on_event``, ``_report_progress``); it owns these three tasks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from typing import TYPE_CHECKING, Any

import trio

from . import testhooks
from .discovery.client import DiscoveryError, Unavailable
from .discovery.schema import EventKind, LossCause
from .discovery.schema import ReaderState as ReaderStateName
from .edgeid import EdgeId
from .edges import ReaderState, WriterEnd, WriterState
from .edgestate import backoff
from .pulse import Pulse

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

LONG_POLL = 25.0
EVENT_BATCH = 0.05  # seconds a busy event log is left to accumulate between polls
HEARTBEAT_EVERY = 0.5
CHECK_FOR = 5.0  # seconds an event's check against the edge's record may take


def claim_of(event: dict[str, Any]) -> int:
    """Discovery's id of the reader claim a ``reader`` or ``reader-lost`` event is about (0:
    not told). A claim's id is its event's seq in the SQLite store; etcd's events name it."""
    data = event.get("data") or {}
    claim = data.get("claim")
    if claim is None and event.get("kind") == EventKind.READER:
        claim = event.get("seq")
    return claim if isinstance(claim, int) else 0


class Membership:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.missed = testhooks.dropped_events()  # a test's stand-in for a missed event
        client = node.discovery  # a stand-in without URLs (unit tests) gets a silent pulse
        self.pulse = Pulse(
            getattr(client, "urls", []),
            node.name,
            node.boot,
            auth=getattr(client, "auth", None),
            verify=getattr(client, "verify", True),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.node._forever, self._watch_events)
            nursery.start_soon(self.node._forever, self._report_progress)
            nursery.start_soon(self.node._forever, self._heartbeat)
            await nursery.start(self.pulse.run)
            task_status.started()

    async def heartbeat_once(self) -> None:
        """Tells discovery which ends this daemon holds; fences off the stale ones."""
        if testhooks.heartbeats_held():
            raise Unavailable("test hook: heartbeats held")
        writers = {
            e.hex: s.writer.generation
            for e, s in self.node.slots.items()
            if s.writer is not None and s.writer.state in (WriterState.OPEN, WriterState.COMPLETE)
        }
        # The EdgeIds themselves: a text each, twice a second, at 10,000 waiting readers
        # fragmented the arenas their records were being allocated in (heartbeat.deltas).
        readers = [e for e, s in self.node.slots.items() if s.reader is not None]
        stale = await self.node.discovery.heartbeat(
            self.node.name, self.node.boot, writers, readers
        )
        self.node.announced.set()  # discovery knows this run: its writers may register
        for edge in stale:
            writer = self.node.writer_for(EdgeId.parse(edge))
            # Only the generation reported: a newer one may have opened meanwhile.
            if writer is not None and writer.generation == writers.get(edge):
                self.node._fence(writer)

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.heartbeat_once()
            except (Unavailable, DiscoveryError) as exc:
                log.debug("heartbeat failed: %s", exc)
            except (KeyError, ValueError, TypeError) as exc:  # a malformed answer
                log.warning("heartbeat: unexpected answer from discovery: %r", exc)
            await trio.sleep(HEARTBEAT_EVERY)

    async def _watch_events(self) -> None:
        """Follows discovery's event log: removals made on other nodes end edges here."""
        after = -1
        attempt = 0
        while True:
            try:
                if after < 0:
                    after = int((await self.node.discovery.health(retry_for=0))["last_event"])
                got = await self.node.discovery.events(after, wait=LONG_POLL)
                attempt = 0
            except (Unavailable, DiscoveryError, KeyError, ValueError):
                await trio.sleep(backoff(attempt, cap=2.0))
                attempt += 1
                continue
            for event in got["events"]:
                self._on_event(event)
            after = int(got["last"])
            if got["events"]:
                # A burst of edge changes (a thousand opens) answers every poll at once
                # with an event or two: let a few accumulate instead of one poll each.
                await trio.sleep(EVENT_BATCH)

    def _on_event(self, event: dict[str, Any]) -> None:
        try:
            edge = EdgeId.parse(event["edge"])
        except (KeyError, ValueError):
            return
        kind = event.get("kind")  # an EventKind (a StrEnum compares equal to its string)
        if isinstance(kind, str) and kind in self.missed:
            return
        data = event.get("data") or {}
        writer = self.node.writer_for(edge)
        seq = event.get("seq")
        if kind == EventKind.DELETED:
            # Only ends older than the removal: the edge may have started afresh (a re-run
            # after ``rm``) and its new ends registered here before the feed brought it.
            self.node._abort_local(edge, "removed", seq if isinstance(seq, int) else None)
        elif kind == EventKind.WRITER:
            with contextlib.suppress(TypeError, ValueError):
                generation = int(data.get("generation", 0))
                # A newer generation, recorded after this end's claim or registration: an
                # edge removed and made afresh numbers its generations from 1 again, and a
                # lagging feed brings the old edge's writer events after the new ends came.
                slot = self.node.slots.get(edge)
                reader = slot.reader if slot is not None else None
                if reader is None or not isinstance(seq, int) or seq > reader.claimed_at:
                    self.node.supersede(edge, generation)  # a reader here: leave the old one
                if (
                    writer is not None
                    and generation > writer.generation
                    and (not isinstance(seq, int) or seq > writer.registered)
                ):
                    self.node._fence(writer)
        elif kind == EventKind.READER_LOST and writer is not None:
            writer.set_reader_lost(True, str(data.get("node", "")), claim_of(event))
            # A silent node may only be stalled or cut off: while its connection lives (or
            # until it comes back and redials) it loses nothing. A restarted or departed
            # daemon took what its reader had delivered with it.
            if data.get("cause") != LossCause.SILENT or writer.connection is None:
                self.node._reader_gone(writer)
        elif kind == EventKind.WRITER_GONE:
            slot = self.node.slots.get(edge)
            reader = slot.reader if slot is not None else None
            if reader is not None and reader.state in (ReaderState.WAITING, ReaderState.STREAMING):
                with contextlib.suppress(TypeError, ValueError):
                    self.node.spawn(self.writer_gone, edge, int(data.get("generation", 0)))
        elif kind in (EventKind.READER_BACK, EventKind.READER) and writer is not None:
            if (
                kind == EventKind.READER
                and writer.reader_lost
                and writer.connection is not None
                and data.get("node") != writer.lost_reader[0]
            ):
                # A new claim replaces a reader lost with its node: a connection that
                # outlived the partition is the old reader's; it must not read beside the
                # new one. (Its daemon, on redialling, finds the claim taken: Node._pump.)
                # Unless the feed lags and the edge moved on from that claim (checked).
                # The lost node's own claim is no such case: a node holds one reader of
                # an edge, so its daemon left the old reader (and its connection) first.
                self.node.spawn(self._drop_if_claimed, writer, writer.connection, event)
            else:
                writer.set_reader_lost(False)
        if kind == EventKind.READER and data.get("node") not in (None, self.node.name):
            # Another node claimed the edge: discovery took the reader here for lost (this
            # node was cut off) and the stage was re-run there. A connection that outlived
            # the partition must not go on reading beside the re-run.
            slot = self.node.slots.get(edge)
            reader = slot.reader if slot is not None else None
            # Only a claim newer than this reader's: a feed that lags behind discovery can
            # bring the claim a newer reader here took the edge back from (event seqs and
            # a claim's record version are one sequence, in both stores).
            if (
                reader is not None
                and reader.state in (ReaderState.WAITING, ReaderState.STREAMING)
                and (not isinstance(seq, int) or seq > reader.claimed_at)
            ):
                why = f"edge {edge}: node {data.get('node')} claimed it (this node was lost)"
                reader.fail(errno.EIO, why)
                pull = self.node._pulls.get(edge)
                if pull is not None:
                    pull[1].cancel()  # leave the writer now, as Node.supersede does
        elif kind == EventKind.READER_CLOSED and writer is not None:
            # A reader closed early after this writer registered, without telling it over
            # a data connection (it closed before it connected: Node.linger_reader waits
            # CONNECT_WAIT for one, then records the close alone): "no more" all the same.
            # Unless that reader last pulled an older generation: its release reached
            # discovery after this writer, a re-run, registered (it is for the reader that
            # comes next). One that pulled none may have closed before any writer came.
            with contextlib.suppress(TypeError, ValueError):
                pulled = int(data.get("generation", 0))
                if 0 < pulled < writer.generation:
                    log.info(
                        "edge %s: a reader of generation %d closed early: not generation %d's",
                        edge,
                        pulled,
                        writer.generation,
                    )
                elif int(event.get("seq", 0)) > writer.registered and not writer.reader_closed:
                    log.info("edge %s: its reader closed early (discovery)", edge)
                    writer.on_reader_closed()
        elif kind == EventKind.READER_DONE and writer is not None:
            # Only a reader done after this generation began: a lagging feed brings an
            # earlier generation's (as long: a re-run), which would let this one's end go
            # before its own reader has it all.
            with contextlib.suppress(TypeError, ValueError):
                if not isinstance(seq, int) or seq > writer.registered:
                    writer.on_reader_done(int(data.get("bytes", 0)))
            self.node._reap(edge)  # a transient end whose END_ACK was lost is done too

    async def _record(self, edge: EdgeId) -> dict[str, Any] | None:
        """The edge's record now (None if discovery does not answer within
        :data:`CHECK_FOR`): what a lagging feed's event is checked against."""
        with trio.move_on_after(CHECK_FOR):
            try:
                return await self.node.discovery.get(edge.hex)
            except (Unavailable, DiscoveryError) as exc:
                log.info("edge %s: could not check an event against discovery: %s", edge, exc)
        return None

    async def _drop_if_claimed(
        self, writer: WriterEnd, connection: trio.CancelScope, event: dict[str, Any]
    ) -> None:
        """Another node claimed the edge while discovery had its reader here lost: drop the
        connection, unless the edge has a newer claim than that event's (the feed lags: a
        reader the edge went back to may be the one connected). Unknown: drop it."""
        rec = await self._record(writer.edge)
        if rec is not None and int(rec.get("reader_claim") or 0) != claim_of(event):
            # A newer claim, whose own event comes later and decides; if it is the lost
            # node's, that node left the reader it lost before it claimed again.
            if rec.get("reader_node") == writer.lost_reader[0]:
                writer.set_reader_lost(False)
            log.info("edge %s: a claim the edge has moved on from (feed lags)", writer.edge)
            return
        connection.cancel()
        writer.set_reader_lost(False)

    async def confirm_reader_gone(self, writer: WriterEnd) -> None:
        """Fails ``writer`` for a reader lost with acknowledged bytes (Node._reader_gone),
        unless the edge moved on from that reader: back, done, or claimed again since (a
        lagging feed brings the loss after the newer claim's reader acknowledged bytes:
        that loss failed its generation for nothing, one needless re-run)."""
        node, claim = writer.lost_reader
        rec = await self._record(writer.edge)
        if rec is not None:
            lost = rec.get("reader_state") in (ReaderStateName.LOST, ReaderStateName.FAILED)
            if not lost or (claim and int(rec.get("reader_claim") or 0) != claim):
                log.info(
                    "edge %s: its reader on %s is not lost any more (%s)",
                    writer.edge,
                    node or "?",
                    rec.get("reader_state"),
                )
                return
        self.node._reader_gone(writer, confirmed=True)

    async def writer_gone(self, edge: EdgeId, generation: int) -> None:
        """The reader here lacks the END of ``generation``, whose writer's daemon run is
        gone: the rest of the stream went with it. Discovery fails the generation (the
        reader waits for a re-run writer, as for a failed program)."""
        log.warning(
            "edge %s: generation %d's writer daemon is gone before its END came: failing it",
            edge,
            generation,
        )
        for attempt in range(10):
            try:
                await self.node.discovery.writer_gone(edge.hex, self.node.name, generation)
                return
            except Unavailable:
                await trio.sleep(backoff(attempt, cap=2.0))
            except DiscoveryError as exc:
                log.warning(
                    "edge %s: discovery refused to fail generation %d: %s", edge, generation, exc
                )
                return

    async def _report_progress(self) -> None:
        reported: dict[EdgeId, int] = {}
        while True:
            await trio.sleep(1.0)
            for edge, slot in list(self.node.slots.items()):
                reader = slot.reader
                # A claim starts at 0 in discovery: a reader that read nothing says nothing
                # (a request per waiting reader, thousands at once, for no news).
                if reader is None or reported.get(edge, 0) == (consumed := reader.consumed):
                    continue
                reported[edge] = consumed
                with contextlib.suppress(Unavailable, DiscoveryError):
                    await self.node.discovery.progress(edge.hex, consumed)
            for edge in list(reported):
                if edge not in self.node.slots:
                    del reported[edge]
