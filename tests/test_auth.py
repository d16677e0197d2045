"""The cluster secret: discovery refuses whoever cannot prove it, a node may act only as
itself, and the data port serves no stream to a peer without the secret."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fractalfs import auth, dataplane, handshake
from fractalfs.edgeid import EdgeId
from fractalfs.handshake import HELLO, REPLY, Hello, Reply, Status
from fractalfs.testing import Discovery, Node, shared_secret_file

from .conftest import Cluster, Programs, needs_fuse, new_edge, sh, sha_file

E = "0123456789abcdef0123456789abcdef"
CMD = [sys.executable, "-m", "fractalfs"]
ROUTES = [
    ("GET", "/"),
    ("GET", "/metrics"),
    ("GET", "/v1/edges"),
    ("GET", f"/v1/edges/{E}"),
    ("DELETE", f"/v1/edges/{E}"),
    ("POST", f"/v1/edges/{E}/writer"),
    ("POST", f"/v1/edges/{E}/writer/close"),
    ("POST", f"/v1/edges/{E}/writer/gone"),
    ("POST", f"/v1/edges/{E}/reader"),
    ("POST", f"/v1/edges/{E}/reader/close"),
    ("POST", f"/v1/edges/{E}/progress"),
    ("POST", f"/v1/edges/{E}/mode"),
    ("POST", f"/v1/edges/{E}/writer/restore"),
    ("POST", f"/v1/edges/{E}/event"),
    ("GET", "/v1/events"),
    ("GET", "/v1/events/stream"),
    ("GET", "/v1/nodes"),
    ("POST", "/v1/nodes/a/heartbeat"),
    ("POST", "/v1/nodes/a/leave"),
    ("POST", "/v1/nodes/a/pulse"),
]


def secret() -> bytes:
    return auth.load_secret(str(shared_secret_file()))


def as_node(name: str) -> tuple[str, str]:
    return auth.node_credentials(secret(), name)


def test_every_route_but_health_needs_the_secret(disc: Discovery) -> None:
    wrong = ("fractalfs", "not-the-secret-at-all")
    forged = auth.node_credentials(b"another-cluster-secret", "a")
    with httpx.Client(base_url=disc.url, timeout=10) as http:
        for method, path in ROUTES:
            for creds in (None, wrong, forged):
                resp = http.request(method, path, json={"node": "a"}, auth=creds)
                assert resp.status_code == 401, (method, path, creds, resp.text)
                assert resp.headers["WWW-Authenticate"].startswith("Basic")
                assert "secret" in resp.json()["error"]
        # Health is open, but how much the cluster does (the event log's head) is not.
        for creds in (None, wrong, forged):
            assert http.get("/v1/health", auth=creds).json() == {"ok": True}
        assert "last_event" in http.get("/v1/health", auth=disc.auth).json()
        assert "last_event" in http.get("/v1/health", auth=as_node("a")).json()
        assert http.get("/v1/edges", auth=disc.auth).status_code == 200
        assert http.get("/", auth=disc.auth).status_code == 200
        assert http.get("/v1/edges", auth=as_node("x")).status_code == 200


def test_a_peer_without_the_secret_cannot_keep_a_silent_node_alive(disc: Discovery) -> None:
    """Any request a node makes with its name in X-Fractalfs-Node counts as a sign of its
    life. /v1/health needs no secret: a peer without it must not be able to keep a dead
    node from being declared lost (its streams would never be re-run)."""
    hb = {"boot": "1", "writers": {}, "readers": []}
    with httpx.Client(base_url=disc.url + "/v1", timeout=10) as http:
        assert http.post("/nodes/a/heartbeat", json=hb, auth=as_node("a")).status_code == 200
        # a dies; the attacker sends its name on open (and refused) requests meanwhile.
        spoof = {"X-Fractalfs-Node": "a"}
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            assert http.get("/health", headers=spoof).status_code == 200
            assert http.get("/edges", headers=spoof).status_code == 401
            assert http.get("/edges", headers=spoof, auth=as_node("b")).status_code == 200
            time.sleep(0.2)
        nodes = {n["node"]: n for n in http.get("/nodes", auth=disc.auth).json()["nodes"]}
        assert not nodes["a"]["alive"], nodes
        # a's own signs of life still count: it is back.
        assert http.post("/nodes/a/heartbeat", json=hb, auth=as_node("a")).status_code == 200
        nodes = {n["node"]: n for n in http.get("/nodes", auth=disc.auth).json()["nodes"]}
        assert nodes["a"]["alive"], nodes


def test_a_node_may_act_only_as_itself(disc: Discovery) -> None:
    a, b = as_node("a"), as_node("b")
    hb = {"boot": "1", "writers": {}, "readers": []}
    with httpx.Client(base_url=disc.url + "/v1", timeout=10) as http:
        assert http.post("/nodes/a/heartbeat", json=hb, auth=a).status_code == 200
        assert http.post("/nodes/b/heartbeat", json=hb, auth=b).status_code == 200
        # Spoofed liveness: a cannot make b look restarted or gone.
        for path in ("/nodes/b/heartbeat", "/nodes/b/leave", "/nodes/b/pulse"):
            resp = http.post(path, json={**hb, "boot": "2"}, auth=a)
            assert resp.status_code == 403 and "may not act as node b" in resp.json()["error"]
        nodes = http.get("/nodes", auth=a).json()["nodes"]
        assert all(n["alive"] for n in nodes)
        # Registrations name their node; only that node may make them.
        w = {"node": "b", "endpoint": "h:1"}
        assert http.post(f"/edges/{E}/writer", json=w, auth=a).status_code == 403
        assert http.post(f"/edges/{E}/writer", json=w, auth=b).status_code == 200
        assert http.post(f"/edges/{E}/reader", json={"node": "b"}, auth=a).status_code == 403
        assert http.post(f"/edges/{E}/reader", json={"node": "a"}, auth=a).status_code == 200
        # Fencing b's writer off or closing it: only b; progress: only the reader a.
        close = {"generation": 1, "state": "complete", "bytes": 0}
        resp = http.post(f"/edges/{E}/writer/close", json=close, auth=a)
        assert resp.status_code == 403 and "not the writer" in resp.json()["error"]
        mode = {"generation": 1, "mode": "persistent", "reason": "x"}
        assert http.post(f"/edges/{E}/mode", json=mode, auth=a).status_code == 403
        assert http.post(f"/edges/{E}/progress", json={"bytes": 1}, auth=b).status_code == 403
        assert http.post(f"/edges/{E}/progress", json={"bytes": 1}, auth=a).status_code == 200
        assert http.post(f"/edges/{E}/mode", json=mode, auth=b).status_code == 200
        # Failing a generation as its reader that lacks the END: only in its own name.
        gone = {"node": "a", "generation": 1}
        assert http.post(f"/edges/{E}/writer/gone", json=gone, auth=b).status_code == 403
        # ... and only as the edge's reader (b is its writer).
        resp = http.post(f"/edges/{E}/writer/gone", json={**gone, "node": "b"}, auth=b)
        assert resp.status_code == 403 and "not the reader" in resp.json()["error"]
        assert http.post(f"/edges/{E}/writer/gone", json=gone, auth=a).status_code == 200
        # Registering as the writer of an edge whose writer is open on another node: 409.
        resp = http.post(f"/edges/{E}/writer", json={"node": "a", "endpoint": "h:2"}, auth=a)
        assert resp.status_code == 409 and "open writer on node b" in resp.json()["error"]
        rec = http.get(f"/edges/{E}", auth=a).json()
        assert rec["writer_node"] == "b" and rec["reader_node"] == "a"
        assert rec["writer_state"] == "open" and rec["generation"] == 1
        assert rec["writer_endpoint"] == "h:1"
        # The operator (the secret itself) may do anything.
        assert disc.auth is not None
        assert http.post(f"/edges/{E}/writer/close", json=close, auth=disc.auth).is_success


def test_new_secret_and_unsafe_secret_files(tmp_path: Path) -> None:
    got = subprocess.run([*CMD, "new-secret"], capture_output=True, text=True, check=True)
    assert len(got.stdout.strip()) >= 40
    loose = tmp_path / "loose"
    loose.write_text(got.stdout)
    loose.chmod(0o644)
    for args in (
        ["discovery", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "d.db")],
        ["mount", str(tmp_path), "--discovery", "http://127.0.0.1:1"],
        ["status", "--discovery", "http://127.0.0.1:1"],
    ):
        res = subprocess.run(
            [*CMD, *args, "--secret-file", str(loose)], capture_output=True, text=True, timeout=30
        )
        assert res.returncode == 2, res.stderr
        err = res.stderr.strip().splitlines()
        assert err[-1].startswith("fractalfs: ") and "chmod 600" in err[-1], res.stderr
        assert "Traceback" not in res.stderr


def test_a_secret_file_another_user_owns_is_refused(tmp_path: Path) -> None:
    """Another local user who planted the secret file (in a state dir or a directory they
    can write) knows the cluster's key: the programs refuse a file owned by anyone but
    their own user or root, with one line and exit 2."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    tmp_path.chmod(0o755)
    planted = tmp_path / "secret"
    planted.write_text(auth.new_secret() + "\n")
    planted.chmod(0o600)
    os.chown(planted, 65534, 65534)
    with pytest.raises(auth.SecretError, match="owned by uid 65534"):
        auth.load_secret(str(planted))
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    os.rename(planted, state / "secret")  # a state dir another user made, secret planted
    with pytest.raises(auth.SecretError, match="owned by uid 65534"):
        auth.ensure_secret(str(state / "secret"))
    res = subprocess.run(
        [
            *CMD,
            "status",
            "--discovery",
            "http://127.0.0.1:1",
            "--secret-file",
            str(state / "secret"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("fractalfs: "), res.stderr
    assert "owned by uid 65534" in res.stderr and "Traceback" not in res.stderr


def test_standalone_discovery_without_secret_stays_on_loopback(tmp_path: Path) -> None:
    res = subprocess.run(
        [*CMD, "discovery", "--listen", "0.0.0.0:0", "--db", str(tmp_path / "d.db")],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "FRACTALFS_SECRET_FILE"},
    )
    assert res.returncode == 2 and "--insecure" in res.stderr, res.stderr
    args = [*CMD, "discovery", "--listen", "0.0.0.0:0", "--db", str(tmp_path / "i.db")]
    insecure = subprocess.Popen(
        [*args, "--insecure"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert insecure.stdout is not None and "listening" in insecure.stdout.readline()
    finally:
        insecure.terminate()
        insecure.wait(10)
    local = Discovery(tmp_path / "local", secret_file="")
    local.start()
    try:
        assert httpx.get(local.url + "/v1/edges").status_code == 200
    finally:
        local.stop()


@needs_fuse
def test_make_run_needs_no_setup(tmp_path: Path, programs: Programs) -> None:
    """An embedded discovery without --secret-file creates STATE_DIR/secret (0600) and
    local `fractalfs status` finds it there."""
    node = Node(tmp_path, "solo", None, secret_file="")
    node.start()
    try:
        path = node.state / "secret"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert httpx.get(node.discovery_url + "/v1/edges").status_code == 401
        edge = new_edge()
        reader = programs.start(f"cat {node.path(edge)}")
        sh(f"echo hello > {node.path(edge)}")
        assert reader.wait(timeout=20) == 0
        env = {k: v for k, v in os.environ.items() if k != "FRACTALFS_SECRET_FILE"}
        status = [*CMD, "status", "--discovery", node.discovery_url]
        res = subprocess.run(status, capture_output=True, text=True, env=env, timeout=30)
        assert res.returncode == 1 and "--secret-file" in res.stderr, res.stderr
        env["FRACTALFS_STATE_DIR"] = str(node.state)
        res = subprocess.run(status, capture_output=True, text=True, env=env, timeout=30)
        assert res.returncode == 0 and edge in res.stdout, res.stderr
    finally:
        node.stop()


# -- the data port ------------------------------------------------------------------------


def exchange(endpoint: str, data: bytes) -> bytes:
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        got = b""
        while len(got) < REPLY.size:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


@needs_fuse
def test_forged_hellos_are_refused_and_the_real_stream_completes(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    cluster.start_discovery()
    a, b = cluster.node("a"), cluster.node("b")
    edge = new_edge()
    src = tmp_path / "src"
    sh(f"head -c 24M /dev/urandom > {src}")
    out = tmp_path / "out"
    reader = programs.start(f"cat {b.path(edge)} > {out}")
    slowcat = Path(__file__).with_name("slowcat.py")
    # Held after 4 MiB until the forged hellos were tried: paced alone (3.6 s), the stream
    # was delivered before a loaded `status` poll saw it streaming (a failed make test).
    go = tmp_path / "go"
    writer = programs.start(
        f"{sys.executable} {slowcat} {src} {a.path(edge)} --chunk 1048576 --delay 0.15"
        f" --hold-after {4 << 20} --until {go}"
    )
    rec: dict[str, object] = {}
    deadline = time.monotonic() + 20
    while rec.get("state") != "streaming" and time.monotonic() < deadline:
        rec = cluster.edge(edge)
        time.sleep(0.05)
    assert rec.get("state") == "streaming", rec
    endpoint, gen = str(rec["writer_endpoint"]), int(rec["generation"])  # type: ignore[call-overload]
    raw = EdgeId.parse(edge)
    v1 = handshake.HELLO.pack(b"FRFS", 1, 0, raw.bytes, gen, 0, 0)
    no_proof = Hello(raw, gen, 0).encode()
    for forged in (v1, no_proof):
        reply = Reply.decode(exchange(endpoint, forged)[: REPLY.size], b"")
        assert reply.status is Status.AUTH_REQUIRED
        assert (reply.generation, reply.offset) == (0, 0)
    # A peer with another secret: the writer proves itself first, and learns nothing.
    offer = Hello(raw, gen, 0, handshake.FLAG_HMAC, os.urandom(handshake.NONCE))
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(offer.encode())
        challenge = b""
        while len(challenge) < handshake.CHALLENGE.size:
            challenge += s.recv(handshake.CHALLENGE.size - len(challenge))
        wrong = auth.data_key(b"another-cluster-secret")
        assert handshake.check_challenge(wrong, offer, challenge) is None
        assert handshake.check_challenge(auth.data_key(secret()), offer, challenge)
        s.sendall(os.urandom(handshake.MAC))
        fixed = s.recv(REPLY.size)
        reply = Reply.decode(fixed, b"")
        assert reply.status is Status.AUTH_FAILED and (reply.generation, reply.offset) == (0, 0)
    # Garbage and a half-sent HELLO: the data port keeps serving.
    with pytest.raises(ConnectionError):  # closed at once, nothing revealed
        assert exchange(endpoint, b"GET / HTTP/1.1\r\n\r\n" + b"\0" * HELLO.size) == b""
        raise ConnectionResetError
    go.touch()
    assert writer.wait(timeout=60) == 0
    assert reader.wait(timeout=60) == 0
    assert sha_file(out) == sha_file(src)


@needs_fuse
def test_idle_peers_at_the_data_port_are_capped_and_timed_out(
    cluster: Cluster, programs: Programs
) -> None:
    cluster.start_discovery()
    a, b = cluster.node("a"), cluster.node("b")
    endpoint = a.ready_line.split("data ")[1].split(",")[0]
    host, _, port = endpoint.rpartition(":")
    base = len(os.listdir(f"/proc/{a.pid}/fd"))
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(400)]
    try:
        time.sleep(1.0)
        held = len(os.listdir(f"/proc/{a.pid}/fd")) - base
        assert held <= dataplane.MAX_HANDSHAKES + 10, held
        time.sleep(dataplane.HANDSHAKE_TIMEOUT + 1)
        assert len(os.listdir(f"/proc/{a.pid}/fd")) - base < 20  # all timed out
    finally:
        for s in idle:
            s.close()
    edge = new_edge()
    reader = programs.start(f"cat {b.path(edge)}")
    sh(f"echo still-serving > {a.path(edge)}")
    out, _ = reader.communicate(timeout=20)
    assert out == b"still-serving\n"


def test_a_node_may_not_restore_another_nodes_writer(disc: Discovery) -> None:
    """Restoring a spill re-announces the writer of a generation: only the node that wrote
    it, else any node could take over another's stream (its endpoint, its state)."""
    a, b = as_node("a"), as_node("b")
    with httpx.Client(base_url=disc.url + "/v1", timeout=10) as http:
        w = {"node": "b", "endpoint": "h:1"}
        assert http.post(f"/edges/{E}/writer", json=w, auth=b).status_code == 200
        hijack = {"generation": 1, "node": "a", "endpoint": "evil:1", "complete": True}
        resp = http.post(f"/edges/{E}/writer/restore", json=hijack, auth=a)
        assert resp.status_code == 403 and "not the writer" in resp.json()["error"]
        rec = http.get(f"/edges/{E}", auth=a).json()
        assert rec["writer_node"] == "b" and rec["writer_endpoint"] == "h:1"
        assert rec["writer_state"] == "open"
        # Its own writer's restart: allowed, as before.
        own = {"generation": 1, "node": "b", "endpoint": "h:2", "complete": True}
        assert http.post(f"/edges/{E}/writer/restore", json=own, auth=b).status_code == 200


def test_a_node_without_secret_keeps_its_data_port_on_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like standalone discovery: without a secret the data port would serve any stream to
    any peer (HELLO v1), so a non-loopback data address is refused unless --insecure."""
    import trio

    from fractalfs import mount
    from fractalfs.config import NodeConfig
    from fractalfs.errors import QuietError

    started: list[object] = []
    monkeypatch.setattr(trio, "run", lambda *a, **k: started.append(a))
    monkeypatch.setattr(mount, "freeze_startup_heap", lambda: None)

    def config(listen: str, insecure: bool = False) -> NodeConfig:
        c = NodeConfig(mountpoint=str(tmp_path), discovery_url="http://127.0.0.1:1")
        c.state_dir, c.data_listen, c.insecure = str(tmp_path / "state"), listen, insecure
        return c

    with pytest.raises(QuietError, match="without a cluster secret"):
        mount.run(config("0.0.0.0:7701"))
    assert not started
    mount.run(config("127.0.0.1:0"))
    mount.run(config("0.0.0.0:7701", insecure=True))
    assert len(started) == 2


def test_metrics_on_a_network_address_need_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's metrics name every edge and its byte counts: like the data port, a
    non-loopback metrics address without a cluster secret is refused unless --insecure."""
    import trio

    from fractalfs import mount
    from fractalfs.config import NodeConfig
    from fractalfs.errors import QuietError

    started: list[object] = []
    monkeypatch.setattr(trio, "run", lambda *a, **k: started.append(a))
    monkeypatch.setattr(mount, "freeze_startup_heap", lambda: None)

    def config(metrics: str, insecure: bool = False) -> NodeConfig:
        c = NodeConfig(mountpoint=str(tmp_path), discovery_url="http://127.0.0.1:1")
        c.state_dir, c.data_listen, c.insecure = str(tmp_path / "state"), "127.0.0.1:0", insecure
        c.metrics_listen = metrics
        return c

    with pytest.raises(QuietError, match="refusing to serve metrics"):
        mount.run(config("0.0.0.0:9701"))
    assert not started
    mount.run(config("127.0.0.1:0"))
    mount.run(config("0.0.0.0:9701", insecure=True))
    assert len(started) == 2


def test_a_node_may_not_end_a_writer_no_node_registered(disc: Discovery) -> None:
    """An edge with only a reader has generation 0 and no writer node: no node is its
    writer, so none may close, restore or reconfigure that generation (a forged "complete,
    0 bytes" would end the waiting reader's stream empty)."""
    a, b = as_node("a"), as_node("b")
    with httpx.Client(base_url=disc.url + "/v1", timeout=10) as http:
        assert http.post(f"/edges/{E}/reader", json={"node": "a"}, auth=a).status_code == 200
        close = {"generation": 0, "state": "complete", "bytes": 0}
        resp = http.post(f"/edges/{E}/writer/close", json=close, auth=b)
        assert resp.status_code == 403 and "not the writer" in resp.json()["error"]
        mode = {"generation": 0, "mode": "persistent", "reason": "x"}
        assert http.post(f"/edges/{E}/mode", json=mode, auth=b).status_code == 403
        restore = {"generation": 0, "node": "b", "endpoint": "evil:1", "complete": True}
        assert http.post(f"/edges/{E}/writer/restore", json=restore, auth=b).status_code == 403
        assert http.get(f"/edges/{E}", auth=a).json()["writer_state"] == "none"
        # A writer registers: then it is the writer, as before.
        w = {"node": "b", "endpoint": "h:1"}
        assert http.post(f"/edges/{E}/writer", json=w, auth=b).status_code == 200
        close["generation"] = 1
        assert http.post(f"/edges/{E}/writer/close", json=close, auth=b).status_code == 200


def test_a_nodes_request_that_proved_the_secret_is_not_pushed_out_while_its_body_comes(
    tmp_path: Path,
) -> None:
    """A node's POST whose head proved the secret (HTTP Basic) is no longer in the pool a
    flood can take places from, even while discovery still reads its body (the guard
    reads it to see which node the request names): 8 connections from 8 other addresses
    arriving meanwhile at a cap of 8 took the place of the oldest, the node's, and its
    request was cut."""
    import base64

    conf = tmp_path / "discovery.toml"
    conf.write_text("max_connections = 8\nheader_timeout = 5.0\n")
    disc = Discovery(tmp_path, extra=["--config", str(conf)])
    disc.start()
    flood: list[socket.socket] = []
    try:
        host, _, port = disc.listen.rpartition(":")
        secret = auth.load_secret(str(shared_secret_file()))
        user, password = auth.node_credentials(secret, "n1")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        body = b'{"node": "n1", "endpoint": "127.0.0.1:1"}'
        edge = new_edge()
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                f"POST /v1/edges/{edge}/writer HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Basic {token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            time.sleep(0.5)  # the guard waits for the body
            for i in range(8):
                c = socket.socket()
                c.bind((f"127.0.0.{20 + i}", 0))
                c.connect((host, int(port)))
                flood.append(c)
            time.sleep(0.5)
            s.sendall(body)
            answer = b""
            try:
                while b"\r\n\r\n" not in answer:
                    got = s.recv(4096)
                    if not got:
                        break
                    answer += got
            except ConnectionResetError:
                pass
        assert answer.startswith(b"HTTP/1.1 "), answer
        assert disc.alive()
    finally:
        for c in flood:
            c.close()
        disc.stop()


SQUAT = r"""
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
s.settimeout(30)
got = b""
for _ in range(2):  # status, then watch
    c, _ = s.accept()
    c.settimeout(5)
    try:
        got += c.recv(65536)
    except OSError:
        pass
    c.close()
sys.stdout.write(got.decode(errors="replace"))
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_the_cli_never_sends_the_secret_itself(disc: Discovery, tmp_path: Path) -> None:
    """Over plain HTTP, whoever listens where `fractalfs status` or `watch` connects reads
    its password: `nobody` listening on a loopback port (any user may, where discovery is
    not) must not learn the cluster secret that way. The CLI proves a key derived for the
    operator, which discovery takes as the secret itself."""
    secret = Path(disc.secret_file).read_text().strip()
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    squat = subprocess.Popen(
        [*nobody, "/usr/bin/python3", "-c", SQUAT], stdout=subprocess.PIPE, text=True
    )
    assert squat.stdout is not None
    url = f"http://127.0.0.1:{squat.stdout.readline().strip()}"
    args = ["--discovery", url, "--secret-file", disc.secret_file]
    subprocess.run([*CMD, "status", *args], capture_output=True, timeout=30, check=False)
    watch = subprocess.Popen(
        [*CMD, "watch", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        heard, _ = squat.communicate(timeout=30)
    finally:
        watch.kill()
        watch.wait()
    assert heard.count("Authorization: Basic ") == 2, heard
    for line in heard.splitlines():
        if line.startswith("Authorization: Basic "):
            password = base64.b64decode(line.split()[-1]).decode().partition(":")[2]
            leaked = secret in password  # (not in the assertion: a report would show it)
            assert password and not leaked, "the CLI sent the cluster secret itself"
    # And the real discovery takes what the CLI sends, as it takes the secret itself.
    ok = sh(
        f"{sys.executable} -m fractalfs status --json --discovery {disc.url}"
        f" --secret-file {disc.secret_file}"
    )
    assert b'"edges"' in ok.stdout


def test_the_operator_key_serves_prometheus_and_the_browser(
    disc: Discovery, tmp_path: Path
) -> None:
    """`fractalfs operator-key` prints the password the CLI sends, for whatever else logs
    in as the operator (Prometheus' basic_auth, the status page): discovery takes it as
    it takes the secret, and a scraper configured with it never holds the secret."""
    got = subprocess.run(
        [*CMD, "operator-key", "--secret-file", disc.secret_file],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert got.returncode == 0, got.stderr
    key = got.stdout.strip()
    secret = Path(disc.secret_file).read_text().strip()
    assert len(key) == 64 and key != secret
    for path in ("/metrics", "/v1/edges", "/"):
        assert httpx.get(disc.url + path, auth=("prometheus", key), timeout=5).status_code == 200
    wrong = httpx.get(disc.url + "/metrics", auth=("prometheus", key[:-1] + "0"), timeout=5)
    assert wrong.status_code == 401 or key.endswith("0")
    missing = subprocess.run(
        [*CMD, "operator-key", "--secret-file", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
