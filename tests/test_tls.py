"""TLS as an option (``--tls-dir``/``--tls``): mutual TLS on the data plane, HTTPS at
discovery, both verified against the cluster's CA of ``fractalfs new-tls``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fractalfs import tls
from fractalfs.edgeid import EdgeId
from fractalfs.handshake import REPLY, Hello, Reply, Status
from fractalfs.testing import Discovery, Node, free_port, is_mounted, unmount

from .conftest import Cluster, Programs, needs_fuse, new_edge, sh, sha_file

MiB = 1 << 20

CMD = [sys.executable, "-m", "fractalfs"]


def new_tls(directory: Path) -> Path:
    done = subprocess.run([*CMD, "new-tls", str(directory)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return directory


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=60, env=env)


def test_new_tls_makes_private_files_and_unsafe_ones_are_refused(tmp_path: Path) -> None:
    d = new_tls(tmp_path / "tls")
    for name in ("ca.pem", "cert.pem", "key.pem"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600
    assert not (d / "ca.key").exists()  # nothing else can be signed
    again = run("new-tls", str(d))
    assert again.returncode == 2 and "exists" in again.stderr
    loaded = tls.load(str(d))  # the contexts build: the chain verifies
    assert loaded.data_server.verify_mode is ssl.CERT_REQUIRED

    missing = run("discovery", "--listen", "127.0.0.1:0", "--tls-dir", str(tmp_path / "none"))
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.count("\n") == 1 and "new-tls" in missing.stderr
    os.chmod(d / "key.pem", 0o644)
    for args in (
        ["discovery", "--listen", "127.0.0.1:0", "--tls", str(d)],
        ["mount", str(tmp_path / "mnt"), "--tls-dir", str(d), "--state-dir", str(tmp_path)],
        ["status", "--discovery", "https://127.0.0.1:1", "--tls-dir", str(d)],
    ):
        (tmp_path / "mnt").mkdir(exist_ok=True)
        unsafe = run(*args)
        assert unsafe.returncode == 2, (args, unsafe.stderr)
        assert unsafe.stderr.count("\n") == 1 and "chmod 600" in unsafe.stderr, unsafe.stderr


def test_tls_files_another_user_owns_are_refused(tmp_path: Path) -> None:
    """Another user who owns ca.pem (or the key) could swap in their own CA and certify
    their own peers: every program refuses such a directory, one line, exit 2."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    d = new_tls(tmp_path / "tls")
    os.chown(d / "ca.pem", 65534, 65534)
    with pytest.raises(tls.TlsError, match="owned by uid 65534"):
        tls.load(str(d))
    refused = run("status", "--discovery", "https://127.0.0.1:1", "--tls-dir", str(d))
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1 and "owned by uid 65534" in refused.stderr


def test_discovery_over_https_with_the_cli_and_a_wrong_ca_is_refused(tmp_path: Path) -> None:
    d = new_tls(tmp_path / "tls")
    other = new_tls(tmp_path / "other")
    disc = Discovery(tmp_path / "disc", extra=["--tls-dir", str(d)])
    disc.start()
    try:
        assert disc.url.startswith("https://127.0.0.1:")
        ok = run("status", "--discovery", disc.url, "--tls-dir", str(d))
        assert ok.returncode == 0 and ok.stdout.startswith("ID"), ok.stderr
        env = {**os.environ, "FRACTALFS_TLS_DIR": str(d)}
        assert run("status", "--json", "--discovery", disc.url, env=env).returncode == 0
        for refused in (
            run("status", "--discovery", disc.url, "--tls-dir", str(other)),  # another CA
            run("status", "--discovery", disc.url),  # the system's CAs
        ):
            assert refused.returncode == 1, refused.stderr
            assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr, refused.stderr
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port
            httpx.get(disc.url.replace("https", "http") + "/v1/health", timeout=5)
        verified = httpx.get(disc.url + "/v1/health", verify=tls.load(str(d)).client)
        assert verified.status_code == 200
    finally:
        disc.stop()


