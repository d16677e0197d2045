"""How a stream ends when its reader stops early, at the edges of the rules: a reopen that
reaches its FIFO only after the linger's grace ran out, and a reader that closed before
any writer came (README "Early close")."""

from __future__ import annotations

import shlex
import sys

import pytest

from fractalfs import testhooks

from .conftest import Cluster, Programs, needs_fuse, new_edge, sh, wait_for

pytestmark = needs_fuse

# Opens its input, closes it unread, and opens it again 0.1 s later, the second time
# O_NONBLOCK (as gzip does), so that a FIFO without a writer reads EOF at once instead of
# waiting for good; then reads it all.
REOPEN_LATE = (
    "import hashlib, os, sys, time; f = open(sys.argv[1], 'rb'); time.sleep(0.3);"
    " f.close(); time.sleep(0.1); fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK);"
    " os.set_blocking(fd, True); f = os.fdopen(fd, 'rb'); d = f.read();"
    " print(len(d), hashlib.md5(d).hexdigest())"
)
REOPEN_BYTES = 30_000_000


def test_a_reopen_reaching_its_fifo_after_the_grace_reads_the_whole_stream(
    cluster: Cluster, programs: Programs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reopen's LOOKUP gets the lingering FIFO before the 0.5 s grace ran out, but the
    program's open reaches the FIFO only after (a test hook answers that LOOKUP 0.8 s
    late). The grace's end took it for "no more": the write end closed and the program
    read the pipe's bytes, or none, and EOF, exit 0 (a silent truncation), and the writer
    died of SIGPIPE."""
    cluster.start_discovery()
    a = cluster.node("a")
    monkeypatch.setenv(testhooks.ENV, "1")
    monkeypatch.setenv(testhooks.LINGER_LOOKUP_DELAY_ENV, "0.8")
    b = cluster.node("b")
    edge = new_edge()
    writer = programs.start(f"yes abcdefghi | head -c {REOPEN_BYTES} > {a.path(edge)}")
    wait_for(lambda: cluster.edge(edge).get("writer_state") == "open", 10, "the writer")
    reader = programs.start(f"exec {sys.executable} -c {shlex.quote(REOPEN_LATE)} {b.path(edge)}")
    out, err = reader.communicate(timeout=60)
    assert "a lingering FIFO's LOOKUP waits" in b.log.read_text()  # the case
    want = sh(f"yes abcdefghi | head -c {REOPEN_BYTES} | md5sum").stdout.split()[0]
    assert out.split() == [str(REOPEN_BYTES).encode(), want], (out, err)
    _, err = writer.communicate(timeout=20)
    assert writer.returncode == 0, err
