"""The data server of a node: accepts readers' daemons and streams writer ends to them.

One listening socket per daemon; each connection's HELLO names the edge, generation and
offset (:mod:`fractalfs.handshake`), and :func:`fractalfs.dataplane.serve_edge` streams it.
Moved out of :class:`fractalfs.node.Node` unchanged (``_accept``, ``_serve``,
``_writer_for_hello``); it owns its connections' tasks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from . import dataplane
from .admission import FairSlots, peer_key
from .edgeid import EdgeId
from .edges import WriterEnd, WriterState
from .handshake import HandshakeError, Status
from .tls import TlsConn

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

# How long a lost reader whose connection ended may take to redial or be heard again
# (it redials at once on waking; its next heartbeat or pulse is due within 0.5 s).
REDIAL_GRACE = 2.0
REJECTED_LOG_EVERY = 10.0  # seconds between lines about malformed handshakes


class DataServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        # Data connections not yet past the HELLO: capped, and shared fairly between peers
        # (a flood from one address cannot keep other nodes' readers out).
        self.handshaking: FairSlots[trio.CancelScope] = FairSlots(dataplane.MAX_HANDSHAKES)
        self.rejected = 0  # malformed handshakes not yet logged
        self.rejected_log_at = 0.0  # trio time the next such line may be logged

    async def run(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        await self.node._forever(self._accept, listener)

    async def _accept(self, listener: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, addr = await listener.accept()
                except OSError as exc:
                    log.warning("data plane accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                peer = peer_key(str(addr[0]) if isinstance(addr, tuple) else str(addr))
                # One deadline for TLS and the HELLO: a peer without the secret holds one
                # of the MAX_HANDSHAKES slots this long at most, not twice it.
                scope = trio.CancelScope(deadline=trio.current_time() + dataplane.HANDSHAKE_TIMEOUT)
                admitted, evicted = self.handshaking.admit(peer, scope)
                if evicted is not None:
                    evicted.cancel()  # the oldest handshake of the peer holding the most
                if not admitted:
                    sock.close()  # this peer holds its share of a full cap already
                    continue
                nursery.start_soon(self.node._guarded, self._serve, sock, peer, scope)

    async def _serve(self, raw: trio.socket.SocketType, peer: str, scope: trio.CancelScope) -> None:
        with raw:
            try:
                hello = None
                try:
                    with scope:
                        dataplane.tune(raw)
                        sock: dataplane.Conn = raw
                        if self.node.tls is not None:  # mutual TLS, then the HMAC HELLO
                            sock = TlsConn(raw, self.node.tls.data_server, server=True)
                            await sock.handshake()
                        hello = await dataplane.accept_hello(sock, self.node.data_key)
                finally:
                    self.handshaking.release(peer, scope)
                if scope.cancelled_caught:
                    log.debug("data connection from %s: handshake timed out or evicted", peer)
                if hello is None:
                    return
                writer = await self._writer_for_hello(hello.edge, hello.generation)
                reply = dataplane.check_hello(hello, writer)
                await dataplane.send_all(sock, [reply.encode()])
                if (
                    writer is not None
                    and reply.status is Status.BAD_OFFSET
                    and hello.offset < writer.base
                    and writer.state in (WriterState.OPEN, WriterState.COMPLETE)
                ):
                    # A re-run reader wants bytes already acknowledged and freed: only a
                    # re-run of this writer can produce them again.
                    self.node._lose_freed_prefix(writer, "the reader restarted")
                if writer is None or reply.status is not Status.OK:
                    return
                writer.set_reader_lost(False)  # it redialled: alive after all
                try:
                    await dataplane.serve_edge(sock, writer, hello.offset)
                finally:
                    if writer.connection is None and writer.reader_lost:
                        self.node.spawn(self._reader_gone_unless_back, writer)
                self.node._reap(writer.edge)
            except* (OSError, dataplane.ConnectionLost, trio.TooSlowError) as group:
                log.debug("data connection ended: %s", group.exceptions[0])
            except* HandshakeError as group:
                self._rejected(str(group.exceptions[0]))

    def _rejected(self, why: str) -> None:
        """Logs a refused handshake: the first, then at most one line per 10 s with how
        many there were (a flood of garbage must not become a flood of log lines)."""
        self.rejected += 1
        now = trio.current_time()
        if now >= self.rejected_log_at:
            log.info(
                "rejected data connection: %s (%d since the last such line)", why, self.rejected
            )
            self.rejected, self.rejected_log_at = 0, now + REJECTED_LOG_EVERY

    async def _reader_gone_unless_back(self, writer: WriterEnd) -> None:
        """The connection of a reader whose node discovery lost (silent) ended: gone, unless
        it redials or is back within :data:`REDIAL_GRACE`. A daemon stopped past the
        silence timeout, on waking, takes its writers' connections for silent and closes
        them to redial, often before its heartbeat has told discovery (and discovery this
        daemon) that it is back: failing at that close lost a stream nobody had lost."""
        with trio.move_on_after(REDIAL_GRACE):
            while writer.connection is None and writer.reader_lost:
                await trio.sleep(0.05)
        if writer.connection is None:
            self.node._reader_gone(writer)  # a no-op unless discovery still has it lost

    async def _writer_for_hello(self, edge: EdgeId, generation: int) -> WriterEnd | None:
        """The writer end a reader dials for ``generation``.

        Discovery hands the new generation to waiting readers the moment it records it,
        while its answer to this daemon may still be on the way: a reader can dial before
        the end is installed here. Wait for the registration rather than call that
        generation gone (the reader would then wait for a re-run that never comes).
        """
        with trio.move_on_after(dataplane.HANDSHAKE_TIMEOUT):
            while True:
                slot = self.node.slots.get(edge)
                writer = slot.writer if slot is not None else None
                if writer is not None and writer.generation >= generation:
                    return writer
                if slot is None or "writer" not in slot.opening:
                    return writer
                await self.node.writers_changed.wait()
        return self.node.writer_for(edge)
