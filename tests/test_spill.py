"""Spill files: round trip, completeness that payload bytes cannot forge, damage."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fractalfs import codec
from fractalfs.codec import AbortReason
from fractalfs.edgeid import EdgeId
from fractalfs.edges import WriterEnd
from fractalfs.spill import (
    CACHE_BEHIND,
    HEADER,
    RECYCLE_EVERY,
    REMOVING,
    SpillError,
    SpillFile,
    inspect,
    scan,
)


@pytest.mark.parametrize("direct", [True, False])
def test_roundtrip_and_completeness(tmp_path: Path, direct: bool) -> None:
    edge = EdgeId.new()
    sp = SpillFile.create(tmp_path, edge, 3, 0, direct=direct)
    sp.append(b"hello ")
    sp.append(b"world")
    info = inspect(sp.path)
    # Direct I/O writes whole blocks: a partial last block waits in memory until finish.
    held = 0 if sp._dfd >= 0 else 11  # (no O_DIRECT on this file system: buffered)
    assert (info.complete, info.size, info.generation) == (None, held, 3)
    assert sp.end == info.size
    sp.finish()
    info = inspect(sp.path)
    assert info.complete == 11 and info.edge == edge and sp.end == 11
    assert sp.read(0, 100) == b"hello world" and sp.read(6, 3) == b"wor"
    again = SpillFile.open(info)
    assert again.read(0, 5) == b"hello" and again.complete
    assert [i.path for i in scan(tmp_path)] == [sp.path]


@given(st.lists(st.integers(0, 9000), max_size=8))
@settings(max_examples=40, deadline=None)
def test_direct_appends_of_any_sizes_keep_the_stream(tmp_path_factory, sizes) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("s")
    sp = SpillFile.create(d, EdgeId.new(), 1, 5)
    stream = os.urandom(sum(sizes))
    at = 0
    for n in sizes:
        sp.append(stream[at : at + n])
        at += n
        on_disk = sp.end - sp.start
        assert on_disk <= at and at - on_disk < 4096  # whole blocks, the rest staged
        assert sp.read(5, on_disk) == stream[:on_disk]
    sp.finish()
    assert sp.read(5, len(stream) + 1) == stream
    assert inspect(sp.path).complete == 5 + len(stream)
    sp.remove()


@given(st.binary(max_size=200))
@settings(max_examples=50)
def test_a_payload_ending_in_an_end_frame_is_still_incomplete(tmp_path_factory, payload) -> None:  # type: ignore[no-untyped-def]
    """Upstream's defect: a cut stream whose last bytes look like the end marker."""
    d = tmp_path_factory.mktemp("s")
    # Whole blocks, so that O_DIRECT has written every byte of the forged end frame (a
    # staged partial block would make this hold for any payload).
    payload += b"p" * (-(HEADER.size + len(payload) + codec.END_FRAME_SIZE) % 4096)
    sp = SpillFile.create(d, EdgeId.new(), 1, 0)
    forged = payload + codec.end_frame(len(payload))
    sp.append(forged)  # the program itself wrote an end frame for its own prefix
    info = inspect(sp.path)
    assert info.size == len(forged)  # the forged frame is on the disk ...
    assert info.complete is None  # ... and a crash here is never complete
    sp.finish()
    assert inspect(sp.path).complete == len(forged)


