"""A node: the edges this daemon holds and everything that keeps them moving.

The node maps program-level actions (open a writer, read, close, remove) onto edge ends,
discovery and the data plane. It knows nothing of FUSE: the FUSE layer calls these methods
and turns :class:`~fractalfs.edges.EdgeError` into errnos.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from . import dataplane, metrics, procs, spill
from .codec import AbortReason
from .config import NodeConfig
from .discovery.client import (
    Conflict,
    DiscoveryClient,
    DiscoveryError,
    Unavailable,
)
from .edgeid import EdgeId
from .edges import (
    EdgeError,
    Notifier,
    ReaderEnd,
    ReaderState,
    WriterEnd,
    WriterState,
    wait_or_interrupt,
)
from .edgestate import Connect, EdgeView, Fail, PullOutcome, Query, ReaderMachine, backoff
from .handshake import HandshakeError, Status
from .policy import Mode, Observation, decide

log = logging.getLogger(__name__)

LONG_POLL = 25.0
HEARTBEAT_EVERY = 0.5
CLOSE_GRACE = 0.25  # how long a close by a live program waits to see it exit
RELEASE_GRACE = 2.0  # how long an open waits for a dying program's end to be released


class ExitWatcher:
    """Exit statuses of writing programs, from the kernel's proc connector or /proc."""

    def __init__(self) -> None:
        raw = procs.open_exit_events()
        self._sock = trio.socket.from_stdlib_socket(raw) if raw is not None else None
        self._watched: dict[int, int | None] = {}  # pid -> status once it exited
        self.changed = Notifier()

    @property
    def precise(self) -> bool:
        return self._sock is not None

    def watch(self, pid: int) -> None:
        self._watched.setdefault(pid, None)

    def forget(self, pid: int) -> None:
        self._watched.pop(pid, None)

    async def run(self) -> None:
        if self._sock is None:
            log.info(
                "proc connector unavailable (not root, or not the initial network "
                "namespace): exit statuses come from /proc"
            )
            return
        with self._sock:
            while True:
                data = await self._sock.recv(4096)
                event = procs.parse_exit_event(data)
                if event is not None and event[0] in self._watched:
                    self._watched[event[0]] = event[1]
                    self.changed.notify()

    async def outcome(self, pid: int, grace: float) -> int | None:
        """The exit status of ``pid`` if it exits within ``grace`` seconds, else None."""
        with trio.move_on_after(grace):
            while True:
                status = self._watched.get(pid)
                if status is None:
                    status = procs.exit_status(pid)
                if status is not None:
                    return status
                if self._sock is not None:
                    await self.changed.wait()
                else:
                    await trio.sleep(0.002)
        return None


@dataclass
class Slot:
    """Both ends of one edge as this node holds them (either may be absent)."""

    edge: EdgeId
    writer: WriterEnd | None = None
    reader: ReaderEnd | None = None
    opening: set[str] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return self.writer is None and self.reader is None and not self.opening


