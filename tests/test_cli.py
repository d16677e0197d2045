"""What a person sees: one-line errors and exit codes, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fractalfs.edgeid import EdgeId

from .conftest import Cluster, needs_fuse

CMD = [sys.executable, "-m", "fractalfs"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fractalfs: ") and needle in err, err


def test_new_edge_prints_a_fresh_id() -> None:
    a, b = run("new-edge").stdout.strip(), run("new-edge").stdout.strip()
    assert a != b and EdgeId.parse(a).hex == a


def test_mount_errors(tmp_path: Path) -> None:
    one_line_error(run("mount", str(tmp_path / "missing")), "does not exist")
    (tmp_path / "file").write_text("")
    one_line_error(run("mount", str(tmp_path / "file")), "not a directory")
    one_line_error(run("mount", str(tmp_path), "--discovery", "ftp://x"), "discovery URL")
    one_line_error(run("mount", str(tmp_path), "--discovery", "http://127.0.0.1:1"), "unreachable")
    one_line_error(run("mount", str(tmp_path), "--data-listen", "1.2.3.4:x"), "bad port")


@needs_fuse
def test_busy_mountpoint_and_port(cluster: Cluster) -> None:
    disc = cluster.start_discovery()
    node = cluster.node("a")
    one_line_error(run("mount", str(node.mountpoint), "--discovery", disc.url), "busy")
    port = disc.url.rsplit(":", 1)[1]
    one_line_error(run("discovery", "--listen", f"127.0.0.1:{port}"), "cannot start")


def test_status_errors_and_json(cluster: Cluster) -> None:
    one_line_error(run("status", "--discovery", "http://127.0.0.1:1"), "unreachable")
    disc = cluster.start_discovery()
    out = run("status", "--discovery", disc.url, "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == {"edges": []}


def test_status_of_a_discovery_without_edges(cluster: Cluster) -> None:
    disc = cluster.start_discovery()
    out = run("status", "--discovery", disc.url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ID", "STATE", "GEN", "MODE", "WRITER", "ENDPOINT", "READER",
                                  "DELIVERED", "WHY"]  # fmt: skip


def test_bad_input_to_every_command_is_one_line(tmp_path: Path) -> None:
    """Inputs a person gets wrong, none of which may end in a traceback."""
    import http.server
    import threading

    (tmp_path / "file").write_text("root:x:0:0::/root:/bin/sh\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    local = ["--data-listen", "127.0.0.1:0", "--discovery-listen", "127.0.0.1:1"]
    one_line_error(run("new-tls", str(tmp_path / "file" / "tls")), "Not a directory")
    for command in ("status", "watch"):
        one_line_error(run(command, "--discovery", "http://[::"), "bad discovery URL")
    one_line_error(run("mount", str(mnt), "--discovery", "http://[::"), "bad discovery URL")
    one_line_error(run("mount", str(mnt), *local, "--metrics-listen", "x:y"), "bad port")
    one_line_error(run("mount", str(mnt), *local, "--node", "a b/c"), "node name")
    state = ["--state-dir", str(tmp_path / "file" / "state")]
    one_line_error(run("mount", str(mnt), *local, *state), "Not a directory")
    one_line_error(run("discovery", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "file")),
                   "not a database")  # fmt: skip
    # Something that answers HTTP but is no discovery server.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        one_line_error(run("watch", "--discovery", url), "404")
        one_line_error(run("status", "--discovery", url), "404")
    finally:
        server.shutdown()
