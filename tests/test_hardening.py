"""Hostile inputs at discovery, the spill directory and the operator's terminal: each one
used to give a 500, follow a planted link or print raw escape sequences."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fractalfs import spill
from fractalfs.edgeid import EdgeId
from fractalfs.safetext import printable
from fractalfs.testing import Discovery, Node

from .conftest import Cluster, Programs, needs_fuse, new_edge, sh

E = "0123456789abcdef0123456789abcdef"
HUGE = 2**64


@pytest.fixture
def api(disc: Discovery) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=disc.url + "/v1", timeout=20, auth=disc.auth) as client:
        yield client


def bad(resp: httpx.Response) -> None:
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]


def test_integers_past_63_bits_are_400s(api: httpx.Client) -> None:
    api.post(f"/edges/{E}/writer", json={"node": "a", "endpoint": "h:1"}).raise_for_status()
    bad(api.post(f"/edges/{E}/progress", json={"bytes": HUGE}))
    body = {"generation": HUGE, "state": "complete", "bytes": 1}
    bad(api.post(f"/edges/{E}/writer/close", json=body))
    bad(api.post(f"/edges/{E}/writer/close", json={**body, "generation": 1, "bytes": HUGE}))
    bad(api.post(f"/edges/{E}/event", json={"kind": "resumed", "data": {"n": HUGE}}))
    bad(api.post("/nodes/a/heartbeat", json={"writers": {E: HUGE}, "readers": []}))
    bad(api.get("/events/stream", headers={"Last-Event-ID": "9" * 40}))
    bad(api.get("/events/stream", headers={"Last-Event-ID": "x"}))
    assert api.get("/health").status_code == 200  # still serving


def test_deeply_nested_json_is_a_400(api: httpx.Client) -> None:
    deep = b"[" * 50_000 + b"]" * 50_000
    resp = api.post(f"/edges/{E}/writer", content=deep[:60_000])
    assert resp.status_code == 400, resp.text
    resp = api.post(f"/edges/{E}/event", content=b'{"kind":"resumed","data":' + deep[:60_000])
    assert resp.status_code == 400, resp.text


def test_database_is_private(disc: Discovery) -> None:
    assert stat.S_IMODE(os.stat(disc.db).st_mode) == 0o600


def test_status_strips_control_characters(disc: Discovery, api: httpx.Client) -> None:
    evil = "\x1b]0;owned\x07\x1b[2Jnode"
    api.post(f"/edges/{E}/writer", json={"node": evil, "endpoint": "h:1"}).raise_for_status()
    got = subprocess.run(
        [sys.executable, "-m", "fractalfs", "status", "--discovery", disc.url],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "FRACTALFS_SECRET_FILE": str(disc.secret_file)},
        check=True,
    )
    assert "\x1b" not in got.stdout and "\x07" not in got.stdout
    assert "\\x1b]0;owned" in got.stdout


def test_printable_escapes_every_control_character() -> None:
    assert printable("a\x00b\x7f\x9b\u202e") == "a\\x00b\\x7f\\x9b\\u202e"
    assert printable("plain ünïcode") == "plain ünïcode"


def test_a_symlink_planted_in_the_spill_directory_is_not_followed(tmp_path: Path) -> None:
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    edge = EdgeId.new()
    os.symlink(victim, spill.path_for(spill_dir, edge, 1))
    sp = spill.SpillFile.create(spill_dir, edge, 1, 0, direct=False)
    sp.close()
    assert victim.read_text() == "precious"
    assert not spill.path_for(spill_dir, edge, 1).is_symlink()


def test_a_spill_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    spill_dir.chmod(0o777)
    with pytest.raises(OSError, match="writable by others"):
        spill.SpillFile.create(spill_dir, EdgeId.new(), 1, 0, direct=False)
    fresh = tmp_path / "fresh" / "spill"
    spill.SpillFile.create(fresh, EdgeId.new(), 1, 0, direct=False).close()
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700


@pytest.mark.parametrize("unit", ["fractalfs.service", "fractalfs-discovery.service"])
def test_units_raise_the_descriptor_limit(unit: str) -> None:
    text = (Path(__file__).parent.parent / "systemd" / unit).read_text()
    assert "\nLimitNOFILE=65536\n" in text


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "node",
        "endpoint",
        "generation",
        "state",
        "bytes",
        "reason",
        "mode",
        "complete",
        "kind",
        "data",
        "boot",
        "writers",
        "readers",
    ]
)
POSTS = [
    f"/edges/{E}/writer",
    f"/edges/{E}/writer/close",
    f"/edges/{E}/reader",
    f"/edges/{E}/reader/close",
    f"/edges/{E}/progress",
    f"/edges/{E}/mode",
    f"/edges/{E}/writer/restore",
    f"/edges/{E}/event",
    "/nodes/fuzz/heartbeat",
]


def test_fuzzed_bodies_never_get_a_500(api: httpx.Client) -> None:
    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from(POSTS), st.dictionaries(FIELDS, JSON, max_size=6) | JSON)
    def post(path: str, body: object) -> None:
        resp = api.post(path, json=body)
        assert resp.status_code < 500, (path, body, resp.text)
        if resp.status_code >= 400:
            assert resp.json()["error"]

    post()
    assert api.get("/health").status_code == 200


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[Discovery]:
    conf = tmp_path / "discovery.toml"
    conf.write_text("max_connections = 40\nheader_timeout = 1.0\nbody_timeout = 1.0\n")
    d = Discovery(tmp_path, extra=["--config", str(conf)])
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def test_slowloris_heads_and_bodies_are_cut_off(tight: Discovery) -> None:
    head = _connect(tight.url)
    head.sendall(b"GET /v1/edges HTTP/1.1\r\nHost: x\r\n")  # never finished
    body = _connect(tight.url)
    body.sendall(
        f"POST /v1/edges/{E}/progress HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        f"Content-Type: application/json\r\n\r\n{{".encode()
    )
    t0 = time.monotonic()
    assert head.recv(4096) == b""  # closed by the server
    assert time.monotonic() - t0 < 5
    got = body.recv(4096)  # 408 (or 401 first: both end the request)
    assert got.startswith((b"HTTP/1.1 408", b"HTTP/1.1 401")), got
    head.close()
    body.close()
    with httpx.Client(auth=tight.auth) as http:
        assert http.get(tight.url + "/v1/edges").status_code == 200
    assert "Exception in callback _check_head" not in tight.log.read_text()


def test_connection_cap_keeps_descriptors_bounded(tight: Discovery) -> None:
    idle = [_connect(tight.url) for _ in range(100)]
    try:
        time.sleep(0.3)
        fds = len(os.listdir(f"/proc/{tight.pid}/fd"))
        assert fds < 40 + 30, fds  # the cap, plus the server's own descriptors
    finally:
        for s in idle:
            s.close()
    time.sleep(1.5)
    with httpx.Client(auth=tight.auth) as http:
        assert http.get(tight.url + "/v1/edges").status_code == 200


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_fd_exhaustion_leaves_no_ghost_writer(cluster: Cluster, programs: Programs) -> None:
    """A daemon out of descriptors refuses the open with an errno, and discovery does not
    keep a writer 'open' that no program holds."""
    disc = cluster.start_discovery()
    node = Node(
        cluster.workdir,
        "tight",
        disc.url,
        extra=["--mode", "transient"],
        prefix=["prlimit", "--nofile=96:96"],
    )
    cluster.nodes.append(node)
    node.start()
    endpoint = node.ready_line.split("data ")[1].split(",")[0]
    host, port = endpoint.rsplit(":", 1)
    idle = []
    try:
        for _ in range(120):  # idle data connections until the daemon has no descriptor left
            with contextlib.suppress(OSError):
                idle.append(socket.create_connection((host, int(port)), timeout=2))
        time.sleep(0.5)
        edge = new_edge()
        res = sh(f"echo hi > {node.path(edge)}", check=False)
        if res.returncode == 0:  # the open got through: then it must be a normal stream
            reader = sh(f"timeout 20 cat {node.path(edge)}", check=False)
            assert reader.stdout == b"hi\n"
        else:
            deadline = time.monotonic() + 10
            while cluster.edge(edge).get("writer_state") == "open":
                assert time.monotonic() < deadline, cluster.edge(edge)
                time.sleep(0.2)
    finally:
        for s in idle:
            s.close()
    # Descriptors come back once the idle peers time out: the node works again.
    time.sleep(6)
    again = new_edge()
    back = programs.start(f"cat {node.path(again)}")
    sh(f"echo back > {node.path(again)}")
    out, _ = back.communicate(timeout=20)
    assert out == b"back\n"


def test_watch_escapes_control_characters() -> None:
    from fractalfs.watch import describe

    line = describe({"edge": E, "kind": "failed", "data": {"reason": "\x1b[2J\x1b]0;x\x07"}})
    assert "\x1b" not in line and "\x07" not in line and "\\x1b[2J" in line


def test_heartbeat_delta_generations_are_bounded(api: httpx.Client) -> None:
    """A generation in a heartbeat delta is an integer from 0 to 2**63-1, as everywhere."""
    zero = f"{0:032x}"
    for gen in (2**63, 2**64, -1):
        delta = {"reset": True, "base": zero, "digest": zero, "writers": {E: gen}}
        resp = api.post("/nodes/n/heartbeat", json={"boot": "1", "delta": delta})
        assert resp.status_code == 400, (gen, resp.text)
        assert "generation" in resp.json()["error"]


@needs_fuse
def test_a_package_planted_in_the_working_directory_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m`` puts the working directory first on sys.path: a ``fractalfs`` package
    another user planted where root starts the daemon (or runs mount(8)) would run as root
    in the FIFO keepers the daemon starts and in the daemon the mount helper starts."""
    from fractalfs import testing
    from fractalfs.testing import is_mounted, unmount

    tmp_path.chmod(0o755)
    plant = tmp_path / "plant"
    (plant / "fractalfs").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (plant / "fractalfs" / "__init__.py").write_text(
        f"import os\nopen({str(marker)!r}, 'a').write('uid %d\\n' % os.getuid())\n"
    )
    for path in (plant, plant / "fractalfs", plant / "fractalfs" / "__init__.py"):
        os.chown(path, 65534, 65534)  # nobody's
    # The daemon as systemd starts it (its console script), from the planted directory.
    monkeypatch.setattr(testing, "COMMAND", [str(Path(sys.executable).parent / "fractalfs")])
    monkeypatch.chdir(plant)
    node = Node(tmp_path, "planted", None)
    mnt = tmp_path / "mnt-helper"
    try:
        node.start()
        edge = new_edge()
        got = subprocess.run(
            ["bash", "-c", f"cat {node.path(edge)} & echo planted > {node.path(edge)}; wait"],
            capture_output=True,
            timeout=30,
        )
        assert got.stdout == b"planted\n", got.stderr  # through a reader FIFO: keepers ran
        assert not marker.exists(), marker.read_text()
        # The mount helper (run as README says) and the daemon it starts.
        mnt.mkdir()
        opts = "node=helper,data_listen=127.0.0.1:0,discovery_listen=127.0.0.1:0,"
        opts += f"state_dir={tmp_path}/helper-state"
        cmd = [sys.executable, "-P", "-m", "fractalfs.mount_helper", "embedded", str(mnt)]
        helper = subprocess.run(
            [*cmd, "-o", opts],
            env={**os.environ, "FRACTALFS_LOG": str(tmp_path / "helper.log")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert helper.returncode == 0, helper.stderr
        assert is_mounted(mnt)
        assert not marker.exists(), marker.read_text()
    finally:
        node.stop()
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        time.sleep(0.5)
        if is_mounted(mnt):
            unmount(mnt)
    assert not is_mounted(mnt)
