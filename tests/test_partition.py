"""Fencing under a network partition, etcd deciding (issue 11).

Three hosts (network namespaces on a bridge). h0 runs a 3-member etcd cluster on its own
loopback, two discovery replicas in front of it and a node; h1 runs the writer's node,
h2 the reader's. h1's link goes down mid-stream: its lease expires in etcd, the replicas
mark its writer lost, and a re-run on h0 takes generation 2 through etcd. The partitioned
writer program goes on writing meanwhile. The reader must get only the re-run's bytes
(exactly once); when the link heals, the old writer gets EPIPE, never success."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fractalfs.cluster import NetCluster, available
from fractalfs.etcdtesting import EtcdCluster, Replica, have_etcd

from .conftest import failed, fuse_d_state, new_edge, sha_file, size, wait_for

pytestmark = [
    pytest.mark.skipif(available() is not None, reason=str(available())),
    pytest.mark.skipif(not have_etcd(), reason="needs etcd (apt install etcd-server)"),
]

SLOWCAT = f"{sys.executable} {Path(__file__).with_name('slowcat.py')}"
MiB = 1 << 20
PORTS = (7700, 7702)


class EtcdNet(NetCluster):
    """A :class:`NetCluster` whose discovery is two replicas on etcd, all inside h0."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, 3, ["--writer-lost-timeout", "60", "--mode", "transient"])
        h0 = self.hosts[0]
        self.etcd = EtcdCluster(workdir / "etcd", members=3, prefix=h0.prefix)
        self.replicas: list[Replica] = []

    @property
    def discovery_url(self) -> str:
        return ",".join(f"http://{self.hosts[0].address}:{port}" for port in PORTS)

    def start_discovery(self):  # type: ignore[no-untyped-def]
        h0 = self.hosts[0]
        self.etcd.start()
        for port in PORTS:
            replica = Replica(self.workdir, self.etcd.url, f"replica{port}")
            replica.prefix = h0.prefix
            replica.listen = f"{h0.address}:{port}"
            self.replicas.append(replica)
            replica.start()
        return None

    def down(self) -> None:
        try:
            super().down()  # programs, nodes (no SQLite discovery: self.discovery is None)
        finally:
            for replica in self.replicas:
                replica.stop()
            self.etcd.stop()
            # super().down() removed the namespaces already; again in case it failed early.
            for h in self.hosts:
                subprocess.run(["ip", "netns", "del", h.ns], capture_output=True, check=False)
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)

    def edge(self, edge: str) -> dict[str, object]:
        """The edge's record, from a replica, asked from inside h0."""
        from fractalfs.testing import operator_auth

        url = f"http://{self.hosts[0].address}:{PORTS[1]}/v1/edges/{edge}"
        code = f"import httpx; print(httpx.get({url!r}, timeout=5, auth={operator_auth()!r}).text)"
        got = subprocess.run(
            [*self.hosts[0].prefix, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
        )
        try:
            return json.loads(got.stdout)  # type: ignore[no-any-return]
        except ValueError:
            return {}


@pytest.fixture
def net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EtcdNet]:
    cluster = EtcdNet(tmp_path)
    cluster.up()
    try:
        yield cluster
    finally:
        if failed(request):
            from fractalfs.testing import log_tails

            print(cluster.diagnose())
            print(log_tails(list(cluster.replicas)))
        cluster.down()
    assert not fuse_d_state()


