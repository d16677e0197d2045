"""The ``fractalfs`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3
import ssl
import sys
from typing import Any

from .config import (
    DISCOVERY_CONFIG,
    NODE_CONFIG,
    ConfigError,
    DiscoveryConfig,
    NodeConfig,
    apply,
    check_node_config,
    field_types,
    from_env,
    load_file,
)
from .edgeid import EdgeId
from .errors import QuietError
from .notify import notify
from .runtime import freeze_startup_heap
from .safetext import printable

log = logging.getLogger("fractalfs")

DEFAULT_DISCOVERY = "http://127.0.0.1:7700"


def _discovery_default() -> str:
    return os.environ.get("FRACTALFS_DISCOVERY", DEFAULT_DISCOVERY)


SECRET_HELP = (
    "the cluster secret (default: $FRACTALFS_SECRET_FILE, else the local node's "
    "STATE_DIR/secret if it exists)"
)


def _client_auth(args: argparse.Namespace) -> tuple[str, str] | None:
    """The operator's credentials for status and watch: the secret, wherever it is."""
    from .auth import SecretError, load_secret, operator_credentials, secret_path_for
    from .config import default_state_dir

    path = args.secret_file or os.environ.get("FRACTALFS_SECRET_FILE", "")
    if not path:
        state = os.environ.get("FRACTALFS_STATE_DIR") or default_state_dir()
        path = secret_path_for(state)
        if not os.path.exists(path):
            return None  # a discovery server without a secret (loopback)
    try:
        return operator_credentials(load_secret(path))
    except SecretError as exc:
        raise QuietError(str(exc), 2) from None


TLS_HELP = (
    "TLS: a directory made by `fractalfs new-tls` (ca.pem, cert.pem, key.pem); "
    "default: $FRACTALFS_TLS_DIR"
)


def _client_tls(args: argparse.Namespace) -> ssl.SSLContext | bool:
    """What status and watch verify an https discovery against: the cluster's CA."""
    from .tls import TlsError, check_dir, client_context

    directory = args.tls_dir or os.environ.get("FRACTALFS_TLS_DIR", "")
    if not directory:
        return True  # the system's CAs (and plain http needs nothing)
    for url in args.discovery.split(","):
        if url.strip().lower().startswith("http://"):
            # TLS asked for, and the password would go out in the clear to whoever answers.
            raise QuietError(f"{url.strip()}: with --tls-dir, discovery URLs are https://", 2)
    try:
        return client_context(check_dir(directory))
    except TlsError as exc:
        raise QuietError(str(exc), 2) from None


