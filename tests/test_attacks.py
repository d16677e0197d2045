"""Attacks on a live stream by another local user: every route into the edge's FIFOs.

A stream flows on the default routes (the writer's and the reader's programs each hold a
kernel FIFO of the mount); meanwhile a process of another uid tries every way in: the
edge's name (open for reading and writing, blocking or not, xattr, rm), the programs'
descriptors through ``/proc/<pid>/fd``, and the daemon's own FIFO directory
``MOUNT/.fifo/<ino>`` by the FIFO's inode. Every attempt must be refused, nothing it
writes may reach the stream, and the stream must end exactly, with status 0."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fractalfs import auth, dataplane, handshake
from fractalfs.edgeid import EdgeId
from fractalfs.handshake import Hello, Reply, Status
from fractalfs.testing import Discovery, Flood, Node, free_port, shared_secret_file

from .conftest import (
    Cluster,
    Programs,
    fuse_d_state,
    needs_fuse,
    new_edge,
    sh,
    sha_file,
    size,
    wait_for,
)

SLOWCAT = f"{sys.executable} {Path(__file__).with_name('slowcat.py')}"
MiB = 1 << 20


def as_uid(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


ATTACK = r"""
import errno, json, os, signal, sys
path, wpid, wfd, rpid, rfd, fifo = sys.argv[1:]
signal.alarm(20)  # an open that waits is a failure of its own: the test sees the alarm
got = {}
def attempt(name, how, flags, data=b"INJECTED"):
    try:
        fd = os.open(how, flags)
    except OSError as exc:
        got[name] = errno.errorcode[exc.errno]
        return
    got[name] = "opened"
    try:
        if flags & (os.O_WRONLY | os.O_RDWR):
            os.write(fd, data)
            got[name] = "wrote"
        else:
            got[name] = "read %d" % len(os.read(fd, 65536))
    except OSError as exc:
        got[name] += " " + errno.errorcode[exc.errno]
    finally:
        os.close(fd)
N = os.O_NONBLOCK
attempt("open-r", path, os.O_RDONLY | N)
attempt("open-w", path, os.O_WRONLY | N)
attempt("open-w-blocking", path, os.O_WRONLY)
attempt("open-rw", path, os.O_RDWR)
attempt("proc-writer-fd", f"/proc/{wpid}/fd/{wfd}", os.O_WRONLY | N)
attempt("proc-reader-fd-r", f"/proc/{rpid}/fd/{rfd}", os.O_RDONLY | N)
attempt("proc-reader-fd-w", f"/proc/{rpid}/fd/{rfd}", os.O_WRONLY | N)
attempt("fifo-dir-w", fifo, os.O_WRONLY | N)
attempt("fifo-dir-r", fifo, os.O_RDONLY | N)
for name, call in (
    ("setxattr", lambda: os.setxattr(path, "user.fractalfs.mode", b"persistent")),
    ("getxattr", lambda: os.getxattr(path, "user.fractalfs.mode")),
    ("unlink", lambda: os.unlink(path)),
    ("truncate", lambda: os.truncate(path, 0)),
    ("chmod", lambda: os.chmod(path, 0o666)),
    ("chown", lambda: os.chown(path, os.getuid(), os.getgid())),
    ("utime", lambda: os.utime(path, (0, 0))),
    ("rename", lambda: os.rename(path, path[:-1] + ("0" if path[-1] != "0" else "1"))),
    ("rename-over", lambda: os.rename(path[:-1] + ("0" if path[-1] != "0" else "1"), path)),
    ("link", lambda: os.link(path, path + ".lnk")),
    ("symlink", lambda: os.symlink("/etc/passwd", path)),
    ("mknod", lambda: os.mkfifo(path)),
    ("create-excl", lambda: os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))),
    ("trunc-open", lambda: os.close(os.open(path, os.O_WRONLY | os.O_TRUNC | N))),
    ("removexattr", lambda: os.removexattr(path, "user.fractalfs.mode")),
    ("listdir-fifo", lambda: os.listdir(os.path.dirname(fifo))),
    ("stat-fifo", lambda: os.stat(fifo)),
):
    try:
        call()
        got[name] = "done"
    except OSError as exc:
        got[name] = errno.errorcode[exc.errno]
