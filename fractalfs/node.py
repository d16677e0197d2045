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
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import trio

from . import dataplane, metrics, procs, testhooks, writerstate
from .codec import AbortReason
from .config import NodeConfig
from .dataserver import DataServer
from .discovery.client import (
    Conflict,
    DiscoveryClient,
    DiscoveryError,
    Unavailable,
)
from .edgeid import EdgeId
from .edges import (
    NOT_OPENING,
    EdgeError,
    Notifier,
    ReaderEnd,
    ReaderState,
    WriterEnd,
    WriterState,
    wait_or_interrupt,
)
from .edgestate import (
    Connect,
    EdgeView,
    Fail,
    PullOutcome,
    Query,
    ReaderMachine,
    Unfinished,
    backoff,
)
from .exits import ExitWatcher
from .follow import Follower, Parked
from .membership import Membership
from .persistence import DYNAMIC_UNDECIDED, Persistence
from .policy import Mode
from .tls import Tls
from .writerstate import Exit, Exited, Unknown

log = logging.getLogger(__name__)
T = TypeVar("T")

LONG_POLL = 120.0  # a waiting pump looks at its edge again after this long (the feed wakes it)
ABORTED_PIDS_MAX = 4096  # Node.aborted_pids: at most this many; when full, those older
ABORTED_PIDS_AGE = 60.0  # than this many seconds go (or the older half)
CLOSE_GRACE = 0.25  # how long a close by a live program waits to see it exit
RELEASE_GRACE = 2.0


class WouldWait(Exception):
    """An open that may not wait (a FIFO's LOOKUP, see :meth:`Node.open_writer`) found the
    end held (on another node, or here by a file not yet released): the caller opens
    through FUSE instead, where it waits."""


#: An early close before the reader's daemon is connected to the writer's waits this long
#: for the connection: the "no more" travels on it (``: < E`` while ``yes > E`` runs).
CONNECT_WAIT = 1.0


_NOT_OPENING = NOT_OPENING  # every slot's ``opening`` when nothing opens


@dataclass(slots=True)
class Slot:
    """Both ends of one edge as this node holds them (either may be absent).

    An edge whose only end here is a reader, with nothing opening, is held by the
    :class:`ReaderEnd` itself in ``Node.slots`` (it answers ``reader``, ``writer``,
    ``opening`` and ``empty`` as this slot would): thousands of readers wait, and a Slot
    each was 64 bytes. Read any entry; change one only through ``Node._slot``."""

    edge: EdgeId
    writer: WriterEnd | None = None
    reader: ReaderEnd | None = None
    # Replaced, never changed in place: the empty one is shared (a set is 216 bytes, and
    # a daemon holds a slot per waiting reader).
    opening: frozenset[str] = _NOT_OPENING

    @property
    def empty(self) -> bool:
        return self.writer is None and self.reader is None and not self.opening


