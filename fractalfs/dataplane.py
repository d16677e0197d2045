"""The data plane: moving an edge's bytes between daemons over trio TCP.

One listening socket per node daemon serves every edge it writes; a reader's daemon dials
it, says which edge, generation and offset it wants (:mod:`fractalfs.handshake`), and gets
frames (:mod:`fractalfs.codec`) from that offset. The writer batches whatever its program has
written into one DATA frame per ``sendmsg`` (up to 1 MiB, no copies); the reader receives
large payloads with ``recv_into`` into reused arenas and hands growing views of them to
the FUSE layer (a 1 MiB read is answered without a join, see :class:`Arenas`). TCP_NODELAY is on: a
netpipefs-like 42 ms Nagle/delayed-ACK stall per request would otherwise cap small writes
at a few MB/s.

Nothing here decides policy: :func:`serve_edge` streams one writer end to one connection
and :func:`pull` / :func:`pull_local` fill one reader end, each returning how it ended.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from . import codec, handshake, procs
from .codec import AbortReason
from .edges import Diverged, ReaderEnd, ReaderState, WriterEnd, WriterState
from .edgestate import PullOutcome
from .handshake import HELLO, REPLY, Control, Hello, Reply, Status
from .tls import TlsConn

log = logging.getLogger(__name__)

BATCH = 1 << 20  # bytes per DATA frame / sendmsg
MAX_IOV = 512
RECV_MAX = 1 << 20
SMALL_RECV = 64 * 1024  # read-ahead when a header is due: small frames cost one syscall
BIG_FRAME = 32 * 1024  # payload left in a frame beyond this is received into its own buffer
# Acknowledgements are cumulative: one once ACK_EVERY bytes are unacknowledged, but at most
# one per ACK_GAP seconds unless ACK_MAX are (each one is a loopback send and a wakeup of
# the writer's daemon, its drain and its sender); a deferred one goes out when its gap
# ends, data or not. Fewer bytes than ACK_EVERY are acknowledged once the stream paused
# for ACK_IDLE: a write window smaller than ACK_EVERY must not wait for an ACK forever.
ACK_EVERY = 1 << 20
ACK_GAP = 0.004
ACK_MAX = 4 << 20
ACK_IDLE = 0.02
HANDSHAKE_TIMEOUT = 5.0
CONTROLS_RECV = 4096  # bytes of a reader's controls taken per receive
MAX_HANDSHAKES = 256  # connections at once that have not yet proved the secret
CONNECT_TIMEOUT = 1.0  # a link that is down must not hold a redial for SYN retries
PING_EVERY = 1.0  # an idle writer's daemon proves it is alive this often
SILENCE_TIMEOUT = 3.5  # a reader redials after this long without a byte or a ping
USER_TIMEOUT_MS = 10_000  # unacknowledged sends fail after this long (dead peer)


class ConnectionLost(Exception):
    """The peer closed or reset the connection."""


class Conn(Protocol):
    """What the data plane calls on a connection: a raw trio socket as it is (no wrapper,
    no extra call per batch), or :class:`fractalfs.tls.TlsConn` around one."""

    def recv(self, bufsize: int, /) -> Awaitable[bytes]: ...

    def recv_into(self, buffer: memoryview, /) -> Awaitable[int]: ...

    def sendmsg(self, buffers: Sequence[bytes | memoryview], /) -> Awaitable[int]: ...


def tune(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


async def recv_exact(sock: Conn, n: int) -> bytes:
    parts: list[bytes] = []
    while n:
        data = await sock.recv(n)
        if not data:
            raise ConnectionLost("connection closed by peer")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


async def send_all(sock: Conn, buffers: Sequence[bytes | memoryview]) -> None:
    bufs = list(buffers)
    i = 0  # the first buffer not sent completely (an index: no quadratic list.pop(0))
    while i < len(bufs):
        sent = await sock.sendmsg(bufs[i : i + MAX_IOV])
        while sent:
            first = len(bufs[i])
            if sent >= first:
                sent -= first
                i += 1
            else:
                bufs[i] = memoryview(bufs[i])[sent:]
                sent = 0
        while i < len(bufs) and not len(bufs[i]):
            i += 1  # empty buffers need no sendmsg of their own


def parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- the writer's side -------------------------------------------------------------------


async def read_hello(sock: Conn) -> Hello:
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        fixed = await recv_exact(sock, HELLO.size)
        auth_len = Hello.auth_length(fixed)
        auth = await recv_exact(sock, auth_len) if auth_len else b""
    return Hello.decode(fixed, auth)


async def accept_hello(sock: Conn, key: bytes | None) -> Hello | None:
    """The reader's HELLO, once it proved it holds ``key`` (None: no authentication).

    A peer that does not gets a refusal naming no generation or offset, and None: nothing
    about the edge was looked at, its current connection is untouched.
    """
    with trio.fail_after(HANDSHAKE_TIMEOUT):  # the whole exchange, not each read
        hello = await read_hello(sock)
        if key is None:
            return hello
        refusal = handshake.auth_refusal(hello)
        if refusal is not None:
            await send_all(sock, [refusal.encode()])
            return None
        nonce = secrets.token_bytes(handshake.NONCE)
        await send_all(sock, [handshake.challenge(key, hello, nonce)])
        proof = await recv_exact(sock, handshake.MAC)
        if not handshake.check_proof(key, hello, nonce, proof):
            refused = Reply(Status.AUTH_FAILED, message="wrong proof of the cluster secret")
            await send_all(sock, [refused.encode()])
            return None
    return hello


async def greet(sock: Conn, hello: Hello, key: bytes | None) -> Reply:
    """The reader's side of the handshake: HELLO, the mutual proof if asked, the REPLY."""
    await send_all(sock, [hello.encode()])
    first = await recv_exact(sock, 1)
    if first[0] == handshake.CHALLENGE_TAG:
        rest = await recv_exact(sock, handshake.CHALLENGE.size - 1)
        if key is None:
            return Reply(Status.AUTH_REQUIRED, message="the writer's node requires a secret")
        proof = handshake.check_challenge(key, hello, first + rest)
        if proof is None:
            return Reply(Status.AUTH_FAILED, message="the writer's node has another secret")
        await send_all(sock, [proof])
        first = await recv_exact(sock, 1)
    elif key is not None:
        # No proof: whoever answers at that address (a port bound by another program
        # after the daemon died, a redirected endpoint) must not be streamed from.
        return Reply(Status.AUTH_FAILED, message="the writer's node did not prove the secret")
    fixed = first + await recv_exact(sock, REPLY.size - 1)
    return Reply.decode(fixed, await recv_exact(sock, Reply.message_length(fixed)))


