"""The node's writer settlement in process, with a stand-in for discovery."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from fractalfs.config import NodeConfig
from fractalfs.edgeid import EdgeId
from fractalfs.edges import WriterEnd, WriterState
from fractalfs.node import Node
from fractalfs.spill import SpillFile
from fractalfs.writerstate import Exited


class Recorder:
    """Discovery as far as settling a writer uses it: records what it was told."""

    def __init__(self) -> None:
        self.closed: list[tuple[str, int, str]] = []

    async def close_writer(
        self, edge: str, generation: int, state: str, written: int, reason: str = ""
    ) -> dict[str, Any]:
        self.closed.append((edge, generation, state))
        return {}

    async def set_mode(self, *args: Any) -> dict[str, Any]:
        return {}


async def test_a_spill_whose_completion_fails_fails_its_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """writerstate: "a spill append or the spill's completion failed" fails the generation.
    The node called the end complete anyway when SpillFile.finish raised (EIO on fsync: the
    bytes may not be on disk), so discovery and every re-run reader took an unsealed,
    possibly short spill for the whole stream."""
    config = NodeConfig(str(tmp_path / "mnt"), node="n", spill_dir=str(tmp_path / "spill"))
    discovery = Recorder()
    node = Node(config, discovery, "127.0.0.1:1")  # type: ignore[arg-type]
    edge = EdgeId.new()
    writer = WriterEnd(edge, 1, config.write_window, os.getpid())
    writer.persist(SpillFile.create(config.spill_dir, edge, 1, 0), "configured persistent")
    await writer.write(b"payload", 0.05)
    await writer.drain_spill(0.05)
    node._slot(edge).writer = writer

    def broken(self: SpillFile) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(SpillFile, "finish", broken)
    async with trio.open_nursery() as nursery:
        node._nursery = nursery
        writer.on_released(0)
        node._settle(writer, Exited(0))
        with trio.fail_after(5):
            while not discovery.closed:
                await trio.sleep(0.01)
    assert writer.state is WriterState.FAILED
    assert discovery.closed == [(edge.hex, 1, "failed")]
