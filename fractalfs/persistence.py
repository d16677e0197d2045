"""Persistence of a node's writer ends: mode and policy, spill garbage collection, restore.

Sets each writer's mode up (configured, or the dynamic policy of :mod:`fractalfs.policy`),
switches undecided dynamic edges, collects spill files nobody can need any more
(:func:`fractalfs.writerstate.collect`) and serves spill files again after a restart.
Moved out of :class:`fractalfs.node.Node` unchanged (same method names); it owns the
policy, collection, restore-retry and bandwidth tasks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from . import metrics, procs, spill, writerstate
from .discovery.client import Conflict, DiscoveryError, Unavailable
from .edges import WriterEnd, WriterState
from .edgestate import backoff
from .policy import Mode, Observation, decide
from .writerstate import Exited

if TYPE_CHECKING:
    from .edgeid import EdgeId
    from .node import Node

log = logging.getLogger(__name__)

DYNAMIC_UNDECIDED = "dynamic: undecided"
DELIVERY_CHECK_EVERY = 2.0  # how often GC asks discovery whether a spill was delivered
_PHASES = {
    WriterState.OPEN: writerstate.Phase.OPEN,
    WriterState.COMPLETE: writerstate.Phase.COMPLETE,
    WriterState.FAILED: writerstate.Phase.FAILED,
    WriterState.ABORTED: writerstate.Phase.ABORTED,
}


class Persistence:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.spill_bandwidth = 200e6  # bytes/s until measured
        self._unrestored: list[spill.SpillInfo] = []  # spills discovery has not heard of yet
        # Set by the FUSE layer: the (uid, gid) owning an edge here, None for the daemon's
        # own. A spill file is given to that user (in the daemon's 0700 directory: they
        # still cannot reach it), so a restarted daemon knows whose stream it restores and
        # tells the FUSE layer (on_restored) before anyone else can claim it.
        self.owner_of: Callable[[EdgeId], tuple[int, int] | None] = lambda edge: None
        self.on_restored: Callable[[WriterEnd], None] = lambda writer: None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.node._forever, self._apply_policy)
            nursery.start_soon(self.node._forever, self._collect_spills)
            nursery.start_soon(self.node._forever, self._retry_restores)
            nursery.start_soon(self._measure_spill_bandwidth)
            task_status.started()

    def expected_mode(self, edge: EdgeId) -> tuple[Mode, str]:
        """The mode and reason a new writer of ``edge`` starts with, unless its spill cannot
        be created (registered with it: no separate report)."""
        configured = self.node.mode_overrides.get(edge, self.node.mode)
        if configured is Mode.DYNAMIC:
            return Mode.TRANSIENT, DYNAMIC_UNDECIDED
        return configured, f"configured {configured.value}"

    def _set_up_mode(self, writer: WriterEnd, recorded: tuple[str, str] = ("", "")) -> None:
        """``recorded``: the (mode, reason) discovery recorded with the registration; the
        mode is reported only if the writer's differs."""
        writer.configured = self.node.mode_overrides.get(writer.edge, self.node.mode)
        try:
            writer.pgid = os.getpgid(writer.tgid)
        except OSError:
            writer.pgid = writer.tgid
        if writer.configured is Mode.PERSISTENT:
            self._persist(writer, "configured persistent")
        elif writer.configured is Mode.DYNAMIC:
            # Only the dynamic policy needs the group's CPU (a scan of every process).
            writer.cpu_at_open, writer.queued_at_open = procs.group_times(writer.pgid)
            writer.retain_limit = self.node.config.retain_limit
            writer.mode_reason = DYNAMIC_UNDECIDED
            writer.on_window_full = self._window_full
            writer.on_switch_failed = self._switch_failed
        if (writer.mode.value, writer.mode_reason) != recorded:
            self.node._spawn(self._report_mode, writer)

    def _persist(self, writer: WriterEnd, reason: str) -> bool:
        try:
            sp = spill.SpillFile.create(
                self.node.config.spill_dir, writer.edge, writer.generation, writer.base
            )
            owner = self.owner_of(writer.edge)
            if owner is not None:
                with contextlib.suppress(OSError):  # root may; else the daemon's it stays
                    os.fchown(sp.fd, *owner)
            writer.persist(sp, reason)
        except OSError as exc:
            writer.settle_transient(f"spill failed: {exc.strerror}")
            self._switch_failed(writer, exc)
            return False
        log.info("edge %s: persistent from offset %d (%s)", writer.edge, sp.start, reason)
        return True

    def _switch_failed(self, writer: WriterEnd, exc: OSError) -> None:
        """The spill could not be created, or the prefix held in memory not written to it:
        the edge stays transient for good (the policy does not retry it every second)."""
        log.warning("edge %s: cannot spill (%s): stays transient", writer.edge, exc)
        writer.on_window_full = None
        self.node._spawn(self._report_mode, writer)

    def _window_full(self, writer: WriterEnd) -> None:
        """Dynamic mode, the reader absent or slow: spill rather than block the producer."""
        if writer.configured is Mode.DYNAMIC and writer.spill is None:
            decision = decide(self._observe(writer, window_full=True))
            if decision.mode is Mode.PERSISTENT and self._persist(writer, decision.reason):
                self.node._spawn(self._report_mode, writer)

    def _observe(self, writer: WriterEnd, window_full: bool = False) -> Observation:
        cpu, queued = procs.group_times(writer.pgid)
        return Observation(
            configured=writer.configured,
            current=writer.mode,
            bytes_written=writer.end,
            cpu_seconds=max(0.0, cpu - writer.cpu_at_open),
            elapsed=max(
                0.0,
                trio.current_time()
                - writer.opened_at
                - writer.handler_time
                - max(0.0, queued - writer.queued_at_open),
            ),
            spill_bandwidth=self.spill_bandwidth,
            window_full=window_full,
            prefix_retained=writer.prefix_retained,
        )

    async def _apply_policy(self) -> None:
        """Re-decides every undecided dynamic edge a few times a second."""
        while True:
            await trio.sleep(0.25)
            for slot in list(self.node.slots.values()):
                w = slot.writer
                if w is None or w.state is not WriterState.OPEN or w.spill is not None:
                    continue
                if w.configured is not Mode.DYNAMIC or not w.retain_limit:
                    continue
                # A scan of /proc, on the loop's thread on purpose: in a worker thread it
                # holds the GIL in 5 ms slices against every FUSE request (a convoy: a
                # 1 GiB dynamic stream took twice as long).
                decision = decide(self._observe(w))
                if decision.mode is Mode.PERSISTENT:
                    if self._persist(w, decision.reason):
                        self.node._spawn(self._report_mode, w)
                else:
                    w.mode_reason = decision.reason

    async def _report_mode(self, writer: WriterEnd) -> None:
        try:
            await self.node.discovery.set_mode(
                writer.edge.hex, writer.generation, writer.mode.value, writer.mode_reason
            )
        except (Unavailable, DiscoveryError) as exc:
            log.debug("edge %s: could not report mode: %s", writer.edge, exc)

    async def _measure_spill_bandwidth(self) -> None:
        try:
            bw = await trio.to_thread.run_sync(spill.measure_bandwidth, self.node.config.spill_dir)
        except OSError as exc:
            log.warning("cannot measure spill bandwidth in %s: %s", self.node.config.spill_dir, exc)
            return
        self.spill_bandwidth = bw
        log.info("spill bandwidth of %s: %.0f MB/s", self.node.config.spill_dir, bw / 1e6)

    def _gauge(self) -> None:
        spills = [s.writer.spill for s in self.node.slots.values() if s.writer and s.writer.spill]
        metrics.OPEN_EDGES.set(len(self.node.slots))
        metrics.SPILL_FILES.set(len(spills))
        metrics.SPILL_BYTES.set(sum(sp.end - sp.start for sp in spills))

    async def _collect_spills(self) -> None:
        """Deletes spill files nobody can need any more: delivered to a reader's program,
        and past retention or over the quota (oldest first). Undelivered ones are never
        touched; the prefix of a failed generation goes the same way (a re-run reproduces
        it), or when superseded. The rule is :func:`writerstate.collect`."""
        while True:
            await trio.sleep(1.0)
            self._gauge()
            finished = [
                s.writer
                for s in self.node.slots.values()
                if s.writer is not None
                and s.writer.spill is not None
                and s.writer.state in (WriterState.COMPLETE, WriterState.FAILED)
            ]
            for w in finished:
                if w.state is WriterState.COMPLETE and not w.delivered:
                    await self._check_delivered(w)
            gone = [w for w in finished if w.state is WriterState.FAILED or w.delivered]
            gone.sort(key=lambda w: w.completed_at or 0.0)
            total = sum(w.spill.end - w.spill.start for w in gone if w.spill)
            now = trio.current_time()
            for w in gone:
                if w.spill is None:
                    continue
                action = writerstate.collect(
                    _PHASES[w.state],
                    writerstate.GcDue(
                        delivered=w.delivered,
                        connected=w.connection is not None,
                        expired=now - (w.completed_at or now) > self.node.config.spill_retention,
                        over_quota=bool(self.node.config.spill_quota)
                        and total > self.node.config.spill_quota,
                    ),
                )
                if not isinstance(action, writerstate.RemoveSpill):
                    continue
                total -= w.spill.end - w.spill.start
                log.info("edge %s: spill file removed (%s)", w.edge, action.why)
                w.drop_spill()
                self.node._reap(w.edge)

    async def _check_delivered(self, writer: WriterEnd) -> None:
        """Asks discovery whether a reader's program read this complete stream (at most
        every few seconds per end; the reader-done event usually says so first)."""
        now = trio.current_time()
        if now - writer.delivery_checked_at < DELIVERY_CHECK_EVERY:
            return
        writer.delivery_checked_at = now
        try:
            rec = await self.node.discovery.get(writer.edge.hex)
        except (Unavailable, DiscoveryError) as exc:
            log.debug("edge %s: delivery not known: %s", writer.edge, exc)
            return
        if int(rec.get("generation", 0)) == writer.generation and rec.get("reader_state") == (
            "done"
        ):
            writer.on_reader_done(int(rec.get("bytes_delivered", 0)))

    async def restore_spills(self) -> None:
        """After a restart: serve the spill files again. A complete one is the whole
        stream; an incomplete one died with its writer (its program lost this mount), so
        its generation is failed, but its prefix is served until a re-run supersedes it
        (a reader verifies it against the re-run, as after any failed writer).

        Nothing here deletes a spill a reader may need: only one that discovery says a
        newer generation superseded goes. One discovery does not know (a wiped database,
        or an edge removed while this daemon was down) is kept on disk and not served;
        while discovery cannot be reached, the rest are retried in the background."""
        self._unrestored = spill.scan(self.node.config.spill_dir)
        await self._restore_pending()

    async def _restore_pending(self) -> None:
        pending, self._unrestored = self._unrestored, []
        for i, info in enumerate(pending):
            complete = info.complete is not None
            try:
                await self.node.discovery.restore_writer(
                    info.edge.hex, info.generation, self.node.name, self.node.endpoint, complete
                )
            except Conflict as exc:
                log.info("edge %s: spill superseded, removed (%s)", info.edge, exc)
                info.path.unlink(missing_ok=True)
                continue
            except DiscoveryError as exc:
                if exc.status == 404:
                    log.warning(
                        "edge %s: discovery does not know this edge (%s): spill %s kept on "
                        "disk, not served; remove it by hand if nobody needs it",
                        info.edge,
                        exc,
                        info.path,
                    )
                else:
                    log.warning("edge %s: spill not restored yet: %s", info.edge, exc)
                    self._unrestored.append(info)
                continue
            except Unavailable as exc:
                log.warning(
                    "discovery unavailable (%s): %d spill(s) restored later", exc, len(pending) - i
                )
                self._unrestored.extend(pending[i:])
                return
            self._install_restored(info)

    def _install_restored(self, info: spill.SpillInfo) -> None:
        complete = info.complete is not None
        sp = spill.SpillFile.open(info)
        writer = WriterEnd.restored(sp, self.node.config.write_window, complete)
        self.node._slot(info.edge).writer = writer
        self.on_restored(writer)
        log.info(
            "edge %s: %s spill of generation %d (%d bytes) served again",
            info.edge,
            "complete" if complete else "incomplete (failed)",
            info.generation,
            writer.end,
        )

    async def _retry_restores(self) -> None:
        """Spills that could not be restored at start-up (discovery unreachable) are
        restored as soon as discovery answers."""
        attempt = 0
        while True:
            await trio.sleep(backoff(attempt, base=0.5, cap=5.0) + 0.5)
            if not self._unrestored:
                attempt = 0
                continue
            await self._restore_pending()
            attempt = attempt + 1 if self._unrestored else 0

    async def _complete_spill(self, writer: WriterEnd) -> None:
        """A persistent writer finished well: mark its spill complete (END frame, header,
        fsyncs, off the loop's thread), then the generation."""
        error = await writer.complete_spill()
        if error is not None:
            log.warning("edge %s: spill file not completed: %s", writer.edge, error)
        # A failed completion fails the generation (writerstate.settle): its bytes may not
        # be on disk, and the unsealed spill must not be served as the whole stream.
        self.node._settle(writer, Exited(0), spill_done=True, spill_failure=error)
