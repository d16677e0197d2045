"""Nodes with several discovery URLs: the client fails over between replicas, and a cluster
of three etcd members behind two discovery replicas survives losing one of each mid-stream."""

from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from fractalfs.discovery.client import DiscoveryClient, Unavailable, split_urls
from fractalfs.etcdtesting import EtcdCluster, Replica, have_etcd
from fractalfs.testing import Discovery, Node, free_port, log_tails, operator_auth

from .conftest import Programs, failed, fuse_d_state, new_edge, sha_file, size, wait_for

SLOWCAT = f"{sys.executable} {Path(__file__).with_name('slowcat.py')}"
MiB = 1 << 20


class _Busy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "no etcd member answered"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def busy_url() -> Iterator[str]:
    """A replica that answers every request with 503 (its etcd is out of reach)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_split_urls() -> None:
    assert split_urls("http://a:1/, http://b:2,") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError):
        DiscoveryClient(" , ")


async def test_client_fails_over_past_dead_and_unavailable_replicas(
    discovery: Discovery, busy_url: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = DiscoveryClient(
        f"{dead},{busy_url},{discovery.url}", retry_for=0.0, auth=discovery.auth
    )
    try:
        # Even with no time to retry, every replica gets its one try.
        with trio.fail_after(5):
            assert (await client.health())["ok"]
            assert client.url == discovery.url
            edge = new_edge()
            assert (await client.register_writer(edge, "n1", "h:1"))["generation"] == 1
            assert await client.heartbeat("n1", "b", {edge: 1}, []) == []
    finally:
        await client.aclose()


async def test_client_gives_up_when_every_replica_is_down(busy_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = DiscoveryClient(f"{dead},{busy_url}", retry_for=1.0)
    try:
        start = trio.current_time()
        with pytest.raises(Unavailable):
            await client.health()
        assert 1.0 <= trio.current_time() - start < 5.0
    finally:
        await client.aclose()


def test_mount_refuses_a_bad_url_in_the_list(tmp_path: Path) -> None:
    import subprocess

    got = subprocess.run(
        [sys.executable, "-m", "fractalfs", "mount", str(tmp_path), "--discovery",
         "http://127.0.0.1:1,ftp://x"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert got.returncode != 0
    assert "ftp://x: discovery URL must look like http://HOST:PORT" in got.stderr
    assert "Traceback" not in got.stderr


# -- three etcd members, two replicas, two nodes ----------------------------------------------


class Replicated:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.etcd = EtcdCluster(workdir / "etcd", members=3)
        self.replicas = [Replica(workdir, "", f"replica{i}") for i in range(2)]
        self.nodes: list[Node] = []

    def start(self) -> None:
        self.etcd.start()
        for r in self.replicas:
            r.store = self.etcd.url
            r.start()

    def node(self, name: str, order: list[int]) -> Node:
        urls = ",".join(self.replicas[i].url for i in order)
        node = Node(self.workdir, name, urls, extra=["--mode", "transient"])
        self.nodes.append(node)
        node.start()
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        for r in self.replicas:
            r.stop()
        self.etcd.stop()


@pytest.fixture
def replicated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Replicated]:
    if not have_etcd():
        pytest.skip("needs etcd (apt install etcd-server)")
    r = Replicated(tmp_path)
    try:
        r.start()
        yield r
    finally:
        if failed(request):
            print(log_tails([*r.replicas, *r.nodes]))
        r.stop()
    assert not fuse_d_state()


class GenerationWatch:
    """Polls a replica's edge list; remembers every (edge, generation, version) it saw."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.seen: dict[str, list[tuple[int, int]]] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=2.0, auth=operator_auth()) as http:
            while not self.stopped.wait(0.1):
                for url in self.urls:
                    try:
                        edges = http.get(url + "/v1/edges").json()["edges"]
                    except (httpx.HTTPError, ValueError, KeyError):
                        continue
                    for e in edges:
                        self.seen.setdefault(e["id"], []).append((e["generation"], e["version"]))

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def flowing(out: Path) -> bool:
    return size(out) >= 2 * MiB


