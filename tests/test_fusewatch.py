"""The daemon's loop never stays blocked in a read of ``/dev/fuse`` with nothing to read.

pyfuse3 waits for ``/dev/fuse`` to be readable, then reads it with a blocking ``read``. A
request can leave the kernel's queue in between: a FUSE_INTERRUPT (queued when a program
blocked in a request gets a signal) is dropped when that request is answered, and a
request not yet read is dropped when its program is killed. If the loop answered the
interrupted request after it saw the device readable (a busy loop runs the answer and the
read in one batch), its read blocks until some other program makes a request: no data
plane byte, no heartbeat, no keeper ping meanwhile. ``fractalfs.fusewatch`` interrupts
such a read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fractalfs import fusewatch, testhooks
from fractalfs.testing import Node

from .conftest import Cluster, in_fuse_request, new_edge, wait_for


def _fuse_fds(pid: int) -> set[int]:
    fds = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                fds.add(int(fd))
        except OSError:
            continue
    return fds


def _stuck_for(pid: int, fds: set[int], seconds: float) -> bool:
    """The daemon's loop thread sat in a read of /dev/fuse for ``seconds`` on end."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            text = Path(f"/proc/{pid}/task/{pid}/syscall").read_text()
        except OSError:
            return False
        if not fusewatch.reading(text, fds):
            return False
        time.sleep(0.05)
    return True


def test_reading_parses_the_syscall_file() -> None:
    assert fusewatch.reading("0 0x5 0x7f00 0x101000 0x0 0x0 0x0 0x7ffc 0x7f01\n", {5})
    assert not fusewatch.reading("0 0x6 0x7f00 0x101000 0x0 0x0 0x0 0x7ffc 0x7f01\n", {5})
    assert not fusewatch.reading("232 0x5 0x7f00 0x1 0x0 0x0 0x0 0x7ffc 0x7f01\n", {5})
    assert not fusewatch.reading("running\n", {5})
    assert not fusewatch.reading("-1 0x7ffc 0x7f01\n", {5})
    assert not fusewatch.reading("", {5})


def test_a_request_dropped_after_the_loop_saw_it_does_not_block_the_loop(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program's LOOKUP reaches /dev/fuse while the loop is held; the loop passes one
    checkpoint (it sees the device readable: pyfuse3's reader is due in the next batch) and
    is held again, in that batch; the program is SIGKILLed meanwhile, so the kernel drops
    its request. When pyfuse3's reader runs after the hold (one batch in two: trio runs a
    batch in random order), nothing is left to read. The loop must not sit in that read:
    no other program makes a request here, and the loop would serve nothing else."""
    cluster.start_discovery()
    monkeypatch.setenv(testhooks.ENV, "1")
    monkeypatch.setenv(testhooks.BUSY_ENV, "0.6,1.2")
    a = cluster.node("a")
    fds = _fuse_fds(a.pid)
    assert fds
    stuck = sum(_round(a, fds) for _ in range(8))
    assert stuck == 0, f"the loop sat in a read of /dev/fuse {stuck} of 8 times"


def _round(a: Node, fds: set[int]) -> bool:
    """One hold, one killed LOOKUP; True if the loop then sat in a read of /dev/fuse."""
    log = a.log.read_text
    before = log().count("the loop runs again")
    a.signal(signal.SIGUSR2)
    wait_for(lambda: log().count("the loop is busy") > before, 10, "the busy loop")
    # A LOOKUP the loop cannot read yet (a fresh name: not in the kernel's cache).
    stat = subprocess.Popen(["stat", a.path(new_edge())], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: in_fuse_request(stat.pid), 5, "stat waiting for its LOOKUP")
        wait_for(lambda: log().count("busy again") > before, 10, "the second hold")
        stat.kill()
        stat.wait(timeout=10)
    finally:
        if stat.poll() is None:
            stat.kill()
            stat.wait()
    wait_for(lambda: log().count("the loop runs again") > before, 10, "the loop")
    if not _stuck_for(a.pid, fds, 1.5):
        return False
    # Unblock it for the next round (a request from a program).
    subprocess.run(["stat", "-f", str(a.mountpoint)], capture_output=True)
    return True
