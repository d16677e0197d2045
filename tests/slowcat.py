"""A writer with a pace: copies SRC to DST in chunks, optionally pausing after N bytes.

python slowcat.py SRC DST [--chunk BYTES] [--delay SECONDS] [--pause-after BYTES]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--chunk", type=int, default=1 << 16)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--pause-after", type=int, default=-1)
    args = ap.parse_args()
    fd = os.open(args.dst, os.O_WRONLY)
    done = 0
    with open(args.src, "rb") as src:
        while chunk := src.read(args.chunk):
            os.write(fd, chunk)
            done += len(chunk)
            if 0 <= args.pause_after <= done:
                print("paused", flush=True)
                time.sleep(3600)
            if args.delay:
                time.sleep(args.delay)
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