def check_hello(hello: Hello, writer: WriterEnd | None) -> Reply:
    """Whether ``writer`` can serve ``hello``: an OK reply or the reason it cannot."""
    if writer is None:
        return Reply(Status.NO_EDGE, message=f"no writer of edge {hello.edge} on this node")
    if writer.generation != hello.generation:
        return Reply(
            Status.STALE_GENERATION,
            writer.generation,
            message=f"this node serves generation {writer.generation}, not {hello.generation}",
        )
    if writer.state is WriterState.ABORTED:
        return Reply(Status.NO_EDGE, writer.generation, message="the edge was aborted")
    first = writer.spill.start if writer.spill is not None else writer.base
    if not first <= hello.offset <= writer.end:
        return Reply(
            Status.BAD_OFFSET,
            writer.generation,
            first,
            message=f"offset {hello.offset} is outside [{first}, {writer.end}]",
        )
    return Reply(Status.OK, writer.generation, hello.offset)


async def serve_edge(sock: Conn, writer: WriterEnd, offset: int) -> None:
    """Streams ``writer`` from ``offset`` until delivered, aborted or disconnected.

    A newer connection for the same end supersedes this one (the reader reconnected).
    """
    if writer.connection is not None:
        writer.connection.cancel()
    scope = writer.connection = trio.CancelScope()
    try:
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_receive_controls, sock, writer, scope)
                await _send_stream(sock, writer, offset)
                scope.cancel()
    finally:
        if writer.connection is scope:  # not superseded by a newer connection
            writer.connection = None


