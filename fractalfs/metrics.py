"""Prometheus metrics of a node daemon (its own registry, served on ``metrics_listen``)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

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


def serve(host: str, port: int) -> None:
    """Serves /metrics in a thread; a port in use is logged, never fatal."""
    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        log.warning("metrics cannot listen on %s:%d: %s", host, port, exc.strerror)
    else:
        log.info("metrics on http://%s:%d/metrics", host, port)