def test_kill_an_etcd_member_and_a_replica_mid_stream(
    replicated: Replicated, tmp_path: Path, programs: Programs
) -> None:
    a = replicated.node("a", [0, 1])
    b = replicated.node("b", [1, 0])
    streams = []
    for i in range(4):
        src = tmp_path / f"src{i}"
        src.write_bytes(os.urandom(12 * MiB + i))
        edge, out = new_edge(), tmp_path / f"out{i}"
        reader = programs.start(f"cat {b.path(edge)} > {out}")
        writer = programs.start(f"{SLOWCAT} {src} {a.path(edge)} --chunk {MiB // 4} --delay 0.05")
        streams.append((src, out, reader, writer))
    watch = GenerationWatch([r.url for r in replicated.replicas])
    try:
        for _, out, reader, writer in streams:
            wait_for(functools.partial(flowing, out), 30, "streams flowing", [reader, writer])
        # The worst member to lose is the leader: the cluster elects another.
        replicated.etcd.kill(replicated.etcd.leader())
        replicated.replicas[0].kill()
        killed = time.monotonic()
        # A new edge pairs through the surviving replica and members.
        late_src = tmp_path / "late"
        late_src.write_bytes(os.urandom(64 * 1024))
        late_out = tmp_path / "late-out"
        edge = new_edge()
        late_reader = programs.start(f"cat {b.path(edge)} > {late_out}")
        late_writer = programs.start(f"cat {late_src} > {a.path(edge)}")
        late = [late_reader, late_writer]
        wait_for(lambda: size(late_out) == 64 * 1024, 20, "the late edge", late)
        paired = time.monotonic() - killed
        streams.append((late_src, late_out, late_reader, late_writer))
        for src, out, reader, writer in streams:
            assert writer.wait(60) == 0, writer.stderr.read() if writer.stderr else ""
            assert reader.wait(60) == 0, reader.stderr.read() if reader.stderr else ""
            assert sha_file(out) == sha_file(src)
    finally:
        watch.stop()
    for edge, history in watch.seen.items():
        gens = [g for g, _ in history]
        versions = [v for _, v in history]
        assert gens == sorted(gens), f"generation of {edge} went backwards: {gens}"
        assert versions == sorted(versions), f"version of {edge} went backwards"
    assert len(watch.seen) == 5
    assert all(gens[-1][0] == 1 for gens in watch.seen.values())  # no writer re-ran
    print(f"paired {paired:.2f} s after the kills")
    # The goal. 0.59-0.91 s in six runs at load average ~600; before the replica's
    # etcd calls left its loop (and each try on a member was bounded), one run took 5.3 s.
    assert paired < 2.0, f"pairing resumed {paired:.2f} s after the kills"


@pytest.mark.serial  # asserts each request answers within 2.5 s
def test_a_stalled_etcd_member_holds_no_request_for_long(replicated: Replicated) -> None:
    """A member that takes connections but never answers (SIGSTOP: a hung machine, an
    election's follower) cost each request on it the client's 5 s timeout, on the replica's
    loop: every other request waited behind it (one suite run paired 5.3 s after a kill).
    Now each try is short and runs in a worker thread; the next member answers."""
    import signal as sig
    from concurrent.futures import ThreadPoolExecutor

    replica = replicated.replicas[1]  # its store starts on member 0
    auth = operator_auth()
    with httpx.Client(timeout=30.0, auth=auth) as http:
        http.get(replica.url + "/v1/edges").raise_for_status()  # it talks to member 0 now
        member = replicated.etcd.procs[0]
        assert member is not None
        os.kill(member.pid, sig.SIGSTOP)
        try:

            def pair(i: int) -> float:
                start = time.monotonic()
                edge = new_edge()
                url = f"{replica.url}/v1/edges/{edge}"
                got = http.post(url + "/writer", json={"node": f"w{i}", "endpoint": "h:1"})
                assert got.status_code == 200, got.text
                got = http.post(url + "/reader", json={"node": f"r{i}"})
                assert got.status_code == 200, got.text
                assert http.get(url).json()["generation"] == 1
                return time.monotonic() - start

            with ThreadPoolExecutor(8) as pool:
                took = sorted(pool.map(pair, range(8)))
        finally:
            os.kill(member.pid, sig.SIGCONT)
    print(f"8 concurrent pairings with member 0 stopped: {took[0]:.2f}-{took[-1]:.2f} s")
    # Old code: >= 5 s for the first, the rest queued behind it on the loop.
    assert took[-1] < 2.5, took


