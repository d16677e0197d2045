"""The writer FIFO's drain, in-process: a real pipe, a real program writing into it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from fractalfs import fiforoute
from fractalfs.edgeid import EdgeId
from fractalfs.edges import WriterEnd


class _Node:
    """What the drain calls on its node: the writer end takes every byte at once."""

    def __init__(self) -> None:
        self.released = False

    async def write(self, writer: WriterEnd, data: Any) -> int:
        return await writer.write(data, 0.05)

    async def flush_writer(self, writer: WriterEnd) -> None:
        pass

    def release_writer(self, writer: WriterEnd) -> None:
        self.released = True


SOURCE = r"""
import os, sys, time
data = open(sys.argv[1], "rb").read()
pos = 0
for _ in range(20):  # lines, a millisecond apart
    os.write(1, data[pos : pos + 100]); pos += 100; time.sleep(0.001)
time.sleep(0.05)
os.write(1, data[pos : pos + (1 << 20)]); pos += 1 << 20  # a large write: a bulk read
time.sleep(0.05)
while pos < len(data):  # then small writes at a slow pace
    os.write(1, data[pos : pos + 4096]); pos += 4096; time.sleep(0.001)
"""


async def _drain(path: Path, source: list[str], monkeypatch: Any) -> tuple[WriterEnd, list[int]]:
    """Drains what ``source`` (argv, stdout into the FIFO) writes; returns the writer end
    and the stream offset of each gathering wait."""
    writer = WriterEnd(EdgeId.new(), 1, 64 << 20, os.getpid())
    waits: list[int] = []
    sleep = trio.sleep

    async def spied(seconds: float) -> None:
        if seconds == fiforoute.GATHER_WAIT:
            waits.append(writer.end)
        await sleep(seconds)

    monkeypatch.setattr(trio, "sleep", spied)
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    fifo = fiforoute.Fifo(writer, 1, str(path))
    fifo.fd = rfd
    node = _Node()
    src = subprocess.Popen(source, stdout=wfd)
    os.close(wfd)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fiforoute.drain, node, fifo)  # type: ignore[arg-type]
            await trio.to_thread.run_sync(src.wait)
    assert src.returncode == 0 and node.released
    got = hashlib.sha256()
    for chunk in writer.chunks:
        got.update(chunk)
    assert got.digest() == hashlib.sha256(path.read_bytes()).digest()
    return writer, waits


async def test_after_a_large_read_a_small_one_waits_to_gather_and_lines_never_wait(
    monkeypatch: Any, tmp_path: Path
) -> None:
    """Lines pass at once (no wait before a read that follows small reads); after a large
    read, a wakeup finding less than GATHER_BELOW in the pipe waits GATHER_WAIT before
    reading (a program writing 4 KiB at full speed fills the pipe meanwhile), and the
    small read after it turns gathering off again. Every byte arrives, in order."""
    data = tmp_path / "data"
    data.write_bytes(os.urandom(2000 + (1 << 20) + 30 * 4096))
    src = [sys.executable, "-c", SOURCE, str(data)]
    _, waits = await _drain(data, src, monkeypatch)
    assert waits, "no gathering wait after the large read"
    assert min(waits) >= 1 << 20  # none among the lines: only after the large read
    assert len(waits) <= 3  # only right after a large read


async def test_a_program_writing_4k_at_full_speed_is_drained_in_large_reads(
    monkeypatch: Any, tmp_path: Path
) -> None:
    """``dd bs=4k`` wakes the drain at every write; once a read was large (the program
    writes at full speed), a wakeup finding little in the pipe waits GATHER_WAIT, so reads
    take most of the 1 MiB pipe (they took ~350 KiB each at full speed before: each read a
    frame, a send, a receive and a pour). Every byte arrives, in order."""
    size = 48 << 20
    writer = WriterEnd(EdgeId.new(), 1, 2 * size, os.getpid())
    reads: list[int] = []
    readv = os.readv

    def counted(fd: int, bufs: Any) -> int:
        n = readv(fd, bufs)
        reads.append(n)
        return n

    monkeypatch.setattr(os, "readv", counted)
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    fifo = fiforoute.Fifo(writer, 1, "unused")
    fifo.fd = rfd
    node = _Node()
    data = tmp_path / "data"
    data.write_bytes(os.urandom(size))
    src = subprocess.Popen(["dd", f"if={data}", "bs=4k", "status=none"], stdout=wfd)
    os.close(wfd)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fiforoute.drain, node, fifo)  # type: ignore[arg-type]
            await trio.to_thread.run_sync(src.wait)
    assert src.returncode == 0 and node.released
    got = hashlib.sha256()
    for chunk in writer.chunks:
        got.update(chunk)
    assert got.digest() == hashlib.sha256(data.read_bytes()).digest()
    big = next(i for i, n in enumerate(reads) if n >= 256 * 1024)  # GATHER_AFTER
    after = [n for n in reads[big:] if n]
    assert sum(after) / len(after) >= 512 * 1024, (len(after), sum(after) // len(after))