class Node:
    def __init__(self, config: NodeConfig, discovery: DiscoveryClient, endpoint: str) -> None:
        self.config = config
        self.name = config.node
        self.discovery = discovery
        self.endpoint = endpoint
        self.slots: dict[EdgeId, Slot] = {}
        self.writers_changed = Notifier()  # a writer end was installed, or failed to open
        self.released = Notifier()  # a program's end was released
        self._nursery: trio.Nursery | None = None
        self.closing = False
        self.exits = ExitWatcher()
        self.boot = secrets.token_hex(8)  # tells discovery this is a new run of the daemon
        self.mode = Mode(config.mode)
        self.mode_overrides: dict[EdgeId, Mode] = {}  # per edge (xattr user.fractalfs.mode)
        self.spill_bandwidth = 200e6  # bytes/s until measured

    # -- lifecycle -----------------------------------------------------------------------

    async def run(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._forever, self._accept, listener)
            nursery.start_soon(self._forever, self._watch_events)
            nursery.start_soon(self._forever, self._report_progress)
            nursery.start_soon(self._forever, self.exits.run)
            nursery.start_soon(self._forever, self._heartbeat)
            nursery.start_soon(self._forever, self._apply_policy)
            nursery.start_soon(self._forever, self._collect_spills)
            nursery.start_soon(self._measure_spill_bandwidth)
            task_status.started()

    def shutdown(self) -> None:
        """Wakes every blocked program with an error; stops serving."""
        self.closing = True
        for slot in list(self.slots.values()):
            if slot.writer is not None:
                slot.writer.abort(AbortReason.SHUTDOWN, "the writer's daemon is shutting down")
            if slot.reader is not None:
                slot.reader.fail(errno.EIO, "the reader's daemon is shutting down")

    async def stop(self) -> None:
        self.shutdown()
        with trio.move_on_after(1):
            try:
                await self.discovery.leave(self.name)
            except (Unavailable, DiscoveryError) as exc:
                log.info("could not tell discovery we leave: %s", exc)
        # Give connections a moment to tell their peers, then stop everything.
        with trio.move_on_after(0.5):
            while any(s.writer and s.writer.connection for s in self.slots.values()):
                await trio.sleep(0.02)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, fn, *args)

    spawn = _spawn  # for fiforoute: a guarded background task of this node

    async def _forever(self, fn: Any, *args: Any) -> None:
        """Runs a service task of the node; restarts it if it fails."""
        while True:
            try:
                await fn(*args)
                return
            except Exception:
                log.exception("%s failed; restarting it", getattr(fn, "__name__", fn))
                await trio.sleep(1.0)

    async def _guarded(self, fn: Any, *args: Any) -> None:
        """A background task's failure is logged; it never takes the daemon down."""
        try:
            await fn(*args)
        except Exception:
            log.exception("background task %s failed", getattr(fn, "__name__", fn))
            for arg in args:
                if isinstance(arg, ReaderEnd):
                    arg.fail(errno.EIO, "internal error; see the daemon's log")

    def _slot(self, edge: EdgeId) -> Slot:
        slot = self.slots.get(edge)
        if slot is None:
            slot = self.slots[edge] = Slot(edge)
        return slot

    @contextlib.contextmanager
    def _opening(self, slot: Slot, end: str) -> Iterator[None]:
        """While discovery is asked for an end of ``slot``: the end is opening (a second
        open here is EBUSY), and discovery's refusals become errnos."""
        slot.opening.add(end)
        try:
            yield
        except Conflict as exc:
            raise EdgeError(errno.EBUSY, str(exc)) from None
        except (Unavailable, DiscoveryError) as exc:
            raise EdgeError(errno.EIO, str(exc)) from None
        finally:
            slot.opening.discard(end)
            self._reap(slot.edge)
            self.writers_changed.notify()  # a data connection may wait for this end

    async def _await_release(self, end: WriterEnd | ReaderEnd, pid: int) -> None:
        """A re-run often opens the edge while the killed program it replaces is still
        exiting, before the kernel has sent that program's RELEASE: wait a moment for it
        instead of answering EBUSY. A live holder is not waited for."""
        if not procs.dying(end.pid):
            return
        with trio.move_on_after(RELEASE_GRACE):
            while not end.released:
                await wait_or_interrupt(self.released, pid, self.config.signal_poll)

    def _reap(self, edge: EdgeId) -> None:
        slot = self.slots.get(edge)
        if slot is None:
            return
        if slot.writer is not None and slot.writer.released and slot.writer.done:
            slot.writer = None
        if slot.empty:
            del self.slots[edge]

    # -- writers -------------------------------------------------------------------------

    async def open_writer(self, edge: EdgeId, pid: int) -> WriterEnd:
        if self.closing:
            raise EdgeError(errno.ESHUTDOWN, "daemon is shutting down")
        slot = self._slot(edge)
        old = slot.writer
        if old is not None and old.state is WriterState.OPEN and not old.released:
            await self._await_release(old, pid)
            slot = self._slot(edge)
            old = slot.writer
        if "writer" in slot.opening or (old is not None and old.state is WriterState.OPEN):
            raise EdgeError(errno.EBUSY, f"edge {edge} already has a writer on this node")
        with self._opening(slot, "writer"):
            rec = await self.discovery.register_writer(edge.hex, self.name, self.endpoint)
        slot = self._slot(edge)
        if slot.writer is not None:
            slot.writer.abort(AbortReason.STALE, "a newer writer took the edge over")
        writer = WriterEnd(edge, int(rec["generation"]), self.config.write_window, pid)
        writer.written_metric = metrics.BYTES_WRITTEN.labels(edge.hex)
        slot.writer = writer  # before any waiter runs: nothing here awaits
        self.exits.watch(pid)
        self._set_up_mode(writer)
        log.info("edge %s: writer opened, generation %d", edge, writer.generation)
        return writer

    def _set_up_mode(self, writer: WriterEnd) -> None:
        writer.configured = self.mode_overrides.get(writer.edge, self.mode)
        try:
            writer.pgid = os.getpgid(writer.pid)
        except OSError:
            writer.pgid = writer.pid
        writer.cpu_at_open, writer.queued_at_open = procs.group_times(writer.pgid)
        if writer.configured is Mode.PERSISTENT:
            self._persist(writer, "configured persistent")
        elif writer.configured is Mode.DYNAMIC:
            writer.retain_limit = self.config.retain_limit
            writer.mode_reason = "dynamic: undecided"
            writer.on_window_full = self._window_full
            writer.on_switch_failed = self._switch_failed
        self._spawn(self._report_mode, writer)

    def _persist(self, writer: WriterEnd, reason: str) -> bool:
        try:
            sp = spill.SpillFile.create(
                self.config.spill_dir, writer.edge, writer.generation, writer.base
            )
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
        self._spawn(self._report_mode, writer)

    def _window_full(self, writer: WriterEnd) -> None:
        """Dynamic mode, the reader absent or slow: spill rather than block the producer."""
        if writer.configured is Mode.DYNAMIC and writer.spill is None:
            decision = decide(self._observe(writer, window_full=True))
            if decision.mode is Mode.PERSISTENT and self._persist(writer, decision.reason):
                self._spawn(self._report_mode, writer)

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
            for slot in list(self.slots.values()):
                w = slot.writer
                if w is None or w.state is not WriterState.OPEN or w.spill is not None:
                    continue
                if w.configured is not Mode.DYNAMIC or not w.retain_limit:
                    continue
                decision = decide(self._observe(w))
                if decision.mode is Mode.PERSISTENT:
                    if self._persist(w, decision.reason):
                        self._spawn(self._report_mode, w)
                else:
                    w.mode_reason = decision.reason

    async def _report_mode(self, writer: WriterEnd) -> None:
        try:
            await self.discovery.set_mode(
                writer.edge.hex, writer.generation, writer.mode.value, writer.mode_reason
            )
        except (Unavailable, DiscoveryError) as exc:
            log.debug("edge %s: could not report mode: %s", writer.edge, exc)

    async def _measure_spill_bandwidth(self) -> None:
        try:
            bw = await trio.to_thread.run_sync(spill.measure_bandwidth, self.config.spill_dir)
        except OSError as exc:
            log.warning("cannot measure spill bandwidth in %s: %s", self.config.spill_dir, exc)
            return
        self.spill_bandwidth = bw
        log.info("spill bandwidth of %s: %.0f MB/s", self.config.spill_dir, bw / 1e6)

    def _gauge(self) -> None:
        spills = [s.writer.spill for s in self.slots.values() if s.writer and s.writer.spill]
        metrics.OPEN_EDGES.set(len(self.slots))
        metrics.SPILL_FILES.set(len(spills))
        metrics.SPILL_BYTES.set(sum(sp.end - sp.start for sp in spills))

    async def _collect_spills(self) -> None:
        """Deletes spill files nobody can need any more: delivered, and past retention or
        over the quota (oldest first). Undelivered ones are never touched; the prefix of a
        failed generation goes the same way (a re-run reproduces it), or when superseded."""
        while True:
            await trio.sleep(1.0)
            self._gauge()
            now = trio.current_time()
            delivered = [
                s.writer
                for s in self.slots.values()
                if s.writer is not None
                and s.writer.spill is not None
                and s.writer.connection is None
                and (
                    s.writer.state is WriterState.FAILED
                    or (s.writer.state is WriterState.COMPLETE and s.writer.acked >= s.writer.end)
                )
            ]
            delivered.sort(key=lambda w: w.completed_at or 0.0)
            total = sum(w.spill.end - w.spill.start for w in delivered if w.spill)
            for w in delivered:
                expired = now - (w.completed_at or now) > self.config.spill_retention
                over = self.config.spill_quota and total > self.config.spill_quota
                if not (expired or over):
                    continue
                assert w.spill is not None
                total -= w.spill.end - w.spill.start
                log.info(
                    "edge %s: spill file removed (%s)",
                    w.edge,
                    "retention passed" if expired else "over quota",
                )
                w.spill.remove()
                w.spill = None
                self._reap(w.edge)

    async def restore_spills(self) -> None:
        """After a restart: serve the spill files again. A complete one is the whole
        stream; an incomplete one died with its writer (its program lost this mount), so
        its generation is failed, but its prefix is served until a re-run supersedes it
        (a reader verifies it against the re-run, as after any failed writer)."""
        for info in spill.scan(self.config.spill_dir):
            complete = info.complete is not None
            try:
                await self.discovery.restore_writer(
                    info.edge.hex, info.generation, self.name, self.endpoint, complete
                )
            except (Conflict, DiscoveryError) as exc:
                log.info("edge %s: spill not restored (%s)", info.edge, exc)
                info.path.unlink(missing_ok=True)
                continue
            writer = WriterEnd(info.edge, info.generation, self.config.write_window, 0)
            writer.spill = spill.SpillFile.open(info)
            writer.base = writer.end = writer.spill.end
            writer.acked = 0  # not known to be delivered: keep it for its reader
            writer.mode = Mode.PERSISTENT
            writer.mode_reason = "restored from its spill file"
            writer.state = WriterState.COMPLETE if complete else WriterState.FAILED
            writer.completed_at = trio.current_time()
            writer.released = True
            self._slot(info.edge).writer = writer
            log.info(
                "edge %s: %s spill of generation %d (%d bytes) served again",
                info.edge,
                "complete" if complete else "incomplete (failed)",
                info.generation,
                writer.end,
            )

    async def write(self, writer: WriterEnd, data: bytes) -> int:
        n = await writer.write(data, self.config.signal_poll)
        writer.written_metric.inc(n)
        return n

    async def flush_writer(self, writer: WriterEnd) -> None:
        """A close(2) of the writer's file: the last spill append must have landed (close
        fails with its error otherwise); note whether its program is exiting, and how."""
        if writer.spill is not None and writer.state is WriterState.OPEN:
            await writer.drain_spill(self.config.signal_poll)
        writer.exit_status = procs.exit_status(writer.pid)

    def release_writer(self, writer: WriterEnd) -> None:
        """The writer's file is closed for good: the stream ends, cleanly or not.

        A program killed by a signal or exiting non-zero did not finish its stream: that is
        a failed generation (the reader waits for a re-run), never an end.
        """
        writer.released = True
        self.released.notify()
        if writer.state is WriterState.ABORTED:
            reason, message = writer.abort_reason or (AbortReason.REMOVED, "")
            if reason is AbortReason.READER_LOST:
                # Readers must not try this generation again: only a re-run can serve them.
                self._spawn(self._close_writer, writer, "failed", message)
        if writer.state is not WriterState.OPEN:
            self._reap(writer.edge)
            return
        if writer.exit_status is not None and not writer.spilling:
            self._settle(writer, writer.exit_status)
        else:
            # Closed while its program still ran; GNU tools do that in atexit right before
            # exiting non-zero, so watch it for a moment before calling the stream complete.
            self._spawn(self._settle_later, writer)

    async def _settle_later(self, writer: WriterEnd) -> None:
        while writer.spilling:
            await writer.changed.wait()
        status = writer.exit_status
        if status is None:
            status = await self.exits.outcome(writer.pid, CLOSE_GRACE)
        self._settle(writer, status or 0)

    def _settle(self, writer: WriterEnd, status: int) -> None:
        self.exits.forget(writer.pid)
        if writer.state is not WriterState.OPEN:
            return
        if status or writer.spill_error is not None:
            why = (
                f"writing program {procs.describe_status(status)}"
                if status
                else f"spill file failed: {writer.spill_error}"
            )
            log.warning("edge %s: %s: generation %d failed", writer.edge, why, writer.generation)
            writer.finish(WriterState.FAILED)
            self._spawn(self._close_writer, writer, "failed", why)
        else:
            if writer.spill is not None:
                try:
                    writer.spill.finish()
                except OSError as exc:
                    log.warning("edge %s: spill file not completed: %s", writer.edge, exc)
            writer.finish(WriterState.COMPLETE)
            self._spawn(self._close_writer, writer, "complete", "")
            if writer.configured is Mode.DYNAMIC and writer.spill is None:
                # Say how it ended: the policy's last reason, or that it never had to decide.
                undecided = writer.mode_reason == "dynamic: undecided"
                writer.mode_reason = "dynamic, stayed transient: " + (
                    "finished before it had to decide" if undecided else writer.mode_reason
                )
                self._spawn(self._report_mode, writer)
        self._reap(writer.edge)

    async def _record(self, edge: EdgeId, kind: str, data: dict[str, Any]) -> None:
        try:
            await self.discovery.record(edge.hex, kind, data)
        except (Unavailable, DiscoveryError) as exc:
            log.debug("edge %s: event %s not recorded: %s", edge, kind, exc)

    async def _close_writer(self, writer: WriterEnd, state: str, reason: str) -> None:
        await self._until_recorded(
            writer.edge,
            f"writer {state}",
            functools.partial(
                self.discovery.close_writer,
                writer.edge.hex,
                writer.generation,
                state,
                writer.end,
                reason,
            ),
        )

    async def _until_recorded(
        self, edge: EdgeId, what: str, call: Callable[[], Awaitable[object]]
    ) -> None:
        """How an end finished must reach discovery (status, completion events, a re-run's
        pairing), even when discovery is down for longer than one request retries: keep
        trying, with backoff, until it is recorded or discovery refuses it (a newer
        generation or reader took the edge over meanwhile)."""
        attempt = 0
        while True:
            try:
                await call()
            except Unavailable as exc:
                if attempt == 0:
                    log.warning("edge %s: %s not recorded yet (%s); retrying", edge, what, exc)
                await trio.sleep(backoff(attempt, cap=5.0))
                attempt += 1
                continue
            except (Conflict, DiscoveryError) as exc:
                log.warning("edge %s: could not record %s: %s", edge, what, exc)
                return
            if attempt:
                log.info("edge %s: %s recorded", edge, what)
            return

    # -- readers -------------------------------------------------------------------------

    async def open_reader(self, edge: EdgeId, pid: int) -> ReaderEnd:
        if self.closing:
            raise EdgeError(errno.ESHUTDOWN, "daemon is shutting down")
        slot = self._slot(edge)
        if slot.reader is not None:
            await self._await_release(slot.reader, pid)
            slot = self._slot(edge)
        if "reader" in slot.opening or slot.reader is not None:
            raise EdgeError(errno.EBUSY, f"edge {edge} already has a reader on this node")
        with self._opening(slot, "reader"):
            await self._claim_reader(edge, pid)
        reader = ReaderEnd(edge, self.config.read_buffer, pid)
        reader.read_metric = metrics.BYTES_READ.labels(edge.hex)
        self._slot(edge).reader = reader
        self._spawn(self._pump, reader)
        return reader

    async def _claim_reader(self, edge: EdgeId, pid: int) -> None:
        """Discovery refuses a second open reader; but the reader it knows of may be a
        killed one whose node has not said so yet (the re-run came at once, elsewhere).
        Give that release a moment to arrive, watching the edge, before answering EBUSY."""
        deadline = trio.current_time() + RELEASE_GRACE
        while True:
            try:
                await self.discovery.claim_reader(edge.hex, self.name)
                return
            except Conflict:
                left = deadline - trio.current_time()
                if left <= 0:
                    raise
            rec = await self.discovery.get(edge.hex)
            await self.discovery.get(
                edge.hex, wait=min(left, self.config.signal_poll), since=int(rec["version"])
            )
            if procs.signal_pending(pid):
                raise EdgeError(errno.EINTR, "interrupted by a signal")

    async def read(self, reader: ReaderEnd, size: int) -> bytes | memoryview:
        data = await reader.read(size, self.config.signal_poll)
        reader.read_metric.inc(len(data))
        return data

    def flush_reader(self, reader: ReaderEnd) -> None:
        reader.exit_status = procs.exit_status(reader.pid)

    def release_reader(self, reader: ReaderEnd) -> None:
        reader.released = True
        self.released.notify()
        complete = reader.state is ReaderState.EOF and reader.delivered == reader.received
        if reader.state is not ReaderState.EOF:
            if not procs.reader_closed_early(reader.exit_status):
                # Killed or failed: not "I want no more". A persistent writer carries on for
                # a re-run reader; a transient one learns when the re-run asks for offset 0.
                reader.close(tell_writer=False)
            else:
                reader.close()  # the pump tells the writer (its next write gets EPIPE)
        slot = self.slots.get(reader.edge)
        if slot is not None and slot.reader is reader:
            slot.reader = None
            self._reap(reader.edge)
        state = "done" if complete else "closed"
        self._spawn(self._release_reader, reader, state)

    async def _release_reader(self, reader: ReaderEnd, state: str) -> None:
        await self._until_recorded(
            reader.edge,
            f"reader {state}",
            functools.partial(
                self.discovery.release_reader, reader.edge.hex, self.name, state, reader.delivered
            ),
        )

    async def _pump(self, reader: ReaderEnd) -> None:
        """Carries out the reader machine's actions until the stream ends or fails."""
        edge = reader.edge.hex
        machine = ReaderMachine(
            reconnect_for=self.config.reconnect_for,
            writer_lost_timeout=self.config.writer_lost_timeout,
            long_poll=LONG_POLL,
        )
        with trio.CancelScope() as scope:
            reader.pump = scope
            action = machine.start()
            attempt = 0
            while reader.state in (ReaderState.WAITING, ReaderState.STREAMING):
                if isinstance(action, Query):
                    if action.delay:
                        await trio.sleep(action.delay)
                    try:
                        rec = await self.discovery.get(edge, wait=action.wait, since=action.since)
                    except (Unavailable, DiscoveryError) as exc:
                        log.info("edge %s: discovery: %s; retrying", edge, exc)
                        await trio.sleep(backoff(attempt, cap=1.0))
                        attempt += 1
                        continue
                    attempt = 0
                    view = EdgeView.from_json(rec)
                    action = machine.on_record(view, trio.current_time(), reader.received)
                elif isinstance(action, Connect):
                    if machine.lost_since is not None or action.replay:
                        resumed_from = reader.received
                        kind = "replay" if action.replay else "reconnect"

                        def connected(gen: int, off: int = resumed_from, how: str = kind) -> None:
                            machine.on_connected(gen)
                            metrics.RESUMES.labels(how).inc()
                            self._spawn(
                                self._record,
                                reader.edge,
                                "resumed",
                                {"offset": off, "generation": gen, "how": how},
                            )

                        on_connected: Callable[[int], None] = connected
                    else:
                        on_connected = machine.on_connected
                    result = await self._pull_once(reader, action, on_connected)
                    log.debug("edge %s: pull ended: %s %s", edge, result.outcome, result.detail)
                    if result.outcome is PullOutcome.LOST:
                        log.info("edge %s: %s", edge, result.detail)
                        metrics.RECONNECTS.inc()
                    action = machine.on_pull(result.outcome, result.detail, trio.current_time())
                elif isinstance(action, Fail):
                    reader.fail(action.errno, f"edge {edge}: {action.reason}")
                    if action.reason.startswith("replay diverged"):
                        await self._record(reader.edge, "diverged", {"reason": action.reason})
                    return
                else:
                    return

    async def _pull_once(
        self, reader: ReaderEnd, action: Connect, on_connected: Callable[[int], None]
    ) -> dataplane.Result:
        local = self.writer_for(reader.edge)
        if action.node == self.name and local is not None and local.generation == action.generation:
            return await dataplane.pull_local(reader, local, action.replay, on_connected)
        return await dataplane.pull(
            reader, action.endpoint, action.generation, action.replay, on_connected
        )

    # -- whole edges ---------------------------------------------------------------------

    async def remove(self, edge: EdgeId) -> None:
        """Ends the edge on every node (the one here at once, others via discovery)."""
        known = edge in self.slots
        try:
            await self.discovery.delete(edge.hex)
        except DiscoveryError as exc:
            if exc.status != 404 or not known:
                raise EdgeError(errno.ENOENT, str(exc)) from None
        except Unavailable as exc:
            raise EdgeError(errno.EIO, str(exc)) from None
        self._abort_local(edge, "removed")

    def _abort_local(self, edge: EdgeId, why: str) -> None:
        slot = self.slots.get(edge)
        if slot is None:
            return
        log.info("edge %s: %s", edge, why)
        if slot.writer is not None:
            slot.writer.abort(AbortReason.REMOVED, f"edge {edge} was {why}")
        if slot.reader is not None:
            slot.reader.fail(errno.ECANCELED, f"edge {edge} was {why}")
        self._reap(edge)

    def writer_for(self, edge: EdgeId) -> WriterEnd | None:
        slot = self.slots.get(edge)
        return slot.writer if slot is not None else None

    async def _writer_for_hello(self, edge: EdgeId, generation: int) -> WriterEnd | None:
        """The writer end a reader dials for ``generation``.

        Discovery hands the new generation to waiting readers the moment it records it,
        while its answer to this daemon may still be on the way: a reader can dial before
        the end is installed here. Wait for the registration rather than call that
        generation gone (the reader would then wait for a re-run that never comes).
        """
        with trio.move_on_after(dataplane.HANDSHAKE_TIMEOUT):
            while True:
                slot = self.slots.get(edge)
                writer = slot.writer if slot is not None else None
                if writer is not None and writer.generation >= generation:
                    return writer
                if slot is None or "writer" not in slot.opening:
                    return writer
                await self.writers_changed.wait()
        return self.writer_for(edge)

    # -- background ----------------------------------------------------------------------

    async def _accept(self, listener: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, _addr = await listener.accept()
                except OSError as exc:
                    log.warning("data plane accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._guarded, self._serve, sock)

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                dataplane.tune(sock)
                hello = await dataplane.read_hello(sock)
                writer = await self._writer_for_hello(hello.edge, hello.generation)
                reply = dataplane.check_hello(hello, writer)
                await dataplane.send_all(sock, [reply.encode()])
                if (
                    writer is not None
                    and reply.status is Status.BAD_OFFSET
                    and hello.offset < writer.base
                    and writer.state is WriterState.OPEN
                ):
                    # A re-run reader wants bytes already acknowledged and freed: only a
                    # re-run of this writer can produce them again.
                    writer.abort(AbortReason.READER_LOST, "the reader restarted")
                if writer is None or reply.status is not Status.OK:
                    return
                writer.reader_lost = False  # it redialled: alive after all
                try:
                    await dataplane.serve_edge(sock, writer, hello.offset)
                finally:
                    if writer.connection is None:
                        self._reader_gone(writer)  # a no-op unless discovery lost its node
                self._reap(writer.edge)
            except* (OSError, dataplane.ConnectionLost, trio.TooSlowError) as group:
                log.debug("data connection ended: %s", group.exceptions[0])
            except* HandshakeError as group:
                log.info("rejected data connection: %s", group.exceptions[0])

    async def _watch_events(self) -> None:
        """Follows discovery's event log: removals made on other nodes end edges here."""
        after = -1
        attempt = 0
        while True:
            try:
                if after < 0:
                    after = int((await self.discovery.health(retry_for=0))["last_event"])
                got = await self.discovery.events(after, wait=LONG_POLL)
                attempt = 0
            except (Unavailable, DiscoveryError, KeyError, ValueError):
                await trio.sleep(backoff(attempt, cap=2.0))
                attempt += 1
                continue
            for event in got["events"]:
                self._on_event(event)
            after = int(got["last"])

    def _on_event(self, event: dict[str, Any]) -> None:
        try:
            edge = EdgeId.parse(event["edge"])
        except (KeyError, ValueError):
            return
        kind = event.get("kind")
        data = event.get("data") or {}
        writer = self.writer_for(edge)
        if kind == "deleted":
            self._abort_local(edge, "removed")
        elif kind == "writer" and writer is not None:
            if int(data.get("generation", 0)) > writer.generation:
                self._fence(writer)
        elif kind == "reader-lost" and writer is not None:
            writer.reader_lost = True
            # A silent node may only be stalled or cut off: while its connection lives (or
            # until it comes back and redials) it loses nothing. A restarted or departed
            # daemon took what its reader had delivered with it.
            if data.get("cause") != "silent" or writer.connection is None:
                self._reader_gone(writer)
        elif kind in ("reader-back", "reader") and writer is not None:
            writer.reader_lost = False

    def _reader_gone(self, writer: WriterEnd) -> None:
        """The reader's daemon is gone. If it had acknowledged bytes that a transient writer
        has freed, only a re-run of the writer can serve the next reader: fail it now."""
        if (
            writer.reader_lost
            and writer.acked > 0
            and writer.state is WriterState.OPEN
            and writer.spill is None  # a persistent stream still has every byte for a re-run
        ):
            log.warning("edge %s: the reader's node was lost with acknowledged bytes", writer.edge)
            writer.abort(AbortReason.READER_LOST, "the reader's node was lost")

    def _fence(self, writer: WriterEnd) -> None:
        if writer.state is not WriterState.ABORTED:
            log.warning(
                "edge %s: generation %d fenced off by a newer writer",
                writer.edge,
                writer.generation,
            )
            writer.abort(AbortReason.STALE, "a newer writer generation took the edge over")
            self._reap(writer.edge)

    async def heartbeat_once(self) -> None:
        """Tells discovery which ends this daemon holds; fences off the stale ones."""
        writers = {
            e.hex: s.writer.generation
            for e, s in self.slots.items()
            if s.writer is not None and s.writer.state in (WriterState.OPEN, WriterState.COMPLETE)
        }
        readers = [e.hex for e, s in self.slots.items() if s.reader is not None]
        stale = await self.discovery.heartbeat(self.name, self.boot, writers, readers)
        for edge in stale:
            writer = self.writer_for(EdgeId.parse(edge))
            # Only the generation reported: a newer one may have opened meanwhile.
            if writer is not None and writer.generation == writers.get(edge):
                self._fence(writer)

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.heartbeat_once()
            except (Unavailable, DiscoveryError) as exc:
                log.debug("heartbeat failed: %s", exc)
            await trio.sleep(HEARTBEAT_EVERY)

    async def _report_progress(self) -> None:
        reported: dict[EdgeId, int] = {}
        while True:
            await trio.sleep(1.0)
            for edge, slot in list(self.slots.items()):
                reader = slot.reader
                if reader is None or reported.get(edge) == reader.delivered:
                    continue
                reported[edge] = reader.delivered
                with contextlib.suppress(Unavailable, DiscoveryError):
                    await self.discovery.progress(edge.hex, reader.delivered)
            for edge in list(reported):
                if edge not in self.slots:
                    del reported[edge]