def test_watch_takes_the_replica_list_and_follows_on_when_one_dies(
    replicated: Replicated,
) -> None:
    """``fractalfs watch --discovery URL1,URL2`` starts past a dead URL and, when the
    replica it follows dies, resumes the event stream on the next one (event numbers are
    etcd revisions: the same on every replica), missing nothing."""
    import subprocess

    dead = f"http://127.0.0.1:{free_port()}"
    r0, r1 = (r.url for r in replicated.replicas)
    cmd = [sys.executable, "-m", "fractalfs", "watch", "--discovery", f"{dead},{r0},{r1}"]
    watch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        with httpx.Client(timeout=10.0, auth=operator_auth()) as http:
            first, second = new_edge(), new_edge()

            def register(url: str, edge: str) -> None:
                body = {"node": "w", "endpoint": "h:1"}
                http.post(f"{url}/v1/edges/{edge}/writer", json=body).raise_for_status()

            # The first event may come before watch fixed its start: register until seen.
            deadline = time.monotonic() + 20
            while not any(first in line for line in lines):
                assert time.monotonic() < deadline, (lines, watch.poll())
                register(r1, first)
                time.sleep(0.5)
            replicated.replicas[0].kill()
            register(r1, second)
            wait_for(lambda: any(second in line for line in lines), 20, "the event after the kill")
    finally:
        watch.terminate()
        try:
            _, err = watch.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            watch.kill()
            _, err = watch.communicate()
    assert "Traceback" not in err, err


def test_status_takes_the_first_replica_that_answers(discovery: Discovery) -> None:
    import subprocess

    edge = new_edge()
    httpx.post(
        f"{discovery.url}/v1/edges/{edge}/reader", json={"node": "n"}, auth=discovery.auth
    ).raise_for_status()
    dead = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "fractalfs", "status", "--json"]
    got = subprocess.run(
        [*cmd, "--discovery", f"{dead},{discovery.url}"], capture_output=True, text=True, timeout=60
    )
    assert got.returncode == 0, got.stderr
    assert edge in got.stdout
    down = subprocess.run([*cmd, "--discovery", dead], capture_output=True, text=True, timeout=60)
    assert down.returncode != 0 and "unreachable" in down.stderr and "Traceback" not in down.stderr


def test_a_parked_reader_is_woken_through_another_replicas_etcd_watch(
    replicated: Replicated, tmp_path: Path, programs: Programs
) -> None:
    """A reader's pump parks on the feed of its replica (GET /v1/changes); the writer
    registers through the other replica: only the etcd watch tells the reader's replica,
    whose feed names the edge as text, and the follower must find the parked reader by
    its EdgeId. A miss leaves it parked for the pump's long poll (120 s)."""
    a = replicated.node("a", [0, 1])
    b = replicated.node("b", [1, 0])
    src, out, edge = tmp_path / "src", tmp_path / "out", new_edge()
    src.write_bytes(os.urandom(256 * 1024))
    reader = programs.start(f"cat {b.path(edge)} > {out}")
    time.sleep(3.0)  # claimed, looked once, parked
    started = time.monotonic()
    writer = programs.start(f"cat {src} > {a.path(edge)}")
    wait_for(lambda: size(out) == 256 * 1024, 20, "the parked reader woken", [reader, writer])
    took = time.monotonic() - started
    assert writer.wait(30) == 0 and reader.wait(30) == 0
    assert sha_file(out) == sha_file(src)
    print(f"data {took:.2f} s after the writer started")