def _tls_answer(endpoint: str, ctx: ssl.SSLContext, data: bytes) -> bytes:
    """What the data port answers ``data`` over TLS with ``ctx`` (b"": refused)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10)) as s:
            s.sendall(data)
            return s.recv(4096)
    except (ssl.SSLError, ConnectionError):
        return b""


@needs_fuse
def test_a_stream_over_tls_is_exact_and_plain_or_foreign_peers_are_refused(
    tmp_path: Path, programs: Programs, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = new_tls(tmp_path / "tls")
    other = new_tls(tmp_path / "other")
    monkeypatch.setenv("FRACTALFS_TLS_DIR", str(d))  # the daemons and the CLI
    disc = Discovery(tmp_path / "disc")
    nodes: list[Node] = []
    try:
        disc.start()
        assert disc.url.startswith("https://")
        for name in ("a", "b"):
            node = Node(tmp_path, name, disc.url, extra=["--mode", "transient"])
            nodes.append(node)
            node.start()
        a, b = nodes
        edge = new_edge()
        src, out = tmp_path / "src", tmp_path / "out"
        sh(f"head -c 24M /dev/urandom > {src}")
        reader = programs.start(f"cat {b.path(edge)} > {out}")
        slowcat = Path(__file__).with_name("slowcat.py")
        writer = programs.start(
            f"{sys.executable} {slowcat} {src} {a.path(edge)} --chunk 1048576 --delay 0.15"
        )
        endpoint = a.ready_line.split("data ")[1].split(",")[0]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = run("status", "--discovery", disc.url)  # over https, CA from the env
            assert status.returncode == 0, status.stderr
            if "streaming" in status.stdout:
                break
            time.sleep(0.1)
        assert "streaming" in status.stdout, status.stdout
        # A plain-TCP peer (a HELLO in the clear): no reply, the connection just ends.
        host, _, port = endpoint.rpartition(":")
        hello = Hello(EdgeId.parse(edge), 1, 0).encode()
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(hello)
            try:
                got = s.recv(4096)
            except ConnectionResetError:
                got = b""
            assert not got.startswith(b"\x05") and b"FRFS" not in got  # TLS alert at most
        # A TLS peer of another cluster's CA, or of this CA without a client certificate:
        # the handshake fails, or the writer's node hangs up without a word.
        no_cert = ssl.create_default_context(cafile=str(d / "ca.pem"))
        no_cert.check_hostname = False
        for ctx in (tls.load(str(other)).client, no_cert):
            assert _tls_answer(endpoint, ctx, hello) == b""
        # The cluster's own certificate gets through TLS to the HMAC HELLO, which still
        # refuses a HELLO without proof of the secret (and names no generation).
        reply = Reply.decode(
            _tls_answer(endpoint, tls.load(str(d)).client, hello)[: REPLY.size], b""
        )
        assert reply.status is Status.AUTH_REQUIRED and reply.generation == 0
        assert writer.wait(timeout=90) == 0
        assert reader.wait(timeout=90) == 0
        assert sha_file(out) == sha_file(src)
        log = a.log.read_text()
        assert "rejected data connection" not in log or "AUTH" not in log
    finally:
        for node in reversed(nodes):
            node.stop()
        disc.stop()


@needs_fuse
def test_embedded_discovery_over_https_with_status_and_watch(
    tmp_path: Path, programs: Programs
) -> None:
    d = new_tls(tmp_path / "tls")
    node = Node(tmp_path, "e", None, extra=["--tls", str(d)])
    try:
        node.start()
        assert node.discovery_url.startswith("https://127.0.0.1:"), node.ready_line
        watch = programs.start(
            f"exec {' '.join(CMD)} watch --discovery {node.discovery_url} --tls-dir {d}"
        )
        time.sleep(2.5)  # subscribed before the edge's first event (a loaded machine)
        edge = new_edge()
        reader = programs.start(f"cat {node.path(edge)}")
        sh(f"echo over-https > {node.path(edge)}")
        out, _ = reader.communicate(timeout=20)
        assert out == b"over-https\n"
        status = run("status", "--discovery", node.discovery_url, "--tls-dir", str(d))
        assert status.returncode == 0 and edge in status.stdout, status.stderr
        time.sleep(1.5)
        watch.send_signal(signal.SIGINT)
        events, errors = watch.communicate(timeout=10)
        assert f"{edge} writer registered".encode() in events, (events, errors)
        assert b"reconnecting" not in errors, errors
    finally:
        node.stop()


def test_tls_and_the_hello_share_one_handshake_deadline(tmp_path: Path) -> None:
    """A peer that takes its time over the TLS handshake and then sends no HELLO holds a
    handshake slot HANDSHAKE_TIMEOUT (5 s) from its connect, not that twice over."""
    d = new_tls(tmp_path / "tls")
    node = Node(tmp_path, "e", None, extra=["--tls", str(d)])
    try:
        node.start()
        endpoint = node.ready_line.split("data ")[1].split(",")[0]
        host, _, port = endpoint.rpartition(":")
        ctx = tls.load(str(d)).client  # the cluster's own certificate: TLS succeeds
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            started = time.monotonic()
            time.sleep(3.5)  # a slow ClientHello
            with ctx.wrap_socket(raw, server_hostname="fractalfs") as conn:
                with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                    assert conn.recv(1) == b""  # then silence: the node hangs up
                took = time.monotonic() - started
        assert took < 6.5, f"closed {took:.1f} s after connecting"
    finally:
        node.stop()


def test_with_tls_a_nodes_metrics_are_https(tmp_path: Path) -> None:
    """A scrape sends the cluster secret itself (HTTP Basic): over plain HTTP anyone on the
    path would read it, though TLS was turned on to keep such an attacker out."""
    d = new_tls(tmp_path / "tls")
    port = free_port()  # not an ephemeral port another connect may take
    extra = ["--tls", str(d), "--metrics-listen", f"127.0.0.1:{port}"]
    node = Node(tmp_path, "m", None, extra=extra)
    try:
        node.start()
        url = f"127.0.0.1:{port}/metrics"
        auth = ("prometheus", Path(node.secret_file).read_text().strip())
        ca = tls.load(str(d)).client
        got = httpx.get(f"https://{url}", auth=auth, verify=ca, timeout=10)
        assert got.status_code == 200 and "fractalfs_open_edges" in got.text
        assert httpx.get(f"https://{url}", verify=ca, timeout=10).status_code == 401
        with pytest.raises(httpx.HTTPError):  # plain HTTP: no answer, nothing sent in clear
            httpx.get(f"http://{url}", auth=auth, timeout=10)
        with socket.create_connection(("127.0.0.1", port)) as silent:  # no ClientHello
            silent.settimeout(60)
            started = time.monotonic()
            assert silent.recv(1) == b""
            assert time.monotonic() - started < 30
        assert httpx.get(f"https://{url}", auth=auth, verify=ca, timeout=10).status_code == 200
    finally:
        node.stop()


def test_tls_conn_streams_exactly_while_the_other_side_talks_back(tmp_path: Path) -> None:
    """The data plane's use of one TLS connection: the writer's side sends batches of
    header + payload views while a second task receives ACKs; every byte in order."""
    import hashlib
    import random

    import trio

    from fractalfs import dataplane

    ctx = tls.load(str(new_tls(tmp_path / "tls")))
    rng = random.Random(7)
    batches = [rng.randbytes(rng.choice([1, 100, 16_384, 65_536, 1 << 20])) for _ in range(60)]
    want = hashlib.sha256(b"".join(batches)).hexdigest()

    async def main() -> tuple[str, int]:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        acks = 0

        async def writer_side() -> None:
            nonlocal acks
            sock, _ = await listener.accept()
            with sock:
                conn = tls.TlsConn(sock, ctx.data_server, server=True)
                await conn.handshake()
                async with trio.open_nursery() as nursery:

                    async def controls() -> None:
                        nonlocal acks
                        while await dataplane.recv_exact(conn, 9):
                            acks += 1

                    nursery.start_soon(controls)
                    for batch in batches:
                        view = memoryview(batch)
                        await dataplane.send_all(conn, [b"", view[:7], view[7:]])
                    await trio.sleep(0.2)
                    nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer_side)
            sock = trio.socket.socket()
            await sock.connect(listener.getsockname())
            conn = tls.TlsConn(sock, ctx.client, server=False)
            await conn.handshake()
            h = hashlib.sha256()
            total, size = 0, sum(map(len, batches))
            while total < size:
                data = await conn.recv(1 << 20)
                assert data
                h.update(data)
                total += len(data)
                await dataplane.send_all(conn, [b"A" * 9])  # an ACK per receive
            try:
                tail = await conn.recv(10)  # EOF once the writer's side hangs up
            except ConnectionResetError:
                tail = b""  # or a reset, if it closed with an ACK unread
            assert tail == b""
            sock.close()
        return h.hexdigest(), acks

    got, acks = trio.run(main)
    assert got == want and acks > 0


@needs_fuse
def test_over_tls_a_killed_writer_is_rerun_on_another_node_exactly_once(
    cluster: Cluster, programs: Programs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay path (a new data connection to another node, verified prefix) over TLS."""
    monkeypatch.setenv("FRACTALFS_TLS_DIR", str(new_tls(tmp_path / "tls")))
    assert cluster.start_discovery().url.startswith("https://")
    a, b, c = (cluster.node(n, extra=["--writer-lost-timeout", "20"]) for n in "abc")
    src, out = tmp_path / "src", tmp_path / "out"
    src.write_bytes(os.urandom(12 * MiB + 333))
    edge = new_edge()
    reader = programs.start(f"cat {c.path(edge)} > {out}")
    slowcat = Path(__file__).with_name("slowcat.py")
    writer = programs.start(
        f"exec {sys.executable} {slowcat} {src} {a.path(edge)} --pause-after {5 * MiB}"
    )
    assert writer.stdout is not None and writer.stdout.readline() == b"paused\n"
    deadline = time.monotonic() + 10
    while (out.stat().st_size if out.exists() else 0) < 5 * MiB:
        assert time.monotonic() < deadline, "5 MiB not delivered"
        time.sleep(0.05)
    os.killpg(writer.pid, signal.SIGKILL)
    time.sleep(1.0)
    assert reader.poll() is None and out.stat().st_size == 5 * MiB
    sh(f"cat {src} > {b.path(edge)}")  # the re-run, on another node
    reader.communicate(timeout=30)
    assert reader.returncode == 0
    assert sha_file(out) == sha_file(src)
    assert "replay of 5242880 bytes verified" in c.log.read_text()


