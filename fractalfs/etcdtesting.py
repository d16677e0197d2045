"""Real etcd members on loopback for tests and benchmarks (Debian's ``etcd-server``).

:class:`EtcdCluster` starts N ``etcd`` processes that form one cluster, waits until it has
a leader, and on :meth:`stop` kills and reaps them and removes their data. :class:`Replica`
is a ``fractalfs discovery --store etcd://...`` process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .discovery.etcd import EtcdStore, _put
from .testing import Discovery, Process, free_port

ETCD = "etcd"


def have_etcd() -> bool:
    return shutil.which(ETCD) is not None


class EtcdCluster:
    def __init__(
        self,
        workdir: Path,
        members: int = 3,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        prefix: list[str] | None = None,
    ) -> None:
        """``prefix``: run the members inside a network namespace (``nsenter --net=...``),
        on that namespace's loopback."""
        self.workdir = workdir
        self.prefix = prefix or []
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.names = [f"m{i}" for i in range(members)]
        self.client_ports = [free_port() for _ in self.names]
        self.peer_ports = [free_port() for _ in self.names]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * members

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    def _args(self, i: int) -> list[str]:
        peers = ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True)
        )
        client = f"http://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        return [
            ETCD,
            "--name", self.names[i],
            "--data-dir", str(self.workdir / f"etcd-{self.names[i]}"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", peers,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"fractalfs-{self.workdir.name}",
            # etcd's tuning guide for a LAN: a leader's loss is noticed in 0.5-1 s, not 1-2 s.
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(len(self.names)):
            self.start_member(i)
        self.wait_healthy(timeout)

    def start_member(self, i: int) -> None:
        with open(self.workdir / f"etcd-{self.names[i]}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(
                [*self.prefix, *self._args(i)], stdout=log, stderr=log, start_new_session=True
            )

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        for i, port in enumerate(self.client_ports):
            if self.procs[i] is None:
                continue
            while True:
                if self._healthy(port):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {self.names[i]} not healthy")
                time.sleep(0.1)

    def _healthy(self, port: int) -> bool:
        url = f"http://127.0.0.1:{port}/health"
        if self.prefix:  # that loopback is the namespace's: ask from inside it
            code = f"import httpx; print(httpx.get({url!r}, timeout=1.0).json()['health'])"
            got = subprocess.run(
                [*self.prefix, sys.executable, "-c", code], capture_output=True, text=True
            )
            return got.stdout.strip() == "true"
        try:
            return bool(httpx.get(url, timeout=1.0).json().get("health") == "true")
        except (httpx.HTTPError, ValueError):
            return False

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.kill()
            proc.wait()
            self.procs[i] = None

    def leader(self) -> int:
        """The index of the member that is leader now."""
        for i, port in enumerate(self.client_ports):
            if self.procs[i] is None:
                continue
            got = httpx.post(f"http://127.0.0.1:{port}/v3/maintenance/status", json={}).json()
            if got.get("leader") == got.get("header", {}).get("member_id"):
                return i
        raise RuntimeError("no leader")

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)
        for name in self.names:
            shutil.rmtree(self.workdir / f"etcd-{name}", ignore_errors=True)


class Replica(Discovery):
    """``fractalfs discovery --store etcd://...``."""

    def __init__(self, workdir: Path, store: str, name: str = "discovery") -> None:
        super().__init__(workdir)
        self.store = store
        self.log = workdir / f"{name}.log"

    def start(self, timeout: float = 15.0) -> str:
        self.args = ["discovery", "--listen", self.listen, "--store", self.store]
        if self.secret_file:
            self.args += ["--secret-file", self.secret_file]
        line = Process.start(self, timeout)
        self.url = line.split(" listening on ")[1].split()[0]
        self.listen = self.url.removeprefix("http://")
        return line


def put_v4_edge(store: EtcdStore, edge: str, **extra: object) -> None:
    """Writes ``edge``'s key as schema 4 did (no ``reader_no_writer``): its reader
    "closed" with 0 bytes and no writer, which is also how a version before f9138f0
    recorded a reader killed while it waited. ``extra``: more fields (a newer version's)."""
    record = {
        "generation": 0,
        "writer_node": "",
        "writer_endpoint": "",
        "writer_state": "none",
        "bytes_written": 0,
        "reader_node": "r",
        "reader_state": "closed",
        "bytes_delivered": 0,
        "reason": "",
        "mode": "",
        "mode_reason": "",
        "reader_claim": 1,
        "created": 0.0,
        "updated": 0.0,
        **extra,
    }
    store.gateway.txn([], [_put(f"{store.prefix}e/{edge}", json.dumps(record))])
