"""Bytes through /fractal/<edge> with real programs, on one node and across two daemons."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from fractalfs.codec import SENTINEL
from fractalfs.fs import EDGE_SIZE

from .conftest import (
    Pair,
    Programs,
    blocked_on_a_full_window,
    needs_fuse,
    new_edge,
    sh,
    sha_file,
    wait_for,
    waiting_to_read,
)

pytestmark = needs_fuse


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finish(proc: object, timeout: float = 60) -> bytes:
    out, err = proc.communicate(timeout=timeout)  # type: ignore[attr-defined]
    assert proc.returncode == 0, err.decode(errors="replace")  # type: ignore[attr-defined]
    return out  # type: ignore[no-any-return]


PAYLOADS = {
    "empty": b"",
    "one-byte": b"x",
    "binary": os.urandom(3 * 1024 * 1024 + 17),
    "sentinels": SENTINEL * (512 * 1024 + 3),  # 4 MiB of the end marker itself
    "sentinel-tail": os.urandom(1000) + SENTINEL,
}


@pytest.mark.parametrize("kind", PAYLOADS)
def test_exact_bytes_arrive_reader_first(
    pair: Pair, programs: Programs, tmp_path: Path, kind: str
) -> None:
    data = PAYLOADS[kind]
    src = tmp_path / "src"
    src.write_bytes(data)
    _, w, r = pair.paths()
    reader = programs.start(f"exec cat {r} > {tmp_path / 'out'}")
    wait_for(lambda: waiting_to_read(reader.pid), 5, "the reader waiting for its writer")
    sh(f"cat {src} > {w}")
    finish(reader)
    assert sha_file(tmp_path / "out") == sha(data)


def test_writer_first_small_stream_waits_for_its_reader(pair: Pair) -> None:
    _, w, r = pair.paths()
    sh(f"echo 'written before any reader' > {w}")  # returns at once: the daemon holds it
    time.sleep(0.3)
    assert sh(f"cat {r}").stdout == b"written before any reader\n"


@pytest.mark.parametrize("bs", ["4k", "64k", "1M"])
def test_dd_block_sizes(pair: Pair, programs: Programs, tmp_path: Path, bs: str) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(24 * 1024 * 1024 + 1234))
    _, w, r = pair.paths()
    reader = programs.start(f"dd if={r} bs={bs} status=none | sha256sum")
    sh(f"dd if={src} of={w} bs={bs} status=none")
    assert finish(reader).split()[0].decode() == sha_file(src)


def test_append_redirect_and_input_redirect(pair: Pair, programs: Programs) -> None:
    _, w, r = pair.paths()
    reader = programs.start(f"wc -l < {r}")
    sh(f"seq 1 100000 >> {w}")
    assert finish(reader).strip() == b"100000"


def test_tee_gzip_gunzip(pair: Pair, programs: Programs, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"".join(b"line %d of a compressible text\n" % i for i in range(200_000)))
    _, w, r = pair.paths()
    reader = programs.start(f"gunzip -c < {r} > {tmp_path / 'out'}")
    sh(f"gzip -c {src} | tee {w} > {tmp_path / 'copy.gz'}")
    finish(reader)
    assert sha_file(tmp_path / "out") == sha_file(src)


def test_tar_directory_tree(pair: Pair, programs: Programs, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for i in range(20):
        (tree / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 4}" / f"f{i}").write_bytes(os.urandom(i * 10_000))
    out = tmp_path / "out"
    out.mkdir()
    _, w, r = pair.paths()
    reader = programs.start(f"tar x -C {out} < {r}")
    sh(f"tar c -C {tree} . > {w}")
    finish(reader)
    sh(f"diff -r {tree} {out}")


def test_python_open(pair: Pair, programs: Programs) -> None:
    _, w, r = pair.paths()
    reader = programs.start(
        f"python3 -c \"import sys, hashlib; print(hashlib.sha256(open('{r}','rb').read())"
        '.hexdigest())"'
    )
    data = os.urandom(2_000_000)
    with open(w, "wb") as f:
        f.write(data)
    assert finish(reader).strip().decode() == sha(data)


def test_one_gib_stream(pair: Pair, programs: Programs, tmp_path: Path) -> None:
    block = tmp_path / "block"
    block.write_bytes(os.urandom(64 * 1024 * 1024))
    gen = f"for i in $(seq 16); do cat {block}; done"
    _, w, r = pair.paths()
    reader = programs.start(f"sha256sum < {r}")
    expected = sh(f"{gen} | tee {w} | sha256sum", timeout=120).stdout.split()[0]
    assert finish(reader, timeout=120).split()[0] == expected


def test_early_close_gives_the_writer_epipe(pair: Pair, programs: Programs) -> None:
    _, w, r = pair.paths()
    writer = programs.start(f"exec yes > {w}")
    assert sh(f"head -c 10 {r}").stdout == b"y\n" * 5
    _, err = writer.communicate(timeout=10)
    assert writer.returncode == -signal.SIGPIPE, err  # as through a pipe: quietly


def test_ctrl_c_and_kill_end_a_blocked_reader(pair: Pair, programs: Programs) -> None:
    for signum in (signal.SIGINT, signal.SIGKILL):
        _, _, r = pair.paths()
        reader = programs.start(f"exec cat {r}")
        wait_for(functools.partial(waiting_to_read, reader.pid), 5, "blocked in read: no writer")
        assert reader.poll() is None
        t0 = time.monotonic()
        os.kill(reader.pid, signum)
        reader.wait(timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert reader.returncode == -signum


def test_an_early_close_ends_a_writer_blocked_on_backpressure(
    pair: Pair, programs: Programs
) -> None:
    """The reader closes early while the writer waits for window space: the writer gets
    EPIPE/SIGPIPE, and its daemon handles that as an EPIPE, not as a failed task (a
    writer FIFO's drain got it wrapped in an ExceptionGroup and logged a traceback)."""
    _, w, r = pair.paths()
    log_before = pair.writer.log.read_text().count("background task")
    writer = programs.start(f"exec dd if=/dev/zero of={w} bs=64k status=none")
    wait_for(
        functools.partial(blocked_on_a_full_window, writer.pid), 5, "blocked on the full window"
    )
    reader = programs.start(f"exec head -c 10 {r} > /dev/null")
    assert reader.wait(timeout=10) == 0
    writer.communicate(timeout=10)
    assert writer.returncode == -signal.SIGPIPE
    time.sleep(0.2)
    assert pair.writer.log.read_text().count("background task") == log_before


def test_kill_ends_a_writer_blocked_on_backpressure(pair: Pair, programs: Programs) -> None:
    _, w, _ = pair.paths()
    writer = programs.start(f"exec dd if=/dev/zero of={w} bs=1M count=100 status=none")
    wait_for(
        functools.partial(blocked_on_a_full_window, writer.pid), 5, "blocked on the full window"
    )
    assert writer.poll() is None
    t0 = time.monotonic()
    os.kill(writer.pid, signal.SIGTERM)
    writer.wait(timeout=5)
    assert time.monotonic() - t0 < 1.0 and writer.returncode == -signal.SIGTERM


def test_a_rerun_may_open_while_the_killed_program_is_still_exiting(
    pair: Pair, programs: Programs
) -> None:
    """A killed program's RELEASE reaches the daemon after it died; a re-run started at
    once must not get EBUSY for that (CI saw it after a SIGKILL of a blocked writer)."""
    _, w, r = pair.paths()
    writer = programs.start(f"exec dd if=/dev/zero of={w} bs=1M count=100 status=none")
    wait_for(
        functools.partial(blocked_on_a_full_window, writer.pid), 5, "blocked on the full window"
    )
    assert writer.poll() is None
    os.kill(writer.pid, signal.SIGKILL)
    fd = os.open(w, os.O_WRONLY)  # the re-run, while dd still waits to die
    os.write(fd, b"second generation")
    os.close(fd)
    assert writer.wait(timeout=5) == -signal.SIGKILL
    with open(r, "rb") as f:
        assert f.read() == b"second generation"

    edge2, w2, r2 = pair.paths()
    reader = programs.start(f"exec cat {r2}")
    wait_for(lambda: waiting_to_read(reader.pid), 5, "blocked in read: no writer yet")
    os.kill(reader.pid, signal.SIGKILL)
    fd = os.open(pair.writer.path(edge2), os.O_RDONLY)  # same node, or another one
    try:
        assert reader.wait(timeout=5) == -signal.SIGKILL
        sh(f"printf data > {w2}")
        assert os.read(fd, 100) == b"data"
        assert os.read(fd, 100) == b""
    finally:
        os.close(fd)


def test_read_write_open_is_einval(pair: Pair) -> None:
    with pytest.raises(OSError) as info:
        os.open(pair.writer.path(new_edge()), os.O_RDWR)
    assert info.value.errno == errno.EINVAL


def test_second_writer_and_second_reader_are_ebusy(pair: Pair) -> None:
    _, w, r = pair.paths()
    wfd = os.open(w, os.O_WRONLY)
    rfd = os.open(r, os.O_RDONLY)
    try:
        for path, flags in ((w, os.O_WRONLY), (r, os.O_WRONLY), (r, os.O_RDONLY), (w, os.O_RDONLY)):
            with pytest.raises(OSError) as info:
                os.open(path, flags)
            assert info.value.errno == errno.EBUSY, (path, flags)
        os.write(wfd, b"still works")
        os.close(wfd)
        wfd = -1
        assert os.read(rfd, 100) == b"still works"
        assert os.read(rfd, 100) == b""
    finally:
        if wfd >= 0:
            os.close(wfd)
        os.close(rfd)


def test_names_and_listing(pair: Pair) -> None:
    mnt = pair.writer.mountpoint
    for bad in ("hello", "ABCDEF0123456789ABCDEF0123456789", "0" * 31, "0" * 33):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / bad)
    with pytest.raises(OSError):
        (mnt / "not-an-edge").write_bytes(b"x")
    edge, w, _ = pair.paths()
    st = os.stat(w)
    assert (st.st_mode & 0o170000) == 0o100000  # a regular file, sized for buffers
    assert st.st_size == EDGE_SIZE and st.st_blocks * 512 == st.st_size  # not sparse
    fd = os.open(w, os.O_WRONLY)
    try:
        assert edge in os.listdir(mnt)
    finally:
        os.close(fd)


