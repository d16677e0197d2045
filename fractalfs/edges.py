"""The two ends of an edge as a node holds them: buffers, offsets and backpressure.

A :class:`WriterEnd` lives on the writer's node. It keeps every byte its program wrote
until the reader's daemon acknowledges it (the replay window), so a broken connection
resumes from the reader's offset without recomputation; the program blocks once the window
is full. A :class:`ReaderEnd` lives on the reader's node and buffers bytes received ahead of
the reading program. Offsets count payload bytes from the start of the stream, so resuming is
always "send from offset N".

Blocking methods take the thread that opened the file (FUSE's ``ctx.pid``) and its
process, and give up with EINTR when it has a signal pending (see :mod:`fractalfs.procs`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, Protocol

import outcome
import trio
import xxhash

from . import procs
from .codec import AbortReason
from .edgeid import EdgeId
from .policy import Mode
from .spill import SpillFile

log = logging.getLogger(__name__)


class _NoMetric:
    def inc(self, amount: float = 1) -> None:
        return None


_NO_METRIC = _NoMetric()


class EdgeError(Exception):
    """An edge operation failed; ``errno`` is what the program sees."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


class _Wakeable(Protocol):
    def wake(self) -> None: ...


#: Nothing being opened (a node's slot, see node.Slot): ``frozenset({"reader"}) -
#: {"reader"}`` is a new empty frozenset (216 bytes) each time, not a shared one.
NOT_OPENING: frozenset[str] = frozenset()


class Notifier:
    """Wakes every task waiting for a change (a broadcast condition for one trio loop)."""

    __slots__ = ("_event", "_hook")

    def __init__(self) -> None:
        self._event: trio.Event | None = None  # made by the first waiter: notify() is
        # called per read and write, mostly with nobody waiting
        self._hook: _Wakeable | None = None

    def notify(self) -> None:
        event = self._event
        if event is not None:
            self._event = None
            event.set()
        hook = self._hook
        if hook is not None:
            self._hook = None
            hook.wake()

    def call_once(self, hook: _Wakeable | None) -> None:
        """``hook.wake()`` at the next change, once, instead of a task waiting for it
        (None: not any more)."""
        self._hook = hook

    async def wait(self) -> None:
        event = self._event
        if event is None:
            event = self._event = trio.Event()
        await event.wait()


class _Waiting:
    __slots__ = ("scope", "signalled")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.signalled = False


class SignalWatch:
    """One loop per daemon looks for pending signals of every program a handler blocks
    for: one ``/proc/<pid>/status`` read per program per tick, however many handlers wait,
    instead of a timer and a read per blocked handler. A program with a signal pending has
    its waits cancelled (they raise EINTR)."""

    def __init__(self, poll: float) -> None:
        self.poll = poll
        self.pids: dict[tuple[int, int], set[_Waiting]] = {}  # (thread, process) -> waits
        self.running = False

    def add(self, pid: int, waiting: _Waiting, tgid: int = 0) -> None:
        if pid <= 0:
            return  # nobody to interrupt
        self.pids.setdefault((pid, tgid), set()).add(waiting)
        if not self.running:
            self.running = True
            trio.lowlevel.spawn_system_task(self._tick, name="fractalfs signal watch")

    def remove(self, pid: int, waiting: _Waiting, tgid: int = 0) -> None:
        held = self.pids.get((pid, tgid))
        if held is not None:
            held.discard(waiting)
            if not held:
                del self.pids[(pid, tgid)]

    async def _tick(self) -> None:
        try:
            pause = self.poll
            while self.pids:
                await trio.sleep(pause)
                started = trio.current_time()
                for key in list(self.pids):
                    try:
                        pending = procs.signal_pending(*key)
                    except Exception:  # never take the run down: the waits time out anyway
                        log.exception("signal check of pid %d failed", key[0])
                        continue
                    if pending:
                        for waiting in self.pids.pop(key, ()):
                            waiting.signalled = True
                            waiting.scope.cancel()
                # Thousands of waiting programs: keep the scan to a tenth of the time.
                pause = max(self.poll, 9 * (trio.current_time() - started))
        finally:
            self.running = False