async def _send_stream(sock: Conn, writer: WriterEnd, offset: int) -> None:
    pos = offset
    cursor: tuple[int, int] | None = None
    bufs: Sequence[bytes | memoryview]
    while True:
        if writer.state is WriterState.ABORTED:
            reason, message = writer.abort_reason or (AbortReason.REMOVED, "")
            await send_all(sock, [codec.abort_frame(reason, message)])
            return
        if writer.on_disk(pos):
            bufs, cursor = [await writer.read_spill(pos, BATCH)], None
        else:
            bufs, cursor = writer.read_at(pos, cursor, BATCH)
        if bufs:
            size = sum(len(b) for b in bufs)
            await send_all(sock, [codec.data_header(size), *bufs])
            pos += size
            continue
        if writer.state is WriterState.COMPLETE:
            writer.on_end_sent()
            await send_all(sock, [codec.end_frame(writer.end)])
            # Stay until the reader acknowledges everything and hangs up.
            await trio.sleep_forever()
        if writer.state is WriterState.FAILED:
            await send_all(
                sock,
                [codec.abort_frame(AbortReason.WRITER_FAILED, "the writing program failed")],
            )
            return
        with trio.move_on_after(PING_EVERY) as idle:
            await writer.changed.wait()
        if idle.cancelled_caught:
            await send_all(sock, [codec.PING_FRAME])


async def _receive_controls(sock: Conn, writer: WriterEnd, scope: trio.CancelScope) -> None:
    size = handshake.CONTROL.size
    pending = b""
    try:
        while True:
            # Every control that has arrived, from one receive (recv_exact per 9-byte
            # control: 11% of the writer's daemon's time holding the GIL at bs=1M, py-spy).
            data = await sock.recv(CONTROLS_RECV)
            if not data:
                raise ConnectionLost("connection closed by peer")
            pending += data
            usable = len(pending) - len(pending) % size
            closed = False
            for at in range(0, usable, size):
                kind, value = handshake.parse_control(pending[at : at + size])
                if kind is Control.ACK:
                    writer.ack(value)  # bytes received, not "delivered": that is END_ACK
                elif kind is Control.END_ACK:
                    writer.ack(value)
                    writer.on_end_acked(value)
                elif kind is Control.CLOSE:
                    writer.on_reader_closed()
                    closed = True
                    break
            if closed:
                break
            pending = pending[usable:]
    except (ConnectionLost, OSError, handshake.HandshakeError):
        pass
    finally:
        scope.cancel()


# -- the reader's side -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    outcome: PullOutcome
    detail: str = ""


_ABORTS = {
    AbortReason.REMOVED: PullOutcome.REMOVED,
    AbortReason.WRITER_FAILED: PullOutcome.GONE,
    AbortReason.SHUTDOWN: PullOutcome.GONE,
    AbortReason.STALE: PullOutcome.GONE,
    AbortReason.READER_LOST: PullOutcome.GONE,
}


async def _wait_for_space(reader: ReaderEnd) -> None:
    while not reader.has_space and reader.state is ReaderState.STREAMING:
        await reader.changed.wait()


