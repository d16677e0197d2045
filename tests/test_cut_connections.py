"""The data plane's hot path under cut connections: two daemons on the default routes
(FIFOs on both sides), a stream in flight at speed, its data connection destroyed again
and again (``ss -K``). Each cut must resume at the reader's offset: sha256 of what the
reader got == the writer's stream, the writer never re-run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fractalfs.testing import operator_auth

from .conftest import Cluster, Programs, needs_fuse, new_edge, sha_file, size, wait_for

pytestmark = [
    needs_fuse,
    pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)"),
]

SLOWCAT = f"{sys.executable} {Path(__file__).with_name('slowcat.py')}"
MiB = 1 << 20


def data_port(ready_line: str) -> int:
    """The data port a daemon announced: "... data 127.0.0.1:PORT, discovery ..."."""
    found = re.search(r"data [^ ]*:(\d+),", ready_line)
    assert found, ready_line
    return int(found.group(1))


def destroy_connections(port: int) -> int:
    """Destroys the established TCP connections whose local port is ``port`` (the writer's
    daemon's accepted data connections); how many there were."""
    got = subprocess.run(
        ["ss", "-K", "-H", "-t", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    )
    return len([line for line in got.stdout.splitlines() if line.strip()])


def test_a_data_connection_destroyed_mid_stream_resumes_at_the_readers_offset(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    cluster.start_discovery()
    a = cluster.node("a")
    b = cluster.node("b")
    port = data_port(a.ready_line)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * MiB + 4097))  # not page aligned: the tail too
    edge, out = new_edge(), tmp_path / "out"
    reader = programs.start(f"exec cat {b.path(edge)} > {out}")
    # Paced (about 40 MiB/s in 1 MiB writes) so that the stream is in flight for the cuts.
    writer = programs.start(f"exec {SLOWCAT} {src} {a.path(edge)} --chunk {MiB} --delay 0.025")
    cuts = 0
    wait_for(lambda: size(out) >= 4 * MiB, 20, "4 MiB delivered", [reader, writer])
    while writer.poll() is None and size(out) < 56 * MiB:
        cuts += 1 if destroy_connections(port) else 0
        time.sleep(0.15)
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    _, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert cuts >= 3, f"only {cuts} connections were cut: the test proved nothing"
    assert sha_file(out) == sha_file(src)  # nothing lost, nothing twice
    got = httpx.get(f"{a.discovery_url}/v1/events", params={"after": 0}, auth=operator_auth())
    events = got.raise_for_status().json()["events"]
    resumes = [e["data"] for e in events if e["edge"] == edge and e["kind"] == "resumed"]
    assert len(resumes) >= 3, f"{cuts} cuts, {len(resumes)} resumes recorded"
    assert all(r["how"] == "reconnect" and r["generation"] == 1 for r in resumes)
