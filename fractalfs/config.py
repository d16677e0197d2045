"""The node daemon's configuration: one typed place, defaults documented in daemon/."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

MiB = 1 << 20
MIN_WRITE_WINDOW = 2 * MiB  # twice dataplane.ACK_EVERY (tests/test_dataplane.py)


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/fractalfs"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "fractalfs")


@dataclass
class NodeConfig:
    mountpoint: str
    #: Discovery URL; None embeds a discovery server in the daemon.
    discovery_url: str | None = None
    #: Where an embedded discovery server listens.
    discovery_listen: str = "127.0.0.1:7700"
    #: The embedded discovery server's SQLite database (default: state_dir/discovery.db).
    discovery_db: str = ""
    #: The data plane's one listening socket (port 0: any free port).
    data_listen: str = "0.0.0.0:7701"
    #: The host other nodes dial for this node's data port (default: the address that
    #: routes to discovery).
    advertise: str = ""
    #: This node's name in discovery; unique per daemon.
    node: str = field(default_factory=socket.gethostname)
    state_dir: str = field(default_factory=default_state_dir)
    #: Spill files of persistent edges (default: state_dir/spill).
    spill_dir: str = ""
    #: Bytes a writer may have sent but not yet acknowledged by its reader; a writer
    #: blocks beyond this (the replay window of transient mode).
    write_window: int = 8 * MiB
    #: Plain write-only opens get a kernel FIFO the daemon drains, keeping FUSE off the
    #: writer's data path (fractalfs/fiforoute.py); errors reach such a writer as a
    #: pipe's EPIPE/SIGPIPE, without a message. false: every write is a FUSE request.
    fifo_writers: bool = True
    #: Plain read-only opens get a kernel FIFO the daemon fills: programs see a FIFO
    #: (fstat), so `head -n`, `gzip FILE` behave as on a pipe; a failed stream kills its
    #: readers (fractalfs/fiforoute.py). false: every read is a FUSE request.
    fifo_readers: bool = True
    #: Bytes a reader's daemon buffers ahead of the reading program.
    read_buffer: int = 8 * MiB
    #: Descriptors kept free for sockets, spill files and /proc reads (at least this, or
    #: 1/8 of the limit): an open that would eat into them gets FUSE, not a FIFO.
    fd_reserve: int = 512
    #: pyfuse3 worker limit; every blocked read or write holds one.
    max_tasks: int = 10_000
    #: How often a blocked handler checks its program for a pending signal (seconds).
    signal_poll: float = 0.2
    #: How long a request keeps retrying an unreachable discovery server (seconds).
    discovery_retry: float = 30.0
    #: Seconds a reader's daemon keeps redialing a writer it lost before the read fails.
    reconnect_for: float = 60.0
    #: Seconds a reader waits for a re-run writer after its writer failed, before EIO.
    writer_lost_timeout: float = 120.0
    #: transient | persistent | dynamic (cost model); an edge may override it (xattr).
    mode: str = "dynamic"
    #: Dynamic mode, undecided: acknowledged bytes kept so a switch can spill from 0.
    retain_limit: int = 64 * MiB
    #: Seconds a complete, delivered spill file is kept for re-run readers.
    spill_retention: float = 600.0
    #: Bytes of spill files above which the oldest delivered ones go first (0: no quota).
    spill_quota: int = 0
    #: Prometheus metrics at http://HOST:PORT/metrics (empty: off).
    metrics_listen: str = ""
    #: The cluster secret (``fractalfs new-secret``; mode 0600). Empty: state_dir/secret,
    #: created if this daemon embeds discovery.
    secret_file: str = ""
    #: Without a secret, serve the data port on a non-loopback address anyway (anyone
    #: reaching it reads any stream whose edge id and generation it knows).
    insecure: bool = False
    #: TLS for the data plane (mutual) and discovery: a directory of ``fractalfs new-tls``
    #: (ca.pem, cert.pem, key.pem 0600). Empty: no TLS. Every node must agree.
    tls_dir: str = ""
    #: Per local user (not root): memory its open ends may hold (a writer reserves its
    #: write window, plus retain_limit in dynamic mode; a reader its read buffer); an open
    #: beyond it fails with EDQUOT.
    uid_memory_limit: int = 4096 * MiB
    #: Per local user (not root): bytes its open writers may have spilled; a write beyond
    #: it fails with EDQUOT (0: no limit).
    uid_spill_limit: int = 64 * 1024 * MiB
    #: Per local user (not root): a spilling write fails with EDQUOT while the spill
    #: directory's filesystem has less than this free, so no user can fill the disk that
    #: root's streams, discovery's database and the logs share (0: no floor).
    spill_min_free: int = 1024 * MiB

    def finalize(self) -> None:
        """Fills in what was left empty: node name, state directory and paths under it."""
        self.discovery_url = self.discovery_url or None  # empty: embed one
        self.node = self.node or socket.gethostname()
        self.state_dir = self.state_dir or default_state_dir()
        if not self.discovery_db:
            self.discovery_db = os.path.join(self.state_dir, "discovery.db")
        if not self.spill_dir:
            self.spill_dir = os.path.join(self.state_dir, "spill")


# -- loading: file, then environment, then flags -------------------------------------------

NODE_CONFIG = "/etc/fractalfs/fractalfs.toml"
DISCOVERY_CONFIG = "/etc/fractalfs/discovery.toml"
ENV_PREFIX = "FRACTALFS_"


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


@dataclass
class DiscoveryConfig:
    #: Listening address.
    listen: str = "0.0.0.0:7700"
    #: SQLite database (default: state dir/discovery.db).
    db: str = ""
    #: The cluster secret every request must prove (``fractalfs new-secret``; mode 0600).
    secret_file: str = ""
    #: Serve without a secret on a non-loopback address (anyone reaching it controls
    #: every stream).
    insecure: bool = False
    #: Serve HTTPS with the cluster certificate of ``fractalfs new-tls`` (empty: HTTP).
    tls_dir: str = ""
    #: Client connections at once (each is a descriptor; more are closed on accept).
    max_connections: int = 4096
    #: Seconds a client has to send a request head, and its body.
    header_timeout: float = 5.0
    body_timeout: float = 10.0
    #: Long-polls held at once (more are answered at once) and event-stream subscribers.
    max_waiters: int = 2048
    max_subscribers: int = 64
    #: Shared state instead of the SQLite file: etcd://HOST:PORT[,HOST:PORT...][/PREFIX]
    #: (any number of discovery replicas may serve one etcd cluster).
    store: str = ""
    #: Seconds a delivered edge stays in status and /v1/edges before it is forgotten.
    retention: float = 3600.0


def _coerce(where: str, key: str, kind: type, value: object) -> object:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {key} must be {kind.__name__}, not {value!r}")


def field_types(cls: type) -> dict[str, type]:
    import typing

    hints = typing.get_type_hints(cls)
    out: dict[str, type] = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if args else hint
    return out


def apply(config: object, values: dict[str, object], where: str) -> None:
    """Sets ``values`` on ``config``, refusing unknown keys and ill-typed values."""
    types = field_types(type(config))
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in types:
            raise ConfigError(f"{where}: unknown key {key!r}")
        setattr(config, name, _coerce(where, key, types[name], value))


def load_file(path: str, required: bool) -> dict[str, object]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def from_env(cls: type, env: dict[str, str], prefix: str = ENV_PREFIX) -> dict[str, object]:
    return {
        name: env[prefix + name.upper()]
        for name in field_types(cls)
        if prefix + name.upper() in env
    }


#: A node name is a path segment of discovery's routes (``/v1/nodes/{node}/...``) and an
#: HTTP header's value: a slash, space, ``?``, ``#``, ``%`` or a non-ASCII character there
#: made every heartbeat a 404 (the node mounted, and its writers waited for good).
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,254}")


def check_node_config(config: NodeConfig) -> None:
    if config.node and not NODE_NAME.fullmatch(config.node):
        raise ConfigError(
            f"node name {config.node!r}: want 1 to 255 of A-Z a-z 0-9 . _ : @ + - "
            "(a letter or digit first)"
        )
    if config.mode not in ("transient", "persistent", "dynamic"):
        raise ConfigError(f"mode must be transient, persistent or dynamic, not {config.mode!r}")
    for key in ("write_window", "read_buffer", "max_tasks"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be positive")
    if config.write_window < MIN_WRITE_WINDOW:
        # A reader acknowledges once dataplane.ACK_EVERY bytes (1 MiB) are unacknowledged,
        # fewer only after the stream paused for ACK_IDLE: a writer on a smaller window
        # would stall that long at every window's end.
        raise ConfigError(f"write_window must be at least {MIN_WRITE_WINDOW} bytes")
    if config.fd_reserve < 0:
        raise ConfigError("fd_reserve must not be negative")
    for key in ("signal_poll", "discovery_retry", "reconnect_for", "writer_lost_timeout"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be positive")