_WATCH: trio.lowlevel.RunVar[SignalWatch] = trio.lowlevel.RunVar("fractalfs_signal_watch")


def signal_watch(poll: float) -> SignalWatch:
    try:
        return _WATCH.get()
    except LookupError:
        watch = SignalWatch(poll)
        _WATCH.set(watch)
        return watch


async def wait_or_interrupt(
    notifier: Notifier, pid: int, poll: float, timeout: float | None = None, tgid: int = 0
) -> None:
    """Waits for ``notifier`` (at most ``timeout``, by default a few ticks: callers loop);
    raises EINTR if thread ``pid`` of process ``tgid`` (0: ``pid`` is the process) gets a
    signal meanwhile (see :class:`SignalWatch`)."""
    watch = signal_watch(poll)
    with trio.move_on_after(max(5 * poll, 1.0) if timeout is None else timeout) as scope:
        waiting = _Waiting(scope)
        watch.add(pid, waiting, tgid)
        try:
            await notifier.wait()
            return
        finally:
            watch.remove(pid, waiting, tgid)
    if waiting.signalled:
        raise EdgeError(errno.EINTR, "interrupted by a signal")


IDLE_WAIT = 30.0  # a waiting reader's read looks again after this long without a change
FULL_FOR = 1.0  # seconds without any ack before "the reader is absent or slow"


class WriterState(Enum):
    OPEN = "open"
    COMPLETE = "complete"  # the program closed its end normally
    FAILED = "failed"  # the program died or exited non-zero
    ABORTED = "aborted"  # removed, superseded or shut down