def test_a_flood_of_unfinished_tls_handshakes_at_discovery_meets_its_cap(
    tmp_path: Path,
) -> None:
    """Discovery over HTTPS, flooded from one address by connections that never send a
    ClientHello (more than its 40 connections, reopened as each is cut): they count
    against its cap from accept, as plain HTTP ones do, so its descriptors stay bounded
    and a client from another address is answered (aiohttp sees a connection only once
    its TLS handshake is done; asyncio's own handshake timeout is 60 s)."""
    from fractalfs.testing import Flood

    from .test_attacks import descriptors

    d = new_tls(tmp_path / "tls")
    conf = tmp_path / "discovery.toml"
    conf.write_text("max_connections = 40\nheader_timeout = 1.0\n")
    disc = Discovery(tmp_path / "disc", extra=["--tls-dir", str(d), "--config", str(conf)])
    disc.start()
    try:
        ctx = tls.load(str(d)).client
        endpoint = disc.url.removeprefix("https://")
        base = descriptors(disc.pid)
        with Flood(endpoint, "127.0.0.9", 200) as flood:
            time.sleep(3.0)  # past header_timeout: a flood connection lives no longer
            answers: list[int | str] = []
            for _ in range(5):  # a fresh connection each time
                with httpx.Client(auth=disc.auth, timeout=10, verify=ctx) as http:
                    try:
                        answers.append(http.get(disc.url + "/v1/edges").status_code)
                    except httpx.TransportError as exc:
                        answers.append(type(exc).__name__)
            # Refused connections close on discovery's next turn: on a loaded machine a
            # few more wait for it at any one look (71 once at load ~130). The least of
            # five looks over a second: without the cap it is the whole flood (~200).
            looks = []
            for _ in range(5):
                looks.append(descriptors(disc.pid) - base)
                time.sleep(0.2)
            held = min(looks)
            assert flood.thread.is_alive() and flood.opened > 40
        assert answers == [200] * 5, answers
        assert held <= 40 + 30, held  # the cap, and refused ones closing on the next turn
        assert disc.alive()
    finally:
        disc.stop()