def _add_tls(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--tls-dir", "--tls", dest="tls_dir", metavar="DIR", help=help_text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fractalfs", description="Remote named pipes as ordinary files (FUSE)."
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("FRACTALFS_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("discovery", help="run the discovery server in the foreground")
    d.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"TOML configuration (default: {DISCOVERY_CONFIG} if it exists)",
    )
    d.add_argument("--listen", metavar="HOST:PORT", help="listening address (0.0.0.0:7700)")
    d.add_argument("--db", metavar="PATH", help="SQLite file (default: state dir)")
    d.add_argument("--secret-file", metavar="PATH", help="the cluster secret (mode 0600)")
    d.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow serving without a secret on a non-loopback address",
    )
    _add_tls(d, "serve HTTPS with the cluster certificate of `fractalfs new-tls DIR`")
    d.add_argument(
        "--retention",
        type=float,
        metavar="SECONDS",
        help="how long delivered edges are kept (3600)",
    )
    d.add_argument(
        "--store",
        metavar="etcd://HOST:PORT,...",
        help="keep state in etcd instead of SQLite (discovery replicas share it)",
    )

    m = sub.add_parser("mount", help="run the node daemon in the foreground")
    m.add_argument("mountpoint", nargs="?", default=None)
    m.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"TOML configuration (default: {NODE_CONFIG} if it exists)",
    )
    m.add_argument(
        "--discovery",
        dest="discovery_url",
        metavar="URL",
        help="discovery server (default: embed one)",
    )
    m.add_argument(
        "--discovery-listen",
        metavar="HOST:PORT",
        help="where an embedded discovery server listens (127.0.0.1:7700)",
    )
    m.add_argument(
        "--data-listen",
        metavar="HOST:PORT",
        help="data plane listening address, port 0: any (0.0.0.0:7701)",
    )
    m.add_argument(
        "--advertise",
        metavar="HOST",
        help="host other nodes dial for data (default: route to discovery)",
    )
    m.add_argument("--spill-dir", metavar="DIR")
    m.add_argument("--state-dir", metavar="DIR")
    m.add_argument("--node", metavar="NAME", help="node name (default: hostname)")
    m.add_argument(
        "--secret-file",
        metavar="PATH",
        help="the cluster secret, mode 0600 (default: STATE_DIR/secret, created when "
        "discovery is embedded)",
    )
    _add_tls(
        m,
        "mutual TLS on data connections and HTTPS to (and of an embedded) discovery, with "
        "the files of `fractalfs new-tls DIR`; every node must use it",
    )
    m.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="without a secret, serve the data port on a non-loopback address anyway",
    )
    m.add_argument(
        "--write-window",
        type=int,
        metavar="BYTES",
        help="bytes a writer may run ahead of its reader's acknowledgements",
    )
    m.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics there (default: off)",
    )
    m.add_argument(
        "--writer-lost-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a reader waits for a re-run writer (120)",
    )
    m.add_argument(
        "--mode",
        choices=["transient", "persistent", "dynamic"],
        help="persistence of edges written here (dynamic)",
    )

    sub.add_parser("new-edge", help="print a fresh edge id")
    sub.add_parser("new-secret", help="print a fresh cluster secret (store it mode 0600)")
    k = sub.add_parser(
        "operator-key",
        help="print the operator's password derived from the secret (Prometheus, the browser)",
    )
    k.add_argument("--secret-file", metavar="PATH", help=SECRET_HELP)
    t = sub.add_parser("new-tls", help="create DIR with a CA, the cluster certificate and key")
    t.add_argument("dir", metavar="DIR")

    w = sub.add_parser("watch", help="live progress and lifecycle events of the edges")
    w.add_argument("--discovery", metavar="URL[,URL...]", default=_discovery_default())
    w.add_argument("--secret-file", metavar="PATH", help=SECRET_HELP)
    _add_tls(w, TLS_HELP)

    s = sub.add_parser("status", help="list the edges discovery knows")
    s.add_argument("--discovery", metavar="URL[,URL...]", default=_discovery_default())
    s.add_argument("--secret-file", metavar="PATH", help=SECRET_HELP)
    _add_tls(s, TLS_HELP)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _layered(cls: type, config: object, args: argparse.Namespace, default_path: str) -> None:
    """File, then FRACTALFS_* environment, then flags: each overrides the one before."""
    path = args.config or default_path
    try:
        apply(config, load_file(path, required=args.config is not None), path)
        env = dict(os.environ)
        if "FRACTALFS_DISCOVERY" in env:  # the documented short name of discovery_url
            env.setdefault("FRACTALFS_DISCOVERY_URL", env["FRACTALFS_DISCOVERY"])
        apply(config, from_env(cls, env), "environment")
        # Every flag is named after its configuration key: no list to keep in step.
        given = {
            f: getattr(args, f) for f in field_types(cls) if getattr(args, f, None) is not None
        }
        apply(config, given, "command line")
    except ConfigError as exc:
        raise QuietError(str(exc), 2) from None


def _cmd_discovery(args: argparse.Namespace) -> None:
    from .config import default_state_dir
    from .discovery.etcd import EtcdUnavailable
    from .discovery.limits import Limits, fit_descriptors
    from .discovery.server import parse_listen, serve_forever

    config = DiscoveryConfig()
    _layered(DiscoveryConfig, config, args, DISCOVERY_CONFIG)
    try:
        host, port = parse_listen(config.listen, 7700)
    except ValueError as exc:
        raise QuietError(str(exc), 2) from None
    if config.retention <= 0:
        raise QuietError("retention must be positive", 2)
    db = config.db or os.path.join(default_state_dir(), "discovery.db")
    secret = _discovery_secret(config, host)
    ssl_context = None
    if config.tls_dir:
        from .tls import TlsError, check_dir, server_context

        try:
            ssl_context = server_context(check_dir(config.tls_dir), mutual=False)
        except TlsError as exc:
            raise QuietError(str(exc), 2) from None
    lim = fit_descriptors(
        Limits(
            max_connections=config.max_connections,
            header_timeout=config.header_timeout,
            body_timeout=config.body_timeout,
            max_waiters=config.max_waiters,
            max_subscribers=config.max_subscribers,
        )
    )
    if config.store:
        from .discovery.etcd import parse_url

        try:
            parse_url(config.store)
        except ValueError as exc:
            raise QuietError(str(exc), 2) from None
        db = config.store

    def ready(url: str) -> None:
        print(f"fractalfs discovery listening on {url} (db {db})", flush=True)
        notify("READY=1")

    freeze_startup_heap()
    try:
        asyncio.run(
            serve_forever(db, host, port, ready, secret, lim, config.retention, ssl_context)
        )
    except OSError as exc:
        if exc.filename is not None:  # the database's directory, not the address
            raise QuietError(f"discovery cannot start: {exc.filename}: {exc.strerror}") from None
        raise QuietError(f"discovery cannot start on {config.listen}: {exc.strerror}") from None
    except EtcdUnavailable as exc:
        raise QuietError(f"discovery cannot start: {exc}") from None
    except sqlite3.Error as exc:  # --db names a file that is not a database
        raise QuietError(f"discovery cannot open {db}: {exc}") from None
    except KeyboardInterrupt:
        pass
    finally:
        notify("STOPPING=1")


