"""Spill files: round trip, completeness that payload bytes cannot forge, damage."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fractalfs import codec
from fractalfs.edgeid import EdgeId
from fractalfs.spill import CACHE_BEHIND, RECYCLE_EVERY, SpillError, SpillFile, inspect, scan


def test_roundtrip_and_completeness(tmp_path: Path) -> None:
    edge = EdgeId.new()
    sp = SpillFile.create(tmp_path, edge, 3, 0)
    sp.append(b"hello ")
    sp.append(b"world")
    info = inspect(sp.path)
    assert (info.complete, info.size, info.generation) == (None, 11, 3)
    sp.finish()
    info = inspect(sp.path)
    assert info.complete == 11 and info.edge == edge
    assert sp.read(0, 100) == b"hello world" and sp.read(6, 3) == b"wor"
    again = SpillFile.open(info)
    assert again.read(0, 5) == b"hello" and again.complete
    assert [i.path for i in scan(tmp_path)] == [sp.path]


@given(st.binary(max_size=200))
@settings(max_examples=50)
def test_a_payload_ending_in_an_end_frame_is_still_incomplete(tmp_path_factory, payload) -> None:  # type: ignore[no-untyped-def]
    """Upstream's defect: a cut stream whose last bytes look like the end marker."""
    d = tmp_path_factory.mktemp("s")
    sp = SpillFile.create(d, EdgeId.new(), 1, 0)
    forged = payload + codec.end_frame(len(payload))
    sp.append(forged)  # the program itself wrote an end frame for its own prefix
    assert inspect(sp.path).complete is None  # crash here: never complete
    sp.finish()
    assert inspect(sp.path).complete == len(forged)


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


def test_a_failed_append_leaves_no_partial_bytes(tmp_path: Path) -> None:
    sp = SpillFile.create(tmp_path, EdgeId.new(), 1, 0)
    sp.append(b"abc")
    os.close(sp.fd)
    sp.fd = os.open(sp.path, os.O_RDONLY)  # writes now fail with EBADF
    with pytest.raises(OSError):
        sp.append(b"def")
    assert sp.end == 3


def _resident(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_a_long_spill_hands_its_page_cache_back_and_loses_nothing(tmp_path: Path) -> None:
    if (
        subprocess.run(
            ["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True
        ).stdout.strip()
        == "tmpfs"
    ):
        pytest.skip("tmpfs pages are the file itself")
    sp = SpillFile.create(tmp_path, EdgeId.new(), 1, 0)
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