async def pull(
    reader: ReaderEnd,
    endpoint: str,
    generation: int,
    replay: bool,
    on_connected: Callable[[int], None],
    key: bytes | None = None,
    tls: ssl.SSLContext | None = None,
) -> Result:
    """Fills ``reader`` from the writer's daemon at ``endpoint``.

    Resumes at the reader's offset, or, for a re-run writer (``replay``), reads from 0 and
    verifies the prefix already delivered. ``on_connected`` is called once the writer has
    accepted the handshake. ``tls``: the cluster's client context (mutual TLS).
    """
    try:
        host, port = parse_endpoint(endpoint)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
    except (ValueError, OSError) as exc:
        return Result(PullOutcome.GONE, f"bad endpoint {endpoint!r}: {exc}")
    with sock:
        offset = reader.begin_stream(replay)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await sock.connect((host, port))
            tune(sock)
            conn: Conn = sock
            if tls is not None:
                conn = TlsConn(sock, tls, server=False)
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await conn.handshake()
            if key is None:
                hello = Hello(reader.edge, generation, offset)
            else:
                nonce = secrets.token_bytes(handshake.NONCE)
                hello = Hello(reader.edge, generation, offset, handshake.FLAG_HMAC, nonce)
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                reply = await greet(conn, hello, key)
        except (OSError, ConnectionLost, trio.TooSlowError, handshake.HandshakeError) as exc:
            return Result(PullOutcome.LOST, f"cannot reach {endpoint}: {exc or 'timeout'}")
        if reply.status is Status.NO_EDGE and not reply.generation:
            # Not "aborted" (that names its generation): no writer of the edge there at all.
            return Result(PullOutcome.UNHELD, f"{reply.status.name}: {reply.message}")
        if reply.status is not Status.OK:
            return Result(PullOutcome.GONE, f"{reply.status.name}: {reply.message}")
        on_connected(generation)
        try:
            return await _receive(conn, reader, offset)
        except (OSError, ConnectionLost) as exc:
            return Result(PullOutcome.LOST, f"connection to {endpoint} broke: {exc}")
        except trio.TooSlowError:
            return Result(PullOutcome.LOST, f"{endpoint} silent for {SILENCE_TIMEOUT:g} s")
        except Diverged as exc:
            return Result(PullOutcome.DIVERGED, str(exc))
        except codec.ProtocolError as exc:
            return Result(PullOutcome.LOST, f"bad stream from {endpoint}: {exc}")
        finally:
            if reader.state is ReaderState.CLOSED and reader.tell_writer:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await send_all(conn, [handshake.control(Control.CLOSE, reader.consumed)])
                    # Closing now, with the writer's data unread, would reset the
                    # connection: the writer's send fails and may end its side before it
                    # reads the CLOSE (seen: 1 early close in 7 did not stop the writer).
                    # Let the writer hang up first.
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                        while await sock.recv(RECV_MAX):
                            pass