@pytest.mark.parametrize("heal", ["after-the-rerun", "during-the-rerun"])
def test_a_partitioned_writer_is_fenced_by_etcd_and_gets_epipe_when_it_heals(
    net: EtcdNet, tmp_path: Path, heal: str
) -> None:
    """``during-the-rerun``: the partition heals while the reader still reads generation 2
    from h0, and the old writer's daemon, back on the network, holds 8 MiB of generation 1
    unsent: none of it may reach the reader."""
    h0, h1, h2 = net.hosts
    assert h0.node and h1.node and h2.node
    src = tmp_path / "src"
    src.write_bytes(os.urandom(12 * MiB + 7))
    edge, out = new_edge(), tmp_path / "out"
    reader = net.run(h2, f"exec cat {h2.node.path(edge)} > {out}")
    old = net.run(
        h1, f"exec {SLOWCAT} {src} {h1.node.path(edge)} --pause-after {2 * MiB} --resume-on-usr1"
    )
    assert old.stdout is not None and old.stdout.readline() == b"paused\n"
    wait_for(lambda: size(out) >= 2 * MiB, 20, "2 MiB delivered", [reader, old])
    net.link(h1, up=False)  # h1 is cut off from discovery, etcd and the reader
    healed = False
    try:
        # The old writer goes on writing on the far side of the partition.
        os.kill(old.pid, signal.SIGUSR1)
        # etcd expires h1's lease; a replica's watch marks its writer lost.
        wait_for(lambda: net.edge(edge).get("writer_state") == "lost", 15, "h1's writer lost")
        # Generation 2, via etcd; slowly, so that the partition can heal mid-stream.
        rerun = net.run(h0, f"{SLOWCAT} {src} {h0.node.path(edge)} --chunk {MiB} --delay 0.2")
        if heal == "during-the-rerun":
            wait_for(lambda: net.edge(edge).get("generation") == 2, 15, "generation 2", [rerun])
            assert old.poll() is None  # blocked on its window, on the far side
            net.link(h1, up=True)
            healed = True
        _, err = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, err
        _, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        assert sha_file(out) == sha_file(src)  # the re-run's bytes, exactly once
        record = net.edge(edge)
        assert record["generation"] == 2 and record["writer_node"] == h0.name, record
        if not healed:
            assert old.poll() is None  # still blocked on its window, on the far side
            net.link(h1, up=True)
            healed = True
        # Healed: h1's daemon learns from discovery that generation 1 is stale.
        _, err = old.communicate(timeout=30)
        assert old.returncode == 1 and b"write failed: EPIPE" in err, err
    finally:
        if not healed:
            net.link(h1, up=True)
    assert sha_file(out) == sha_file(src)  # nothing of generation 1 reached the reader
    assert "fenced off" in h1.node.log.read_text()


@pytest.mark.serial  # the killed writer's end must reach etcd within the 2 s grace
def test_an_etcd_member_and_a_replica_killed_mid_stream_lose_nothing(
    net: EtcdNet, tmp_path: Path
) -> None:
    """Mid-stream (the writer paused after 2 MiB, by construction), one of the three etcd
    members and the first discovery replica every node asks are SIGKILLed. The stream
    completes exactly, nobody is re-run; then, on what is left (two members, one replica),
    a new edge pairs, its writer is killed mid-stream and re-run on another host (a new
    generation through etcd), and its reader gets the source exactly once."""
    h0, h1, h2 = net.hosts
    assert h0.node and h1.node and h2.node
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * MiB + 3))
    edge, out = new_edge(), tmp_path / "out"
    reader = net.run(h2, f"exec cat {h2.node.path(edge)} > {out}")
    writer = net.run(
        h1, f"exec {SLOWCAT} {src} {h1.node.path(edge)} --pause-after {2 * MiB} --resume-on-usr1"
    )
    assert writer.stdout is not None and writer.stdout.readline() == b"paused\n"
    wait_for(lambda: size(out) >= 2 * MiB, 20, "2 MiB delivered", [reader, writer])
    net.etcd.kill(0)  # the first member every replica dials
    net.replicas[0].kill()  # the first replica every node asks
    os.kill(writer.pid, signal.SIGUSR1)
    for proc in (writer, reader):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert sha_file(out) == sha_file(src)
    assert net.edge(edge).get("generation") == 1  # nobody re-run

    second, out2 = new_edge(), tmp_path / "out2"
    reader = net.run(h0, f"exec cat {h0.node.path(second)} > {out2}")
    first = net.run(
        h2, f"exec {SLOWCAT} {src} {h2.node.path(second)} --pause-after {MiB} --resume-on-usr1"
    )
    assert first.stdout is not None and first.stdout.readline() == b"paused\n"
    wait_for(lambda: size(out2) >= MiB, 20, "1 MiB delivered", [reader, first])
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    rerun = net.run(h1, f"exec cat {src} > {h1.node.path(second)}")
    for proc in (rerun, reader):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert sha_file(out2) == sha_file(src)
    assert net.edge(second).get("generation") == 2