class WriterEnd:
    def __init__(self, edge: EdgeId, generation: int, window: int, pid: int, tgid: int = 0) -> None:
        self.edge = edge
        self.generation = generation
        self.window = window
        self.pid = pid  # the thread that opened it (FUSE's ctx.pid)
        self.tgid = tgid or pid  # its process: whose exit ends or fails the stream
        self.interrupt_pid = pid  # whose pending signals end a wait (0: nobody waits)
        self.chunks: deque[bytes | memoryview] = deque()
        self.first_index = 0  # absolute index of chunks[0]
        self.base = 0  # stream offset of chunks[0]
        self.end = 0  # bytes written so far
        self.acked = 0
        self.state = WriterState.OPEN
        self.abort_reason: tuple[AbortReason, str] | None = None
        self.reader_closed = False
        self.registered = 0  # discovery's version of the edge when this generation began
        self.reader_lost = False  # discovery lost the reader's node (it may come back)
        # Which reader that loss was about: its node and discovery's id of its claim (0:
        # not told). A lagging feed brings losses and claims the edge has moved on from.
        self.lost_reader: tuple[str, int] = ("", 0)
        self.released = False  # the program's file is closed
        self.exit_status: int | None = None  # seen at FLUSH if the program was exiting
        self.peers: tuple[int, ...] = ()  # its pipeline's other processes (procs.pipeline_peers)
        self.upstream = 0  # how many of them, after the parent, feed it through pipes
        self.parent_feeds = False  # its parent holds a pipe it reads (split --filter)
        self.blocked = 0  # writes waiting for the window (they hold the kernel inode lock)
        self.changed = Notifier()
        self.connection: trio.CancelScope | None = None
        # Persistence: the configured mode, what the edge does now and why, its spill file.
        self.configured = Mode.TRANSIENT
        self.mode = Mode.TRANSIENT
        self.mode_reason = "configured transient"
        self.spill: SpillFile | None = None
        # One spill append runs in a worker thread while the program's next write is
        # served (not on its request's path); a failure reaches the next write or close.
        self._spilling = False
        self.spill_error: OSError | None = None
        self._remove_spill_after = False  # aborted while an append ran: remove after it
        self.retain_limit = 0  # dynamic and undecided: keep acked bytes up to this many
        self.opened_at = trio.current_time()
        self.completed_at: float | None = None
        self.on_window_full: Callable[[WriterEnd], None] | None = None
        self.on_switch_failed: Callable[[WriterEnd, OSError], None] | None = None
        self.pgid = self.tgid
        self.cpu_at_open = 0.0
        self.queued_at_open = 0.0
        self.written_metric: Any = _NO_METRIC
        self.handler_time = 0.0  # seconds its program spent inside our write handler
        self.end_acked = False  # a reader acknowledged the END frame: fully delivered
        # The END frame of this generation went to a reader (a data connection or the
        # same-node pull), or did in an earlier run of the daemon (a restored spill
        # marked so: spill.SENT_BIT): until then no
        # reader's program can have read it whole, and a "reader done" in discovery is
        # another generation's (the last run's reader, recorded before or even after
        # this re-run registered, and as long as its stream: on_reader_done).
        self.end_sent = False
        # A reader's *program* read the whole stream (discovery recorded the reader done
        # with every byte): only then may a persistent spill be collected.
        self.delivered = False
        self.delivery_checked_at = float("-inf")

    @property
    def prefix_retained(self) -> bool:
        return self.base == 0 or (self.spill is not None and self.spill.start == 0)

    @property
    def done(self) -> bool:
        """Nothing left to do for this end: delivered completely, or dead.

        A persistent end stays for re-run readers until garbage collection removes it.
        """
        if self.state is WriterState.ABORTED:
            return True
        if self.spill is not None:
            return False  # also a failed one: it serves its prefix until superseded
        if self.state is WriterState.FAILED:
            return True
        # Not "acked >= end": for an empty stream that holds before any reader came. An
        # END_ACK lost with its connection is made up for by discovery's "reader done".
        # A reader that closed early after the END frame wants no more either.
        return self.state is WriterState.COMPLETE and (
            self.end_acked or self.delivered or self.reader_closed
        )

    async def write(self, data: bytes | memoryview, poll: float) -> int:
        entered = trio.current_time()
        try:
            return await self._write(data, poll)
        finally:
            # Time its program spent in our handler (window, spill): not the producer's
            # own work, so not part of what a replay would cost.
            self.handler_time += trio.current_time() - entered

    async def _write(self, data: bytes | memoryview, poll: float) -> int:
        blocked_since: float | None = None
        while True:
            if self.reader_closed:
                raise EdgeError(errno.EPIPE, "the reader closed the edge")
            if self.state is WriterState.ABORTED:
                raise EdgeError(errno.EPIPE, self.abort_reason[1] if self.abort_reason else "")
            if self.spill is not None:
                await self.drain_spill(poll)  # the previous append; raises its error
                if self.abort_reason is not None:  # aborted meanwhile
                    raise EdgeError(errno.EPIPE, self.abort_reason[1])
                if self.spill is not None:
                    self._start_spill(self.spill, [data])
                    break
                continue  # the switch to persistent failed: transient, window and all
            if self.end - self.acked < self.window:
                break
            now = trio.current_time()
            blocked_since = now if blocked_since is None else blocked_since
            if self.on_window_full is not None and now - blocked_since >= FULL_FOR:
                # Blocked for a while, not just while the reader pairs: the policy may
                # spill instead of blocking the producer.
                self.on_window_full(self)
                if self.spill is not None:
                    continue
            self.blocked += 1
            try:
                await wait_or_interrupt(
                    self.changed,
                    self.interrupt_pid,
                    poll,
                    timeout=min(poll, FULL_FOR),
                    tgid=self.tgid,
                )
            finally:
                self.blocked -= 1
        self.chunks.append(data)
        self.end += len(data)
        if self.spill is not None and self.end - self.base > self.window:
            self._free(self.end - self.window)  # on disk (up to spill.end): only a cache
        self.changed.notify()
        return len(data)

    def _start_spill(
        self, spill: SpillFile, chunks: list[bytes | memoryview], switch: bool = False
    ) -> None:
        """Appends ``chunks`` to the spill in a worker thread (pwrite releases the GIL);
        :meth:`drain_spill` waits for it. A failed ``switch`` (the prefix a dynamic edge
        held in memory when it turned persistent) leaves the edge transient: memory still
        holds every one of those bytes, so the program need not see the error."""
        self._spilling = True
        token = trio.lowlevel.current_trio_token()

        def append_all() -> None:
            for chunk in chunks:
                spill.append(chunk)

        def finished(result: outcome.Outcome[None]) -> None:  # in the trio thread
            # Runs as a run_sync_soon callback: an exception here would end trio's run
            # (the daemon), so none may escape.
            try:
                settled(result)
            except Exception as exc:
                log.exception("edge %s: handling the end of a spill append failed", self.edge)
                if self.spill_error is None and self.spill is spill:
                    self.spill_error = OSError(errno.EIO, f"spill bookkeeping failed: {exc!r}")
            finally:
                self._spilling = False
                self.changed.notify()

        def settled(result: outcome.Outcome[None]) -> None:
            self._spilling = False
            if isinstance(result, outcome.Error):
                error = result.error
                if not isinstance(error, OSError):
                    log.error("edge %s: spill append failed: %r", self.edge, error)
                    error = OSError(errno.EIO, f"spill append failed: {error!r}")
                if switch and self.spill is spill:
                    self.spill = None
                    self.mode = Mode.TRANSIENT
                    spill.remove()
                    self.settle_transient(f"spill failed: {error.strerror}")
                    if self.on_switch_failed is not None:
                        self.on_switch_failed(self, error)
                else:
                    self.spill_error = error
            if self._remove_spill_after:
                spill.remove()
            self.changed.notify()

        def deliver(result: outcome.Outcome[None]) -> None:  # in the worker thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(finished, result)

        trio.lowlevel.start_thread_soon(append_all, deliver)

    @property
    def spilling(self) -> bool:
        return self._spilling

    async def drain_spill(self, poll: float) -> None:
        """Waits until no spill append runs; raises the error of a failed one (every
        later write and the close fail with it: the stream is no longer persisted)."""
        while self._spilling:
            await wait_or_interrupt(self.changed, self.interrupt_pid, poll, tgid=self.tgid)
        if self.spill_error is not None:
            exc = self.spill_error
            raise EdgeError(exc.errno or errno.EIO, f"spill file: {exc.strerror}")

    async def complete_spill(self) -> OSError | None:
        """Marks the spill complete (:meth:`SpillFile.finish`: three fsyncs) in a worker
        thread; an abort meanwhile removes the spill only after it. Returns its error."""
        spill = self.spill
        if spill is None or spill.complete:
            return None
        self._spilling = True
        try:
            await trio.to_thread.run_sync(spill.finish)  # not abandoned on cancel
            return None
        except OSError as exc:
            return exc
        finally:
            self._spilling = False
            if self._remove_spill_after:
                spill.remove()
            self.changed.notify()

    def persist(self, spill: SpillFile, reason: str) -> None:
        """Switches to persistent mode: what memory holds goes to disk first, then all writes.

        ``spill`` must start at ``base``: no byte is lost or written twice by the switch.
        """
        assert spill.start == self.base and spill.end == self.base
        assert not self._spilling
        self.spill = spill
        self.mode = Mode.PERSISTENT
        self.mode_reason = reason
        self.retain_limit = 0
        if self.chunks:
            # Up to the retention limit (64 MiB): not on the loop's thread.
            self._start_spill(spill, list(self.chunks), switch=True)
        self.changed.notify()

    def settle_transient(self, reason: str) -> None:
        """The policy keeps this edge transient: acknowledged bytes need not be kept."""
        self.mode_reason = reason
        self.retain_limit = 0
        self._free(self.acked)

    def finish(self, state: WriterState) -> None:
        if self.state is WriterState.OPEN:
            self.state = state
            self.completed_at = trio.current_time()
            self.changed.notify()

    def abort(self, reason: AbortReason, message: str) -> None:
        self.state = WriterState.ABORTED
        self.abort_reason = (reason, message)
        self.chunks.clear()
        if self.spill is not None and reason is not AbortReason.SHUTDOWN:
            # A shut-down daemon's spill files are served after restart. Never close the
            # fd under a running append: its number could be reused by another file.
            if self._spilling:
                self._remove_spill_after = True
            else:
                self.spill.remove()
        self.changed.notify()  # its connection sends the reader an ABORT frame

    # -- what the node and the data plane observe (no other module assigns the fields) --

    @classmethod
    def restored(cls, spill: SpillFile, window: int, complete: bool) -> WriterEnd:
        """The end of a spill file found after a restart: complete, or the prefix of a
        generation that died with the daemon (failed). Released: no program holds it."""
        writer = cls(spill.edge, spill.generation, window, 0)
        writer.spill = spill
        writer.base = writer.end = spill.end
        writer.acked = 0  # not known to be delivered: keep it for its reader
        writer.mode = Mode.PERSISTENT
        writer.mode_reason = "restored from its spill file"
        writer.state = WriterState.COMPLETE if complete else WriterState.FAILED
        writer.completed_at = trio.current_time()
        writer.released = True
        writer.end_sent = spill.sent  # an earlier run of the daemon sent it (marked)
        return writer

    def on_released(self, exit_status: int | None) -> None:
        """Its program's file is closed for good (``exit_status``: seen at FLUSH)."""
        self.released = True
        if exit_status is not None:
            self.exit_status = exit_status

    def on_reader_closed(self) -> None:
        """The reading program closed its end early: the next write gets EPIPE."""
        self.reader_closed = True
        self.changed.notify()

    def set_reader_lost(self, lost: bool, node: str = "", claim: int = 0) -> None:
        """Discovery lost the reader's node (it may come back), or it is back. ``node`` and
        ``claim`` name the reader lost (:attr:`lost_reader`)."""
        self.reader_lost = lost
        if lost:
            self.lost_reader = (node, claim)

    def drop_spill(self) -> None:
        """Garbage collection: the spill file goes; nobody can need it any more."""
        if self.spill is not None:
            self.spill.remove()
            self.spill = None

    def on_end_sent(self) -> None:
        """Its END frame goes to a reader now; a spill keeps that across a restart."""
        self.end_sent = True
        if self.spill is not None:
            self.spill.mark_sent()

    def on_reader_done(self, delivered: int) -> None:
        """Discovery says the reader's program read ``delivered`` bytes and the end. Not
        this generation's reader unless its END frame went out (``end_sent``)."""
        if self.state is WriterState.COMPLETE and delivered >= self.end and self.end_sent:
            self.delivered = True

    def on_end_acked(self, total: int) -> None:
        """A reader acknowledged the END frame of a stream of ``total`` bytes: delivered.
        Only for a complete stream of exactly that length (a data ACK never counts)."""
        if self.state is WriterState.COMPLETE and total == self.end:
            self.end_acked = True
            self.changed.notify()

    def ack(self, offset: int) -> None:
        """The reader holds every byte below ``offset``: free them."""
        offset = min(offset, self.end)
        if offset <= self.acked:
            return
        self.acked = offset
        if self.retain_limit and self.end - self.base <= self.retain_limit:
            self.changed.notify()  # dynamic, undecided: keep the prefix for a switch
            return
        if self.retain_limit:
            self.settle_transient("dynamic: prefix retention limit reached")
        self._free(offset)
        self.changed.notify()

    def _free(self, offset: int) -> None:
        if self.spill is not None:
            offset = min(offset, self.spill.end)  # what is not on disk yet stays in memory
        chunks = self.chunks
        while chunks and self.base + len(chunks[0]) <= offset:
            self.base += len(chunks.popleft())
            self.first_index += 1

    def locate(self, pos: int) -> tuple[int, int]:
        """The (absolute chunk index, offset inside it) of stream offset ``pos``."""
        if not self.base <= pos <= self.end:
            raise ValueError(f"offset {pos} outside the window [{self.base}, {self.end}]")
        at = self.base
        for i, chunk in enumerate(self.chunks):
            if pos < at + len(chunk):
                return self.first_index + i, pos - at
            at += len(chunk)
        return self.first_index + len(self.chunks), 0

    def read_at(
        self, pos: int, cursor: tuple[int, int] | None, limit: int
    ) -> tuple[Sequence[bytes | memoryview], tuple[int, int] | None]:
        """Up to ``limit`` bytes of the stream from offset ``pos`` and the cursor after them
        (``cursor``: where the previous call left off, or None). Bytes no longer in memory
        (persistent mode) come from the spill file; none when nothing new was written."""
        if pos < self.base and self.spill is not None:
            return [self.spill.read(pos, limit)], None  # the data plane: read_spill
        if cursor is None or cursor[0] < self.first_index:
            cursor = self.locate(pos)
        return self.take(cursor, limit)

    def on_disk(self, pos: int) -> bool:
        """Stream offset ``pos`` is no longer in memory: :meth:`read_spill` reads it."""
        return pos < self.base and self.spill is not None

    async def read_spill(self, pos: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``pos`` out of the spill file, in a worker thread
        (up to 1 MiB of O_DIRECT pread: not on the loop). The spill's close or removal
        meanwhile (abort, garbage collection, supersede) waits until the read returns."""
        spill = self.spill
        assert spill is not None
        spill.begin_read()
        try:
            return await trio.to_thread.run_sync(spill.read, pos, limit)  # not abandoned
        finally:
            spill.end_read()

    def take(self, cursor: tuple[int, int], limit: int) -> tuple[list[memoryview], tuple[int, int]]:
        """Up to ``limit`` bytes from ``cursor`` (as views, no copy) and the cursor after."""
        index, inner = cursor
        if index < self.first_index:
            raise ValueError("cursor points at bytes already freed")
        out: list[memoryview] = []
        size = 0
        i = index - self.first_index
        chunks = self.chunks
        while i < len(chunks) and size < limit:
            view = memoryview(chunks[i])[inner:]
            if size + len(view) > limit:
                view = view[: limit - size]
                inner += len(view)
            else:
                i += 1
                inner = 0
            out.append(view)
            size += len(view)
        return out, (i + self.first_index, inner)


class Diverged(Exception):
    """A re-run writer's bytes differ from what was already delivered."""


SHORT_READ = 64 * 1024  # a read is answered with one buffer alone from this size on


class ReaderState(Enum):
    WAITING = "waiting"  # for a writer
    STREAMING = "streaming"
    EOF = "eof"  # the end marker arrived and was verified
    FAILED = "failed"
    CLOSED = "closed"  # the program closed its end


_NO_CHUNKS: deque[bytes | memoryview] = deque(maxlen=0)  # every end's until its first byte


class ReaderEnd(Notifier):
    # Slots, and nothing built before the first byte (the chunk deque, 0.6 KiB, and the
    # digest): a daemon holds one per waiting reader, and thousands wait. The end is its
    # own notifier (``changed`` is the end itself): a Notifier object more was 48 bytes
    # per waiting reader.
    __slots__ = (
        "_replay",
        "_tail",
        "_tail_start",
        "backlog",
        "chunks",
        "claim",
        "claimed_at",
        "delivered",
        "digest",
        "edge",
        "error",
        "exit_status",
        "head",
        "interrupt_pid",
        "limit",
        "pid",
        "pump",
        "read_metric",
        "received",
        "released",
        "state",
        "stream_pos",
        "tell_writer",
        "tgid",
    )

    def __init__(
        self, edge: EdgeId, limit: int, pid: int, claim: int = 0, tgid: int = 0, claimed_at: int = 0
    ) -> None:
        self.edge = edge
        self.limit = limit
        self.pid = pid  # the thread that opened it (FUSE's ctx.pid)
        self.tgid = pid if tgid in (0, pid) else tgid  # its process (the same int: 28 bytes)
        self.interrupt_pid = pid  # whose pending signals end a wait (0: nobody waits)
        self.chunks = _NO_CHUNKS  # a deque of its own from the first byte (push)
        self.head = 0  # bytes of chunks[0] already delivered
        self.delivered = 0  # handed out by read() (to the program, or into its FIFO)
        # The FIFO route: bytes in the reader's pipe, handed out but not yet consumed.
        self.backlog: Callable[[], int] | None = None
        self.received = 0
        self.state = ReaderState.WAITING
        self.error: EdgeError | None = None
        Notifier.__init__(self)
        self.pump: trio.CancelScope | None = None
        self.tell_writer = True
        self.read_metric: Any = None  # the node's counter, made at the first bytes read
        self.exit_status: int | None = None  # seen at FLUSH if the program was exiting
        self.released = False  # the program's file is closed
        self.claim = claim  # discovery's id of this reader's claim (its release names it)
        # The seq of the claim's event (the record's version the claim left): an event
        # of the edge up to it is older than this reader (Membership._on_event).
        self.claimed_at = claimed_at
        # xxh3-128 of every byte received (~21 us/MiB): what a re-run writer must reproduce
        # (made by the first byte).
        self.digest: xxhash.xxh3_128 | None = None
        # Replay of a re-run writer: stream offset reached, and while it is below
        # ``received`` the digest of the replayed prefix with the one it must reach (one
        # slot: a daemon holds a ReaderEnd per waiting reader).
        self.stream_pos = 0
        self._replay: tuple[xxhash.xxh3_128, bytes] | None = None
        # The last chunk, when it is a view of a receive buffer still being filled, and
        # its start there (its buffer is the view's ``obj``, its end start + len). The
        # next piece received right behind it extends it, so a frame's payload reads as
        # one buffer.
        self._tail: memoryview | None = None
        self._tail_start = 0

    @property
    def changed(self) -> Notifier:
        """Wakes whoever waits for this end to change (bytes, the end, a failure)."""
        return self

    # A node's slot of an edge that holds only this reader is the reader itself (see
    # node.Slot): a Slot object more was 64 bytes per waiting reader.
    @property
    def reader(self) -> ReaderEnd:
        return self

    @property
    def writer(self) -> None:
        return None

    @property
    def opening(self) -> frozenset[str]:
        return NOT_OPENING

    @property
    def empty(self) -> bool:
        return False

    def waiting(self) -> bool:
        """Nothing to read, and no end yet (bytes or the end may still come)."""
        return not self.chunks and self.state in (ReaderState.WAITING, ReaderState.STREAMING)

    @property
    def has_space(self) -> bool:
        return self.received - self.delivered < self.limit

    @property
    def consumed(self) -> int:
        """Bytes the program has read: what progress, a close and a release report."""
        backlog = self.backlog
        return self.delivered if backlog is None else self.delivered - backlog()

    def start_streaming(self) -> None:
        """A writer accepted the handshake: bytes may flow."""
        self.state = ReaderState.STREAMING
        self.changed.notify()

    def on_released(self) -> None:
        self.released = True
        self.changed.notify()  # a pull waiting to acknowledge the end (until_consumed)

    def attach_pump(self, scope: trio.CancelScope) -> None:
        """The task filling this end; :meth:`close` cancels it."""
        self.pump = scope

    def begin_stream(self, replay: bool) -> int:
        """A stream starts; returns the offset to ask the writer for.

        A resumed generation continues at ``received``. A re-run writer (``replay``) starts at
        0: its first ``received`` bytes are checked against what was delivered, not passed on.
        A connection lost in the middle of such a check resumes the *check*, at the offset the
        replay reached: the generation being verified is the one dialled again, and only a
        finished check may let its bytes through.
        """
        if not replay and self._replay is not None:
            return self.stream_pos  # finish verifying the replayed prefix first
        if replay and self.received and self.digest is not None:
            self._replay = (xxhash.xxh3_128(), self.digest.digest())
            self.stream_pos = 0
        else:
            self._replay = None
            self.stream_pos = self.received
        return self.stream_pos

    def accept(self, data: bytes | memoryview, at: int = -1) -> None:
        """Bytes of the stream at ``stream_pos``: verify the replayed part, push the rest.
        ``at``: ``data`` is a view of a receive buffer starting at that index (see push)."""
        if self._replay is not None:
            replay, expected = self._replay
            take = min(len(data), self.received - self.stream_pos)
            replay.update(data[:take] if take < len(data) else data)
            self.stream_pos += take
            if self.stream_pos < self.received:
                return
            self._replay = None
            if replay.digest() != expected:
                raise Diverged(
                    f"the re-run writer's first {self.received} bytes differ from the "
                    "bytes already delivered"
                )
            log.info("edge %s: replay of %d bytes verified", self.edge, self.received)
            if take == len(data):
                return
            data = memoryview(data)[take:]
            at = at + take if at >= 0 else at
        self.stream_pos += len(data)
        self.push(data, at)

    def check_end(self, total: int) -> None:
        if self._replay is not None or total < self.received:
            raise Diverged(
                f"the re-run writer ended after {total} bytes; {self.received} were delivered"
            )

    def push(self, data: bytes | memoryview, at: int = -1) -> None:
        """Appends received bytes. ``at`` >= 0: ``data`` is a memoryview of a receive buffer
        (``data.obj``) starting at index ``at``; if it continues the last chunk in that
        buffer, the two become one view (no copy), so a program's large read gets the
        whole frame received so far in one piece instead of a join of the pieces."""
        digest, chunks = self.digest, self.chunks
        if digest is None:
            digest = self.digest = xxhash.xxh3_128()
        if chunks is _NO_CHUNKS:
            chunks = self.chunks = deque()
        digest.update(data)
        self.received += len(data)
        tail = self._tail
        if at < 0 or not isinstance(data, memoryview):
            self._tail = None
            chunks.append(data)
        elif (
            tail is not None
            and chunks
            and chunks[-1] is tail
            and data.obj is tail.obj
            and at == self._tail_start + len(tail)
        ):
            self._tail = chunks[-1] = memoryview(data.obj)[self._tail_start : at + len(data)]
        else:
            self._tail, self._tail_start = data, at
            chunks.append(data)
        self.changed.notify()

    def finish(self) -> None:
        self.state = ReaderState.EOF
        self.changed.notify()

    def fail(self, code: int, message: str) -> None:
        if self.state in (ReaderState.WAITING, ReaderState.STREAMING):
            log.warning("edge %s: reader fails: %s", self.edge, message)
            self.state = ReaderState.FAILED
            self.error = EdgeError(code, message)
            self.changed.notify()

    def close(self, tell_writer: bool = True) -> None:
        """The program closed its end. ``tell_writer``: it meant it (the writer's next write
        gets EPIPE); else it died, and a re-run reader may still want the stream."""
        self.tell_writer = tell_writer
        self.state = ReaderState.CLOSED
        self.chunks = _NO_CHUNKS
        self._tail = None
        self.changed.notify()
        if self.pump is not None:
            self.pump.cancel()

    async def read(self, size: int, poll: float) -> bytes | memoryview:
        while not self.chunks:
            if self.state is ReaderState.EOF:
                return b""
            if self.error is not None:
                raise self.error
            if self.state is ReaderState.CLOSED:
                raise EdgeError(errno.EBADF, "edge closed")
            # Every change of the end notifies (bytes, EOF, failure, close); the timeout is a
            # safety net only: a thousand waiting readers do not wake once a second each.
            await wait_or_interrupt(
                self.changed, self.interrupt_pid, poll, timeout=IDLE_WAIT, tgid=self.tgid
            )
        chunks = self.chunks  # the first byte made it (push)
        first = chunks[0]
        head = self.head
        out: bytes | memoryview
        if len(first) - head >= min(size // 2, SHORT_READ) or len(chunks) == 1:
            # One buffer answers: hand it (or a view of it) over without copying. A large
            # one is worth a short read (as a pipe gives) rather than a copy to fill it.
            if len(first) - head <= size:
                chunks.popleft()
                out = first if head == 0 else memoryview(first)[head:]
                self.head = 0
            else:
                out = memoryview(first)[head : head + size]
                self.head = head + size
        else:
            # Many small buffers (small writes): join them up to the requested size.
            parts: list[bytes | memoryview] = []
            got = 0
            while chunks and got < size:
                chunk = chunks[0]
                view = memoryview(chunk)[self.head :]
                if got + len(view) > size:
                    view = view[: size - got]
                    self.head += len(view)
                else:
                    chunks.popleft()
                    self.head = 0
                parts.append(view)
                got += len(view)
            out = b"".join(parts)
        self.delivered += len(out)
        self.changed.notify()
        return out
