#!/usr/bin/env python3
"""Failure figures: fault x payload -> bytes equal? duplicates? time until bytes flow again.

Runs on a three-host cluster of network namespaces (discovery on h0, writer on h1, reader
on h2). The writer is paced so every fault lands mid-stream (at ~40 % of the payload).
"Recovery" is measured from the end of the fault (link back up, re-run started, daemon
restarted) until the reader's output grows again. Results: bench/results/failures.json.

    make bench-failures        # needs root, ip, nsenter, nft
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fractalfs.cluster import Host, NetCluster, available
from fractalfs.edgeid import EdgeId

HERE = Path(__file__).resolve().parent
SLOWCAT = f"{sys.executable} {HERE.parent / 'tests' / 'slowcat.py'}"
MiB = 1 << 20


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def until(pred: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.005)
    return time.monotonic() - t0


class Run:
    def __init__(self, net: NetCluster, src: Path, work: Path, payload: int) -> None:
        self.net, self.src, self.payload = net, src, payload
        self.edge = EdgeId.new().hex
        self.out = work / f"out-{self.edge}"
        self.h0, self.h1, self.h2 = net.hosts
        chunk = max(payload // 32, 4096)
        self.pace = f"--chunk {chunk} --delay {0.05 if payload < 8 * MiB else 0.004}"

    def path(self, host: Host) -> str:
        assert host.node is not None
        return host.node.path(self.edge)

    def reader(self, host: Host) -> subprocess.Popen[bytes]:
        return self.net.run(host, f"cat {self.path(host)} > {self.out}")

    def writer(self, host: Host, extra: str = "") -> subprocess.Popen[bytes]:
        return self.net.run(
            host, f"exec {SLOWCAT} {self.src} {self.path(host)} {self.pace} {extra}"
        )

    def midway(self) -> None:
        until(lambda: size(self.out) >= self.payload * 0.4, 60)

    def recovery(self) -> float:
        before = size(self.out)
        return until(lambda: size(self.out) > before or size(self.out) >= self.payload, 30)

    def verdict(self, reader: subprocess.Popen[bytes]) -> tuple[bool, int]:
        reader.wait(timeout=120)
        data = self.out.read_bytes()
        equal = hashlib.sha256(data).digest() == hashlib.sha256(self.src.read_bytes()).digest()
        return equal, max(0, len(data) - self.payload)


def link_down(r: Run) -> float:
    reader, writer = r.reader(r.h2), r.writer(r.h1)
    r.midway()
    r.net.link(r.h1, up=False)
    time.sleep(3)
    r.net.link(r.h1, up=True)
    rec = r.recovery()
    writer.wait(timeout=60)
    r.result = r.verdict(reader)  # type: ignore[attr-defined]
    return rec


def packet_loss(r: Run) -> float:
    reader, writer = r.reader(r.h2), r.writer(r.h1)
    r.midway()
    r.net.drop(r.h2, 20)
    time.sleep(3)
    r.net.undrop(r.h2)
    rec = r.recovery()
    writer.wait(timeout=60)
    r.result = r.verdict(reader)  # type: ignore[attr-defined]
    return rec


def writer_killed(r: Run) -> float:
    reader, writer = r.reader(r.h2), r.writer(r.h1)
    r.midway()
    os.killpg(writer.pid, signal.SIGKILL)
    time.sleep(0.5)
    rerun = r.net.run(r.h0, f"cat {r.src} > {r.path(r.h0)}")
    rec = r.recovery()
    rerun.wait(timeout=60)
    r.result = r.verdict(reader)  # type: ignore[attr-defined]
    return rec


def writer_daemon_killed(r: Run) -> float:
    reader, writer = r.reader(r.h2), r.writer(r.h1)
    r.midway()
    assert r.h1.node is not None
    r.h1.node.kill()
    os.killpg(writer.pid, signal.SIGKILL)
    r.net.restart_node(r.h1)
    rerun = r.net.run(r.h1, f"cat {r.src} > {r.path(r.h1)}")
    rec = r.recovery()
    rerun.wait(timeout=60)
    r.result = r.verdict(reader)  # type: ignore[attr-defined]
    return rec


def reader_daemon_killed(r: Run) -> float:
    reader, writer = r.reader(r.h2), r.writer(r.h1)
    until(lambda: size(r.out) >= r.payload * 0.4, 60)
    assert r.h2.node is not None
    r.h2.node.kill()
    reader.wait(timeout=10)
    writer.wait(timeout=10)  # released: its acknowledged bytes died with the reader
    r.net.restart_node(r.h2)
    r.out.unlink()
    t0 = time.monotonic()
    reader = r.reader(r.h0)
    r.net.run(r.h1, f"cat {r.src} > {r.path(r.h1)}")
    until(lambda: size(r.out) > 0, 30)
    first_byte = time.monotonic() - t0
    r.result = r.verdict(reader)  # type: ignore[attr-defined]
    return first_byte


def discovery_killed(r: Run) -> float:
    reader, writer = r.reader(r.h2), r.writer(r.h1)
    r.midway()
    assert r.net.discovery is not None
    r.net.discovery.kill()
    t0, last, stall = time.monotonic(), size(r.out), 0.0
    while reader.poll() is None and time.monotonic() - t0 < 60:  # measure the worst stall
        now = size(r.out)
        if now != last:
            last, t0 = now, time.monotonic()
        stall = max(stall, time.monotonic() - t0)
        time.sleep(0.005)
    writer.wait(timeout=60)
    r.result = r.verdict(reader)  # type: ignore[attr-defined]
    r.net.start_discovery()
    return stall


FAULTS: list[tuple[str, Callable[[Run], float], str]] = [
    ("link down 3 s (writer host)", link_down, "after link up"),
    ("20 % packet loss for 3 s", packet_loss, "after loss ends"),
    ("writer killed, re-run elsewhere", writer_killed, "after re-run starts"),
    ("writer daemon killed, restarted", writer_daemon_killed, "after daemon restart"),
    ("reader daemon killed, both re-run", reader_daemon_killed, "re-run to first byte"),
    ("discovery killed mid-stream", discovery_killed, "longest stall"),
]


def main() -> int:
    why = available()
    if why:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, bool, int, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="fractalfs-failures-") as tmp:
        work = Path(tmp)
        srcs = {}
        for label, n in (("1 MiB", MiB), ("256 MiB", 256 * MiB)):
            srcs[label] = (work / f"src-{n}", n)
            srcs[label][0].write_bytes(os.urandom(n))
        for name, fault, measured in FAULTS:
            for label, (src, n) in srcs.items():
                net = NetCluster(
                    work / f"c-{len(rows)}",
                    3,
                    ["--writer-lost-timeout", "60", "--mode", "transient"],
                )
                net.up()
                try:
                    run = Run(net, src, work, n)
                    rec = fault(run)
                    equal, dup = run.result  # type: ignore[attr-defined]
                    rows.append((name, label, equal, dup, rec, measured))
                except Exception as exc:
                    rows.append((name, label, False, -1, float("nan"), f"error: {exc!r}"))
                finally:
                    net.down()
                r = rows[-1]
                print(
                    f"{r[0]:36s} {r[1]:8s} equal={r[2]!s:5s} dup={r[3]:<3d} {r[4]:6.3f} s {r[5]}",
                    flush=True,
                )
    print("\n| fault | payload | bytes equal | duplicate bytes | time until bytes flow again |")
    print("| --- | --- | --- | ---: | ---: |")
    for name, label, equal, dup, rec, measured in rows:
        print(
            f"| {name} | {label} | {'yes' if equal else 'NO'} | {dup} | {rec:.2f} s ({measured}) |"
        )
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "failures.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
