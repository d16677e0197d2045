"""The node daemon process: mountpoint checks, discovery, data listener, FUSE main loop,
signals and a clean unmount however it ends."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import resource
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Callable
from urllib.parse import urlsplit

import pyfuse3
import trio

from . import auth, fusewatch, metrics, testhooks
from .config import NodeConfig
from .discovery.client import DiscoveryClient, DiscoveryError, Unavailable, check_discovery_urls
from .discovery.server import EmbeddedDiscovery, parse_listen
from .errors import QuietError
from .fs import Operations
from .node import Node
from .notify import notify
from .runtime import freeze_startup_heap
from .tls import Tls, TlsError
from .tls import load as tls_load

log = logging.getLogger(__name__)

FUSE_OPTIONS = {"fsname=fractalfs", "subtype=fractalfs", "allow_other", "default_permissions"}
UNMOUNT_GRACE = 2.0
STOP_DRAIN = 3.0  # seconds a clean stop waits for closed FIFO writers to be drained and settled


def lazy_unmount(path: str) -> bool:
    result = subprocess.run(
        ["fusermount3", "-u", "-z", path], capture_output=True, text=True, check=False
    )
    return result.returncode == 0


def prepare_mountpoint(path: str) -> str:
    """Checks the mountpoint; removes a stale mount a crashed daemon left behind."""
    path = os.path.abspath(path)
    try:
        # statfs always reaches the filesystem (stat may be answered from the attribute
        # cache): a mount whose daemon died answers ENOTCONN.
        os.statvfs(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            log.warning("removing the stale mount at %s left by a crashed daemon", path)
            if not lazy_unmount(path):
                raise QuietError(f"{path}: stale mount could not be removed") from None
        elif exc.errno == errno.ENOENT:
            raise QuietError(f"{path}: mountpoint does not exist") from None
        else:
            raise QuietError(f"{path}: {exc.strerror}") from None
    if os.path.ismount(path):
        raise QuietError(f"{path}: mountpoint is busy (something is mounted there)")
    if not os.path.isdir(path):
        raise QuietError(f"{path}: mountpoint is not a directory")
    return path


def route_to(url: str) -> str:
    """The local address the kernel would use to reach ``url`` (no packet is sent)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            return str(probe.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def check_url(url: str) -> str:
    """One discovery URL or several, comma-separated (replicas of one cluster)."""
    try:
        return check_discovery_urls(url)
    except ValueError as exc:
        raise QuietError(str(exc)) from None


async def _open_listener(host: str, port: int) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        await sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise QuietError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(512)
    return sock


async def serve(
    config: NodeConfig,
    discovery_url: str,
    *,
    ready: Callable[[str], None] | None = None,
    secret: bytes | None = None,
    tls: Tls | None = None,
) -> None:
    """Mounts and serves until unmounted or signalled; always unmounts."""
    creds = auth.node_credentials(secret, config.node) if secret is not None else None
    client = DiscoveryClient(
        discovery_url,
        retry_for=config.discovery_retry,
        auth=creds,
        verify=tls.client if tls is not None else True,
    )
    try:
        await client.health(retry_for=3.0)
        await client.edges()  # proves the secret (or learns discovery wants one)
    except Unavailable as exc:
        await client.aclose()
        raise QuietError(str(exc)) from None
    except DiscoveryError as exc:
        await client.aclose()
        if exc.status == 401:
            raise QuietError(
                f"discovery at {discovery_url} refused this node's credentials: "
                "--secret-file must name the cluster's secret"
            ) from None
        raise QuietError(f"discovery at {discovery_url}: {exc}") from None
    host, port = parse_listen(config.data_listen, 7701)
    listener = await _open_listener(host, port)
    bound_port = listener.getsockname()[1]
    adv = config.advertise or (host if host not in ("0.0.0.0", "::") else route_to(client.url))
    endpoint = f"[{adv}]:{bound_port}" if ":" in adv else f"{adv}:{bound_port}"
    if config.metrics_listen:
        metrics_tls = tls.http_server if tls is not None else None
        metrics.serve(*parse_listen(config.metrics_listen, 9701), secret, metrics_tls)
    node = Node(config, client, endpoint)
    node.data_key = auth.data_key(secret) if secret is not None else None
    node.tls = tls
    # Before anything can be opened: discovery learns this is a new run of the daemon, and
    # forgets the ends a previous run held (it may have crashed a moment ago).
    try:
        await node.heartbeat_once()
    except (Unavailable, DiscoveryError):
        node.unannounced = True  # writers wait for the first heartbeat (Node.announced)
    await node.restore_spills()  # never raises for discovery: what fails is retried
    ops = Operations(node)
    mounted = False
    watch = fusewatch.FuseWatch()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run, listener)
            pyfuse3.init(ops, config.mountpoint, FUSE_OPTIONS)
            mounted = True
            watch.start()
            nursery.start_soon(_on_signals, node, ops)
            if testhooks.enabled():
                await nursery.start(testhooks.run)
            line = (
                f"fractalfs: {config.mountpoint} mounted (node {config.node}, "
                f"data {endpoint}, discovery {discovery_url})"
            )
            nursery.start_soon(_announce_when_answering, ops, line, ready)
            await pyfuse3.main(max_tasks=config.max_tasks)
            log.info("FUSE session ended; stopping")
            notify("STOPPING=1")
            await node.stop()
            nursery.cancel_scope.cancel()
    finally:
        watch.stop()  # before the device closes: its number may be reused
        if mounted:
            pyfuse3.close(unmount=True)
        ops.keeper.close()  # it kills the readers of streams left unfinished, then exits
        listener.close()
        with trio.CancelScope(shield=True):
            await client.aclose()


