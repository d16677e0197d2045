"""Fixtures that run the real thing: discovery and node daemons as subprocesses, the kernel
FUSE mount, and real programs through bash. Everything started is stopped and unmounted in
teardown, also when a test fails."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fractalfs.cluster import NetCluster
from fractalfs.edgeid import EdgeId
from fractalfs.etcdtesting import EtcdCluster, Replica, have_etcd
from fractalfs.testing import Discovery, Node, Process, is_mounted, log_tails, shared_secret_file

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3",
)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Lets fixtures see whether their test failed (``failed(request)``) and print logs.
    report = yield
    if report.when == "call" and report.failed:
        item.failed = True  # type: ignore[attr-defined]
    return report


def failed(request: pytest.FixtureRequest) -> bool:
    return bool(getattr(request.node, "failed", False))


def pytest_configure(config: pytest.Config) -> None:
    # A CI timeout or a person's kill sends SIGTERM: turn it into KeyboardInterrupt so that
    # pytest still runs every teardown (stopping daemons, unmounting).
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    # An xdist worker gets a process group of its own: the daemons' FLUSH check
    # (procs.failing_in_group) takes any process of the writer's group exiting non-zero
    # for a child of the writer failing, and sh() leaves its commands in this group.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.setpgid(0, 0)
    # Every daemon and CLI run a test starts proves the same cluster secret.
    os.environ["FRACTALFS_SECRET_FILE"] = str(shared_secret_file())
    # Started in the background by a non-interactive shell, we inherit SIGINT ignored, and
    # so would every program a test starts: tests that Ctrl-C one would fail for that.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def new_edge() -> str:
    return EdgeId.new().hex


def fuse_d_state(*roots: Path) -> list[str]:
    """Processes of this test session stuck in uninterruptible sleep inside a FUSE request.
    Ours: their command line or working directory is under the session's temporary
    directory or one of ``roots`` (other checkouts' suites run on the same machine, on
    their own mounts)."""
    mine = [str(r) for r in roots] + ([_SESSION_ROOT] if _SESSION_ROOT else [])
    stuck = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state != "D":
                continue
            with open(f"/proc/{pid}/wchan") as f:
                wchan = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if mine and not any(r in cmd or cwd.startswith(r) for r in mine):
            continue
        if "fuse" in wchan or "request_wait_answer" in wchan:
            stuck.append(f"{pid} {cmd} ({wchan})")
    return stuck


_SESSION_ROOT = ""  # set by the session_root fixture


@pytest.fixture(scope="session", autouse=True)
def session_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    global _SESSION_ROOT
    _SESSION_ROOT = str(tmp_path_factory.getbasetemp())


class Programs:
    """Background programs of one test; all killed in teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["bash", "-c", cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    running: Sequence[subprocess.Popen[bytes]] = (),
) -> float:
    """Polls ``predicate``; returns the seconds it took, fails the test after ``timeout``, or
    at once (with its stderr) if one of the ``running`` programs has exited non-zero."""
    t0 = time.monotonic()
    while not predicate():
        for proc in running:
            if proc.poll():
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise AssertionError(
                    f"waiting for {what}: {proc.args!r} exited {proc.returncode}: {err}"
                )
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sh(cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd!r} exited {result.returncode}: {result.stderr.decode(errors='replace')}"
        )
    return result


@pytest.fixture
def programs() -> Iterator[Programs]:
    progs = Programs()
    try:
        yield progs
    finally:
        progs.close()


@dataclass
class Pair:
    """Where to write and where to read an edge: one node, or two daemons on one host."""

    name: str
    writer: Node
    reader: Node

    def paths(self, edge: str | None = None) -> tuple[str, str, str]:
        edge = edge or new_edge()
        return edge, self.writer.path(edge), self.reader.path(edge)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fractalfs")


@pytest.fixture(scope="session")
def shared_discovery(session_dir: Path) -> Iterator[Discovery]:
    disc = Discovery(session_dir / "discovery")
    disc.start()
    try:
        yield disc
    finally:
        disc.stop()


@pytest.fixture(scope="session")
def shared_nodes(session_dir: Path, shared_discovery: Discovery) -> Iterator[tuple[Node, Node]]:
    # Transient mode: these tests are about backpressure and the transient semantics.
    a = Node(session_dir, "a", shared_discovery.url, extra=["--mode", "transient"])
    b = Node(session_dir, "b", shared_discovery.url, extra=["--mode", "transient"])
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()


@pytest.fixture(params=["same-node", "two-nodes"])
def pair(request: pytest.FixtureRequest, shared_nodes: tuple[Node, Node]) -> Iterator[Pair]:
    a, b = shared_nodes
    if not (a.alive() and b.alive()):
        pytest.fail("a shared daemon died in an earlier test; see its log in " + str(a.log))
    yield Pair(request.param, a, b if request.param == "two-nodes" else a)
    stuck = fuse_d_state()
    assert not stuck, f"processes left in D state: {stuck}"


