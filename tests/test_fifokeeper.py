"""The keeper's holder scan kills only holders of the daemon's own FIFO inode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fractalfs import fifokeeper, procs

NAME = "0123456789abcdef0123456789abcdef"


def _holder(path: str) -> subprocess.Popen[bytes]:
    """A process holding ``path`` open read-only until told to go."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; f = open(sys.argv[1], 'rb'); print('open', flush=True); sys.stdin.read()",
            path,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"open\n"
    return proc


def test_same_name_and_inode_number_on_another_mount_is_not_killed(tmp_path: Path) -> None:
    """A file elsewhere whose path ends in the edge's name and whose inode number equals
    the FIFO's (another fractalfs mount numbers its inodes alike) is not the FIFO: its
    holder must not be SIGKILLed when a stream fails."""
    victim_path = tmp_path / NAME
    victim_path.write_bytes(b"x")
    ino = os.stat(victim_path).st_ino
    victim = _holder(str(victim_path))
    r, w = os.pipe()  # the daemon's own end lives on another mount than tmp_path
    try:
        other = procs.mount_id(w)
        assert other is not None
        assert fifokeeper.kill_holders(NAME, ino, other) == 0
        assert victim.poll() is None
        # The same scan with the file's own mount does find it (the test can fail).
        with open(victim_path, "rb") as own:
            same = procs.mount_id(own.fileno())
        assert procs.holds_file(victim.pid, NAME, ino, same)
        assert not procs.holds_file(victim.pid, NAME, ino, other)
    finally:
        os.close(r)
        os.close(w)
        assert victim.stdin is not None
        victim.stdin.close()
        victim.wait(5)
