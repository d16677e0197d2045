"""The pyfuse3 Operations of a fractalfs mount, and nothing else.

The root directory holds one regular file per edge id. Lookup of any well-formed id
succeeds (the file "exists" for every edge), anything else is ENOENT. Opening for writing
makes this node the edge's writer, opening for reading its reader; reads and writes are
handed to :class:`~fractalfs.node.Node`.

Pitfalls handled here (see DEVELOPERS.md):
* edge files are S_IFREG (an S_IFIFO is served by the kernel, locally) sized EDGE_SIZE and
  opened ``direct_io``, ``nonseekable``, ``keep_cache=False``; a plain read-only open gets
  a kernel FIFO the daemon fills (``fifo_readers``, the default), and with ``fifo_writers``
  a write-only open gets one the daemon drains (fiforoute);
* entry and attribute timeouts are short: pyfuse3's default is 300 s;
* a direct_io WRITE holds the inode's lock in the kernel for as long as we block it, so an
  unlink of that inode would wait in vfs_unlink without ever reaching us. Edge entries are
  therefore never cached (entry timeout 0) and, while a writer is blocked, lookup answers
  with a fresh inode number: the kernel revalidates, the unlink lands on the new, unlocked
  inode, and removing the edge releases the blocked writer with EPIPE;
* any exception other than FUSEError escaping a handler would kill the mount, so every
  handler goes through :func:`_guard`;
* waiting handlers answer EINTR on a pending signal (pyfuse3 ignores FUSE_INTERRUPT).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
import stat
import subprocess
import time
from collections.abc import Callable, Container, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from . import fifokeeper, fiforoute, metrics, procs, testhooks
from .edgeid import EdgeId
from .edges import EdgeError, ReaderEnd, WriterEnd
from .node import Node, WouldWait
from .ownership import ROOT_UID, Owners
from .policy import Mode

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
XATTR_MODE = b"user.fractalfs.mode"  # transient | persistent | dynamic, before the writer opens
XATTR_REASON = b"user.fractalfs.mode_reason"
#: What stat reports as an edge's size. An edge's length is unknown until its end, and
#: GNU sort sizes its buffer from st_size of a regular file: with 0 it kept one line per
#: buffer and wrote a temporary file per line. 1 MiB is about the guess sort makes for a
#: pipe, and keeps `wc`'s column width (7 digits) what it is for a pipe.
EDGE_SIZE = 1 << 20
FOREVER = 365 * 86400.0  # entry and attribute timeout of MOUNT/.fifo
SPILL_NEAR = 256 << 20  # below spill_min_free + this, free space is looked at every write
#: Kernel FIFOs get inodes in [FIFO_INO, INO_END), every other inode is below: whether an
#: inode is a FIFO is its number (a set of FIFO inodes was 33 bytes per waiting reader).
#: Both ranges stay below 2^32, numbers wrapping round past those still in use: a 32-bit
#: program built without large-file support gets EOVERFLOW from stat of a larger st_ino.
FIFO_INO = 1 << 31
INO_END = 1 << 32
FDS_PER_FIFO = 1  # the daemon's descriptors for one FIFO (its end, also what a new keeper gets)
FINISHED_COST = 1 << 20  # a closed, undelivered writer end: records and descriptors, besides bytes
RECOUNT_EVERY = 1.0  # seconds between recounts of what a user's closed writer ends hold
PRUNE_EVERY = 1.0  # seconds between passes over the ownership claims
P = ParamSpec("P")
T = TypeVar("T")


def _guard(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Every error leaves a handler as an errno; nothing else may reach pyfuse3."""

    latency = metrics.FUSE_SECONDS.labels(fn.__name__)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except EdgeError as exc:
            if exc.errno not in (errno.EINTR, errno.EPIPE):
                log.info("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            latency.observe(time.perf_counter() - start)

    return wrapper


_SIZES: dict[int, int] = {}  # the reservations made so far, one int object each


@dataclass(slots=True)
class Handle:
    inode: int
    writer: WriterEnd | None = None
    reader: ReaderEnd | None = None
    uid: int = 0
    reserved: int = 0  # memory this end may hold, counted against its uid


@dataclass(slots=True)
class Finished:
    """One user's closed writer ends not yet delivered: their bytes stay in the daemon's
    memory (and spill files) until a reader takes them, so they keep counting against the
    uid's limits. ``memory`` and ``spill`` only overestimate between recounts (a reader
    frees bytes, a delivered end goes)."""

    ends: dict[EdgeId, WriterEnd]
    memory: int = 0
    spill: int = 0
    counted_at: float = float("-inf")


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node
        self._inodes: dict[EdgeId, int] = {}  # the inode lookup currently answers
        self._edges: dict[int, EdgeId] = {}  # every inode the kernel may still use
        self._lookups: dict[int, int] = {}  # kernel lookup counts, released by forget
        self._last_ino = ROOT
        self._last_fifo_ino = FIFO_INO  # see FIFO_INO
        self._fifo_count = 0  # FIFO inodes in _edges (handed out, not forgotten)
        self._fifo_writers: dict[EdgeId, fiforoute.Fifo] = {}
        self._fifo_readers: dict[EdgeId, fiforoute.FifoReader] = {}
        # Holds reader FIFOs' write ends past our death; their edge names are ours.
        self.keeper = fifokeeper.Keeper(name_of=self._fifo_name)
        # Reader FIFOs waiting for their first byte, with no task (started by the mount).
        self.idle_fifos = fiforoute.IdleFifos(self._wake_fifo, self._stop_fifo)
        self._fuse_reasons: set[tuple[str, str]] = set()  # FIFO fallbacks logged
        self._last_ino += 1
        self._fifo_dir = self._last_ino  # MOUNT/.fifo: the daemon's reader FIFOs
        self._fifo_dir_warm = False  # its entry is cached (warm_fifo_dir)
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._dir_uids: dict[int, int] = {}  # open directory handle -> the uid listing it
        self._finished: dict[int, Finished] = {}  # uid -> its closed, undelivered writer ends
        self._pruned_at = float("-inf")  # see _prune
        self._spill_free = (0, float("-inf"))  # spill filesystem's free bytes, next look
        self._next_dir = 1
        self._started_ns = time.time_ns()
        self._uid = os.getuid()
        self._gid = os.getgid()
        self.owners = Owners(self._busy)
        # A persisted stream survives a restart with its owner (see Persistence.owner_of).
        node.persistence.owner_of = self._spill_owner
        node.persistence.on_restored = self._claim_restored
        for slot in list(node.slots.values()):
            if slot.writer is not None:
                self._claim_restored(slot.writer)

    # -- local ownership (see fractalfs.ownership) ---------------------------------------

    def _busy(self, edge: EdgeId) -> bool:
        if edge in self.node.slots or edge in self._fifo_readers:
            return True
        return any(self._edges.get(h.inode) == edge for h in self._handles.values())

    def _permit(self, edge: EdgeId, ctx: pyfuse3.RequestContext, err: int, claim: bool) -> None:
        if not self.owners.allows(edge, ctx.uid, ctx.gid, claim=claim):
            raise pyfuse3.FUSEError(err)

    def _reserve(self, edge: EdgeId, writing: bool, uid: int, pipe: int = 0) -> int:
        """The memory the new end may hold (and ``pipe``, a reader FIFO's kernel pipe);
        EDQUOT if ``uid`` would exceed its limit."""
        config = self.node.config
        if not writing:
            need = config.read_buffer + pipe
        else:
            mode = self.node.mode_overrides.get(edge, self.node.mode)
            need = config.write_window + (config.retain_limit if mode is Mode.DYNAMIC else 0)
        need = _SIZES.setdefault(need, need)  # one int for every end (each kept in a Handle)
        if uid == ROOT_UID:
            return need
        held = sum(h.reserved for h in self._handles.values() if h.uid == uid)
        held += sum(f.reserved for f in self._fifo_readers.values() if f.uid == uid)
        if held + need + self._finished_use(uid, config.uid_memory_limit - held - need)[0] > (
            config.uid_memory_limit
        ):
            log.info("uid %d: open refused, %d + %d bytes of memory > limit", uid, held, need)
            raise pyfuse3.FUSEError(errno.EDQUOT)
        return need

    def _check_spill(self, handle: Handle) -> None:
        limit = self.node.config.uid_spill_limit
        writer = handle.writer
        if handle.uid == ROOT_UID or writer is None or writer.spill is None:
            return
        if self._spill_disk_low():
            raise pyfuse3.FUSEError(errno.EDQUOT)
        if not limit:
            return
        spilled = 0
        for h in self._handles.values():
            w = h.writer
            if h.uid == handle.uid and w is not None and w.spill is not None:
                spilled += w.spill.end - w.spill.start
        if spilled + self._finished_use(handle.uid, None, limit - spilled)[1] > limit:
            raise pyfuse3.FUSEError(errno.EDQUOT)

    def _spill_disk_low(self) -> bool:
        """Whether the spill filesystem is below ``spill_min_free``. Far above the floor it
        is looked at every 0.1 s at most; within SPILL_NEAR of it at every write (a
        ``statvfs`` is a microsecond): a writer spilling at GB/s would otherwise pass the
        floor between two looks (a 48 MiB filesystem with a 16 MiB floor filled up)."""
        floor = self.node.config.spill_min_free
        if not floor:
            return False
        free, look_at = self._spill_free
        now = time.monotonic()
        if now >= look_at or free < floor + SPILL_NEAR:
            try:
                st = os.statvfs(self.node.config.spill_dir)
                free = st.f_bavail * st.f_frsize
            except OSError:
                free = 0  # cannot tell: no user may spill
            self._spill_free = (free, now + 0.1)
        return free < floor

    def _keep_counting(self, handle: Handle | None) -> None:
        """A user's writer end closed: until delivered it still holds its bytes (see
        Finished)."""
        if handle is None or handle.uid == ROOT_UID or handle.writer is None:
            return
        writer = handle.writer
        if writer.done:
            return
        fin = self._finished.setdefault(handle.uid, Finished({}))
        if writer.edge not in fin.ends:
            fin.ends[writer.edge] = writer
            fin.memory += _held_memory(writer)
            fin.spill += _held_spill(writer)

    def _finished_use(
        self, uid: int, memory_room: int | None, spill_room: int | None = None
    ) -> tuple[int, int]:
        """The memory and spill bytes ``uid``'s closed writer ends hold; recounted (at most
        every RECOUNT_EVERY) when the estimate exceeds the room left."""
        fin = self._finished.get(uid)
        if fin is None:
            return 0, 0
        over = (memory_room is not None and fin.memory > memory_room) or (
            spill_room is not None and fin.spill > spill_room
        )
        now = time.monotonic()
        if over and now - fin.counted_at >= RECOUNT_EVERY:
            fin.counted_at = now
            still_open = {id(h.writer) for h in self._handles.values() if h.writer is not None}
            fin.memory = fin.spill = 0
            for edge, writer in list(fin.ends.items()):
                slot = self.node.slots.get(edge)
                if slot is None or slot.writer is not writer or writer.done:
                    del fin.ends[edge]
                elif id(writer) not in still_open:  # an open one counts by its handle
                    fin.memory += _held_memory(writer)
                    fin.spill += _held_spill(writer)
            if not fin.ends:
                del self._finished[uid]
        return fin.memory, fin.spill

    def _spill_owner(self, edge: EdgeId) -> tuple[int, int] | None:
        owner = self.owners.owner(edge)
        return None if owner is None or owner.uid == self._uid else (owner.uid, owner.gid)

    def _claim_restored(self, writer: WriterEnd) -> None:
        """A restored spill file owned by a user (not the daemon) is that user's stream."""
        if writer.spill is None:
            return
        try:
            st = os.fstat(writer.spill.fd)
        except OSError:
            return
        if st.st_uid != self._uid:
            self.owners.seed(writer.edge, st.st_uid, st.st_gid)

    def _prune(self) -> None:
        # A pass is O(claims): at most one a second, or a user making claims in a loop
        # (setxattr on fresh names) would make every request of every user pay for it.
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        for edge in self.owners.prune():
            self.node.mode_overrides.pop(edge, None)

    # -- names and attributes ------------------------------------------------------------

    def _inode(self, edge: EdgeId) -> int:
        ino = self._inodes.get(edge)
        writer = self.node.writer_for(edge)
        if ino is None or (writer is not None and writer.blocked):
            self._last_ino = ino = self._free_ino(self._last_ino, self._fifo_dir + 1, FIFO_INO)
            self._inodes[edge] = ino
            self._edges[ino] = edge
        return ino

    def _looked_up(self, ino: int) -> int:
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return ino

    def _edge(self, inode: int) -> EdgeId:
        edge = self._edges.get(inode)
        if edge is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return edge

    @staticmethod
    def _name(name: bytes) -> EdgeId:
        try:
            return EdgeId.parse(name.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_uid = self._uid
        attrs.st_gid = self._gid
        if inode == ROOT:
            # Sticky, like /tmp: anyone may create (open) an edge, only its owner (or
            # root) may remove it; the kernel enforces this (default_permissions).
            attrs.st_mode = stat.S_IFDIR | 0o1777
            attrs.st_nlink = 2
        else:
            if inode == self._fifo_dir:  # cached for good: see warm_fifo_dir
                attrs.st_mode = stat.S_IFDIR | 0o700
                attrs.st_nlink = 2
                attrs.entry_timeout = attrs.attr_timeout = FOREVER
                return attrs
            owner = self.owners.owner(self._edge(inode))
            kind = stat.S_IFIFO if inode >= FIFO_INO else stat.S_IFREG
            attrs.st_mode = kind | (0o666 if owner is None else 0o600)
            attrs.st_nlink = 1
            if owner is not None:
                attrs.st_uid, attrs.st_gid = owner.uid, owner.gid
            if kind == stat.S_IFREG:
                # Programs size buffers from st_size of a regular file (see EDGE_SIZE); blocks
                # agree with it, or cp takes the file for sparse and tries SEEK_DATA.
                attrs.st_size = EDGE_SIZE
                attrs.st_blocks = EDGE_SIZE // 512
        attrs.st_blksize = 1 << 20
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._started_ns
        attrs.entry_timeout = 1.0 if inode == ROOT else 0.0
        attrs.attr_timeout = 1.0 if inode == ROOT else 0.0  # ownership changes at open
        return attrs

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == self._fifo_dir and procs.tgid(ctx.pid) == self.keeper.pid:
            ino = int(name) if name.isdigit() else 0
            if ino < FIFO_INO or ino not in self._edges:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(self._looked_up(ino))
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attrs(ROOT)
        if name == fiforoute.FIFO_DIR and (
            fiforoute.is_own_thread(ctx.pid) or fiforoute.is_own_child(ctx.pid)
        ):
            return self._attrs(self._fifo_dir)
        edge = self._name(name)
        config = self.node.config
        if config.fifo_writers or config.fifo_readers:
            flags = fiforoute.open_flags(ctx.pid)
            # The kernel serves a FIFO's open itself: ownership is decided here.
            if (
                config.fifo_writers
                and self._fifo_dir_warm
                and fiforoute.wants_fifo_writer(ctx.pid, flags)
            ):
                self._permit(edge, ctx, errno.EACCES, claim=True)
                attrs = await self._fifo_writer(edge, ctx)
                if attrs is not None:
                    return attrs
            if (
                config.fifo_readers
                and self._fifo_dir_warm
                and fiforoute.wants_fifo_reader(flags)
                and not fiforoute.stays_on_fuse(ctx.pid)
            ):
                self._permit(edge, ctx, errno.EACCES, claim=True)
                attrs = await self._fifo_reader(edge, ctx)
                if attrs is not None:
                    return attrs
        return self._attrs(self._looked_up(self._inode(edge)))

    def _new_fifo_ino(self, edge: EdgeId) -> tuple[int, str]:
        """A new FIFO inode for ``edge`` and its path under ``MOUNT/.fifo``, by which only
        the keeper may open it (see lookup)."""
        ino = self._fifo_ino(edge)
        path = os.path.join(self.node.config.mountpoint, fiforoute.FIFO_DIR.decode(), f"{ino}")
        return ino, path

    def _fifo_alive(self, ino: int) -> bool:
        """A FIFO inode lives as long as its drain or feed (see forget)."""
        edge = self._edges.get(ino)
        if edge is None:
            return False
        fifo: fiforoute.Fifo | fiforoute.FifoReader | None
        for fifo in (self._fifo_writers.get(edge), self._fifo_readers.get(edge)):
            if fifo is not None and fifo.ino == ino:
                return True
        return False

    async def _fifo_reader(
        self, edge: EdgeId, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes | None:
        """A read-only open gets a kernel FIFO the daemon fills (fiforoute.feed); its write
        end is opened (by the keeper) before the LOOKUP is answered (fiforoute.prepare).
        None: this open stays on FUSE (see _refuse_fifo)."""
        fifo = self._fifo_readers.get(edge)
        if fifo is not None and fifo.lingering:  # closed unread: a reopen (fiforoute._reopened)
            # Its open may come after the grace (_late_reopen).
            if fifo.reopeners is None:
                fifo.reopeners = set()
            fifo.reopeners.add(ctx.pid)
            attrs = self._attrs(self._looked_up(fifo.ino))
            await testhooks.lingering_lookup_delay()
            return attrs
        if fifo is not None and fifo.unopened_by(ctx.pid):
            return self._attrs(self._looked_up(fifo.ino))
        why = self._refuse_fifo(ctx.pid)
        if why:
            self._fuse_read_because(why)
            return None
        # The pipe's MiB is kernel memory the user pins: it counts with the read buffer.
        reserved = self._reserve(edge, False, ctx.uid, fifokeeper.PIPE_SIZE)
        ino = self._fifo_ino(edge)
        path = os.path.join(self.node.config.mountpoint, fiforoute.FIFO_DIR.decode(), f"{ino}")
        opening = fiforoute.Opening(ino, path, edge.hex)
        with trio.move_on_after(fiforoute.PREPARE_FOR):
            await trio.to_thread.run_sync(
                fiforoute.prepare, opening, self.keeper, abandon_on_cancel=True
            )
        ends = opening.settle()
        if ends is None:
            # Never a FIFO without its write end: a non-blocking open (gzip) would read EOF
            # at once and take the stream for empty; a blocking one would wait for good.
            self._forget_fifo(ino)
            if opening.failure is not None:
                why = f"cannot open the reader's FIFO: {opening.failure}"
            else:
                why = f"the reader's FIFO was not open within {fiforoute.PREPARE_FOR} s"
            log.warning("edge %s: %s; this open reads through FUSE", edge, why)
            return None
        try:
            reader = await self.node.open_reader(edge, ctx.pid, wait=False)
        except BaseException as exc:
            fiforoute.let_go(ends, ino, self.keeper)
            self._forget_fifo(ino)
            if isinstance(exc, WouldWait):
                return None  # the FUSE open waits for it, not holding the lookup lock
            raise
        # No FUSE handle: the FIFO record counts the uid's memory (_reserve), and keeps
        # the edge busy (_busy) until its feed ends (_fed).
        fifo = fiforoute.FifoReader(reader, ino, ends, ctx.uid, reserved)
        self._fifo_readers[edge] = fifo
        self.node.spawn(self._feed, edge, fifo)
        return self._attrs(self._looked_up(ino))

    def _refuse_fifo(self, pid: int) -> str:
        """Why an open by ``pid`` must not get a reader FIFO ("" if it may). A FIFO reader
        of a failed stream must die (EOF would look like the end): only a daemon that can
        find and kill every holder of the read end may hand one out."""
        if not self.keeper.usable:
            return "no FIFO keeper runs (a daemon crash would give its readers EOF)"
        if not procs.sees_every_process():
            return (
                "this daemon is not in the initial pid namespace: a holder of a FIFO in "
                "another one could not be killed"
            )
        if not procs.visible(pid):
            return "the opener is not in this daemon's /proc"
        return self._short_of_descriptors()

    def _short_of_descriptors(self) -> str:
        """Why a new FIFO would bring this daemon near its descriptor limit ("" if not).
        A FIFO costs the daemon one descriptor for its life; a daemon out of them
        cannot read ``/proc/<pid>/fd`` and would take a program holding its FIFO for one
        that never opened it (and kill it). A FUSE open costs no descriptor."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return ""
        reserve = max(self.node.config.fd_reserve, soft // 8)
        if FDS_PER_FIFO * self._fifo_count + reserve > soft:
            return f"too close to the descriptor limit ({soft})"
        return ""

    def _fuse_read_because(self, why: str) -> None:
        self._on_fuse_because("reader FIFOs: FUSE reads instead", why)

    def _fuse_write_because(self, why: str) -> None:
        self._on_fuse_because("writer FIFOs: FUSE writes instead", why)

    def _on_fuse_because(self, what: str, why: str) -> None:
        """Logs once per route and reason that FIFOs fall back to FUSE."""
        if (what, why) not in self._fuse_reasons:
            self._fuse_reasons.add((what, why))
            log.warning("%s: %s", what, why)

    def _forget_fifo(self, ino: int) -> None:
        if ino not in self._lookups:  # else forget() does, once the kernel lets it go
            self._drop_fifo_ino(ino)

    def _free_ino(self, last: int, low: int, end: int) -> int:
        return free_ino(last, low, end, self._edges, self._lookups)

    def _fifo_ino(self, edge: EdgeId) -> int:
        self._last_fifo_ino = ino = self._free_ino(self._last_fifo_ino, FIFO_INO, INO_END)
        self._edges[ino] = edge
        self._fifo_count += 1
        return ino

    def _fifo_name(self, ino: int) -> str | None:
        """The edge name of FIFO inode ``ino`` (for the keeper; from its threads)."""
        edge = self._edges.get(ino)
        return edge.hex if edge is not None else None

    def _drop_fifo_ino(self, ino: int) -> None:
        edge = self._edges.get(ino)
        if edge is not None:
            self.keeper.remember(ino, edge.hex)  # first: the keeper may still hold it
            del self._edges[ino]
            self._fifo_count -= 1

    def warm_fifo_dir(self) -> None:
        """Looks ``MOUNT/.fifo`` up once, from a worker thread: its entry stays cached (its
        entry timeout is long), so opening a reader FIFO under it never waits for the
        root's lookup lock (see fiforoute.prepare). Until then readers stay on FUSE."""
        # From a child process, not a thread of ours: a daemon killed while one of its own
        # threads waits in a request to its mount can never exit (the thread waits for an
        # answer only the dead daemon could give) and its mount hangs instead of failing.
        if not self.keeper.start():
            return  # logged: readers stay on FUSE
        path = os.path.join(self.node.config.mountpoint, fiforoute.FIFO_DIR.decode())
        try:
            looked = subprocess.run(["test", "-d", path], timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("reader FIFOs off: %s", exc)
            return
        if looked.returncode != 0:
            log.warning("reader FIFOs off: %s cannot be looked up", path)
            return
        self._fifo_dir_warm = True

    async def _feed(self, edge: EdgeId, fifo: fiforoute.FifoReader, woken: bool = False) -> None:
        parked = False
        try:
            if woken:
                await fiforoute.resume(self.node, fifo, self.keeper)
            else:
                parked = await fiforoute.feed(self.node, fifo, self.keeper, self.idle_fifos)
        finally:
            if not parked:
                self._fed(edge, fifo)

    def _fed(self, edge: EdgeId, fifo: fiforoute.FifoReader) -> None:
        if self._fifo_readers.get(edge) is fifo:
            del self._fifo_readers[edge]
        # As _drain: an inode the kernel forgot while its feed ran (forget() kept it for
        # the feed) goes now, or it would count against the descriptor reserve for good.
        self._forget_fifo(fifo.ino)

    def _wake_fifo(self, fifo: fiforoute.FifoReader) -> None:
        self.node.spawn(self._feed, fifo.reader.edge, fifo, True)

    def _stop_fifo(self, fifo: fiforoute.FifoReader) -> None:
        """A FIFO still parked when the daemon stops (its pour task would be cancelled)."""
        try:
            fiforoute.finish(self.node, fifo, self.keeper, settled=False)
        finally:
            self._fed(fifo.reader.edge, fifo)
            self._forget_fifo(fifo.ino)

    async def _fifo_writer(
        self, edge: EdgeId, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes | None:
        """A write-only open gets a kernel FIFO the daemon drains (fiforoute). The uid's
        memory and spill limits hold as for a FUSE writer: EDQUOT at the open, and a spill
        past the limit ends the drain (the program's next write: EPIPE).

        The end the daemon drains is opened by the keeper before the LOOKUP is answered and
        before the writer is registered: a thread of the daemon waiting in a request to
        its own mount would keep a SIGKILLed daemon from ever exiting, and a FIFO nobody
        reads would keep the program in open(2) for good. None: this open writes through
        FUSE (no keeper, or it could not open the FIFO)."""
        pid = ctx.pid
        fifo = self._fifo_writers.get(edge)
        if fifo is not None and fifo.unopened_by(pid):
            return self._attrs(self._looked_up(fifo.ino))
        if not self.keeper.usable:
            self._fuse_write_because("no FIFO keeper runs")
            return None
        short = self._short_of_descriptors()
        if short:
            self._fuse_write_because(short)
            return None
        reserved = self._reserve(edge, True, ctx.uid)
        ino, path = self._new_fifo_ino(edge)
        try:
            fd = await trio.to_thread.run_sync(self.keeper.open_drain_end, path, ino)
        except OSError as exc:
            self._forget_fifo(ino)
            self._fuse_write_because(f"no FIFO for this open ({exc})")
            return None
        try:
            writer = await self.node.open_writer(edge, pid, wait=False)
        except BaseException as exc:
            self.keeper.drain_held(ino)  # no program gets this FIFO: the keepers' dups go
            os.close(fd)
            self._forget_fifo(ino)
            if isinstance(exc, WouldWait):
                return None  # the FUSE open waits for it, not holding the lookup lock
            raise
        fifo = self._fifo_writers[edge] = fiforoute.Fifo(writer, ino, path)
        fifo.fd = fd
        # No FUSE handle: this one counts the uid's memory and spill.
        handle = self._handles[-ino] = Handle(ino, writer=writer, uid=ctx.uid, reserved=reserved)

        def check_spill() -> None:
            try:
                self._check_spill(handle)
            except pyfuse3.FUSEError as exc:
                raise EdgeError(exc.errno, "the uid's spill limit is exceeded") from None

        fifo.check = check_spill
        fifo.held = functools.partial(self.keeper.drain_held, ino)
        if testhooks.dies_after_writer_lookup():
            testhooks.die_after_writer_lookup(fd)  # (a test's fault: see testhooks)
            return self._attrs(self._looked_up(ino))
        self.node.spawn(self._drain, edge, fifo)
        return self._attrs(self._looked_up(ino))

    async def drain_closed_writers(self, limit: float) -> None:
        """On a clean stop, before writers are aborted: a FIFO whose every writing program
        closed it ended a stream as far as the program knows (``echo hi > E`` returned at
        once, status 0), with its last bytes maybe still in the pipe; a closed end (FIFO or
        FUSE) may still wait to learn its program's exit status. Those are drained and
        settled (spilled, in persistent mode) first, for up to ``limit`` seconds; a
        restart then serves the whole stream instead of a failed generation."""
        with trio.move_on_after(limit):
            while self.node.settling or any(f.hung_up() for f in self._fifo_writers.values()):
                await trio.sleep(0.02)

    async def _drain(self, edge: EdgeId, fifo: fiforoute.Fifo) -> None:
        try:
            await fiforoute.drain(self.node, fifo)
        finally:
            self._keep_counting(self._handles.pop(-fifo.ino, None))
            if self._fifo_writers.get(edge) is fifo:
                del self._fifo_writers[edge]
            if fifo.ino not in self._lookups:  # forgotten meanwhile
                self._drop_fifo_ino(fifo.ino)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    @_guard
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # Truncation to 0 is what `>` means on some paths; anything else has no meaning.
        if fields.update_size and attr.st_size != 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._attrs(inode)

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_dir
        self._next_dir += 1
        self._dir_uids[fh] = ctx.uid
        return fh

    @_guard
    async def releasedir(self, fh: int) -> None:
        self._dir_uids.pop(fh, None)

    def _listed(self, edge: EdgeId, uid: int) -> bool:
        """An edge's name is shown to root, its owner, or anyone while nobody owns it: the
        name of another user's edge would let them claim its other end on another node."""
        if uid == ROOT_UID:
            return True
        owner = self.owners.owner(edge)
        return owner is None or owner.uid == uid

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets are positions in the sorted listing; readdirplus counts as a lookup.
        uid = self._dir_uids.get(fh, -1)  # unknown: only what nobody owns
        names = sorted(edge.hex for edge in self.node.slots if self._listed(edge, uid))
        for pos, name in enumerate(names[start_id:], start=start_id + 1):
            ino = self._inode(EdgeId.parse(name))
            if not pyfuse3.readdir_reply(token, name.encode(), self._attrs(ino), pos):
                break
            self._looked_up(ino)

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 1 << 20
        data.f_namemax = 255
        return data

    # -- opening and closing -------------------------------------------------------------

    async def _open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        edge = self._edge(inode)
        mode = flags & os.O_ACCMODE
        if mode == os.O_RDWR:
            raise pyfuse3.FUSEError(errno.EINVAL)
        self._permit(edge, ctx, errno.EACCES, claim=True)
        reserved = self._reserve(edge, mode == os.O_WRONLY, ctx.uid)
        handle = Handle(inode, uid=ctx.uid, reserved=reserved)
        if mode == os.O_WRONLY:
            handle.writer = await self.node.open_writer(edge, ctx.pid)
        else:
            handle.reader = await self.node.open_reader(edge, ctx.pid)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=True)

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return await self._open(inode, flags, ctx)

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        inode = self._inode(self._name(name))
        info = await self._open(inode, flags, ctx)
        return info, self._attrs(self._looked_up(inode))

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    @_guard
    async def read(  # type: ignore[override]  # pyfuse3 takes any buffer (PyObject_GetBuffer)
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        reader = self._handle(fh).reader
        if reader is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.node.read(reader, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        writer = handle.writer
        if writer is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            self._check_spill(handle)
        except pyfuse3.FUSEError as exc:
            # Bytes the program wrote were not taken: the stream is cut short whatever its
            # exit (a program may go on and exit 0), a failed generation as a FIFO writer's
            # (fiforoute's drain), never "complete" without them.
            if writer.spill_error is None:
                writer.spill_error = OSError(exc.errno, "a write was refused for spill space")
            raise
        try:
            return await self.node.write(writer, buf)
        except EdgeError as exc:
            if exc.errno == errno.EPIPE and writer.reader_closed:
                procs.sigpipe_writer(writer.tgid, writer.edge.hex, writer.pid)  # as a pipe does
            raise

    @_guard
    async def flush(self, fh: int) -> None:
        handle = self._handle(fh)
        if handle.writer is not None:
            await self.node.flush_writer(handle.writer)
        if handle.reader is not None:
            self.node.flush_reader(handle.reader)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        self._handle(fh)

    @_guard
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        if handle.writer is not None:
            self.node.release_writer(handle.writer)
            self._keep_counting(handle)
        if handle.reader is not None:
            self.node.linger_reader(handle.reader)  # closed unread: may be opened again
        if len(self.owners) > 1024:
            self._prune()

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        edge = self._name(name)
        self._permit(edge, ctx, errno.EPERM, claim=False)
        await self.node.remove(edge, ctx.pid, unprivileged=ctx.uid != ROOT_UID)
        if not self._busy(edge):
            self.owners.drop(edge)
            self.node.mode_overrides.pop(edge, None)

    # -- per-edge persistence mode: extended attributes ----------------------------------

    @_guard
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if name != XATTR_MODE:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        try:
            mode = Mode(value.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        edge = self._edge(inode)
        self._permit(edge, ctx, errno.EACCES, claim=True)
        self._prune()  # overrides of edges nobody uses any more go with their claims
        self.node.mode_overrides[edge] = mode

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        edge = self._edge(inode)
        self._permit(edge, ctx, errno.EACCES, claim=False)
        writer = self.node.writer_for(edge)
        if name == XATTR_MODE:
            if writer is not None:
                return writer.mode.value.encode()
            return self.node.mode_overrides.get(edge, self.node.mode).value.encode()
        if name == XATTR_REASON and writer is not None:
            return writer.mode_reason.encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [] if inode == ROOT else [XATTR_MODE, XATTR_REASON]

    @_guard
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            left = self._lookups.get(ino, 0) - count
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups.pop(ino, None)
            if ino >= FIFO_INO:
                # The kernel forgets a FIFO inode whose revalidation failed, maybe before
                # the second LOOKUP of the same open and the daemon's own open of it
                # arrive: it lives as long as its drain or feed (see _drain, _feed).
                if self._fifo_alive(ino):
                    continue
                self._drop_fifo_ino(ino)
                continue
            gone = self._edges.pop(ino, None)
            if gone is not None and self._inodes.get(gone) == ino:
                del self._inodes[gone]


def free_ino(last: int, low: int, end: int, *taken: Container[int]) -> int:
    """The next number after ``last`` in [low, end) in none of ``taken``, wrapping round."""
    ino = last
    while True:
        ino = ino + 1 if low <= ino + 1 < end else low
        if not any(ino in used for used in taken):
            return ino


def _held_memory(writer: WriterEnd) -> int:
    """What a closed writer end keeps in the daemon's memory: its unfreed bytes and records."""
    return FINISHED_COST + (writer.end - writer.base if writer.chunks else 0)


def _held_spill(writer: WriterEnd) -> int:
    return writer.spill.end - writer.spill.start if writer.spill is not None else 0