def _discovery_secret(config: DiscoveryConfig, host: str) -> bytes | None:
    import ipaddress

    from .auth import SecretError, load_secret

    if config.secret_file:
        try:
            return load_secret(config.secret_file)
        except SecretError as exc:
            raise QuietError(str(exc), 2) from None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not config.insecure:
        raise QuietError(
            f"refusing to serve {host} without a cluster secret: pass --secret-file "
            "(make one with `fractalfs new-secret`), or --insecure",
            2,
        )
    log.warning("no cluster secret: anyone who can reach %s controls every stream", host)
    return None


def _cmd_mount(args: argparse.Namespace) -> None:
    from . import mount
    from .discovery.server import parse_listen

    config = NodeConfig(mountpoint="/fractal")
    _layered(NodeConfig, config, args, NODE_CONFIG)
    try:
        check_node_config(config)
        parse_listen(config.data_listen, 7701)
        parse_listen(config.discovery_listen, 7700)
        if config.metrics_listen:
            parse_listen(config.metrics_listen, 9701)
    except (ConfigError, ValueError) as exc:
        raise QuietError(str(exc), 2) from None
    mount.run(config, ready=lambda line: print(line, flush=True))


def _fetch_edges(
    urls: str, auth: tuple[str, str] | None, verify: ssl.SSLContext | bool = True
) -> list[dict[str, Any]]:
    import httpx

    from .discovery.client import split_urls

    why: Exception | str = "no URL given"
    for url in split_urls(urls):  # replicas: the first that answers
        try:
            resp = httpx.get(url + "/v1/edges", timeout=10, auth=auth, verify=verify)
            break
        except httpx.HTTPError as exc:
            why = exc
    else:
        raise QuietError(f"discovery at {urls} unreachable: {why}") from None
    if resp.status_code == 401:
        raise QuietError(f"discovery at {url} wants the cluster secret: pass --secret-file")
    if resp.status_code != 200:
        raise QuietError(f"discovery at {url} answered {resp.status_code}")
    return resp.json()["edges"]  # type: ignore[no-any-return]


def _check_urls(args: argparse.Namespace) -> None:
    from .discovery.client import check_discovery_urls

    try:
        args.discovery = check_discovery_urls(args.discovery)
    except ValueError as exc:
        raise QuietError(str(exc), 2) from None


def _cmd_status(args: argparse.Namespace) -> None:
    _check_urls(args)
    edges = _fetch_edges(args.discovery, _client_auth(args), _client_tls(args))
    if args.json:
        json.dump({"edges": edges}, sys.stdout, indent=2)
        print()
        return
    cols = ("ID", "STATE", "GEN", "MODE", "WRITER", "ENDPOINT", "READER", "DELIVERED", "WHY")
    rows = [
        tuple(
            printable(v)
            for v in (
                e["id"],
                e["state"],
                str(e["generation"]),
                e.get("mode") or "-",
                e["writer_node"] or "-",
                e["writer_endpoint"] or "-",
                e["reader_node"] or "-",
                str(e["bytes_delivered"]),
                e.get("mode_reason") or e.get("reason") or "",
            )
        )
        for e in edges
    ]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    for row in (cols, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "discovery":
            _cmd_discovery(args)
        elif args.command == "mount":
            _cmd_mount(args)
        elif args.command == "new-edge":
            print(EdgeId.new().hex)
        elif args.command == "new-secret":
            from .auth import new_secret

            print(new_secret())
        elif args.command == "operator-key":
            auth = _client_auth(args)
            if auth is None:
                raise QuietError("no cluster secret here: pass --secret-file", 2)
            print(auth[1])
        elif args.command == "new-tls":
            from .tls import TlsError, new_tls

            try:
                new_tls(args.dir)
            except TlsError as exc:
                raise QuietError(str(exc), 2) from None
            except OSError as exc:
                raise QuietError(f"{args.dir}: {exc.strerror}", 2) from None
            print(f"{args.dir}: ca.pem, cert.pem, key.pem (copy the directory to every node)")
        elif args.command == "status":
            _cmd_status(args)
        elif args.command == "watch":
            from .watch import watch

            _check_urls(args)
            watch(args.discovery, _client_auth(args), verify=_client_tls(args))
    except QuietError as exc:
        print(f"fractalfs: {exc}", file=sys.stderr)
        return exc.exitcode
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
