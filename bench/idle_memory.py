#!/usr/bin/env python3
"""What a waiting reader costs its daemon: N readers open on daemon B and wait (no writer).

    .venv/bin/python bench/idle_memory.py --edges 1000            # RSS per idle reader
    .venv/bin/python bench/idle_memory.py --edges 1000 --trace    # + tracemalloc, top sites
    .venv/bin/python bench/idle_memory.py --edges 1000 --types    # + live objects by type

Prints the time for the N readers to register (first open() to the last returned), daemon
B's RSS before and with the N readers waiting, per reader, the same after
glibc's malloc_trim(0) (what the allocator holds but does not use), the peak RSS while
they registered (VmHWM), and with --trace the
Python memory traced per reader and the allocation sites that hold it (run it without
--trace for RSS: tracing costs memory itself). Readers are threads of helper processes (as
in bench/scale.py), on the reader FIFO route.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import Readers, profilers, raise_limits

from fractalfs.edgeid import EdgeId
from fractalfs.testing import Discovery, Node

HERE = Path(__file__).resolve().parent


def ask_types(probe: Path) -> dict[str, list[int]]:
    """Live objects in the daemon by type: {type: [count, bytes]} (the probe's "types")."""
    got: dict[str, list[int]] = ask(probe, "types")["types"]  # type: ignore[assignment]
    return got


def ask_pymalloc(probe: Path) -> dict[str, int]:
    """pymalloc's totals in the daemon (the probe's "pymalloc")."""
    got: dict[str, int] = ask(probe, "pymalloc")["pymalloc"]  # type: ignore[assignment]
    return got


def ask(probe: Path, what: str) -> dict[str, int]:
    answer = probe / "answer"
    answer.unlink(missing_ok=True)
    (probe / "request.tmp").write_text(what)
    (probe / "request.tmp").rename(probe / "request")
    deadline = time.monotonic() + 120
    while not answer.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon's memory probe did not answer")
        time.sleep(0.05)
    got: dict[str, int] = json.loads(answer.read_text())
    return got


def run(
    work: Path,
    n: int,
    trace: bool,
    top: int,
    profile: Path | None = None,
    by_type: bool = False,
) -> dict[str, object]:
    why = raise_limits(n)
    if why:
        return {"edges": n, "skipped": why}
    probe = work / "probe"
    probe.mkdir(parents=True)
    path = os.pathsep.join(p for p in (str(HERE / "memprobe"), os.environ.get("PYTHONPATH")) if p)
    env = [f"PYTHONPATH={path}", f"FRACTALFS_MEMPROBE={probe}"]
    if trace:
        env.append("PYTHONTRACEMALLOC=8")
    disc = Discovery(work / "discovery")
    disc.start()
    b = Node(work, "b", disc.url, extra=["--mode", "transient"], prefix=["env", *env])
    readers = Readers(100)
    try:
        b.start(timeout=120)
        time.sleep(1.0)
        before = ask(probe, "snap")
        arenas_before = ask_pymalloc(probe)
        types_before = ask_types(probe) if by_type else {}
        spies = profilers({"discovery": disc, "daemon B": b}, profile)
        t0 = time.monotonic()
        for i in range(n):
            readers.start(i, b.path(EdgeId.new().hex))
        deadline = time.monotonic() + max(300, 0.06 * n)
        while len(readers.opened) + len(readers.errors) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"readers did not all register ({len(readers.opened)} of {n})")
            time.sleep(0.2)
        registering_s = time.monotonic() - t0
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        if readers.errors:
            raise RuntimeError(f"readers failed: {readers.errors[:3]}")
        with httpx.Client(timeout=30, auth=disc.auth) as http:
            edges = http.get(f"{disc.url}/v1/edges").json()["edges"]
        registered = sum(e["reader_state"] == "open" for e in edges)
        time.sleep(2.0)
        early = ask(probe, "snap")
        # trio's idle worker threads (the open's hop to the keeper) end 10 s after their
        # last job, and their stacks and malloc arenas with them: idle is measured after.
        time.sleep(12.0)
        idle = ask(probe, "snap")
        arenas_idle = ask_pymalloc(probe)
        trimmed = ask(probe, "trim")
        types_idle = ask_types(probe) if by_type else {}
        holders_idle: object = ask(probe, "holders")["holders"] if by_type else {}
        row: dict[str, object] = {
            "edges": n,
            "registered": registered,
            "traced": trace,
            "readers_registered_s": round(registering_s, 2),
            "descriptors_before": before["fds"],
            "descriptors_idle": idle["fds"],
            "rss_kib_before": before["rss_kib"],
            "rss_kib_idle": idle["rss_kib"],
            "rss_per_reader_kib_2s": round((early["rss_kib"] - before["rss_kib"]) / n, 2),
            "rss_per_reader_kib": round((idle["rss_kib"] - before["rss_kib"]) / n, 2),
            # The peak while they registered: what the opens in flight took at once
            # (the allocator keeps most of it: see rss_per_reader_kib_after_trim).
            "peak_rss_per_reader_kib": round((idle["hwm_kib"] - before["rss_kib"]) / n, 2),
            "rss_per_reader_kib_after_trim": round(
                (trimmed["rss_kib_trimmed"] - before["rss_kib"]) / n, 2
            ),
        }
        # pymalloc (objects up to 512 bytes) against the rest (glibc: larger blocks, the
        # maps' tables, C libraries): where the RSS per reader went, and how much of
        # pymalloc's arenas live objects fill.
        for key, name in (
            ("# arenas allocated current", "pymalloc_arena_bytes_per_reader"),
            ("# bytes in allocated blocks", "pymalloc_used_bytes_per_reader"),
            ("# bytes in available blocks", "pymalloc_free_block_bytes_per_reader"),
            ("# bytes in unused pools", "pymalloc_unused_pool_bytes_per_reader"),
        ):
            grew = arenas_idle.get(key, 0) - arenas_before.get(key, 0)
            if key == "# arenas allocated current":
                grew *= 1 << 20
            row[name] = round(grew / n)
        if by_type:
            grown = {
                kind: (c - types_before.get(kind, [0, 0])[0], b - types_before.get(kind, [0, 0])[1])
                for kind, (c, b) in types_idle.items()
            }
            ranked = sorted(grown.items(), key=lambda kv: -kv[1][1])
            # "map ..." rows name containers already counted under their type.
            objects = sum(b for kind, (_, b) in grown.items() if not kind.startswith("map "))
            row["objects_per_reader_bytes"] = round(objects / n)
            row["by_type"] = [
                {
                    "type": kind,
                    "count_per_reader": round(c / n, 2),
                    "bytes_per_reader": round(b / n),
                }
                for kind, (c, b) in ranked[:top]
                if b > 0
            ]
        if by_type:
            row["holders"] = holders_idle
        if trace:
            row["traced_per_reader_kib"] = round((idle["traced"] - before["traced"]) / n / 1024, 2)
            old = tracemalloc.Snapshot.load(str(probe / f"{before['snap']}.snap"))
            new = tracemalloc.Snapshot.load(str(probe / f"{idle['snap']}.snap"))
            for key, frames in (("top_lines", 1), ("top_stacks", 8)):
                stats = new.compare_to(old, "traceback" if frames > 1 else "lineno")
                row[key] = [
                    {
                        "bytes_per_reader": round(s.size_diff / n),
                        "count_per_reader": round(s.count_diff / n, 2),
                        "where": [
                            f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                            for f in s.traceback
                        ][:frames],
                    }
                    for s in stats[:top]
                ]
        return row
    finally:
        for proc in readers.procs:
            proc.kill()
            proc.wait()
        b.stop()
        disc.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edges", type=int, default=1000)
    ap.add_argument("--trace", action="store_true", help="tracemalloc in daemon B")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--types",
        action="store_true",
        help="live objects by type in daemon B (gc), count and bytes per reader",
    )
    ap.add_argument("--profile", type=Path, help="py-spy B and discovery while readers register")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fractalfs-idle-") as tmp:
        row = run(Path(tmp), args.edges, args.trace, args.top, args.profile, args.types)
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