class Node:
    def __init__(self, config: NodeConfig, discovery: DiscoveryClient, endpoint: str) -> None:
        self.config = config
        self.name = config.node
        self.discovery = discovery
        self.endpoint = endpoint
        self.slots: dict[EdgeId, Slot | ReaderEnd] = {}  # see Slot
        self.writers_changed = Notifier()  # a writer end was installed, or failed to open
        self.released = Notifier()  # a program's end was released
        self._nursery: trio.Nursery | None = None
        self.closing = False
        self.settling = 0  # closed writer ends waiting to learn how their program ended
        self.exits = ExitWatcher()
        # Programs whose writer this daemon ended with EPIPE/SIGPIPE for a failure (abort:
        # rm, fenced, reader lost, shutdown), not for a reader's "no more": pid -> when.
        # A pipeline peer dying of that SIGPIPE cut its siblings' streams (cut_short).
        self.aborted_pids: dict[int, float] = {}
        self.boot = secrets.token_hex(8)  # tells discovery this is a new run of the daemon
        # Discovery has taken a heartbeat of this run (Membership.heartbeat_once). Until
        # then a writer registered here would be taken for the previous run's when that
        # heartbeat tells discovery of the restart (failed, or its endpoint cleared; a
        # reader lost with acknowledged bytes): mount sets ``unannounced`` when its first
        # heartbeat failed, and writers' registrations and readers' claims wait.
        self.announced = trio.Event()
        self.unannounced = False
        self.data_key: bytes | None = None  # the HELLO's HMAC key (auth.data_key); mount sets it
        self.tls: Tls | None = None  # --tls-dir: mutual TLS on data connections; mount sets it
        self.mode = Mode(config.mode)
        self.mode_overrides: dict[EdgeId, Mode] = {}  # per edge (xattr user.fractalfs.mode)
        self._closing: dict[EdgeId, trio.Event] = {}  # a generation's end not recorded yet
        # The pull of each reader now: (its generation, its scope), for supersede().
        self._pulls: dict[EdgeId, tuple[int, trio.CancelScope]] = {}
        # The generation each reader last pulled, by edge: (its claim, the generation), told
        # with its release (a late "closed" must not stop a newer generation's writer).
        self._paired: dict[EdgeId, tuple[int, int]] = {}
        # Readers closed unread whose end waits for a reopen (linger_reader), by edge.
        self._lingering: dict[EdgeId, tuple[ReaderEnd, trio.CancelScope]] = {}
        # The parts that own the node's background tasks (each started with nursery.start).
        self.persistence = Persistence(self)
        self.membership = Membership(self)
        self.data_server = DataServer(self)
        self.follower = Follower(discovery)  # one long-poll for every waiting reader
        self._unpark = self._resume_parked  # one bound method for every parked reader

    # -- lifecycle -----------------------------------------------------------------------

    async def run(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._forever, self.exits.run)
            nursery.start_soon(self._forever, self.follower.run)
            nursery.start_soon(self._forever, self.follower.expire_parked)
            await nursery.start(self.data_server.run, listener)
            await nursery.start(self.membership.run)
            await nursery.start(self.persistence.run)
            task_status.started()

    async def heartbeat_once(self) -> None:
        await self.membership.heartbeat_once()

    async def restore_spills(self) -> None:
        await self.persistence.restore_spills()

    def shutdown(self) -> None:
        """Wakes every blocked program with an error; stops serving."""
        self.closing = True
        self.membership.pulse.stop()  # before it leaves: a late pulse is not taken after
        for slot in list(self.slots.values()):
            if slot.writer is not None:
                self._abort_writer(
                    slot.writer, AbortReason.SHUTDOWN, "the writer's daemon is shutting down"
                )
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
        """The edge's slot, to change (a reader standing for its slot gets one again)."""
        slot = self.slots.get(edge)
        if slot is None:
            slot = self.slots[edge] = Slot(edge)
        elif not isinstance(slot, Slot):
            slot = self.slots[edge] = Slot(edge, reader=slot)
        return slot

    @contextlib.contextmanager
    def _opening(self, slot: Slot, end: str) -> Iterator[None]:
        """While discovery is asked for an end of ``slot``: the end is opening (a second
        open here is EBUSY), and discovery's refusals become errnos."""
        slot.opening = slot.opening | {end}
        try:
            yield
        except Conflict as exc:
            raise EdgeError(errno.EBUSY, str(exc)) from None
        except (Unavailable, DiscoveryError) as exc:
            raise EdgeError(errno.EIO, str(exc)) from None
        finally:
            slot.opening = slot.opening - {end} or _NOT_OPENING
            self._reap(slot.edge)
            self.writers_changed.notify()  # a data connection may wait for this end

    async def _interruptible(self, pid: int, call: Callable[[], Awaitable[T]]) -> T:
        """Runs a discovery ``call`` for the program ``pid``; answers EINTR as soon as that
        program gets a signal. Discovery calls retry for up to ``discovery_retry`` seconds,
        and pyfuse3 ignores FUSE_INTERRUPT: without this a program opening or removing an
        edge while discovery is down could not even be killed for that long."""
        if pid <= 0:
            return await call()
        interrupted = False
        result: list[T] = []
        try:
            async with trio.open_nursery() as nursery:

                async def poll() -> None:
                    nonlocal interrupted
                    while True:
                        await trio.sleep(self.config.signal_poll)
                        if procs.signal_pending(pid):
                            interrupted = True
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(poll)
                result.append(await call())
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the call's own error, one of one
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        if interrupted:
            raise EdgeError(errno.EINTR, "interrupted by a signal")
        return result[0]

    async def _await_release(self, end: WriterEnd | ReaderEnd, pid: int) -> None:
        """A re-run often opens the edge while the killed program it replaces is still
        exiting, before the kernel has sent that program's RELEASE: wait a moment for it
        instead of answering EBUSY. A live holder is not waited for."""
        if not procs.dying(end.tgid):
            # A killed program passes through an instant where its SIGKILL is no longer
            # pending and it is not yet exiting (/proc shows neither): look once more.
            await trio.sleep(0.02)
            if end.released or not procs.dying(end.tgid):
                return
        with trio.move_on_after(RELEASE_GRACE):
            while not end.released:
                await wait_or_interrupt(self.released, pid, self.config.signal_poll)

    def _reap(self, edge: EdgeId) -> None:
        slot = self.slots.get(edge)
        if not isinstance(slot, Slot):
            return  # none, or a reader alone (see Slot)
        if slot.writer is not None and slot.writer.released and slot.writer.done:
            slot.writer = None
        if slot.empty:
            del self.slots[edge]
            self._paired.pop(edge, None)  # no reader here: none whose release needs it
            metrics.edge_done(edge.hex, lambda e: EdgeId.parse(e) in self.slots)
        elif slot.writer is None and not slot.opening and slot.reader is not None:
            self.slots[edge] = slot.reader  # the reader alone stands for its slot

    # -- writers -------------------------------------------------------------------------

    async def _announced(self) -> None:
        """Until discovery knows this run (see announced), at most ``discovery_retry``."""
        with trio.move_on_after(self.config.discovery_retry):
            await self.announced.wait()

    async def _register_writer(self, edge: EdgeId, mode: tuple[str, str]) -> dict[str, Any]:
        """Registers a writer of this run, once discovery knows the run (see announced)."""
        if self.unannounced and not self.announced.is_set():
            await self._announced()
        return await self.discovery.register_writer(edge.hex, self.name, self.endpoint, mode)

    async def open_writer(self, edge: EdgeId, pid: int, *, wait: bool = True) -> WriterEnd:
        """``wait`` False (a FIFO's LOOKUP, which holds the mount root's lookup lock, so
        every other user's lookups wait for it): a writer still open here or on another
        node raises :class:`WouldWait` at once instead of being given RELEASE_GRACE to
        go (a user can keep an end "being released" for good: its program exited, a
        child of it holds the file)."""
        if self.closing:
            raise EdgeError(errno.ESHUTDOWN, "daemon is shutting down")
        slot = self._slot(edge)
        old = slot.writer
        if old is not None and old.state is WriterState.OPEN and not old.released:
            if not wait:
                raise WouldWait(f"edge {edge}: its writer here is not released yet")
            await self._await_release(old, pid)
            slot = self._slot(edge)
            old = slot.writer
        if "writer" in slot.opening or (old is not None and old.state is WriterState.OPEN):
            raise EdgeError(errno.EBUSY, f"edge {edge} already has a writer on this node")
        expected = self.persistence.expected_mode(edge)
        with self._opening(slot, "writer"):
            await self._await_close_recorded(edge, pid)
            register = functools.partial(
                self._register_writer, edge, (expected[0].value, expected[1])
            )
            rec = await self._until_free(edge, pid, register, wait)
        slot = self._slot(edge)
        if slot.writer is not None:
            self._abort_writer(slot.writer, AbortReason.STALE, "a newer writer took the edge over")
        # ``pid`` is the opening thread; the stream ends with its process, not with it.
        tgid = procs.tgid(pid)
        writer = WriterEnd(edge, int(rec["generation"]), self.config.write_window, pid, tgid)
        writer.written_metric = metrics.BYTES_WRITTEN.labels(edge.hex)
        slot.writer = writer  # before any waiter runs: nothing here awaits
        writer.registered = int(rec.get("version", 0))
        if rec.get("stops_writers"):
            # The edge's last reader closed early ("no more") before any writer came for
            # it, and no reader claimed it since (discovery decides: store.stops_writers):
            # as a FIFO's writer whose reader went, the first write gets EPIPE/SIGPIPE. A
            # reader that failed is no "no more" ("failed"), nor one that closed after a
            # writer came, read or unread: that writer got the "no more" (a re-run of the
            # pipeline whose writer comes first writes for the reader after it).
            log.info("edge %s: its reader closed early before any writer came", edge)
            writer.on_reader_closed()
        try:
            self.exits.watch(tgid, writer)
            # Its pipeline's other processes: one killed before the writer ends cuts the
            # stream short, however the writer exits (ExitWatcher.cut_short).
            writer.peers, writer.upstream, writer.parent_feeds = procs.pipeline_peers(tgid)
            for peer in writer.peers:
                self.exits.watch(peer, writer)
            recorded = (str(rec.get("mode", "")), str(rec.get("mode_reason", "")))
            self.persistence._set_up_mode(writer, recorded)
        except OSError as exc:
            self._abandon(writer, exc)  # e.g. EMFILE: no ghost open writer in discovery
        log.info("edge %s: writer opened, generation %d", edge, writer.generation)
        return writer

    def _abandon(self, writer: WriterEnd, exc: OSError) -> NoReturn:
        """The writer was registered but cannot be set up here (out of descriptors): its
        generation fails at once in discovery, and the program gets the errno."""
        why = f"writer could not be set up: {exc.strerror or exc}"
        log.warning("edge %s: %s", writer.edge, why)
        writer.released = True
        writer.finish(WriterState.FAILED)
        self._forget_exits(writer)
        self._spawn(self._close_writer, writer, "failed", why)
        self._reap(writer.edge)
        raise EdgeError(exc.errno or errno.EIO, why) from None

    async def write(self, writer: WriterEnd, data: bytes | memoryview) -> int:
        n = await writer.write(data, self.config.signal_poll)
        writer.written_metric.inc(n)
        return n

    async def flush_writer(self, writer: WriterEnd) -> None:
        """A close(2) of the writer's file: the last spill append must have landed (close
        fails with its error otherwise); note whether its program is exiting, and how."""
        if writer.spill is not None and writer.state is WriterState.OPEN:
            await writer.drain_spill(self.config.signal_poll)
        writer.exit_status = procs.exit_status(writer.tgid)
        if writer.exit_status is None and not procs.closing_a_file(writer.pid):
            # The opener runs on and is not the one closing: this close may be a holder's
            # it handed the file to (a child killed mid-stream). Its death is not an end,
            # however the opener goes on. (A scan of every process: skipped when the opener
            # is itself in close(2), as `dd of=E` or `cmd > E` are, or 1,000 writers closing
            # at once cost a million /proc reads.)
            writer.exit_status = procs.failing_in_group(writer.pgid, writer.tgid)

    def _abort_writer(self, writer: WriterEnd, reason: AbortReason, message: str) -> None:
        """Ends ``writer`` for a failure; its program then gets EPIPE/SIGPIPE, which its
        pipeline may take for "the consumer is gone": GNU ``split --filter`` then stops
        feeding its other filters and exits 0, and their edges must not end complete."""
        now = trio.current_time()
        if len(self.aborted_pids) >= ABORTED_PIDS_MAX:
            old = [pid for pid, t in self.aborted_pids.items() if now - t > ABORTED_PIDS_AGE]
            for pid in old or list(self.aborted_pids)[: ABORTED_PIDS_MAX // 2]:
                del self.aborted_pids[pid]
        self.aborted_pids[writer.tgid] = now
        writer.abort(reason, message)

    def _forget_exits(self, writer: WriterEnd) -> None:
        self.exits.forget(writer.tgid, writer)
        for peer in writer.peers:
            self.exits.forget(peer, writer)

    def release_writer(self, writer: WriterEnd) -> None:
        """The writer's file is closed for good: the stream ends, cleanly or not.

        A program killed by a signal or exiting non-zero did not finish its stream: that is
        a failed generation (the reader waits for a re-run), never an end.
        """
        writer.on_released(None)
        self.released.notify()
        if writer.state is WriterState.ABORTED:
            reason, message = writer.abort_reason or (AbortReason.REMOVED, "")
            if reason is AbortReason.READER_LOST:
                # Readers must not try this generation again: only a re-run can serve them.
                self._report_close(writer, "failed", message)
        if writer.state is not WriterState.OPEN:
            self._reap(writer.edge)
            return
        if writer.exit_status is not None and not writer.spilling:
            self._settle(writer, Exited(writer.exit_status))
        else:
            # Closed while its program still ran; GNU tools do that in atexit right before
            # exiting non-zero, so watch it for a moment before calling the stream complete.
            self.settling += 1  # now, not when the task starts: a stop looks at it
            self._spawn(self._settle_later, writer)

    async def _settle_later(self, writer: WriterEnd) -> None:
        try:
            while writer.spilling:
                await writer.changed.wait()
            exit: Exit
            if writer.exit_status is not None:
                exit = Exited(writer.exit_status)
            else:
                exit = await self.exits.outcome(writer.tgid, CLOSE_GRACE)
            self._settle(writer, exit)
        finally:
            self.settling -= 1

    def _settle(
        self,
        writer: WriterEnd,
        exit: Exit,
        spill_done: bool = False,
        spill_failure: OSError | None = None,
    ) -> None:
        killed = (
            self.exits.cut_short(
                writer.peers,
                writer.tgid,
                self.aborted_pids,
                writer.upstream,
                writer.parent_feeds,
            )
            if writer.peers
            else None
        )
        self._forget_exits(writer)
        if writer.state is not WriterState.OPEN:
            return
        failure = writer.spill_error or spill_failure  # an append's, or the completion's
        spill_error = "" if failure is None else str(failure)
        verdict = writerstate.settle(exit, spill_error)
        if killed is not None and isinstance(verdict, writerstate.Complete):
            verdict = writerstate.FailWriter(
                f"process {killed[0]} of its pipeline {procs.describe_status(killed[1])} "
                "before the writing program ended (the stream may be cut short)"
            )
        if isinstance(exit, Unknown) and not exit.observable:
            log.warning("edge %s: %s: taken as complete", writer.edge, exit.why)
        if isinstance(verdict, writerstate.FailWriter):
            why = verdict.why
            log.warning("edge %s: %s: generation %d failed", writer.edge, why, writer.generation)
            writer.finish(WriterState.FAILED)
            self._report_close(writer, "failed", why)
        elif writer.spill is not None and not writer.spill.complete and not spill_done:
            # Its fsyncs run in a worker thread; the end completes after them.
            self._spawn(self.persistence._complete_spill, writer)
            return
        else:
            writer.finish(WriterState.COMPLETE)
            self._report_close(writer, "complete", "")
            if writer.configured is Mode.DYNAMIC and writer.spill is None:
                # Say how it ended: the policy's last reason, or that it never had to decide.
                undecided = writer.mode_reason == DYNAMIC_UNDECIDED
                writer.mode_reason = "dynamic, stayed transient: " + (
                    "finished before it had to decide" if undecided else writer.mode_reason
                )
                self._spawn(self.persistence._report_mode, writer)
        self._reap(writer.edge)

    async def _record(self, edge: EdgeId, kind: str, data: dict[str, Any]) -> None:
        try:
            await self.discovery.record(edge.hex, kind, data)
        except (Unavailable, DiscoveryError) as exc:
            log.debug("edge %s: event %s not recorded: %s", edge, kind, exc)

    def _report_close(self, writer: WriterEnd, state: str, reason: str) -> None:
        """How a generation ended goes to discovery before a next writer of the edge
        registers here (``open_writer`` waits for it): otherwise a re-run started at once
        can take generation N+1 first, and discovery refuses N's end as stale (its
        'failed' event, which readers and ``fractalfs watch`` show, was lost)."""
        done = trio.Event()
        self._closing[writer.edge] = done
        self._spawn(self._close_writer, writer, state, reason, done)

    async def _close_writer(
        self, writer: WriterEnd, state: str, reason: str, done: trio.Event | None = None
    ) -> None:
        try:
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
        finally:
            if done is not None:
                done.set()
                if self._closing.get(writer.edge) is done:
                    del self._closing[writer.edge]

    async def _until_free(
        self,
        edge: EdgeId,
        pid: int,
        call: Callable[[], Awaitable[dict[str, Any]]],
        wait: bool = True,
    ) -> dict[str, Any]:
        """Registers a writer or claims a reader (``call``). Discovery refuses a second open
        one; but the one it knows of may be a killed program whose daemon has not recorded
        its end yet (the re-run came at once, on another node; that daemon is busy, or
        behind a replica that is gone). Give that end RELEASE_GRACE to arrive, watching the
        edge, before answering EBUSY. ``wait`` False: :class:`WouldWait` at once."""
        deadline = trio.current_time() + RELEASE_GRACE
        while True:
            try:
                return await self._interruptible(pid, call)
            except Conflict as exc:
                if not wait:
                    raise WouldWait(str(exc)) from None
                left = deadline - trio.current_time()
                if left <= 0:
                    raise
            rec = await self._interruptible(pid, functools.partial(self.discovery.get, edge.hex))
            await self._interruptible(
                pid,
                functools.partial(
                    self.discovery.get,
                    edge.hex,
                    wait=min(left, self.config.signal_poll),
                    since=int(rec["version"]),
                ),
            )
            if procs.signal_pending(pid):
                raise EdgeError(errno.EINTR, "interrupted by a signal")

    async def _await_close_recorded(self, edge: EdgeId, pid: int) -> None:
        """Waits (briefly, interruptibly) until the end of the edge's previous generation
        on this node is recorded; with discovery down the registration fails anyway."""
        done = self._closing.get(edge)
        if done is None:
            return
        with trio.move_on_after(RELEASE_GRACE):
            while not done.is_set():
                with trio.move_on_after(self.config.signal_poll):
                    await done.wait()
                if not done.is_set() and procs.signal_pending(pid):
                    raise EdgeError(errno.EINTR, "interrupted by a signal")

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

    async def open_reader(self, edge: EdgeId, pid: int, *, wait: bool = True) -> ReaderEnd:
        """``wait``: as for :meth:`open_writer`."""
        if self.closing:
            raise EdgeError(errno.ESHUTDOWN, "daemon is shutting down")
        slot = self._slot(edge)
        taken = self._take_lingering(edge, pid)
        if taken is not None:
            return taken
        if slot.reader is not None:
            if not wait and not slot.reader.released:
                raise WouldWait(f"edge {edge}: its reader here is not released yet")
            await self._await_release(slot.reader, pid)
            slot = self._slot(edge)
        if "reader" in slot.opening or slot.reader is not None:
            raise EdgeError(errno.EBUSY, f"edge {edge} already has a reader on this node")
        with self._opening(slot, "reader"):
            # Watched before the claim: the claim's answer is the pump's first look at
            # its edge, and a change after it wakes the pump (see follow.py). One request
            # per reader open instead of three (claim, a look, a look before parking).
            token = self.follower.watch(edge)
            try:
                claim, rec = await self._claim_reader(edge, pid, wait)
                claimed_at = int(rec.get("version") or 0)
                if claim == claimed_at:
                    # SQLite's claim is its event's seq, the version it left: one int
                    # object (28 bytes a reader), the one the parked pump keeps too.
                    claim = claimed_at
            except BaseException:
                self.follower.unwatch(token)
                raise
            # Installed before the opening ends: an empty slot would be reaped there and
            # made again (a metrics entry and a slot more per reader open).
            reader = ReaderEnd(
                edge, self.config.read_buffer, pid, claim, procs.tgid(pid), claimed_at
            )
            self._slot(edge).reader = reader
        self._spawn(self._pump, reader, None, None, False, (rec, token))
        return reader

    async def _claim_reader(
        self, edge: EdgeId, pid: int, wait: bool = True
    ) -> tuple[int, dict[str, Any]]:
        """Discovery refuses a second open reader; but the reader it knows of may be a
        killed one whose node has not said so yet (the re-run came at once, elsewhere).
        Give that release a moment to arrive, watching the edge, before answering EBUSY.
        Returns the claim's id and the edge's record as the claim left it."""
        if self.unannounced and not self.announced.is_set():  # see announced
            await self._interruptible(pid, self._announced)
        claim = functools.partial(self.discovery.claim_reader, edge.hex, self.name)
        rec = await self._until_free(edge, pid, claim, wait)
        return int(rec.get("reader_claim", 0)), rec

    async def read(self, reader: ReaderEnd, size: int) -> bytes | memoryview:
        data = await reader.read(size, self.config.signal_poll)
        if data:
            if reader.read_metric is None:  # its series exists once bytes are read
                reader.read_metric = metrics.BYTES_READ.labels(reader.edge.hex)
            reader.read_metric.inc(len(data))
        return data

    def flush_reader(self, reader: ReaderEnd) -> None:
        reader.exit_status = procs.exit_status(reader.tgid)
        if reader.exit_status is None and reader.delivered == 0:
            # Closed unread by a running program: how it ends may decide (linger_reader).
            # Watched now, while its close waits for this FLUSH: it cannot be gone yet.
            self.exits.watch(reader.tgid, reader)

    def linger_reader(self, reader: ReaderEnd) -> bool:
        """The reader's file is closed for good; True if its release waits (it lingers).

        A close before the program read a byte is no "no more" yet while the program runs:
        bzip2 opens its input, closes it unread, and opens it again to read, and taken as
        an early close that lost its writer and left the second open waiting for good. The
        end lingers, streaming as before, until the program opens the edge again (any
        reading open on this node takes the end over, as a FIFO's next reader would find
        the bytes in it), exits (its status decides, as for any close: ``: < E`` ends the
        stream early), or runs on for procs.REOPEN_GRACE without (an early close). A close after
        reading (``head -c 10 E``) is an early close at once. An early close made before
        the data connection is up waits for it (CONNECT_WAIT): the writer hears of it there.
        """
        if (
            self.closing
            or reader.delivered
            or reader.error is not None
            or reader.state not in (ReaderState.WAITING, ReaderState.STREAMING)
            or not procs.reader_closed_early(reader.exit_status)
            or (reader.exit_status is not None and reader.state is ReaderState.STREAMING)
        ):
            self.exits.forget(reader.tgid, reader)
            self.release_reader(reader)
            return False
        if reader.exit_status is None:
            self.exits.watch(reader.tgid, reader)
        scope = trio.CancelScope()
        self._lingering[reader.edge] = (reader, scope)
        self._spawn(self._linger, reader, scope)
        return True

    def _take_lingering(self, edge: EdgeId, pid: int) -> ReaderEnd | None:
        """A reading open of ``edge`` takes over its lingering end (see linger_reader)."""
        entry = self._lingering.pop(edge, None)
        if entry is None:
            return None
        reader, scope = entry
        scope.cancel()
        self.exits.forget(reader.tgid, reader)
        slot = self.slots.get(edge)
        if slot is None or slot.reader is not reader or reader.error is not None:
            self._lingering[edge] = entry  # its own task releases it
            return None
        reader.pid = reader.interrupt_pid = pid
        reader.tgid = procs.tgid(pid)
        reader.exit_status = None
        log.info("edge %s: a reader closed unread opened it again", edge)
        return reader

    async def _linger(self, reader: ReaderEnd, scope: trio.CancelScope) -> None:
        edge = reader.edge
        try:
            with scope:
                if reader.exit_status is None:
                    outcome = await self._outcome_unless_failed(reader, procs.REOPEN_GRACE)
                    if isinstance(outcome, Exited):
                        reader.exit_status = outcome.status
                    elif isinstance(outcome, Unknown):
                        reader.exit_status = 9  # not seen: never taken for "no more"
                if procs.reader_closed_early(reader.exit_status):
                    with trio.move_on_after(CONNECT_WAIT):
                        while reader.state is ReaderState.WAITING and reader.error is None:
                            await reader.changed.wait()
        finally:
            entry = self._lingering.get(edge)
            if entry is not None and entry[1] is scope:  # not taken over (nor lingering anew)
                del self._lingering[edge]
                self.exits.forget(reader.tgid, reader)
                if self.closing or reader.error is not None:
                    reader.exit_status = 9  # the daemon stops: a failure, as for any reader
                self.release_reader(reader)

    async def _outcome_unless_failed(self, reader: ReaderEnd, grace: float) -> Exit:
        """How the reader's program ends within ``grace`` (see ExitWatcher.outcome); an
        end that failed meanwhile (the daemon stops) ends the wait: Unknown."""
        result: list[Exit] = []
        async with trio.open_nursery() as nursery:

            async def outcome() -> None:
                result.append(await self.exits.outcome(reader.tgid, grace))
                nursery.cancel_scope.cancel()

            nursery.start_soon(outcome)
            while reader.error is None:
                await reader.changed.wait()
            nursery.cancel_scope.cancel()
        return result[0] if result else Unknown("the reader's end failed")

    def release_reader(self, reader: ReaderEnd) -> None:
        paired = self._paired.get(reader.edge)
        generation = 0
        if paired is not None and paired[0] == reader.claim:
            del self._paired[reader.edge]
            generation = paired[1]
        reader.on_released()
        self.follower.forget(reader.edge)  # a parked pump lets go of it
        self.released.notify()
        complete = reader.state is ReaderState.EOF and reader.consumed == reader.received
        if reader.state is not ReaderState.EOF:
            if not procs.reader_closed_early(reader.exit_status):
                # Killed or failed: not "I want no more". A persistent writer carries on for
                # a re-run reader; a transient one learns when the re-run asks for offset 0.
                reader.close(tell_writer=False)
            else:
                reader.close()  # the pump tells the writer (its next write gets EPIPE)
        slot = self.slots.get(reader.edge)
        if slot is not None and slot.reader is reader:
            self._slot(reader.edge).reader = None
            self._reap(reader.edge)
        # "closed" is "no more" for every later writer of the edge too (open_writer); a
        # failure is not: a re-run reader will want the stream. Nor a reader this daemon
        # failed (EIO: no writer came back, ...) whose program closed it and ran on.
        if complete:
            state = "done"
        elif reader.error is None and procs.reader_closed_early(reader.exit_status):
            state = "closed"
        else:
            state = "failed"
        self._spawn(self._release_reader, reader, state, generation)

    async def _release_reader(self, reader: ReaderEnd, state: str, generation: int) -> None:
        """``generation``: the one the reader last pulled (0: none). Its "closed" may
        reach discovery after a re-run writer registered (a newer generation): that
        writer's daemon must not take it for its own "no more" (Membership)."""
        await testhooks.reader_release_delay()
        await self._until_recorded(
            reader.edge,
            f"reader {state}",
            functools.partial(
                self.discovery.release_reader,
                reader.edge.hex,
                self.name,
                state,
                reader.consumed,
                reader.claim,
                generation,
            ),
        )

    async def _pump(
        self,
        reader: ReaderEnd,
        machine: ReaderMachine | None = None,
        parked: Query | None = None,
        expired: bool = False,
        first: tuple[dict[str, Any], Parked] | None = None,
    ) -> None:
        """Carries out the reader machine's actions until the stream ends or fails.

        A reader waiting for a change of its edge has no task: the pump parks it with the
        follower (``machine`` and the ``parked`` query kept there) and ends; the feed, or
        the query's wait running out (``expired``), starts it again. ``first``: the edge's
        record the claim answered, and the follower's watch registered before the claim
        (the first look, and, if nothing changed since, the wait, need no request)."""
        edge = reader.edge.hex
        if machine is None:
            machine = self._reader_machine()
        token: Parked | None = None  # watching the edge since before the record seen last
        with trio.CancelScope() as scope:
            reader.attach_pump(scope)
            action: Any = machine.start() if parked is None else parked
            attempt = 0
            while reader.state in (ReaderState.WAITING, ReaderState.STREAMING):
                if isinstance(action, Query) and first is not None:
                    rec, token = first  # the claim's answer (machine.start(): a plain look)
                    first = None
                    view = EdgeView.from_json(rec)
                    action = machine.on_record(view, trio.current_time(), reader.received)
                    del rec, view
                    if not isinstance(action, Query):  # the writer is there already
                        self.follower.unwatch(token)
                        token = None
                elif isinstance(action, Query):
                    parkable = not expired and self.follower.can_park(action.wait, action.since)
                    if token is not None and not parkable:
                        self.follower.unwatch(token)
                        token = None
                    if action.delay:
                        await trio.sleep(action.delay)
                    try:
                        if expired:  # the wait ran out: look at the edge as it is
                            expired = False
                            rec = await self.discovery.get(edge)
                        elif parkable:
                            handed, token = token, None
                            got = await self._look_or_park(reader, machine, action, handed)
                            if got is None:
                                reader.pump = None  # this scope ends with the task
                                return  # parked: the follower starts the pump again
                            rec = got
                        else:
                            rec = await self.follower.get(
                                reader.edge, wait=action.wait, since=action.since
                            )
                    except (Unavailable, DiscoveryError) as exc:
                        log.info("edge %s: discovery: %s; retrying", edge, exc)
                        await trio.sleep(backoff(attempt, cap=1.0))
                        attempt += 1
                        continue
                    attempt = 0
                    taken = int(rec.get("reader_claim") or 0)
                    if reader.claim and taken not in (0, reader.claim):
                        # Cut off, taken for lost, and its stage re-run elsewhere, which
                        # claimed the edge: redialling would read beside the re-run (in
                        # transient mode their acknowledgements free each other's bytes).
                        why = f"edge {edge}: another reader claimed it (this node was lost)"
                        # (Membership fails it at once on that claim's event; this is for
                        # a daemon that missed the event.)
                        reader.fail(errno.EIO, why)
                        return
                    view = EdgeView.from_json(rec)
                    action = machine.on_record(view, trio.current_time(), reader.received)
                    del rec, view  # not held while the next query waits
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
                    with trio.CancelScope() as pull:
                        self._pulls[reader.edge] = (action.generation, pull)
                        self._paired[reader.edge] = (reader.claim, action.generation)
                        try:
                            result = await self._pull_once(reader, action, on_connected)
                        finally:
                            self._pulls.pop(reader.edge, None)
                    if pull.cancelled_caught:
                        detail = f"generation {action.generation} was superseded"
                        log.info("edge %s: %s: leaving its writer", edge, detail)
                        result = dataplane.Result(PullOutcome.GONE, detail)
                    log.debug("edge %s: pull ended: %s %s", edge, result.outcome, result.detail)
                    if result.outcome is PullOutcome.LOST:
                        log.info("edge %s: %s", edge, result.detail)
                        metrics.RECONNECTS.inc()
                    action = machine.on_pull(result.outcome, result.detail, trio.current_time())
                elif isinstance(action, Unfinished):
                    # As a writer-gone event would have had it done (Membership), for a
                    # reader whose daemon missed that event: the same call, same check.
                    await self.membership.writer_gone(reader.edge, action.generation)
                    action = Query()
                elif isinstance(action, Fail):
                    reader.fail(action.errno, f"edge {edge}: {action.reason}")
                    if action.reason.startswith("replay diverged"):
                        await self._record(reader.edge, "diverged", {"reason": action.reason})
                    return
                else:
                    return

    async def _look_or_park(
        self, reader: ReaderEnd, machine: ReaderMachine, query: Query, token: Parked | None
    ) -> dict[str, Any] | None:
        """The edge's record if it changed after ``query.since``; else None, and the
        reader is parked with the follower until it does (or ``query.wait`` runs out).
        ``token``: a watch registered before the record ``query`` came from was read; if
        it saw no change, the reader parks at once."""
        edge = reader.edge.hex
        while True:
            if token is not None:
                if not token.woken:
                    break
                self.follower.unwatch(token)
            token = self.follower.watch(reader.edge)  # before the read: no change is missed
            try:
                rec = await self.discovery.get(edge)
            except BaseException:
                self.follower.unwatch(token)
                raise
            if int(rec.get("version", 0)) > query.since:
                self.follower.unwatch(token)
                return rec
            if token.woken:  # changed since the read: read again
                continue
            del rec  # a parked reader holds no decoded record (thousands wait)
            break
        # What the pump starts again from is kept in the token, and the resume call is
        # one for all: a partial each was 270 bytes per waiting reader. A reader waiting
        # for its first writer keeps only its edge's version (ReaderMachine.first_wait).
        version = machine.first_wait(query)
        if version is None:
            self.follower.park(token, query.wait, self._unpark, reader, machine, query)
        else:
            self.follower.park(token, query.wait, self._unpark, reader, None, version)
        return None

    def _resume_parked(self, token: Parked, expired: bool) -> None:
        reader, machine, query = token.reader, token.machine, token.query
        token.reader = token.machine = token.query = None
        if machine is None:  # it waited for its first writer: query is the version
            machine, query = self._reader_machine().waiting_first(query)
        if reader.state in (ReaderState.WAITING, ReaderState.STREAMING):
            self._spawn(self._pump, reader, machine, query, expired)

    def _reader_machine(self) -> ReaderMachine:
        return ReaderMachine(
            reconnect_for=self.config.reconnect_for,
            writer_lost_timeout=self.config.writer_lost_timeout,
            long_poll=LONG_POLL,
        )

    async def _pull_once(
        self, reader: ReaderEnd, action: Connect, on_connected: Callable[[int], None]
    ) -> dataplane.Result:
        local = self.writer_for(reader.edge)
        if action.node == self.name and local is not None and local.generation == action.generation:
            result = await dataplane.pull_local(reader, local, action.replay, on_connected)
            first = local.spill.start if local.spill is not None else local.base
            if (
                result.outcome is PullOutcome.GONE
                and reader.stream_pos < first
                and local.state in (WriterState.OPEN, WriterState.COMPLETE)
            ):
                # As a data connection's BAD_OFFSET does (DataServer._serve): a re-run
                # reader wants bytes already taken and freed; only a re-run writer has them.
                self._lose_freed_prefix(local, "the reader restarted")
            self._reap(reader.edge)  # delivered, or closed early: no data connection reaps it
            return result
        return await dataplane.pull(
            reader,
            action.endpoint,
            action.generation,
            action.replay,
            on_connected,
            self.data_key,
            self.tls.client if self.tls is not None else None,
        )

    # -- whole edges ---------------------------------------------------------------------

    async def remove(self, edge: EdgeId, pid: int = 0, *, unprivileged: bool = False) -> None:
        """Ends the edge on every node (the one here at once, others via discovery).

        ``unprivileged`` (a user but root): ownership is per node, so a user who holds no
        end of the edge here may not end the live ends other nodes hold (another user's
        stream there): EPERM while any is open or lost (its node may come back), or a
        complete writer's node still holds bytes for its reader."""
        known = edge in self.slots
        if unprivileged and not known:
            try:
                rec = await self._interruptible(
                    pid, functools.partial(self.discovery.get, edge.hex)
                )
            except DiscoveryError as exc:
                raise EdgeError(errno.ENOENT, str(exc)) from None
            except Unavailable as exc:
                raise EdgeError(errno.EIO, str(exc)) from None
            live = ("open", "lost")
            # A complete writer's node holds the bytes until its reader has them all.
            held = rec.get("writer_state") == "complete" and rec.get("reader_state") not in (
                "done",
                "closed",
            )
            writer_live = rec.get("writer_state") in live or held
            if (writer_live and rec.get("writer_node") != self.name) or (
                rec.get("reader_state") in live and rec.get("reader_node") != self.name
            ):
                raise EdgeError(errno.EPERM, f"edge {edge} has live ends on other nodes")
        try:
            await self._interruptible(pid, functools.partial(self.discovery.delete, edge.hex))
        except DiscoveryError as exc:
            if exc.status != 404 or not known:
                raise EdgeError(errno.ENOENT, str(exc)) from None
        except Unavailable as exc:
            raise EdgeError(errno.EIO, str(exc)) from None
        self._abort_local(edge, "removed")

    def _abort_local(self, edge: EdgeId, why: str, seq: int | None = None) -> None:
        """Ends the edge's ends here; with ``seq`` (a removal's event), only those that
        began before it (a writer registered, a reader claimed at a lower version)."""
        slot = self.slots.get(edge)
        if slot is None:
            return
        log.info("edge %s: %s", edge, why)
        if slot.writer is not None and (seq is None or slot.writer.registered < seq):
            self._abort_writer(slot.writer, AbortReason.REMOVED, f"edge {edge} was {why}")
        if slot.reader is not None and (seq is None or slot.reader.claimed_at < seq):
            slot.reader.fail(errno.ECANCELED, f"edge {edge} was {why}")
        self._reap(edge)

    def writer_for(self, edge: EdgeId) -> WriterEnd | None:
        slot = self.slots.get(edge)
        return slot.writer if slot is not None else None

    # -- background ----------------------------------------------------------------------

    def _reader_gone(self, writer: WriterEnd, *, confirmed: bool = False) -> None:
        """The reader's daemon is gone. If it had acknowledged bytes that a transient writer
        has freed, only a re-run of the writer can serve the next reader: fail it, once
        discovery's record confirms the edge has not moved on from that reader (a lagging
        feed: ``Membership.confirm_reader_gone``)."""
        if (
            writer.reader_lost
            and writer.acked > 0
            and writer.state in (WriterState.OPEN, WriterState.COMPLETE)
            and writer.spill is None  # a persistent stream still has every byte for a re-run
        ):
            if not confirmed:
                self._spawn(self.membership.confirm_reader_gone, writer)
                return
            log.warning("edge %s: the reader's node was lost with acknowledged bytes", writer.edge)
            self._lose_freed_prefix(writer, "the reader's node was lost")

    def _lose_freed_prefix(self, writer: WriterEnd, why: str) -> None:
        """A transient writer's reader took bytes it freed, and they are gone with it: only
        a re-run of the writer can produce them again. A running program gets EPIPE (its
        release records the failure); one that already finished well has its complete
        generation failed in discovery now, or it would read "complete" for good while
        no reader could ever be served (a re-run reader waited, then EIO)."""
        complete = writer.state is WriterState.COMPLETE
        self._abort_writer(writer, AbortReason.READER_LOST, why)
        if complete:
            self._spawn(self._close_writer, writer, "failed", why)
            self._reap(writer.edge)

    def supersede(self, edge: EdgeId, generation: int) -> None:
        """Discovery recorded ``generation`` of ``edge``: a reader pulling an older one
        drops that connection at once. A writer cut off by a partition keeps its connection
        (shorter than the silence timeout) and would deliver its generation over it once
        the partition heals, after a re-run took the edge over."""
        pulling = self._pulls.get(edge)
        if pulling is not None and pulling[0] < generation:
            pulling[1].cancel()

    def _fence(self, writer: WriterEnd) -> None:
        if writer.state is not WriterState.ABORTED:
            log.warning(
                "edge %s: generation %d fenced off by a newer writer",
                writer.edge,
                writer.generation,
            )
            self._abort_writer(
                writer, AbortReason.STALE, "a newer writer generation took the edge over"
            )
            self._reap(writer.edge)
