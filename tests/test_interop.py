"""Unmodified programs on an edge across two daemons behave as on a `mkfifo` FIFO.

Early close first: a reader that stops reading the way programs at the head of a shell
pipeline do (SIGPIPE, Ctrl-C, `kill`, a normal close) must stop its writer at once with
EPIPE/SIGPIPE, as a pipe does; a reader that fails (SIGKILL) keeps the stream for a re-run.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fractalfs.testing import Discovery, Node

from .conftest import Programs, fuse_d_state, needs_fuse, new_edge, sh, wait_for

pytestmark = needs_fuse


class Duo:
    """Two daemons in the default (dynamic) mode, as a user runs them."""

    def __init__(self, a: Node, b: Node, workdir: Path) -> None:
        self.a, self.b, self.workdir = a, b, workdir

    def spilled(self) -> int:
        total = 0
        for node in (self.a, self.b):
            for root, _, files in os.walk(node.workdir_spill):  # type: ignore[attr-defined]
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total


@pytest.fixture(scope="module")
def duo(tmp_path_factory: pytest.TempPathFactory, shared_discovery: Discovery) -> Iterator[Duo]:
    workdir = tmp_path_factory.mktemp("interop")
    nodes = []
    try:
        for name in ("a", "b"):
            spill = workdir / f"spill-{name}"
            node = Node(workdir, name, shared_discovery.url, extra=["--spill-dir", str(spill)])
            node.workdir_spill = spill  # type: ignore[attr-defined]
            nodes.append(node)
            node.start()
        yield Duo(nodes[0], nodes[1], workdir)
    finally:
        for node in reversed(nodes):
            node.stop()


@pytest.fixture
def both(duo: Duo) -> Iterator[Duo]:
    if not (duo.a.alive() and duo.b.alive()):
        pytest.fail(f"an interop daemon died in an earlier test; see {duo.a.log}")
    yield duo
    stuck = fuse_d_state()
    assert not stuck, f"processes left in D state: {stuck}"


# -- early close ---------------------------------------------------------------------------

EARLY_ENDINGS = {
    # how the reader ends -> (command for the reader, signal sent to it after 0.5 s)
    "sigpipe": ("cat {r} | head -1", None),
    "close": ("head -c 10 {r}", None),
    "sigint": ("exec cat {r} >/dev/null", signal.SIGINT),
    "sigterm": ("exec cat {r} >/dev/null", signal.SIGTERM),
}


@pytest.mark.parametrize("ending", EARLY_ENDINGS)
def test_a_reader_closing_early_stops_the_writer_at_once(
    both: Duo, programs: Programs, ending: str
) -> None:
    edge = new_edge()
    spilled = both.spilled()
    writer = programs.start(f"exec yes > {both.a.path(edge)}")
    cmd, signum = EARLY_ENDINGS[ending]
    reader = programs.start(cmd.format(r=both.b.path(edge)))
    if signum is not None:
        time.sleep(0.5)
        assert reader.poll() is None
        os.kill(reader.pid, signum)
    reader.communicate(timeout=10)
    t0 = time.monotonic()
    _, err = writer.communicate(timeout=10)
    took = time.monotonic() - t0
    assert writer.returncode == -signal.SIGPIPE, (writer.returncode, err)
    assert took < 1.0, f"the writer ran on for {took:.2f} s"
    assert both.spilled() - spilled < 1 << 20, "the writer spilled instead of stopping"


def test_a_killed_reader_is_a_failure_and_keeps_the_stream(
    both: Duo, programs: Programs, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"".join(b"%d\n" % i for i in range(3_000_000)))  # ~20 MB
    edge = new_edge()
    writer = programs.start(f"exec cat {src} > {both.a.path(edge)}")
    reader = programs.start(f"exec cat {both.b.path(edge)} > {tmp_path / 'part'}")
    wait_for(
        lambda: (tmp_path / "part").exists() and (tmp_path / "part").stat().st_size > 0,
        10,
        "the first bytes",
        [reader],
    )
    os.kill(reader.pid, signal.SIGKILL)
    reader.communicate(timeout=10)
    time.sleep(0.5)
    assert writer.poll() in (None, 0), "a killed reader must not fail its writer"
    got = sh(f"sha256sum < {both.b.path(edge)}", timeout=60).stdout.split()[0].decode()
    assert got == hashlib.sha256(src.read_bytes()).hexdigest()
    writer.communicate(timeout=30)
    assert writer.returncode == 0