async def _announce_when_answering(
    ops: Operations, line: str, ready: Callable[[str], None] | None
) -> None:
    """READY only once the mount answers a request (served by this very loop) and, with
    reader FIFOs on, once ``MOUNT/.fifo`` is looked up (until then readers stay on FUSE).
    Both from child processes, never a thread of ours: a daemon killed while one of its own
    threads waits in a request to its mount can never exit, and its mount would hang."""
    mountpoint = ops.node.config.mountpoint
    await trio.run_process(
        ["stat", "-f", "-c", "", mountpoint], stdout=subprocess.DEVNULL, check=False
    )
    if ops.node.config.fifo_readers:
        await trio.to_thread.run_sync(ops.warm_fifo_dir)
        ops.node.spawn(ops.keeper.watch)  # a keeper that dies or stops is replaced
        ops.node.spawn(ops.idle_fifos.run)
    if ready is not None:
        ready(line)
    notify("READY=1")


async def _on_signals(node: Node, ops: Operations) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            notify("STOPPING=1")
            await ops.drain_closed_writers(STOP_DRAIN)
            node.shutdown()
            await trio.sleep(0.1)  # let woken handlers answer their programs
            pyfuse3.terminate()
            # Handlers stuck on the network must not keep the mount alive.
            await trio.sleep(UNMOUNT_GRACE)
            log.warning("handlers still busy after %.0f s; forcing unmount", UNMOUNT_GRACE)
            raise _ForcedStop


class _ForcedStop(Exception):
    pass


def cluster_secret(config: NodeConfig) -> bytes | None:
    """The secret from ``secret_file``; else state_dir/secret, created (0600) when this
    daemon embeds discovery, so that ``make run`` needs no setup."""
    path = config.secret_file or auth.secret_path_for(config.state_dir)
    try:
        if config.secret_file or os.path.exists(path):
            return auth.load_secret(path)
        if config.discovery_url is None:
            secret = auth.ensure_secret(path)
            log.info("created the cluster secret %s", path)
            return secret
    except auth.SecretError as exc:
        raise QuietError(str(exc), 2) from None
    log.warning("no cluster secret (--secret-file): data connections are not authenticated")
    return None


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_tls(directory: str) -> Tls | None:
    """The cluster's TLS contexts from ``directory`` (empty: no TLS); exit 2 if unusable."""
    if not directory:
        return None
    try:
        return tls_load(directory)
    except TlsError as exc:
        raise QuietError(str(exc), 2) from None


def raise_descriptor_limit() -> None:
    """The soft descriptor limit up to the hard one: each FIFO an open gets costs the
    daemon descriptors (fs.FDS_PER_FIFO); near the limit opens fall back to FUSE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(config: NodeConfig, *, ready: Callable[[str], None] | None = None) -> None:
    config.finalize()
    raise_descriptor_limit()
    config.mountpoint = prepare_mountpoint(config.mountpoint)
    secret = cluster_secret(config)
    data_host, _ = parse_listen(config.data_listen, 7701)
    if secret is None and not config.insecure and not _loopback(data_host):
        raise QuietError(
            f"refusing to serve the data port on {data_host} without a cluster secret: pass "
            "--secret-file (make one with `fractalfs new-secret`), or --insecure",
            2,
        )
    metrics_host = parse_listen(config.metrics_listen, 9701)[0] if config.metrics_listen else ""
    if secret is None and not config.insecure and metrics_host and not _loopback(metrics_host):
        raise QuietError(
            f"refusing to serve metrics (edge ids, byte counts) on {metrics_host} without a "
            "cluster secret: pass --secret-file, or --insecure",
            2,
        )
    tls = load_tls(config.tls_dir)
    embedded: EmbeddedDiscovery | None = None
    if config.discovery_url is None:
        host, port = parse_listen(config.discovery_listen, 7700)
        embedded = EmbeddedDiscovery(
            config.discovery_db,
            host,
            port,
            secret,
            tls.http_server if tls is not None else None,
        )
        try:
            url = embedded.start()
        except OSError as exc:
            if exc.filename is not None:  # the database's directory, not the address
                raise QuietError(
                    f"embedded discovery cannot start: {exc.filename}: {exc.strerror}"
                ) from None
            raise QuietError(
                f"embedded discovery cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        except sqlite3.Error as exc:  # discovery_db names a file that is not a database
            raise QuietError(
                f"embedded discovery cannot open {config.discovery_db}: {exc}"
            ) from None
    else:
        url = check_url(config.discovery_url)
        plain = [u for u in url.split(",") if urlsplit(u).scheme == "http"]
        if tls is not None and plain:
            # The node's key would cross the network in the clear, to whoever answers.
            raise QuietError(f"{plain[0]}: with --tls-dir, discovery URLs are https://", 2)
    freeze_startup_heap()
    try:
        trio.run(functools.partial(serve, config, url, ready=ready, secret=secret, tls=tls))
    except _ForcedStop:
        pass
    except BaseExceptionGroup as group:
        quiet, _ = group.split(QuietError)
        if quiet is not None:
            raise _first(quiet) from None
        _, rest = group.split(_ForcedStop)
        if rest is not None:
            raise
    finally:
        if embedded is not None:
            embedded.stop()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