class Cluster:
    """Daemons private to one test (for tests that kill or restart them)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.discovery: Discovery | None = None
        self.nodes: list[Node] = []

    def start_discovery(self) -> Discovery:
        self.discovery = Discovery(self.workdir / "discovery")
        self.discovery.start()
        return self.discovery

    def node(self, name: str, mode: str = "transient", extra: list[str] | None = None) -> Node:
        url = self.discovery.url if self.discovery else None
        node = Node(self.workdir, name, url, extra=["--mode", mode, *(extra or [])])
        self.nodes.append(node)
        node.start()
        return node

    def edge(self, edge: str) -> dict[str, object]:
        """Discovery's record of ``edge``, through the real ``fractalfs status --json``."""
        assert self.discovery is not None
        got = sh(f"{sys.executable} -m fractalfs status --json --discovery {self.discovery.url}")
        edges = {e["id"]: e for e in json.loads(got.stdout)["edges"]}
        return edges.get(edge, {})  # type: ignore[no-any-return]

    def event_time(self, edge: str, kind: str, timeout: float = 10) -> float:
        """The wall-clock time at which discovery wrote the first ``kind`` event of
        ``edge`` (its own clock, in the event). A latency of discovery's measured from it
        leaves out how long the test took to look: under load a ``fractalfs status`` poll
        is a Python start-up of a second or more (node loss "took 3.39 s" to a polling
        test when discovery had declared it 1.6 s after the kill)."""
        assert self.discovery is not None
        import httpx

        deadline = time.monotonic() + timeout
        after = 0
        while True:
            got = httpx.get(
                f"{self.discovery.url}/v1/events",
                params={"after": after, "wait": 1},
                auth=self.discovery.auth,
                timeout=10,
            ).json()
            for e in got["events"]:
                if e["edge"] == edge and e["kind"] == kind:
                    return float(e["time"])
            after = got["last"]
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {kind} of {edge}")

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.signal(signal.SIGTERM)  # all stop at once; each is then waited for
        for node in reversed(self.nodes):
            node.stop()
        if self.discovery is not None:
            self.discovery.stop_later()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        if failed(request):
            daemons: list[Process] = [*c.nodes]
            if c.discovery is not None:
                daemons.insert(0, c.discovery)
            print(log_tails(daemons))  # shown in the failure report
        c.close()
    stuck = fuse_d_state()
    assert not stuck, f"processes left in D state: {stuck}"


class SlowProxy:
    """A TCP proxy that holds every answer from ``upstream`` back for ``delay`` seconds: a
    node with a slow path to discovery, for races between nodes."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(server, client, self.delay), daemon=True
            ).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                time.sleep(delay)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def in_fuse_request(pid: int) -> bool:
    """``pid`` waits in a FUSE request for our daemon's answer (blocked in an open, read or
    write), as /proc/<pid>/wchan shows: what a test means by "the program is blocked"."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return "request_wait_answer" in wchan or "fuse" in wchan


def waiting_to_read(pid: int) -> bool:
    """``pid`` is blocked reading an edge: in a FUSE request, or (a reader FIFO, the
    default) in the kernel's pipe read."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return "pipe_read" in wchan or in_fuse_request(pid)


def waiting_to_write(pid: int) -> bool:
    """``pid`` is blocked writing an edge: in a FUSE request, or (a writer FIFO) in the
    kernel's pipe write."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return "pipe_write" in wchan or in_fuse_request(pid)


def blocked_on_a_full_window(pid: int, window: int = 8 << 20) -> bool:
    """``pid`` wrote a whole write window (``wchar`` in /proc/<pid>/io) and waits in a
    FUSE request or a full writer FIFO: blocked on backpressure, not still opening."""
    try:
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return False
    wchar = int(io.split("wchar:")[1].split()[0])
    return wchar >= window and waiting_to_write(pid)


@pytest.fixture
def discovery(tmp_path: Path) -> Iterator[Discovery]:
    """A discovery server of its own (with the suite's cluster secret) for one test."""
    disc = Discovery(tmp_path / "discovery")
    disc.start()
    try:
        yield disc
    finally:
        disc.stop_later()


@pytest.fixture
def disc(discovery: Discovery) -> Discovery:
    return discovery


@pytest.fixture(params=["sqlite", "etcd"])
def store_cluster(
    request: pytest.FixtureRequest, cluster: Cluster, tmp_path: Path
) -> Iterator[Cluster]:
    """``cluster`` with its discovery started on SQLite, or on a real etcd member."""
    if request.param == "sqlite":
        cluster.start_discovery()
        yield cluster
        return
    if not have_etcd():
        pytest.skip("needs etcd (apt install etcd-server)")
    etcd = EtcdCluster(tmp_path / "etcd", members=1)
    try:
        etcd.start()
        cluster.discovery = Replica(tmp_path, f"{etcd.url}/t{os.getpid()}")
        cluster.discovery.start()
        yield cluster
    finally:
        cluster.close()  # the daemons before their discovery, before its etcd
        etcd.stop()


@pytest.fixture
def net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NetCluster]:
    """Three hosts (network namespaces on a bridge), a daemon on each; its mode is the
    test's parameter (``indirect``), dynamic by default."""
    mode = getattr(request, "param", "dynamic")
    cluster = NetCluster(tmp_path, 3, ["--writer-lost-timeout", "30", "--mode", mode])
    cluster.up()
    mounts = [h.node.mountpoint for h in cluster.hosts if h.node is not None]
    try:
        yield cluster
    finally:
        if failed(request):
            print(cluster.diagnose())
        cluster.down()
    assert not fuse_d_state()
    assert not [m for m in mounts if is_mounted(m)]
