#!/usr/bin/env python3
"""What a reader's open costs: a reader FIFO (the daemon has its write end opened before
the LOOKUP is answered, ``fiforoute.prepare``) against a FUSE open of the same edge, on
one daemon with an embedded discovery, measured in the same run.

    .venv/bin/python bench/fifo_open.py [--opens 100]

Each round writes one byte into a fresh edge (so the reader's claim finds its writer),
then times ``open(O_RDONLY)`` alone; the read and close follow untimed. Prints the
median and 90th percentile per route, and their ratio. Then what the keeper's part costs
alone, on FIFOs outside any mount: its open of both ends and the hand-back
(``Keeper.open_fifo``, with the daemon's two keepers and with one) against the same two
opens made in this process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fractalfs import fifokeeper
from fractalfs.edgeid import EdgeId
from fractalfs.testing import Node


def opens(node: Node, n: int) -> list[float]:
    times = []
    for _ in range(n):
        path = node.path(EdgeId.new().hex)
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b"x")
        os.close(fd)
        t = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        times.append(time.perf_counter() - t)
        while os.read(fd, 4096):
            pass
        os.close(fd)
    return times


def keeper_round_trips(
    directory: str, n: int, copies: int = fifokeeper.COPIES
) -> tuple[list[float], list[float]]:
    """Both ends opened in this process, and by a Keeper running ``copies`` keepers (the
    second gets a dup of each write end before open_fifo returns)."""
    keeper = fifokeeper.Keeper(copies)
    keeper.start()
    direct, kept = [], []
    try:
        for i in range(n):
            path = f"{directory}/fifo{i}"
            os.mkfifo(path)
            t = time.perf_counter()
            hold = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            direct.append(time.perf_counter() - t)
            os.close(hold)
            os.close(wfd)
            t = time.perf_counter()
            hold, wfd = keeper.open_fifo(path, i, "0" * 32)
            kept.append(time.perf_counter() - t)
            os.close(hold)
            keeper.done(i)
            os.close(wfd)
    finally:
        keeper.close()
    return direct, kept


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--opens", type=int, default=100)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for route, fifo in (("fuse", "false"), ("fifo", "true")):
            config = Path(tmp) / f"{route}.toml"
            config.write_text(f"fifo_readers = {fifo}\n")
            node = Node(Path(tmp), route, None, extra=["--config", str(config)])
            node.start()
            try:
                opens(node, 5)  # warm-up
                results[route] = opens(node, args.opens)
            finally:
                node.stop()
    for route, times in results.items():
        ms = sorted(t * 1000 for t in times)
        p90 = ms[int(len(ms) * 0.9)]
        print(f"{route:5} open: median {statistics.median(ms):6.2f} ms, p90 {p90:6.2f} ms")
    ratio = statistics.median(results["fifo"]) / statistics.median(results["fuse"])
    print(f"reader FIFO open / FUSE open (medians): {ratio:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        direct, kept = keeper_round_trips(tmp, 3 * args.opens)
    with tempfile.TemporaryDirectory() as tmp:
        _, alone = keeper_round_trips(tmp, 3 * args.opens, copies=1)
    print(
        f"both ends opened here: median {statistics.median(direct) * 1e6:.0f} us; "
        f"by the keeper: {statistics.median(kept) * 1e6:.0f} us "
        f"({fifokeeper.COPIES} keepers; with 1: {statistics.median(alone) * 1e6:.0f} us)"
    )


if __name__ == "__main__":
    main()