def test_with_tls_a_plain_http_discovery_url_is_refused(tmp_path: Path) -> None:
    """With --tls-dir nothing sends a password over plain HTTP: a node, `status` and
    `watch` given an http:// discovery URL (a slip, or one of several replicas) refuse it
    in one line, exit 2, before any request (a plain discovery listens there and would
    otherwise get a node's key or the operator's, in the clear)."""
    d = new_tls(tmp_path / "tls")
    plain = Discovery(tmp_path / "plain")
    plain.start()
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        urls = f"https://127.0.0.1:9,{plain.url}"
        proc = subprocess.Popen(
            [*CMD, "mount", str(mnt), "--discovery", urls, "--tls-dir", str(d), "--node", "n",
             "--data-listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
             "--secret-file", plain.secret_file],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:  # it mounted: stop it as a node is stopped
                proc.terminate()
                proc.communicate(timeout=30)
            if is_mounted(mnt):
                unmount(mnt)
        assert proc.returncode == 2, err
        assert err == f"fractalfs: {plain.url}: with --tls-dir, discovery URLs are https://\n"
        for cmd in ("status", "watch"):
            got = run(cmd, "--discovery", plain.url, "--tls-dir", str(d))
            assert got.returncode == 2, got.stderr
            assert got.stderr.count("\n") == 1 and "https://" in got.stderr
        events = httpx.get(f"{plain.url}/v1/events", auth=plain.auth, timeout=5).json()
        assert not any(e.get("node") == "n" for e in events["events"])  # never heard of n
    finally:
        plain.stop()