@pytest.mark.parametrize("direct", [True, False])
def test_a_crash_inside_finish_never_serves_the_end_frame_as_data(
    tmp_path: Path, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 2: a crash between the END frame and the header's length left an incomplete
    file whose whole size counted as payload: a restore served the END frame as data."""
    from fractalfs import spill as spill_module

    data = os.urandom(10_000)
    sp = SpillFile.create(tmp_path, EdgeId.new(), 1, 7, direct=direct)
    sp.append(data)
    real = os.pwrite

    def crash_at_the_length(fd: int, buf: bytes, pos: int) -> int:
        if pos == spill_module.COMPLETE_AT:
            raise OSError(errno.EIO, "crashed before the header's length")
        return real(fd, buf, pos)

    monkeypatch.setattr(os, "pwrite", crash_at_the_length)
    with pytest.raises(OSError):
        sp.finish()
    monkeypatch.setattr(os, "pwrite", real)
    sp.close()
    info = inspect(sp.path)
    assert info.complete is None and info.size == len(data)
    restored = SpillFile.open(info)
    assert restored.read(7, 1 << 20) == data
    restored.close()


def test_damage_is_detected(tmp_path: Path) -> None:
    sp = SpillFile.create(tmp_path, EdgeId.new(), 1, 0)
    sp.append(os.urandom(1000))
    sp.finish()
    with open(sp.path, "r+b") as f:
        f.truncate(os.path.getsize(sp.path) - 1)
    with pytest.raises(SpillError, match="disagree"):
        inspect(sp.path)
    (tmp_path / "x.spill").write_bytes(b"not a spill file" * 10)
    with pytest.raises(SpillError, match="not a fractalfs"):
        inspect(tmp_path / "x.spill")
    assert scan(tmp_path) == []


@pytest.mark.parametrize("direct", [True, False])
def test_a_failed_append_leaves_no_partial_bytes(tmp_path: Path, direct: bool) -> None:
    sp = SpillFile.create(tmp_path, EdgeId.new(), 1, 0, direct=direct)
    if direct and sp._dfd < 0:
        pytest.skip("no O_DIRECT on this file system")
    sp.append(b"abc")
    # From now on writes fail with EBADF.
    if direct:
        good, sp._dfd = sp._dfd, os.open(sp.path, os.O_RDONLY)
    else:
        good, sp.fd = sp.fd, os.open(sp.path, os.O_RDONLY)
    with pytest.raises(OSError):
        sp.append(b"d" * 10000)
    assert sp.end == (0 if direct else 3)
    os.close(sp._dfd if direct else sp.fd)
    if direct:
        sp._dfd = good
    else:
        sp.fd = good
    sp.append(b"ef")
    sp.finish()
    assert sp.read(0, 100) == b"abcef"
    sp.remove()


def _on_tmpfs(path: Path) -> bool:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() == "tmpfs"


def _resident(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_a_long_buffered_spill_hands_its_page_cache_back_and_loses_nothing(
    tmp_path: Path,
) -> None:
    if _on_tmpfs(tmp_path):
        pytest.skip("tmpfs pages are the file itself")
    sp = SpillFile.create(tmp_path, EdgeId.new(), 1, 0, direct=False)
    block = os.urandom(1 << 20)
    total = 5 * CACHE_BEHIND
    digest = hashlib.sha256()
    for i in range(total >> 20):
        chunk = block[i % 256 :] + block[: i % 256]  # every MiB different
        sp.append(chunk)
        digest.update(chunk)
    # Only about the last two CACHE_BEHINDs stay cached; without the hand-back all would.
    assert _resident(sp.path) <= 2 * CACHE_BEHIND + 2 * RECYCLE_EVERY
    got = hashlib.sha256()
    for offset in range(0, total, 1 << 20):  # a reader far behind reads from the disk
        got.update(sp.read(offset, 1 << 20))
    assert got.hexdigest() == digest.hexdigest()
    sp.remove()


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_a_direct_spill_leaves_no_page_cache_and_loses_nothing(tmp_path: Path) -> None:
    if _on_tmpfs(tmp_path):
        pytest.skip("tmpfs pages are the file itself")
    sp = SpillFile.create(tmp_path, EdgeId.new(), 1, 0)
    if sp._dfd < 0:
        pytest.skip("no O_DIRECT on this file system")
    chunks = [os.urandom(1 << 20)[: (1 << 20) - i] for i in range(40)]  # odd sizes
    for chunk in chunks:
        sp.append(chunk)
    assert _resident(sp.path) <= 4096  # at most the header's block, from create
    sp.finish()
    assert sp.read(0, 50 << 20) == b"".join(chunks)
    sp.remove()


def test_a_file_system_refusing_direct_writes_falls_back_to_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sp = SpillFile.create(tmp_path, EdgeId.new(), 1, 0)
    if sp._dfd < 0:
        pytest.skip("no O_DIRECT on this file system")
    real = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if fd == sp._dfd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    sp.append(b"abc")  # staged: no write yet
    sp.append(b"x" * 5000)  # the first direct write fails: buffered from here on
    assert sp._dfd < 0 and sp.end == 5003
    sp.append(b"yz")
    sp.finish()
    assert sp.read(0, 10000) == b"abc" + b"x" * 5000 + b"yz"
    assert inspect(sp.path).complete == 5005
    sp.remove()


def test_direct_reads_at_any_offset_and_length(tmp_path: Path) -> None:
    sp = SpillFile.create(tmp_path, EdgeId.new(), 1, 100)
    if not sp._direct_reads:
        pytest.skip("no O_DIRECT on this file system")
    stream = os.urandom(3 * (1 << 20) + 12345)
    for at in range(0, len(stream), 777_777):
        sp.append(stream[at : at + 777_777])
    held = sp.end - sp.start
    for offset, size in ((0, 1), (1, 4095), (4031, 4097), (12345, 1 << 20), (held - 10, 100)):
        want = stream[offset : min(offset + size, held)]
        assert sp.read(100 + offset, size) == want, (offset, size)
        assert sp._rfd >= 0  # served around the page cache
    sp.finish()
    assert sp.read(100 + len(stream) - 5, 100) == stream[-5:]  # the tail finish() wrote
    again = SpillFile.open(inspect(sp.path))  # after a restart: direct reads too
    assert again.read(100 + 5000, 1 << 20) == stream[5000 : 5000 + (1 << 20)]
    assert again._rfd >= 0
    assert again.read(100, len(stream)) == stream  # more than a stage: buffered
    again.close()
    sp.remove()


def _join_unlinks() -> None:
    for t in threading.enumerate():
        if t.name == "spill-unlink":
            t.join(10)


def _spill_of(tmp_path: Path, size: int) -> tuple[SpillFile, bytes]:
    sp = SpillFile.create(tmp_path, EdgeId.new(), 1, 0)
    data = os.urandom(size)
    sp.append(data)
    sp.finish()
    return sp, data


def test_a_removal_waits_for_a_read_in_a_worker_thread(tmp_path: Path) -> None:
    """Abort during a spill read off the loop: the read gets its bytes from the right file,
    the fds stay open (no number reused) until it returns, then the file goes."""
    sp, data = _spill_of(tmp_path, 3 << 20)
    started, go = threading.Event(), threading.Event()
    real_read = sp.read

    def slow_read(offset: int, size: int) -> bytes:
        started.set()
        assert go.wait(10)
        return real_read(offset, size)

    sp.read = slow_read  # type: ignore[method-assign]
    got: list[bytes] = []

    async def main() -> None:
        writer = WriterEnd(sp.edge, 1, 1 << 20, os.getpid())
        writer.spill = sp
        writer.base = writer.end = sp.end
        assert writer.on_disk(12345)

        async def reader() -> None:
            got.append(await writer.read_spill(12345, 1 << 20))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.to_thread.run_sync(started.wait)
            fds = {sp.fd, sp._rfd, sp._dfd} - {-1}
            writer.abort(AbortReason.REMOVED, "removed")  # removes the spill
            sp.remove()  # idempotent, still deferred
            assert sp.fd >= 0 and sp.path.exists()  # nothing closed under the read
            probe = os.open(os.devnull, os.O_RDONLY)
            os.close(probe)
            assert probe not in fds
            go.set()
        assert sp.fd == -1 and sp._rfd == -1 and not sp.path.exists()
        with pytest.raises(OSError):
            await writer.read_spill(0, 10)  # a removed spill is not read

    trio.run(main)
    assert got == [data[12345 : 12345 + (1 << 20)]]
    _join_unlinks()
    assert list(tmp_path.iterdir()) == []


def test_a_close_waits_for_a_read_in_a_worker_thread(tmp_path: Path) -> None:
    sp, data = _spill_of(tmp_path, 1 << 20)
    sp.begin_read()
    sp.close()
    assert sp.fd >= 0  # deferred
    assert sp.read(10, 20) == data[10:30]
    sp.end_read()
    assert sp.fd == -1 and sp.path.exists()
    sp.remove()
    _join_unlinks()
    assert list(tmp_path.iterdir()) == []


def test_concurrent_reads_do_not_share_the_read_buffer(tmp_path: Path) -> None:
    """A superseded connection's read may still run in a thread when a new one reads."""
    sp, data = _spill_of(tmp_path, 4 << 20)
    bad: list[int] = []

    def hammer(seed: int) -> None:
        for i in range(150):
            offset = ((seed * 7919 + i * 104729) * 4093) % (3 << 20)
            size = 1 + (seed * 31 + i * 65537) % (1 << 20)
            if sp.read(offset, size) != data[offset : offset + size]:
                bad.append(offset)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    sp.remove()


def test_removal_renames_at_once_and_unlinks_in_a_thread(tmp_path: Path) -> None:
    sp, _ = _spill_of(tmp_path, 1 << 20)
    sp.remove()
    assert not sp.path.exists()  # the name is free at once
    again = SpillFile.create(tmp_path, sp.edge, sp.generation, 0)  # same name
    sp.remove()  # idempotent: never deletes the new file
    _join_unlinks()
    assert [p.name for p in tmp_path.iterdir()] == [again.path.name]
    again.remove()
    _join_unlinks()
    assert list(tmp_path.iterdir()) == []


def test_a_removal_cut_short_by_a_crash_is_finished_by_the_scan(tmp_path: Path) -> None:
    (tmp_path / f".x.1.spill.1-2{REMOVING}").write_bytes(b"old")
    assert scan(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
