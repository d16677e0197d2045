#!/usr/bin/env python3
"""What a spill file costs the writer: appending a stream with the page cache growing
(plain buffered writes), with the spill's buffered mode recycling its page cache
(``SpillFile.append`` with ``direct=False``: pages older than ``CACHE_BEHIND`` go back to
the kernel), and with the default, direct I/O (O_DIRECT through an aligned stage).

    .venv/bin/python bench/spill_pages.py [--size 3G] [--dir DIR]

Prints MiB/s per 512 MiB stretch, so the point where new page-cache pages get expensive
shows (in our VMs: after the first ~500 MiB, ~3 ms per MiB against ~0.3 ms).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fractalfs.edgeid import EdgeId
from fractalfs.spill import SpillFile

MiB = 1 << 20
STRETCH = 512


def run(append: Callable[[bytes], None], size: int) -> tuple[list[float], float]:
    """MiB/s per stretch, and CPU seconds (user + system, all threads) per GiB."""
    block = os.urandom(MiB)
    cpu0 = time.process_time()
    rates, t = [], time.perf_counter()
    for i in range(size // MiB):
        append(block)
        if (i + 1) % STRETCH == 0:
            now = time.perf_counter()
            rates.append(STRETCH / (now - t))
            t = now
    return rates, (time.process_time() - cpu0) / (size / (1 << 30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="3G", help="bytes per run (default 3G)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir in /tmp)")
    args = ap.parse_args()
    size = int(float(args.size[:-1]) * (1 << 30)) if args.size[-1] in "gG" else int(args.size)
    with tempfile.TemporaryDirectory(prefix="fractalfs-spill-", dir=args.dir) as tmp:
        plain_path = Path(tmp) / "plain"
        fd = os.open(plain_path, os.O_CREAT | os.O_WRONLY, 0o600)
        pos = 0

        def plain(data: bytes) -> None:
            nonlocal pos
            pos += os.pwrite(fd, data, pos)

        try:
            results = {"page cache growing": run(plain, size)}
        finally:
            os.close(fd)
            plain_path.unlink()
        for label, direct in (
            ("spill, buffered+recycled", False),
            ("spill, direct (default)", True),
        ):
            spill = SpillFile.create(tmp, EdgeId.new(), 1, 0, direct=direct)
            try:
                results[label] = run(spill.append, size)
            finally:
                spill.remove()
    print(f"MiB/s per {STRETCH} MiB stretch, {size >> 20} MiB in {tmp}; overall; CPU-s per GiB")
    for label, (rates, cpu) in results.items():
        overall = size / MiB / sum(STRETCH / x for x in rates)
        stretches = " ".join(f"{r:6.0f}" for r in rates)
        print(f"  {label:26s} {stretches}   {overall:6.0f} MiB/s  {cpu:5.2f} CPU-s/GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
