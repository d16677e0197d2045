"""FUSE names the requesting *thread*: an edge opened by a worker thread that exits before
its process is still the process's file. The daemon used to take the thread's
disappearance for the program's: blocked reads and writes from the main thread got EINTR
(the opener's /proc/<tid>/status was gone), and a close while the process ran settled as
"exit status unknown (process is gone)": a failed generation, the reader left waiting."""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

from .conftest import (
    Pair,
    Programs,
    needs_fuse,
    sha_file,
    wait_for,
    waiting_to_read,
    waiting_to_write,
)

pytestmark = needs_fuse

MiB = 1 << 20

# Shared by both programs: a worker thread opens the edge (and the writer writes a first
# part from it), then the thread exits; the main thread goes on through libc, which,
# unlike Python's os.read/os.write, does not retry EINTR, so a spurious one shows.
PROLOGUE = """
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
path, data_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
box = {}
def check(n):
    if n < 0:
        err = ctypes.get_errno()
        print("error", os.strerror(err), flush=True)
        sys.exit(3)
    return n
"""

WRITER = (
    PROLOGUE
    + """
data = open(data_path, "rb").read()
first = len(data) // 8
def opener():
    fd = os.open(path, os.O_WRONLY)
    os.write(fd, data[:first])
    box["fd"] = fd
    box["tid"] = threading.get_native_id()
t = threading.Thread(target=opener)
t.start()
t.join()
while os.path.exists(f"/proc/{os.getpid()}/task/{box['tid']}"):
    time.sleep(0.01)
print("thread gone", flush=True)
view = memoryview(data)[first:]
buf = ctypes.create_string_buffer(bytes(view), len(view))
done = 0
while done < len(view):
    chunk = min(len(view) - done, 1 << 20)
    done += check(libc.write(box["fd"], ctypes.byref(buf, done), chunk))
check(libc.close(box["fd"]))
if mode == "linger":
    time.sleep(1.0)  # closed while the process runs on, then exits 0
print("written", flush=True)
"""
)

READER = (
    PROLOGUE
    + """
out = open(data_path, "wb")
def opener():
    box["fd"] = os.open(path, os.O_RDONLY)
    box["tid"] = threading.get_native_id()
t = threading.Thread(target=opener)
t.start()
t.join()
while os.path.exists(f"/proc/{os.getpid()}/task/{box['tid']}"):
    time.sleep(0.01)
print("thread gone", flush=True)
buf = ctypes.create_string_buffer(1 << 20)
while n := check(libc.read(box["fd"], buf, 1 << 20)):
    out.write(buf.raw[:n])
out.close()
check(libc.close(box["fd"]))
if mode == "linger":
    time.sleep(1.0)
print("read", flush=True)
"""
)


def _program(programs: Programs, code: str, *args: str):  # type: ignore[no-untyped-def]
    script = Path(args[1]).with_suffix(".py")
    script.write_text(code)
    return programs.start("exec " + " ".join([sys.executable, str(script), *args]))


def test_a_writer_thread_that_exits_before_its_process_is_not_a_dead_writer(
    pair: Pair, programs: Programs, tmp_path: Path
) -> None:
    """The worker thread opens and writes an eighth, then exits; the main thread writes
    the rest (blocked on a full window: the reader starts late) and closes, the process
    lingers, then exits 0. The stream must complete exactly."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(20 * MiB + 777))
    for mode in ("exit", "linger"):
        _, w, r = pair.paths()
        out = tmp_path / f"out-{mode}"
        writer = _program(programs, WRITER, w, str(src), mode)
        assert writer.stdout is not None and writer.stdout.readline() == b"thread gone\n"
        # The main thread fills the window and blocks: signal checks run meanwhile.
        wait_for(functools.partial(waiting_to_write, writer.pid), 10, "the main thread blocked")
        time.sleep(1.0)
        reader = programs.start(f"cat {r} > {out}")
        got, err = writer.communicate(timeout=30)
        assert writer.returncode == 0, (got, err)
        reader.communicate(timeout=20)  # a failed generation leaves it waiting
        assert reader.returncode == 0
        assert sha_file(out) == sha_file(src), mode


def test_a_reader_thread_that_exits_before_its_process_is_not_a_dead_reader(
    pair: Pair, programs: Programs, tmp_path: Path
) -> None:
    """The worker thread opens the edge and exits; the main thread reads it all, blocked
    on an absent writer first, and closes at EOF. No EINTR, exact bytes."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(6 * MiB + 555))
    for mode in ("exit", "linger"):
        _, w, r = pair.paths()
        out = tmp_path / f"out-{mode}"
        reader = _program(programs, READER, r, str(out), mode)
        assert reader.stdout is not None and reader.stdout.readline() == b"thread gone\n"
        wait_for(functools.partial(waiting_to_read, reader.pid), 10, "the main thread blocked")
        time.sleep(1.0)  # several signal checks while it waits for a writer
        writer = programs.start(f"cat {src} > {w}")
        got, err = reader.communicate(timeout=30)
        assert reader.returncode == 0, (got, err)
        writer.communicate(timeout=20)
        assert writer.returncode == 0
        assert sha_file(out) == sha_file(src), mode