print(json.dumps(got))
"""

REFUSED = {"EACCES", "EPERM"}
EXISTS = {"symlink", "mknod"}  # every well-formed name exists: EEXIST, nothing made


@pytest.fixture
def work() -> Iterator[Path]:
    # Other uids must reach the mountpoint and the files: not under pytest's 0700 dirs.
    work = Path(tempfile.mkdtemp(prefix="fractalfs-attacks-"))
    work.chmod(0o755)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def node(work: Path) -> Iterator[Node]:
    n = Node(work, "solo", None)
    try:
        n.start()
        n.mountpoint.chmod(0o755)
        yield n
    finally:
        n.stop()
    assert not fuse_d_state(work)


def fifo_fd(pid: int, mountpoint: Path) -> tuple[int, int]:
    """The descriptor of ``pid`` open on the mount, and its inode."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{name}")
        if link.startswith(str(mountpoint)):
            return int(name), os.stat(f"/proc/{pid}/fd/{name}").st_ino
    raise AssertionError(f"{pid} holds nothing on {mountpoint}")


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
@pytest.mark.parametrize(("victim", "attacker"), [(0, 65534), (65534, 65533)])
def test_another_user_cannot_touch_a_live_stream_by_any_route(
    node: Node, programs: Programs, work: Path, victim: int, attacker: int
) -> None:
    src = work / "src"
    src.write_bytes(os.urandom(6 * MiB))
    src.chmod(0o644)
    outdir = work / "out"
    outdir.mkdir(mode=0o777)
    outdir.chmod(0o777)
    out = outdir / "out"
    edge = new_edge()
    path = node.path(edge)
    run = " ".join(as_uid(victim)) + " " if victim else ""
    writer = programs.start(f"exec {run}{SLOWCAT} {src} {path} --chunk 65536 --delay 0.05")
    reader = programs.start(f"exec {run}cat {path} > {out}")
    wait_for(lambda: out.exists() and out.stat().st_size >= MiB, 20, "the stream flowing")
    wfd, wino = fifo_fd(writer.pid, node.mountpoint)
    rfd, rino = fifo_fd(reader.pid, node.mountpoint)
    assert wino != rino
    fifo = node.mountpoint / ".fifo" / str(wino)
    attack = subprocess.run(
        [*as_uid(attacker), sys.executable, "-c", ATTACK, path]
        + [str(v) for v in (writer.pid, wfd, reader.pid, rfd, fifo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert attack.returncode == 0, attack.stderr
    got = json.loads(attack.stdout)
    allowed = {
        k: v
        for k, v in got.items()
        if v not in REFUSED and (k, v) not in {(n, "EEXIST") for n in EXISTS}
    }
    assert allowed == {}, got
    print(got)
    assert writer.wait(timeout=60) == 0, writer.stderr.read() if writer.stderr else ""
    assert reader.wait(timeout=60) == 0, reader.stderr.read() if reader.stderr else ""
    assert out.read_bytes() == src.read_bytes()
    # The daemon serves on.
    assert node.alive()
    other = new_edge()
    again = programs.start(f"cat {node.path(other)}")
    sh(f"echo still-serving > {node.path(other)}")
    assert again.communicate(timeout=20)[0] == b"still-serving\n"


def _answer(s: socket.socket, hello: Hello, key: bytes) -> bytes | None:
    """Send ``hello`` on ``s``, read the writer's challenge: the proof it asks for."""
    s.sendall(hello.encode())
    challenge = b""
    while len(challenge) < handshake.CHALLENGE.size:
        challenge += s.recv(handshake.CHALLENGE.size - len(challenge))
    return handshake.check_challenge(key, hello, challenge)


def _handshake(endpoint: str, hello: Hello, proof: bytes | None, key: bytes) -> Reply:
    """One connection: ``hello``, then ``proof`` (None: the right one for this
    connection's challenge, made with ``key``), then the writer's REPLY."""
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        right = _answer(s, hello, key)
        assert right is not None  # the writer's node proved the secret
        s.sendall(right if proof is None else proof)
        fixed = b""
        while len(fixed) < handshake.REPLY.size:
            chunk = s.recv(handshake.REPLY.size - len(fixed))
            assert chunk, "closed before its reply"
            fixed += chunk
        length = Reply.message_length(fixed)
        return Reply.decode(fixed, s.recv(length) if length else b"")


def _proof_of(endpoint: str, hello: Hello, key: bytes) -> tuple[bytes, Reply]:
    """A real reader's proof on one connection, as an eavesdropper would record it."""
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        proof = _answer(s, hello, key)
        assert proof is not None
        s.sendall(proof)
        fixed = s.recv(handshake.REPLY.size)
        return proof, Reply.decode(fixed[: handshake.REPLY.size], b"")


@needs_fuse
def test_a_replayed_hello_and_proof_are_refused_and_the_stream_is_exact(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    """An eavesdropper (no TLS) records a reader's HELLO and proof and replays both on new
    connections, as is and with its offset changed: the writer's fresh nonce makes the
    recorded proof wrong each time (AUTH_FAILED, generation and offset 0), and the
    stream flowing meanwhile ends exactly."""
    cluster.start_discovery()
    a, b = cluster.node("a"), cluster.node("b")
    edge = new_edge()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * MiB))
    out = tmp_path / "out"
    reader = programs.start(f"exec cat {b.path(edge)} > {out}")
    writer = programs.start(f"exec {SLOWCAT} {src} {a.path(edge)} --chunk 262144 --delay 0.1")
    wait_for(lambda: size(out) >= MiB, 20, "the stream flowing", [reader, writer])
    rec = cluster.edge(edge)
    endpoint, gen = str(rec["writer_endpoint"]), int(rec["generation"])  # type: ignore[call-overload]
    key = auth.data_key(auth.load_secret(str(shared_secret_file())))
    # Recorded: a HELLO for a stale generation (the writer's node answers it and leaves
    # the live connection alone), and its proof.
    recorded = Hello(EdgeId.parse(edge), gen + 7, 0, handshake.FLAG_HMAC, os.urandom(16))
    proof, reply = _proof_of(endpoint, recorded, key)
    assert reply.status is Status.STALE_GENERATION
    for hello in (
        recorded,
        Hello(recorded.edge, gen, 0, recorded.flags, recorded.auth),
        Hello(recorded.edge, gen, size(out), recorded.flags, recorded.auth),
    ):
        got = _handshake(endpoint, hello, proof, key)
        assert got.status is Status.AUTH_FAILED, got
        assert (got.generation, got.offset) == (0, 0)
    assert writer.wait(timeout=60) == 0, writer.stderr.read() if writer.stderr else ""
    assert reader.wait(timeout=60) == 0, reader.stderr.read() if reader.stderr else ""
    assert sha_file(out) == sha_file(src)


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@needs_fuse
@pytest.mark.serial  # each pairing under the flood must take under 3 s
def test_a_slowloris_flood_at_the_data_port_does_not_keep_other_nodes_out(
    cluster: Cluster, programs: Programs
) -> None:
    """A peer without the secret keeps more connections than the handshake cap at a's data
    port, sending nothing and reconnecting as each is cut: readers on b still pair with
    a's writers at once (the flood's oldest connection gives way), a's descriptors stay
    bounded, and the flood runs throughout."""
    cluster.start_discovery()
    a, b = cluster.node("a"), cluster.node("b")
    endpoint = a.ready_line.split("data ")[1].split(",")[0]
    base = descriptors(a.pid)
    with Flood(endpoint, "127.0.0.9", dataplane.MAX_HANDSHAKES + 16) as flood:
        wait_for(
            lambda: descriptors(a.pid) - base >= dataplane.MAX_HANDSHAKES - 8,
            20,
            "the flood filling the handshake cap",
        )
        took = []
        for _ in range(3):
            edge = new_edge()
            reader = programs.start(f"exec head -c 2 {b.path(edge)}")
            time.sleep(0.3)  # the reader waits first
            start = time.monotonic()
            sh(f"echo x > {a.path(edge)}")
            assert reader.communicate(timeout=60)[0] == b"x\n"
            took.append(time.monotonic() - start)
        held = descriptors(a.pid) - base
        assert flood.thread.is_alive() and flood.opened > dataplane.MAX_HANDSHAKES
    print(f"pairing under the flood: {[round(t, 3) for t in took]} s; {held} descriptors")
    assert max(took) < 3.0, took
    assert held <= dataplane.MAX_HANDSHAKES + 20, held


def test_a_flood_at_discovery_does_not_keep_other_clients_out(tmp_path: Path) -> None:
    """A peer keeps more connections than discovery's cap open, sending nothing and
    reconnecting as each is cut: a client from another address still gets its answers on
    fresh connections (the flood's oldest gives way), and discovery's descriptors stay
    bounded by the cap."""
    conf = tmp_path / "discovery.toml"
    conf.write_text("max_connections = 40\nheader_timeout = 1.0\n")
    disc = Discovery(tmp_path, extra=["--config", str(conf)])
    disc.start()
    try:
        endpoint = disc.url.removeprefix("http://")
        base = descriptors(disc.pid)
        with Flood(endpoint, "127.0.0.9", 200) as flood:
            wait_for(lambda: descriptors(disc.pid) - base >= 36, 20, "the flood at the cap")
            answers = []
            for _ in range(10):  # a fresh connection each time
                with httpx.Client(auth=disc.auth, timeout=10) as http:
                    try:
                        answers.append(http.get(disc.url + "/v1/edges").status_code)
                    except httpx.TransportError as exc:
                        answers.append(type(exc).__name__)  # type: ignore[arg-type]
            held = descriptors(disc.pid) - base
            assert flood.thread.is_alive() and flood.opened > 40
        assert answers == [200] * 10, answers
        assert held <= 40 + 30, held  # the cap, and refused ones closing on the next turn
        assert disc.alive()
    finally:
        disc.stop()


@needs_fuse
def test_a_flood_at_a_nodes_metrics_port_does_not_keep_the_scraper_out(
    cluster: Cluster,
) -> None:
    """The metrics port's 64 connections, held by one address that sends nothing and
    reconnects as each is cut: a scrape from another address is still answered."""
    from fractalfs.metrics import MAX_CONNECTIONS

    port = free_port()  # not an ephemeral port another connect may take
    disc = cluster.start_discovery()
    a = cluster.node("a", extra=["--metrics-listen", f"127.0.0.1:{port}"])
    base = descriptors(a.pid)
    # Four flooders from one address: socketserver accepted one connection at a time
    # from a backlog of 5, so one thread connecting in turn could not fill the cap.
    floods = [Flood(f"127.0.0.1:{port}", "127.0.0.9", MAX_CONNECTIONS // 4 + 8) for _ in range(4)]
    with contextlib.ExitStack() as stack:
        for flood in floods:
            stack.enter_context(flood)
        wait_for(
            lambda: descriptors(a.pid) - base >= MAX_CONNECTIONS - 4, 30, "the flood at the cap"
        )
        answers = []
        for _ in range(5):
            try:
                got = httpx.get(f"http://127.0.0.1:{port}/metrics", auth=disc.auth, timeout=10)
                answers.append(got.status_code)
            except httpx.TransportError as exc:
                answers.append(type(exc).__name__)  # type: ignore[arg-type]
        held = descriptors(a.pid) - base
        assert all(f.thread.is_alive() for f in floods)
        assert sum(f.opened for f in floods) > MAX_CONNECTIONS
    assert answers == [200] * 5, answers
    assert held <= MAX_CONNECTIONS + 8, held


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
def test_a_flood_at_discovery_meets_its_cap_before_the_descriptor_limit(tmp_path: Path) -> None:
    """Discovery started where it may open only 1,024 descriptors (a shell's usual limit),
    flooded from one address with more: it serves fewer connections than its descriptors
    at once, so the flood meets the fair cap, never EMFILE (asyncio then stopped accepting
    anyone for a second at a time and logged each failure), another client is answered,
    and refusing a connection logs no traceback (one line per 10 s)."""
    disc = Discovery(tmp_path, prefix=["prlimit", "--nofile=1024:1024"])

    def log() -> str:
        return disc.log.read_text()

    disc.start()
    try:
        endpoint = disc.url.removeprefix("http://")
        with contextlib.ExitStack() as stack:
            floods = [stack.enter_context(Flood(endpoint, "127.0.0.9", 400)) for _ in range(4)]
            wait_for(lambda: sum(f.opened for f in floods) > 1200, 30, "the flood past 1,024")
            time.sleep(1.0)
            answers = []
            for _ in range(5):
                with httpx.Client(auth=disc.auth, timeout=5) as http:
                    try:
                        answers.append(http.get(disc.url + "/v1/edges").status_code)
                    except httpx.TransportError as exc:
                        answers.append(type(exc).__name__)  # type: ignore[arg-type]
            assert all(f.thread.is_alive() for f in floods)
        assert "out of system resource" not in log()
        assert "Traceback" not in log()  # a refused connection's task failed an assertion
        assert answers == [200] * 5, answers
        assert "does not fit the descriptor limit 1024: serving 256 at once" in log()
    finally:
        disc.stop()


@needs_fuse
def test_garbage_at_the_data_port_is_logged_once_per_10_s_not_per_connection(
    cluster: Cluster,
) -> None:
    """500 connections sending garbage: each refused, the daemon serves on, and its log
    gains a line or two, not one per connection (a flood must not fill the disk)."""
    cluster.start_discovery()
    a = cluster.node("a")
    endpoint = a.ready_line.split("data ")[1].split(",")[0]
    host, _, port = endpoint.rpartition(":")
    before = a.log.read_text().count("rejected data connection")
    for _ in range(500):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\n" + b"\0" * handshake.HELLO.size)
            with contextlib.suppress(OSError):
                assert s.recv(64) == b""  # closed unanswered
    lines = a.log.read_text().count("rejected data connection") - before
    assert 1 <= lines <= 2, lines
    assert a.alive()


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_another_user_cannot_fill_the_spill_disk(work: Path) -> None:
    """`nobody` writes a persistent edge nobody reads, far more than the spill filesystem
    (a 48 MiB tmpfs) holds and below its uid_spill_limit: its writes fail with EDQUOT
    once less than spill_min_free (16 MiB) is free, and root's stream still spills."""
    spill = work / "spill-fs"
    spill.mkdir()
    sh(f"mount -t tmpfs -o size=48m,mode=0700 fractalfs-test-spill {spill}")
    try:
        conf = work / "node.toml"
        conf.write_text(f'spill_dir = "{spill}/spill"\nspill_min_free = {16 << 20}\n')
        n = Node(work, "solo", None, extra=["--config", str(conf), "--mode", "persistent"])
        try:
            n.start()
            n.mountpoint.chmod(0o755)
            flood = subprocess.run(
                [*as_uid(65534), "sh", "-c", f"head -c 96M /dev/zero > {n.path(new_edge())}"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert flood.returncode != 0, flood.stderr  # a pipe's EPIPE: the log names EDQUOT
            assert "Disk quota exceeded" in n.log.read_text()
            st = os.statvfs(spill)
            assert st.f_bavail * st.f_frsize >= 8 << 20  # the floor, less one look's worth
            edge = new_edge()
            sh(f"head -c 4M /dev/urandom > {work}/src && cat {work}/src > {n.path(edge)}")
            assert sha_file(Path(n.path(edge))) == sha_file(work / "src")  # root's, spilled
            assert n.alive()
        finally:
            n.stop()
    finally:
        sh(f"umount -l {spill}", check=False)


def _keepalive_get(s: socket.socket, host: str, token: str) -> bytes:
    """One authenticated request on ``s`` (kept open): the status line."""
    s.sendall(
        f"GET /v1/nodes HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {token}\r\n\r\n".encode()
    )
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            return b"closed"
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    return head.split(b"\r\n")[0]


def test_connections_that_proved_the_secret_are_never_pushed_out(tmp_path: Path) -> None:
    """A node holding more of discovery's connections than any flooding address, each of
    them past a request that proved the secret: a flood from 16 addresses at the cap
    pushes out only connections that proved nothing, and the node's all answer on."""
    import base64

    conf = tmp_path / "discovery.toml"
    conf.write_text("max_connections = 40\nheader_timeout = 2.0\n")
    disc = Discovery(tmp_path, extra=["--config", str(conf)])
    disc.start()
    try:
        assert disc.auth is not None
        token = base64.b64encode(":".join(disc.auth).encode()).decode()
        hostport = disc.url.removeprefix("http://")
        host, _, port = hostport.rpartition(":")
        mine = [socket.create_connection((host, int(port)), timeout=10) for _ in range(8)]
        try:
            assert {_keepalive_get(s, hostport, token) for s in mine} == {b"HTTP/1.1 200 OK"}
            with contextlib.ExitStack() as stack:
                floods = [
                    stack.enter_context(Flood(hostport, f"127.0.0.{20 + i}", 4)) for i in range(16)
                ]
                wait_for(lambda: sum(f.opened for f in floods) > 200, 30, "the flood churning")
                assert {_keepalive_get(s, hostport, token) for s in mine} == {b"HTTP/1.1 200 OK"}
        finally:
            for s in mine:
                s.close()
    finally:
        disc.stop()


HOLDS_ELSEWHERE = r"""
import errno, os, sys, time
path, flags, until = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
got = set()
while time.monotonic() < until:
    try:
        os.close(os.open(path, flags))
        got.add("opened")
    except OSError as exc:
        got.add(errno.errorcode[exc.errno])
print(" ".join(sorted(got)))
"""


@needs_fuse
@pytest.mark.serial  # asserts how long a lookup takes
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
@pytest.mark.parametrize("end", ["writer", "reader"])
def test_opening_an_edge_held_on_another_node_does_not_stall_everyones_lookups(
    work: Path, end: str
) -> None:
    """The kernel serialises the LOOKUPs of one directory, and a FIFO open is decided in
    its LOOKUP. An end held on another node is waited for (a killed holder's release may
    be on its way), up to 2 s: that wait must not hold the mount root's lookup lock, or
    `nobody`, opening such an edge in a loop (its name is in any `ps` listing), stalls
    every other user's first open of a new edge on the node for as long as it likes."""
    (work / "disc").mkdir()
    disc = Discovery(work / "disc")
    nodes: list[Node] = []
    try:
        disc.start()
        a, b = nodes = [Node(work, name, disc.url) for name in ("a", "b")]
        for n in nodes:
            n.start()
            n.mountpoint.chmod(0o755)
        edge = new_edge()
        if end == "writer":  # its writer is open on b (and stays so)
            held = subprocess.Popen(
                ["sh", "-c", f"sleep 30 > {b.path(edge)}"], start_new_session=True
            )
            flags = os.O_WRONLY
        else:  # its reader is open on b, waiting for a writer
            held = subprocess.Popen(
                ["sh", "-c", f"cat {b.path(edge)} > /dev/null"], start_new_session=True
            )
            flags = os.O_RDONLY
        try:
            wait_for(
                lambda: bool(
                    httpx.get(f"{disc.url}/v1/edges/{edge}", auth=disc.auth, timeout=5)
                    .json()
                    .get(f"{end}_node")
                ),
                10,
                f"the {end} registered on b",
            )
            attack = [sys.executable, "-c", HOLDS_ELSEWHERE, a.path(edge), str(flags), "6"]
            attacker = subprocess.Popen(
                [*as_uid(65534), *attack],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.5)
            took = []
            for _ in range(8):
                start = time.monotonic()
                os.stat(a.path(new_edge()))  # a name never looked up: the lookup path
                took.append(time.monotonic() - start)
                time.sleep(0.25)
            out, _ = attacker.communicate(timeout=30)
        finally:
            os.killpg(held.pid, 9)
            held.wait()
        assert out.split() == ["EBUSY"], out  # refused as before, after the same grace
        assert max(took) < 1.0, [f"{t:.2f}" for t in took]
        assert a.alive() and b.alive()
    finally:
        for n in reversed(nodes):
            n.stop()
        disc.stop()
    assert not fuse_d_state(work)


HELD_HERE = r"""
import errno, os, sys, time
path, until = sys.argv[1], time.monotonic() + float(sys.argv[2])
if os.fork() == 0:  # opens the edge on FUSE, leaves its file to a child, and exits
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    if os.fork() == 0:
        time.sleep(float(sys.argv[2]) + 5)
        os._exit(0)
    os._exit(0)
os.wait()
got = set()
while time.monotonic() < until:
    try:  # a plain open: a writer FIFO, decided in the LOOKUP
        os.close(os.open(path, os.O_WRONLY))
        got.add("opened")
    except OSError as exc:
        got.add(errno.errorcode[exc.errno])
print(" ".join(sorted(got)))
"""


@needs_fuse
@pytest.mark.serial  # asserts how long a lookup takes
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_reopening_an_edge_whose_holder_exited_does_not_stall_everyones_lookups(
    node: Node,
) -> None:
    """A writer whose program exited while another process (its child) still holds the
    file is an end "being released": a re-run's open waits up to 2 s for it. `nobody`,
    on one node alone, leaves such an end on its own edge and opens it again and again:
    that wait must not be in the LOOKUP (the mount root's lookup lock), or every other
    user's first open of a new edge waits behind it."""
    edge = new_edge()
    attacker = subprocess.Popen(
        [*as_uid(65534), sys.executable, "-c", HELD_HERE, node.path(edge), "6"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its child, holding the file, goes with the group
    )
    time.sleep(1.0)
    took = []
    for _ in range(8):
        start = time.monotonic()
        os.stat(node.path(new_edge()))  # a name never looked up: the lookup path
        took.append(time.monotonic() - start)
        time.sleep(0.25)
    try:
        out, _ = attacker.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(attacker.pid, 9)
    assert out.split() == ["EBUSY"], out
    assert max(took) < 1.0, [f"{t:.2f}" for t in took]
    assert node.alive()


READ_IN_A_THREAD = r"""
import os, sys, threading, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o600)  # O_CREAT: stays on FUSE
threading.Thread(target=os.read, args=(fd, 4096), daemon=True).start()
time.sleep(0.5)  # the thread waits in a FUSE read (no writer)
print("reading", flush=True)
os._exit(0)  # exit_group: the other thread is SIGKILLed, the opener is a zombie
"""


@needs_fuse
def test_a_program_exiting_while_another_thread_reads_an_edge_is_not_left_in_d_state(
    node: Node,
) -> None:
    """The thread that opened an edge exits with its program while another of its
    threads waits in a read (no writer yet): the kernel has SIGKILLed that thread and
    waits, uninterruptibly, for the daemon's answer (pyfuse3 ignores FUSE_INTERRUPT).
    The daemon must see the program is exiting and answer, or the program stays a
    zombie with a thread in D state, unkillable, until a writer comes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", READ_IN_A_THREAD, node.path(new_edge())],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "reading\n"
    try:
        assert proc.wait(timeout=5) == 0
    except subprocess.TimeoutExpired:
        proc.kill()  # in vain while its thread waits for the daemon
        raise AssertionError("the exiting program is stuck: a thread in D state") from None
    assert node.alive()
