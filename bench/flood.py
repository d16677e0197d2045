#!/usr/bin/env python3
"""Pairing latency and a stream's MB/s between two daemons, quiet and under a flood.

    .venv/bin/python bench/flood.py --target data --addresses 2
    .venv/bin/python bench/flood.py --target discovery --addresses 4

A flooder (no secret) from ``--addresses`` loopback addresses of its own (127.0.0.9, ...)
keeps ``--connections`` connections per address at daemon A's data port or at discovery,
sending nothing (``--trickle``: a byte each 0.2 s) and reopening each as soon as it is cut.
Before it, during it (twice, 3 s apart) and after it: ``--pairs`` pairings one at a time
(reader ``head -c 2`` waiting on B, then ``echo x`` into A: the writer's start to the
reader's bytes; median and max) and one ``dd`` of ``--mib`` MiB from A to B. Also A's and
discovery's descriptors. Only figures within one run compare (the VM is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fractalfs.testing import Discovery, Flood, Node


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=["data", "discovery"], default="data")
    ap.add_argument("--addresses", type=int, default=2)
    ap.add_argument("--connections", type=int, default=600, help="per address")
    ap.add_argument("--trickle", action="store_true")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fractalfs-flood-"))
    disc = Discovery(work / "discovery")
    nodes: list[Node] = []
    try:
        disc.start()
        a, b = Node(work, "a", disc.url), Node(work, "b", disc.url)
        nodes += [a, b]
        a.start()
        b.start()

        def fds(pid: int) -> int:
            return len(os.listdir(f"/proc/{pid}/fd"))

        def pair() -> float:
            edge = os.urandom(16).hex()
            reader = subprocess.Popen(["head", "-c", "2", b.path(edge)], stdout=subprocess.PIPE)
            time.sleep(0.3)
            start = time.monotonic()
            subprocess.run(f"echo x > {a.path(edge)}", shell=True, check=True, timeout=120)
            out = reader.communicate(timeout=120)[0]
            if out != b"x\n":
                raise SystemExit(f"pairing failed: {out!r}")
            return (time.monotonic() - start) * 1000

        def mbps() -> float:
            edge = os.urandom(16).hex()
            cat = subprocess.Popen(
                f"dd if={b.path(edge)} of=/dev/null bs=1M 2>/dev/null", shell=True
            )
            start = time.monotonic()
            subprocess.run(
                f"dd if=/dev/zero of={a.path(edge)} bs=1M count={args.mib} 2>/dev/null",
                shell=True,
                check=True,
            )
            cat.wait(300)
            return float(args.mib * 1.048576 / (time.monotonic() - start))

        def measure(label: str) -> None:
            took = sorted(pair() for _ in range(args.pairs))
            rate = mbps()
            print(
                f"{label:>16}: pairing median {statistics.median(took):7.1f} ms, max "
                f"{took[-1]:7.1f} ms; {rate:5.0f} MB/s; descriptors A {fds(a.pid)}, "
                f"discovery {fds(disc.pid)}",
                flush=True,
            )

        if args.target == "data":
            endpoint = a.ready_line.split("data ")[1].split(",")[0]
        else:
            endpoint = disc.url.split("://", 1)[1]
        host, _, port = endpoint.rpartition(":")
        print(
            f"load {os.getloadavg()[0]:.1f}; flood: {args.addresses} x "
            f"{args.connections} at {args.target}"
        )
        measure("quiet")
        with contextlib.ExitStack() as stack:
            floods = [
                stack.enter_context(
                    Flood(f"{host}:{port}", f"127.0.0.{9 + i}", args.connections, args.trickle)
                )
                for i in range(args.addresses)
            ]
            time.sleep(3)
            measure("flood")
            time.sleep(3)
            measure("flood, later")
            print(f"flood opened {sum(f.opened for f in floods)} connections")
        time.sleep(6)
        measure("after")
        print(f"load {os.getloadavg()[0]:.1f}")
    finally:
        for node in reversed(nodes):
            node.stop()
        disc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