def test_rm_ends_the_edge_on_every_node(pair: Pair, programs: Programs) -> None:
    _, w, r = pair.paths()
    writer = programs.start(f"exec dd if=/dev/zero of={w} bs=64k status=none")
    time.sleep(0.5)
    assert writer.poll() is None
    fifo = stat.S_ISFIFO(os.stat(f"/proc/{writer.pid}/fd/1").st_mode)
    os.unlink(r)  # removed through the reader's node
    _, err = writer.communicate(timeout=5)
    if fifo:
        # A writer FIFO (the default) can only be closed: the program gets a pipe's EPIPE,
        # so dd dies of SIGPIPE, without a message (README, "Errors").
        assert writer.returncode == -signal.SIGPIPE
    else:
        assert writer.returncode != 0 and b"Broken pipe" in err

    _, w, r = pair.paths()
    reader = programs.start(f"exec cat {r}")
    wait_for(lambda: waiting_to_read(reader.pid), 5, "the reader waiting for its writer")
    time.sleep(0.2)
    os.unlink(w)  # removed through the writer's node
    reader.communicate(timeout=5)
    # A reader FIFO cannot carry ECANCELED (a FUSE reader gets it): its program is killed,
    # never given an EOF that would look like the end of the stream.
    assert reader.returncode == -signal.SIGKILL