class Arenas:
    """Receive buffers of one connection. Large payloads are received into an arena, one
    frame after another, so the reader's chunks are views of it (consecutive pieces merge
    into one view, see :meth:`ReaderEnd.push`) and no byte is copied after ``recv_into``.
    An arena the reader no longer holds any view of is filled again instead of allocating
    (and zero-filling) a new one. None is made before the first large frame: a connection
    carrying only small frames (lines) holds no arena, whatever the number of edges.

    ``keep`` must cover what the other side may hold: a reader's read buffer, a writer's
    window, in arenas, plus two. With fewer, every arena was still viewed when its turn
    came, and a fresh 1 MiB was allocated, zero-filled and faulted in per frame (py-spy:
    ``bytearray(size)`` was a fifth of both daemons' Python time at 1 MiB writes). The
    spares are let go when the stream falls idle (:meth:`trim`): an edge that carried
    one burst does not keep a window's worth of memory for the rest of its life."""

    KEEP = 2  # retired arenas kept for reuse, beyond what the held bytes need

    def __init__(self, size: int = RECV_MAX, keep: int = KEEP) -> None:
        self.size = size
        self.keep = keep
        self.spare: list[bytearray] = []
        self.buf = bytearray()  # no room: the first large frame makes one
        self.fill = 0

    @classmethod
    def covering(cls, held: int, size: int = RECV_MAX) -> Arenas:
        """Arenas of ``size`` for a side that holds up to ``held`` bytes in views."""
        return cls(size, -(-held // size) + cls.KEEP)

    @property
    def room(self) -> int:
        return len(self.buf) - self.fill

    def trim(self) -> None:
        """The stream is idle: keeps only the arena being filled."""
        self.spare.clear()

    def next(self) -> None:
        """Moves on to a fresh arena: a spare one nobody holds a view of, else a new one.
        The oldest are released first (bytes are consumed in order): they are tried first."""
        spare = self.spare
        if self.buf:
            spare.append(self.buf)
        for i in range(len(spare)):
            if _refs(spare, i) == _UNSHARED:
                self.buf = spare.pop(i)
                break
        else:
            self.buf = bytearray(self.size)
            if len(spare) > self.keep:
                del spare[-1]  # still held by the reader: left to the garbage collector
        self.fill = 0


def _refs(spare: list[bytearray], i: int) -> int:
    return sys.getrefcount(spare[i])


# What _refs counts for an arena held by nothing but the spare list (a memoryview of it,
# alive anywhere, adds one): measured, not assumed, for this interpreter.
_UNSHARED = _refs([bytearray(1)], 0)


async def _receive(sock: Conn, reader: ReaderEnd, offset: int) -> Result:
    decoder = codec.Decoder(offset)
    reader.start_streaming()
    acked = offset
    acked_at = heard = trio.current_time()
    arenas = Arenas.covering(reader.limit)
    into = False  # the current DATA frame's payload goes into the arena
    while True:
        await _wait_for_space(reader)
        if reader.state is ReaderState.CLOSED:
            return Result(PullOutcome.CLOSED)
        want = decoder.want()
        # A live writer's daemon sends at least a PING every PING_EVERY seconds.
        deadline = heard + SILENCE_TIMEOUT
        if decoder.offset - acked >= ACK_EVERY:
            deadline = min(deadline, acked_at + ACK_GAP)  # a deferred ACK is due then
        elif decoder.offset > acked:
            deadline = min(deadline, heard + ACK_IDLE)  # a pause acknowledges the rest
        if into:
            if not arenas.room:
                arenas.next()
            at = arenas.fill
            view = memoryview(arenas.buf)[at : at + min(want, arenas.room)]
            n = -1
            with trio.CancelScope(deadline=deadline):
                n = await sock.recv_into(view)
            if n < 0:
                acked, acked_at = await _timed_out(sock, decoder.offset, heard)
                continue
            heard = trio.current_time()
            if not n:
                decoder.close()  # raises Truncated: an end without the end marker
            decoder.took(n)
            arenas.fill += n
            into = decoder.in_data
            reader.accept(view[:n], at)
        else:
            data = None
            with trio.CancelScope(deadline=deadline):
                data = await sock.recv(min(want, RECV_MAX) if decoder.in_data else SMALL_RECV)
            if data is None:
                acked, acked_at = await _timed_out(sock, decoder.offset, heard)
                continue
            heard = trio.current_time()
            if not data:
                decoder.close()
            events = decoder.feed(data)
            last = len(events) - 1
            for i, event in enumerate(events):
                if isinstance(event, codec.Data):
                    if i == last and decoder.in_data and decoder.want() >= BIG_FRAME:
                        # The start of a large frame came with its header: into the
                        # arena with it, so the whole frame reads as one buffer.
                        k = len(event.payload)
                        if arenas.room < k:
                            arenas.next()
                        at = arenas.fill
                        arenas.buf[at : at + k] = event.payload
                        arenas.fill += k
                        into = True
                        reader.accept(memoryview(arenas.buf)[at : at + k], at)
                    else:
                        reader.accept(event.payload)
                elif isinstance(event, codec.End):
                    reader.check_end(event.total)
                    reader.finish()
                    if decoder.offset > acked:
                        # Every byte is here: the writer's daemon frees them now (a data
                        # ACK, never the END_ACK), not after the program read them all.
                        acked, acked_at = decoder.offset, heard
                        await send_all(sock, [handshake.control(Control.ACK, acked)])
                    consumed = await until_consumed(reader, event.total)
                    if consumed:
                        await send_all(sock, [handshake.control(Control.END_ACK, event.total)])
                    elif procs.reader_closed_early(reader.exit_status):
                        await send_all(sock, [handshake.control(Control.CLOSE, reader.consumed)])
                    return Result(PullOutcome.END)
                elif isinstance(event, codec.Abort):
                    return Result(_ABORTS[event.reason], f"{event.reason.name}: {event.message}")
                elif isinstance(event, codec.Ping):
                    arenas.trim()  # the writer has been idle for PING_EVERY
            if decoder.in_data and decoder.want() >= BIG_FRAME:
                into = True  # a header alone (or its frame's start): the rest into the arena
        unacked = decoder.offset - acked
        if unacked >= ACK_EVERY and (unacked >= ACK_MAX or heard - acked_at >= ACK_GAP):
            acked, acked_at = decoder.offset, heard
            await send_all(sock, [handshake.control(Control.ACK, acked)])


async def until_consumed(reader: ReaderEnd, total: int) -> bool:
    """The END frame arrived: waits until the program has consumed all ``total`` bytes
    (True), or its file was closed or released first (False).

    Only then is the stream delivered (END_ACK), and only then may the writer's daemon
    forget a transient end whose bytes it freed as they were received. Until then those
    bytes live only in this daemon (its read buffer, the reader's FIFO): if it dies, the
    writer's daemon, still holding the end, fails the generation so that a re-run of the
    writer can produce them again. Acknowledged at receipt, the end was gone by then, and
    the generation stayed "complete" with its bytes lost."""
    while reader.consumed < total:
        if reader.released or reader.state is ReaderState.CLOSED:
            return False
        await reader.changed.wait()
    return True


async def _timed_out(sock: Conn, offset: int, heard: float) -> tuple[int, float]:
    """A receive's deadline passed: the writer has been silent too long (TooSlowError), or
    a deferred ACK is due: sends it; returns the new (acked, acked_at)."""
    now = trio.current_time()
    if now - heard >= SILENCE_TIMEOUT:
        raise trio.TooSlowError
    await send_all(sock, [handshake.control(Control.ACK, offset)])
    return offset, now


async def pull_local(
    reader: ReaderEnd, writer: WriterEnd, replay: bool, on_connected: Callable[[int], None]
) -> Result:
    """The same-node shortcut: takes the writer's buffers directly, no socket, no copy."""
    offset = reader.begin_stream(replay)
    first = writer.spill.start if writer.spill is not None else writer.base
    if not first <= offset <= writer.end:
        return Result(PullOutcome.GONE, f"offset {offset} is outside the local window")
    on_connected(writer.generation)
    cursor: tuple[int, int] | None = None
    bufs: Sequence[bytes | memoryview]
    reader.start_streaming()
    try:
        while True:
            await _wait_for_space(reader)
            if reader.state is ReaderState.CLOSED:
                return Result(PullOutcome.CLOSED)
            if writer.state is WriterState.ABORTED:
                reason, message = writer.abort_reason or (AbortReason.REMOVED, "")
                return Result(_ABORTS[reason], message)
            if writer.on_disk(reader.stream_pos):
                bufs, cursor = [await writer.read_spill(reader.stream_pos, BATCH)], None
                if reader.state is ReaderState.CLOSED:  # type: ignore[comparison-overlap]
                    return Result(PullOutcome.CLOSED)  # while the thread ran
            else:
                bufs, cursor = writer.read_at(reader.stream_pos, cursor, BATCH)
            if bufs:
                for buf in bufs:
                    reader.accept(buf)
                writer.ack(reader.stream_pos)
                continue
            if writer.state is WriterState.COMPLETE:
                writer.on_end_sent()
                reader.check_end(writer.end)
                reader.finish()
                if await until_consumed(reader, writer.end):
                    writer.on_end_acked(writer.end)
                elif procs.reader_closed_early(reader.exit_status):
                    writer.on_reader_closed()
                return Result(PullOutcome.END)
            if writer.state is WriterState.FAILED:
                return Result(PullOutcome.GONE, "the writing program failed")
            await writer.changed.wait()
    except Diverged as exc:
        return Result(PullOutcome.DIVERGED, str(exc))
    finally:
        if reader.state is ReaderState.CLOSED and reader.tell_writer:
            writer.on_reader_closed()
