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
    while still taking one of the connections (the pool shrinks by one)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.slots: FairSlots[Any] = FairSlots(limits.max_connections)
        self.peers: dict[Any, str] = {}  # unproven handler -> the peer it counts against
        self.proven: set[Any] = set()
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

    def install(self, server: web.Server) -> None:
        """Caps connections and times out request heads on ``server`` (after
        runner.setup)."""
        loop = asyncio.get_running_loop()
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            name = transport.get_extra_info("peername")
            peer = peer_key(str(name[0]) if isinstance(name, tuple) else str(name))
            admitted, evicted = self.slots.admit(peer, handler)
            if evicted is not None:
                self.peers.pop(evicted, None)
                _close(evicted)  # the oldest connection of the address holding the most
            made(handler, transport)
            if not admitted:
                # Closed on the loop's next turn, after aiohttp started the handler's task
                # (an abort here ran its connection_lost first: the task failed an
                # assertion and logged a traceback per refused connection).
                loop.call_soon(_close, handler)
                self.refused += 1
                if loop.time() >= self.warn_at:  # one line per 10 s, not one per client
                    log.warning(
                        "connection cap (%d) reached: refused %d clients",
                        self.limits.max_connections,
                        self.refused,
                    )
                    self.refused, self.warn_at = 0, loop.time() + 10.0
                return
            self.peers[handler] = peer
            loop.call_later(self.limits.header_timeout, _check_head, handler)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            peer = self.peers.pop(handler, None)
            if peer is not None:
                self.slots.release(peer, handler)
            elif handler in self.proven:
                self.proven.discard(handler)
                self.slots.total = max(self.limits.max_connections - len(self.proven), 0)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]


ADMISSION = web.AppKey("admission", Admission)


def _close(handler: Any) -> None:
    transport = handler.transport
    handler.force_close()
    if transport is not None:
        transport.close()


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
