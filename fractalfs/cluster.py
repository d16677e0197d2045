"""A fractalfs cluster on one machine: hosts as network namespaces on a bridge.

Each host is a network namespace with its own address, joined to the others by a veth pair
and a bridge; each runs its own node daemon (mountpoint, state and spill directory), and
host 0 also runs the discovery server. Daemons and programs enter a host with
``nsenter --net=`` only (``ip netns exec`` would also give them a private mount namespace,
hiding their FUSE mounts from everyone else).

Fault tools: kill a program, a daemon or discovery; a host's link down for N seconds;
nftables drops inside a host (all traffic, or a random share); restart a daemon.

``python -m fractalfs.cluster up`` (``make cluster``) brings one up for a person to try,
and tears it down on Ctrl-C. Teardown always removes namespaces, mounts and processes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .testing import Discovery, Node, Process, log_tails

DISCOVERY_PORT = 7700
DATA_PORT = 7701


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Host:
    index: int
    ns: str
    veth: str  # the bridge-side end: down = this host is cut off
    address: str
    workdir: Path
    node: Node | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}"]

    @property
    def name(self) -> str:
        return f"h{self.index}"


class NetCluster:
    def __init__(self, workdir: Path, hosts: int = 3, node_args: list[str] | None = None):
        self.workdir = workdir
        self.tag = secrets.token_hex(2)
        self.subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250) + 1}"
        self.bridge = f"frb{self.tag}"
        self.hosts = [
            Host(
                i,
                f"frfs-{self.tag}-h{i}",
                f"frv{self.tag}{i}",
                f"{self.subnet}.{i + 1}",
                workdir / f"h{i}",
                extra=list(node_args or []),
            )
            for i in range(hosts)
        ]
        self.discovery: Discovery | None = None
        self.programs: list[subprocess.Popen[bytes]] = []

    # -- lifecycle -----------------------------------------------------------------------

    def up(self) -> NetCluster:
        try:
            self._network()
            self.start_discovery()
            # Each daemon takes about a second to start: start them side by side.
            with ThreadPoolExecutor(len(self.hosts)) as pool:
                for started in [pool.submit(self.start_node, h) for h in self.hosts]:
                    started.result()
        except BaseException:
            self.down()
            raise
        return self

    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for h in self.hosts:
            peer = f"frp{self.tag}{h.index}"
            _ip("netns", "add", h.ns)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", h.ns)
            _ip("link", "set", h.veth, "master", self.bridge, "up")
            _ip("-n", h.ns, "link", "set", peer, "name", "eth0")
            _ip("-n", h.ns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")

    @property
    def discovery_url(self) -> str:
        return f"http://{self.hosts[0].address}:{DISCOVERY_PORT}"

    def start_discovery(self) -> Discovery:
        h0 = self.hosts[0]
        if self.discovery is None:
            self.discovery = Discovery(
                self.workdir / "discovery",
                listen=f"{h0.address}:{DISCOVERY_PORT}",
                prefix=h0.prefix,
            )
        self.discovery.start()
        return self.discovery

    def start_node(self, host: Host) -> Node:
        host.node = Node(
            host.workdir,
            host.name,
            self.discovery_url,
            listen=f"{host.address}:{DATA_PORT}",
            advertise=host.address,
            extra=host.extra,
            prefix=host.prefix,
        )
        host.node.start()
        return host.node

    def restart_node(self, host: Host) -> Node:
        if host.node is not None:
            host.node.stop()
        return self.start_node(host)

    def down(self) -> None:
        for proc in self.programs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for h in self.hosts:
            if h.node is not None:
                h.node.stop()
        if self.discovery is not None:
            self.discovery.stop()
        for h in self.hosts:
            _ip("netns", "del", h.ns, check=False)
        _ip("link", "del", self.bridge, check=False)

    def diagnose(self, lines: int = 40) -> str:
        """What each program and daemon said: for a failed test's report."""
        out = []
        for proc in self.programs:
            out.append(f"program {proc.args!r}: exit {proc.poll()}")
        daemons: list[Process] = [h.node for h in self.hosts if h.node is not None]
        if self.discovery is not None:
            daemons.insert(0, self.discovery)
        out.append(log_tails(daemons, lines))
        return "\n".join(out)

    # -- programs and faults -------------------------------------------------------------

    def run(self, host: Host, cmd: str) -> subprocess.Popen[bytes]:
        """Starts ``cmd`` (bash) inside ``host``; killed at teardown."""
        proc = subprocess.Popen(
            [*host.prefix, "bash", "-c", cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.programs.append(proc)
        return proc

    def api(self, path: str) -> str:
        """GET a discovery path from inside host 0 (the root namespace has no route here)."""
        auth = self.discovery.auth if self.discovery is not None else None
        url = f"{self.discovery_url}{path}"
        code = f"import httpx; print(httpx.get({url!r}, timeout=10, auth={auth!r}).text)"
        got = subprocess.run(
            [*self.hosts[0].prefix, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return got.stdout

    def link(self, host: Host, up: bool) -> None:
        _ip("link", "set", host.veth, "up" if up else "down")

    def drop(self, host: Host, percent: int = 100) -> None:
        """Drops incoming packets of ``host`` (all, or a random share) until :meth:`undrop`."""
        rules = (
            "add table inet fractalfs_fault\n"
            "add chain inet fractalfs_fault in { type filter hook input priority 0; }\n"
            + (
                "add rule inet fractalfs_fault in drop\n"
                if percent >= 100
                else f"add rule inet fractalfs_fault in numgen random mod 100 < {percent} drop\n"
            )
        )
        subprocess.run([*host.prefix, "nft", "-f", "-"], input=rules, text=True, check=True)

    def undrop(self, host: Host) -> None:
        subprocess.run(
            [*host.prefix, "nft", "delete", "table", "inet", "fractalfs_fault"],
            capture_output=True,
            check=False,
        )


def available() -> str | None:
    """Why a cluster cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nsenter", "nft", "fusermount3"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fractalfs.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("command", choices=["up"])
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--dir", default="", help="work directory (default: a temporary one)")
    args = ap.parse_args()
    why = available()
    if why:
        print(f"fractalfs cluster: {why}", file=sys.stderr)
        return 1
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="fractalfs-cluster-"))
    cluster = NetCluster(workdir, args.hosts)
    cluster.up()
    try:
        print(f"discovery: {cluster.discovery_url} (in {cluster.hosts[0].ns})")
        if cluster.discovery is not None:
            print(f"secret: {cluster.discovery.secret_file} (FRACTALFS_SECRET_FILE)")
        for h in cluster.hosts:
            assert h.node is not None
            print(
                f"{h.name}: {h.address}  mount {h.node.mountpoint}  netns {h.ns}  log {h.node.log}"
            )
        print("\ntry:  E=$(fractalfs new-edge)")
        h0, hn = cluster.hosts[0], cluster.hosts[-1]
        assert h0.node is not None and hn.node is not None
        print(f"      cat {hn.node.mountpoint}/$E | sha256sum &")
        print(f"      seq 1 1000000 > {h0.node.mountpoint}/$E")
        print(f"      ip link set {h0.veth} down   # cut {h0.name} off\n")
        print("Ctrl-C tears it all down.")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
