"""Prometheus metrics of a node daemon (its own registry, served on ``metrics_listen``)."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from .admission import FairSlots, peer_key
from .auth import check_basic

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
REALM = 'Basic realm="fractalfs", charset="UTF-8"'
IDLE = 10.0  # seconds a metrics connection may stay silent
LIFETIME = 10.0  # seconds a metrics connection may last in all (one request, one answer)
MAX_CONNECTIONS = 64  # metrics connections served at once
MAX_DONE_SERIES = 10_000  # edges gone from this node whose byte counts stay exported

BYTES_WRITTEN = Counter(
    "fractalfs_edge_bytes_written",
    "Bytes written into edges on this node",
    ["edge"],
    registry=REGISTRY,
)
BYTES_READ = Counter(
    "fractalfs_edge_bytes_read",
    "Bytes read out of edges on this node",
    ["edge"],
    registry=REGISTRY,
)
OPEN_EDGES = Gauge("fractalfs_open_edges", "Edges this node holds an end of", registry=REGISTRY)
RECONNECTS = Counter(
    "fractalfs_reconnects", "Times a reader redialed a writer it lost", registry=REGISTRY
)
RESUMES = Counter("fractalfs_resumes", "Streams resumed after a fault", ["how"], registry=REGISTRY)
SPILL_BYTES = Gauge("fractalfs_spill_bytes", "Bytes in spill files", registry=REGISTRY)
SPILL_FILES = Gauge("fractalfs_spill_files", "Spill files on this node", registry=REGISTRY)
FUSE_SECONDS = Histogram(
    "fractalfs_fuse_request_seconds",
    "Time to answer a FUSE request",
    ["op"],
    registry=REGISTRY,
    buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1, 0.5, 2.5, 10, 60),
)


_done: OrderedDict[str, None] = OrderedDict()  # edges gone from this node, oldest first


def edge_done(edge: str, live: Callable[[str], bool]) -> None:
    """``edge`` left this node: its series stay for the ``MAX_DONE_SERIES`` most recent
    such edges, then go unless ``live`` (used again), or every edge ever carried would
    stay in memory and in every scrape (0.7 KiB and 180 bytes each)."""
    _done[edge] = None
    _done.move_to_end(edge)
    while len(_done) > MAX_DONE_SERIES:
        old, _ = _done.popitem(last=False)
        if not live(old):
            for family in (BYTES_WRITTEN, BYTES_READ):
                with contextlib.suppress(KeyError):
                    family.remove(old)


def serve(
    host: str, port: int, secret: bytes | None = None, tls: ssl.SSLContext | None = None
) -> None:
    """Serves /metrics in a thread; a port in use is logged, never fatal. With a cluster
    secret every request must prove it (HTTP Basic, as discovery's): edge ids and byte
    counts are not for whoever reaches the port. A connection idle for ``IDLE`` seconds,
    or open for ``LIFETIME`` (a client trickling its request a byte at a time), is closed,
    and beyond ``MAX_CONNECTIONS`` at once new ones are closed unanswered. With ``tls``
    (the cluster's TLS, as discovery's HTTPS) it serves HTTPS: HTTP Basic carries the
    secret itself, which plain HTTP would hand to anyone on the path."""
    app = make_wsgi_app(REGISTRY)

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        header = environ.get("HTTP_AUTHORIZATION", "")
        if secret is not None and check_basic(secret, header) is None:
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", REALM)],
            )
            return [b"this node's metrics require the cluster secret\n"]
        return app(environ, start_response)

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = type("_Server", (_Server,), {"address_family": family})((host, port), _Handler)
    except OSError as exc:
        log.warning("metrics cannot listen on %s:%d: %s", host, port, exc.strerror)
        return
    if tls is not None:  # the handshake runs in the connection's thread (_Handler.setup)
        server.socket = tls.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    server.set_app(guarded)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    bound = server.server_address[1]  # port 0: the one the kernel picked
    log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", host, bound)


class _Handler(WSGIRequestHandler):
    timeout = IDLE  # a slow or silent client (slowloris) holds a thread this long at most

    def setup(self) -> None:
        super().setup()  # sets the timeout
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 dropped the SYNs of a burst of connections (the
    # peer retries after 1 s, 3 s, ...): a scrape waited behind a flood for seconds.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        super().__init__(address, handler)
        # Shared fairly between peers: a flood from one address cannot keep the scraper out.
        self._slots: FairSlots[Any] = FairSlots(MAX_CONNECTIONS)
        self._lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = peer_key(str(client_address[0]))
        with self._lock:
            admitted, evicted = self._slots.admit(peer, request)
        if evicted is not None:
            _cut(evicted)  # the oldest connection of the address holding the most
        if not admitted:
            self.shutdown_request(request)  # its address holds its share: closed unanswered
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # The handler's timeout bounds each read only: a slow client is cut off in all.
        cut = threading.Timer(LIFETIME, _cut, (request,))
        cut.daemon = True
        cut.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            cut.cancel()
            with self._lock:
                self._slots.release(peer_key(str(client_address[0])), request)


def _cut(request: socket.socket) -> None:
    """Ends a connection's blocked reads and writes (its thread then closes it)."""
    with contextlib.suppress(OSError):  # already closed
        request.shutdown(socket.SHUT_RDWR)
