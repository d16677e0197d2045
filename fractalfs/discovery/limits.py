"""Bounds on what one client can hold at discovery: connections, a request's header and
body time, long-polls and event-stream subscribers.

aiohttp has no header read timeout: a client that sends half a request line is kept
forever (slowloris), and each such socket is a descriptor. The server's connection hook is
wrapped so that a connection over the cap is closed at once, and one that has not sent a
complete request head within ``header_timeout`` is closed; between requests aiohttp's
``keepalive_timeout`` does the same. Bodies are read under ``body_timeout``
(:func:`read_body`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import resource
import ssl
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..admission import FairSlots, peer_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    #: Open client connections at once. Past it a newcomer takes the place of the oldest
    #: connection of the address holding the most, if that holds more than the newcomer's
    #: (:class:`fractalfs.admission.FairSlots`); otherwise it is closed on accept.
    max_connections: int = 4096
    #: Seconds from accepting a connection to a complete request head.
    header_timeout: float = 5.0
    #: Seconds to receive a request body.
    body_timeout: float = 10.0
    #: Seconds an idle keep-alive connection (or a half-sent next request) is kept.
    keepalive_timeout: float = 15.0
    #: Long-polls waiting at once; beyond this a poll is answered at once (no wait).
    max_waiters: int = 2048
    #: Event-stream (SSE) subscribers at once; beyond this 503.
    max_subscribers: int = 64


#: Descriptors kept for what is not a client connection (the listener, SQLite and its WAL,
#: the etcd client's connections, logs) and for connections accepted but not yet closed:
#: asyncio accepts up to the listen backlog (128) per wakeup before the cap closes any, and
#: a connection closed by the cap gives its descriptor back only on the loop's next turn.
#: This many, or three quarters of the limit where that is less (a connection is accepted
#: in one turn, set up in a later one and closed later still; one run at a load average of
#: ~3,000 hit EMFILE with half of a 1,024 limit to spare).
DESCRIPTOR_MARGIN = 1024


def fit_descriptors(limits: Limits) -> Limits:
    """Raises the soft descriptor limit to the hard one, and lowers ``max_connections``
    below it if it does not fit: a flood must meet the cap (where the fair share works),
    never EMFILE (asyncio then stops accepting anyone for a second at a time)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    fits = max(soft - DESCRIPTOR_MARGIN, soft // 4, 16)
    if limits.max_connections <= fits:
        return limits
    log.warning(
        "max_connections %d does not fit the descriptor limit %d: serving %d at once",
        limits.max_connections,
        soft,
        fits,
    )
    return dataclasses.replace(limits, max_connections=fits)


class Admission:
    """Who holds discovery's ``max_connections``. A connection that has not yet proved the
    cluster secret counts in a :class:`FairSlots` (past the cap a newcomer takes the place
    of the oldest such connection of the address holding the most); one whose request
    proved it (:meth:`prove`) leaves that pool and can no longer be pushed out by anyone,
    while still taking one of the connections (the pool shrinks by one). Over HTTPS a
    connection counts from its accept, its TLS handshake included (:class:`TlsSite`)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.slots: FairSlots[Any] = FairSlots(limits.max_connections)
        self.peers: dict[Any, str] = {}  # unproven handler -> the peer it counts against
        self.proven: set[Any] = set()
        # handler -> its raw transport while its TLS handshake is under way (TlsSite)
        self.handshaking: dict[Any, asyncio.Transport] = {}
        self.tasks: set[asyncio.Task[None]] = set()  # TLS handshakes under way
        self.refused = 0  # refused since the last warning
        self.warn_at = 0.0  # loop time the next warning may be logged

    def prove(self, handler: Any) -> None:
        """``handler``'s connection made a request that proved the secret."""
        peer = self.peers.pop(handler, None)
        if peer is None:
            return  # proved before, or not counted (refused)
        self.slots.release(peer, handler)
        self.proven.add(handler)
        self.slots.total = max(self.limits.max_connections - len(self.proven), 0)

    def admit(self, handler: Any, transport: asyncio.BaseTransport) -> bool:
        """Whether ``handler``'s new connection may go on (it then counts against its
        peer); the connection it pushed out, if any, is closed now."""
        loop = asyncio.get_running_loop()
        name = transport.get_extra_info("peername")
        peer = peer_key(str(name[0]) if isinstance(name, tuple) else str(name))
        admitted, evicted = self.slots.admit(peer, handler)
        if evicted is not None:
            self.peers.pop(evicted, None)
            _close(evicted, self.handshaking.pop(evicted, None))
        if not admitted:
            self.refused += 1
            if loop.time() >= self.warn_at:  # one line per 10 s, not one per client
                log.warning(
                    "connection cap (%d) reached: refused %d clients",
                    self.limits.max_connections,
                    self.refused,
                )
                self.refused, self.warn_at = 0, loop.time() + 10.0
            return False
        self.peers[handler] = peer
        return True

    def gone(self, handler: Any) -> None:
        """``handler``'s connection closed: it no longer counts (harmless twice)."""
        peer = self.peers.pop(handler, None)
        if peer is not None:
            self.slots.release(peer, handler)
        elif handler in self.proven:
            self.proven.discard(handler)
            self.slots.total = max(self.limits.max_connections - len(self.proven), 0)

    def install(self, server: web.Server) -> None:
        """Caps connections and times out request heads on ``server`` (after
        runner.setup)."""
        loop = asyncio.get_running_loop()
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            if handler in self.peers:  # admitted at accept, before its TLS handshake
                made(handler, transport)
                loop.call_later(self.limits.header_timeout, _check_head, handler)
                return
            admitted = self.admit(handler, transport)
            made(handler, transport)
            if not admitted:
                # Closed on the loop's next turn, after aiohttp started the handler's task
                # (an abort here ran its connection_lost first: the task failed an
                # assertion and logged a traceback per refused connection).
                loop.call_soon(_close, handler)
                return
            loop.call_later(self.limits.header_timeout, _check_head, handler)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self.gone(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]


class _TlsGate(asyncio.Protocol):
    """A connection to :class:`TlsSite` until its TLS handshake is done: admitted (or
    refused) at accept, then handed to aiohttp's handler. asyncio's own TLS server hands a
    connection to the protocol only after its handshake, which it allows 60 s: connections
    that never send a ClientHello counted against no cap and held a descriptor each."""

    def __init__(self, admission: Admission, server: web.Server, context: ssl.SSLContext) -> None:
        self.admission, self.server, self.context = admission, server, context
        self.handler: Any = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello waits for start_tls
        handler = self.server()
        if not self.admission.admit(handler, transport):
            transport.abort()
            return
        self.handler = handler
        self.admission.handshaking[handler] = transport
        self.task = asyncio.get_running_loop().create_task(self._handshake(transport, handler))
        tasks = self.admission.tasks  # held: the loop keeps only weak references to tasks
        tasks.add(self.task)
        self.task.add_done_callback(tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        # Only before start_tls took the transport over (a cut in the first turn).
        if self.handler is not None and self.task is None:
            self.admission.handshaking.pop(self.handler, None)
            self.admission.gone(self.handler)

    async def _handshake(self, transport: asyncio.Transport, handler: Any) -> None:
        loop = asyncio.get_running_loop()
        tls: asyncio.Transport | None = None
        try:
            tls = await loop.start_tls(
                transport,
                handler,
                self.context,
                server_side=True,
                ssl_handshake_timeout=self.admission.limits.header_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, RuntimeError) as exc:
            log.debug("TLS handshake failed: %r", exc)
        if self.admission.handshaking.pop(handler, None) is None or tls is None:
            transport.abort()  # failed, or pushed out meanwhile
            if tls is not None:
                tls.abort()
            self.admission.gone(handler)
            return
        handler.connection_made(tls)  # counted already: the server's hook lets it in


class TlsSite(web.TCPSite):
    """HTTPS whose connections count against the :class:`Admission` from their accept,
    TLS handshake included (see :class:`_TlsGate`)."""

    __slots__ = ("_admission",)

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        admission: Admission,
        ssl_context: ssl.SSLContext,
    ) -> None:
        super().__init__(runner, host, port, reuse_address=True, ssl_context=ssl_context)
        self._admission = admission

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site (TCPSite's wraps TLS itself)
        server = self._runner.server
        context = self._ssl_context
        assert server is not None and context is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _TlsGate(self._admission, server, context),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )


ADMISSION = web.AppKey("admission", Admission)


def _close(handler: Any, raw: asyncio.Transport | None = None) -> None:
    """Closes ``handler``'s connection (``raw``: its transport, its TLS handshake under
    way)."""
    transport = handler.transport
    handler.force_close()
    if transport is not None:
        transport.close()
    if raw is not None:
        raw.abort()


def _check_head(handler: Any) -> None:
    # aiohttp counts a request once its head is parsed (RequestHandler._request_count).
    transport = handler.transport
    if getattr(handler, "_request_count", 1) == 0 and transport is not None:
        _close(handler)


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The request body, or 408 if it does not arrive within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="request body too slow") from None


DEFAULT_LIMITS = Limits()
