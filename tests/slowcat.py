"""A writer with a pace: copies SRC to DST in chunks, optionally pausing after N bytes.

python slowcat.py SRC DST [--chunk BYTES] [--delay SECONDS] [--pause-after BYTES]
                  [--resume-on-usr1] [--hold-after BYTES --until PATH] [--announce]

With --resume-on-usr1 a paused copy goes on when it gets SIGUSR1; a write that fails then
prints "write failed: ERRNO" on stderr and exits 1. With --hold-after, a copy that wrote
that many bytes waits until PATH exists, then goes on (a test's go-ahead: the stage is
still running when its fault hits, however loaded the machine; a re-run started after
the go-ahead does not wait). With --announce it prints "opening" on stdout just before it
opens DST and "closing" just before it closes it (a test stops a daemon at that moment).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--chunk", type=int, default=1 << 16)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--pause-after", type=int, default=-1)
    ap.add_argument("--resume-on-usr1", action="store_true")
    ap.add_argument("--hold-after", type=int, default=-1)
    ap.add_argument("--until", default="")
    ap.add_argument("--announce", action="store_true")
    args = ap.parse_args()
    if args.resume_on_usr1:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    if args.announce:
        print("opening", flush=True)
    fd = os.open(args.dst, os.O_WRONLY)
    done = 0
    with open(args.src, "rb") as src:
        while chunk := src.read(args.chunk):
            try:
                os.write(fd, chunk)
            except OSError as exc:
                print(
                    f"write failed: {errno.errorcode.get(exc.errno or 0, exc.errno)}",
                    file=sys.stderr,
                )
                return 1
            done += len(chunk)
            if 0 <= args.hold_after <= done:
                args.hold_after = -1
                while not os.path.exists(args.until):
                    time.sleep(0.05)
            if 0 <= args.pause_after <= done:
                print("paused", flush=True)
                if args.resume_on_usr1:
                    signal.sigwait({signal.SIGUSR1})
                    args.pause_after = -1
                    continue
                time.sleep(3600)
            if args.delay:
                time.sleep(args.delay)
    if args.announce:
        print("closing", flush=True)
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
