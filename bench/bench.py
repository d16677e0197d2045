#!/usr/bin/env python3
"""fractalfs benchmarks: throughput, line latency and pairing time, each printed next to
baselines measured in the same run (a kernel FIFO and a socat TCP pipeline on loopback).

    make bench                       # everything, 2 GiB per throughput run
    .venv/bin/python bench/bench.py --size 512M --only throughput

Throughput uses `dd if=/dev/zero | <pipe> | dd of=/dev/null` at the given block sizes. The
socat baseline is what a user would do by hand: `dd | socat -u - TCP:...` into
`socat -u TCP-LISTEN:... - | dd`. With --tls, two more daemons with `--tls-dir` (their own
discovery over https) and socat over TLS with the same certificate add two rows: the cost
of TLS in the same run. Results also go to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fractalfs.edgeid import EdgeId
from fractalfs.testing import COMMAND, Discovery, Node, Process

HERE = Path(__file__).resolve().parent
SOCAT = "socat TCP loopback"
TWO_DAEMONS = "fractalfs two daemons"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed_pair(writer_cmd: str, reader_cmd: str, reader_first: float = 0.2) -> float:
    """Starts the reader, then the writer; returns seconds until both are done."""
    reader = subprocess.Popen(["bash", "-c", reader_cmd], stderr=subprocess.PIPE)
    time.sleep(reader_first)
    t0 = time.perf_counter()
    writer = subprocess.run(["bash", "-c", writer_cmd], stderr=subprocess.PIPE, check=False)
    _, err = reader.communicate(timeout=600)
    elapsed = time.perf_counter() - t0
    if writer.returncode or reader.returncode:
        raise RuntimeError(f"{writer_cmd} / {reader_cmd}: {writer.stderr!r} {err!r}")
    return elapsed


@dataclass
class Row:
    """One configuration of the throughput table: how to run it once, and whose CPU to
    count (daemons: writer's, reader's)."""

    name: str
    run: Callable[[str, str], tuple[str, str]]  # (source, sink) -> (writer, reader) commands
    reader_first: float = 0.2
    daemons: tuple[Node, Node] | None = None


def edge_row(name: str, writer: Node, reader: Node) -> Row:
    def run(src: str, sink: str) -> tuple[str, str]:
        edge = EdgeId.new().hex
        return f"{src} of={writer.path(edge)}", f"{sink} if={reader.path(edge)}"

    return Row(name, run, daemons=(writer, reader))


def throughput_rows(
    nodes: tuple[Node, Node],
    work: Path,
    tls: tuple[tuple[Node, Node], Path] | None = None,
    fuse: tuple[Node, Node] | None = None,
    compare: tuple[str, tuple[Node, Node]] | None = None,
) -> list[Row]:
    """The configurations: baselines, then fractalfs. ``tls``: a second pair of daemons with
    ``--tls-dir`` and that directory (rows for them and for socat over TLS with the same
    certificate); ``fuse``: a pair of daemons with both FIFO routes off (every read and
    write a FUSE request); ``compare``: a label and a pair of daemons running another
    tree's code (an A/B under the same load)."""
    fifo = work / "fifo"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)

    def socat(src: str, sink: str) -> tuple[str, str]:
        port = free_port()
        return (
            f"{src} | socat -u - TCP:127.0.0.1:{port}",
            f"socat -u TCP-LISTEN:{port},reuseaddr - | {sink}",
        )

    a, b = nodes
    rows = [
        Row("kernel FIFO", lambda src, sink: (f"{src} of={fifo}", f"{sink} if={fifo}")),
        Row(SOCAT, socat, reader_first=0.5),
        edge_row("fractalfs same node", a, a),
        edge_row(TWO_DAEMONS, a, b),
    ]
    if compare is not None:
        label, (ca, cb) = compare
        rows.append(edge_row(f"two daemons, {label}", ca, cb))
    if fuse is not None:
        rows.append(edge_row("two daemons, FUSE routes", *fuse))
    if tls is not None:
        (ta, tb), d = tls
        opts = f"cert={d}/cert.pem,key={d}/key.pem,cafile={d}/ca.pem,verify=1"

        def socat_tls(src: str, sink: str) -> tuple[str, str]:
            port = free_port()
            return (
                f"{src} | socat -u - OPENSSL:127.0.0.1:{port},{opts},commonname=fractalfs",
                f"socat -u OPENSSL-LISTEN:{port},reuseaddr,{opts} - | {sink}",
            )

        rows.append(Row("socat TLS loopback", socat_tls, reader_first=0.5))
        rows.append(edge_row("fractalfs two daemons TLS", ta, tb))
    return rows


def throughput(rows: list[Row], size: int, bs: str, rounds: int) -> dict[str, dict[str, float]]:
    """Each row ``rounds`` times, interleaved (every row once per round, in order, then in
    reverse): the other developers' load on this VM moves one run by 2x, and interleaving
    spreads it over all rows alike. Per row: median, min and max MB/s, and for daemons the median
    CPU-seconds per GiB of the writer's and the reader's daemon."""
    count = size // parse_size(bs)
    src = f"dd if=/dev/zero bs={bs} count={count} status=none"
    sink = f"dd of=/dev/null bs={bs} status=none"
    gib = size / (1 << 30)
    rates: dict[str, list[float]] = {row.name: [] for row in rows}
    cpu: dict[str, list[tuple[float, float]]] = {row.name: [] for row in rows}
    for i in range(rounds):
        # Every other round runs the rows in reverse: a row's place in the round moved
        # it by up to 40% (two pairs of daemons, A first then B first, 512 MiB, 5 rounds).
        for row in rows if i % 2 == 0 else rows[::-1]:
            writer_cmd, reader_cmd = row.run(src, sink)
            before = (0.0, 0.0)
            if row.daemons is not None:
                before = (cpu_seconds(row.daemons[0]), cpu_seconds(row.daemons[1]))
            t = timed_pair(writer_cmd, reader_cmd, row.reader_first)
            rates[row.name].append(size / t / 1e6)
            if row.daemons is not None:
                w, r = row.daemons
                if w is r:  # one daemon is both ends
                    cpu[row.name].append(((cpu_seconds(w) - before[0]) / gib, 0.0))
                else:
                    cpu[row.name].append(
                        ((cpu_seconds(w) - before[0]) / gib, (cpu_seconds(r) - before[1]) / gib)
                    )
    out: dict[str, dict[str, float]] = {}
    for name, runs in rates.items():
        out[name] = {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}
        if cpu[name]:
            out[name]["writer_cpu_s_per_gib"] = statistics.median(c[0] for c in cpu[name])
            out[name]["reader_cpu_s_per_gib"] = statistics.median(c[1] for c in cpu[name])
    return out


LATENCY_WRITER = r"""
import os, sys, time
n, gap = int(sys.argv[2]), float(sys.argv[3])
fd = os.open(sys.argv[1], os.O_WRONLY)
time.sleep(0.3)
for i in range(n):
    os.write(fd, b"%d\n" % time.monotonic_ns())
    time.sleep(gap)
os.close(fd)
"""

LATENCY_READER = r"""
import os, sys, time, statistics
f = open(sys.argv[1], "rb", buffering=0)
lat, buf = [], b""
while True:
    data = f.read(65536)
    now = time.monotonic_ns()
    if not data:
        break
    buf += data
    *lines, buf = buf.split(b"\n")
    lat += [(now - int(line)) / 1e6 for line in lines]
print(statistics.median(lat), max(lat))
"""


def line_latency(path_w: str, path_r: str, lines: int = 300) -> tuple[float, float]:
    reader = subprocess.Popen(
        [sys.executable, "-c", LATENCY_READER, path_r], stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.2)
    subprocess.run([sys.executable, "-c", LATENCY_WRITER, path_w, str(lines), "0.003"], check=True)
    out, _ = reader.communicate(timeout=60)
    med, worst = map(float, out.split())
    return med, worst


def latency(nodes: tuple[Node, Node], work: Path) -> dict[str, list[float]]:
    fifo = work / "fifo-lat"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    a, b = nodes
    out = {"kernel FIFO": list(line_latency(str(fifo), str(fifo)))}
    edge = EdgeId.new().hex
    out["fractalfs same node"] = list(line_latency(a.path(edge), a.path(edge)))
    edge = EdgeId.new().hex
    out["fractalfs two daemons"] = list(line_latency(a.path(edge), b.path(edge)))
    return out


PAIR_READER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
print("ready", flush=True)
os.read(fd, 1)
print(time.monotonic_ns(), flush=True)
"""


def pairing(nodes: tuple[Node, Node], rounds: int = 15) -> dict[str, float]:
    """Reader already waiting; ms from the writer's open() to the reader's first byte."""
    a, b = nodes
    out: dict[str, float] = {}
    for name, wnode, rnode in (("same node", a, a), ("two daemons", a, b)):
        samples = []
        for _ in range(rounds):
            edge = EdgeId.new().hex
            reader = subprocess.Popen(
                [sys.executable, "-c", PAIR_READER, rnode.path(edge)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "ready"
            time.sleep(0.2)  # the reader's daemon is long-polling discovery by now
            t0 = time.monotonic_ns()
            fd = os.open(wnode.path(edge), os.O_WRONLY)
            os.write(fd, b"x")
            got = int(reader.stdout.readline())
            os.close(fd)
            reader.wait(timeout=10)
            samples.append((got - t0) / 1e6)
        out[f"fractalfs {name}"] = statistics.median(samples)
    return out


FIRST_BYTE = r"""
import os, sys, time
t0 = time.monotonic_ns()
fd = os.open(sys.argv[1], os.O_RDONLY)
os.read(fd, 1)
print((time.monotonic_ns() - t0) / 1e6)
"""


def cpu_seconds(node: Node) -> float:
    """User + system CPU seconds of a daemon, all its threads."""
    assert node.proc is not None
    with open(f"/proc/{node.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def persistence(
    nodes: tuple[Node, Node], pnode: Node, size: int, rounds: int = 5
) -> dict[str, float]:
    """Persistent vs transient edge between two daemons; a re-run reader's first byte."""
    a, b = nodes
    count = size // (1 << 20)
    src = f"dd if=/dev/zero bs=1M count={count} status=none"
    sink = "dd of=/dev/null bs=1M status=none"
    out: dict[str, float] = {}
    # Alternating runs, medians: on a shared 2-core VM one run of each swings by 2x.
    rates: dict[str, list[float]] = {"transient": [], "persistent": []}
    cpu: dict[str, list[tuple[float, float]]] = {"transient": [], "persistent": []}
    gib = size / (1 << 30)
    for _ in range(rounds):
        for mode, wnode in (("transient", a), ("persistent", pnode)):
            edge = EdgeId.new().hex
            os.sync()
            before = (cpu_seconds(wnode), cpu_seconds(b))
            t = timed_pair(f"{src} of={wnode.path(edge)}", f"{sink} if={b.path(edge)}")
            rates[mode].append(size / t / 1e6)
            cpu[mode].append(
                ((cpu_seconds(wnode) - before[0]) / gib, (cpu_seconds(b) - before[1]) / gib)
            )
            if mode == "persistent":
                subprocess.run(["rm", "-f", wnode.path(edge)], check=True)  # frees the spill
    for mode, runs in rates.items():
        out[f"{mode} MB/s (median of {rounds})"] = statistics.median(runs)
        out[f"{mode} MB/s (min)"] = min(runs)
        out[f"{mode} MB/s (max)"] = max(runs)
        out[f"{mode} writer daemon CPU-s/GiB"] = statistics.median(c[0] for c in cpu[mode])
        out[f"{mode} reader daemon CPU-s/GiB"] = statistics.median(c[1] for c in cpu[mode])
    out["persistent/transient (medians)"] = statistics.median(
        rates["persistent"]
    ) / statistics.median(rates["transient"])
    # A re-run reader: the stream is complete in the spill; open -> first byte.
    samples = []
    for _ in range(10):
        edge = EdgeId.new().hex
        subprocess.run(["bash", "-c", f"head -c 4M /dev/zero > {pnode.path(edge)}"], check=True)
        time.sleep(0.4)  # completion recorded
        got = subprocess.run(
            [sys.executable, "-c", FIRST_BYTE, b.path(edge)],
            capture_output=True,
            text=True,
            check=True,
        )
        samples.append(float(got.stdout))
    out["re-run reader open -> first byte ms"] = statistics.median(samples)
    return out


def small_writes(
    nodes: tuple[Node, Node], fuse: tuple[Node, Node] | None = None
) -> dict[str, float]:
    """Writers that write a few KiB at a time (seconds; into a pipe and into an edge read on
    the other daemon; ``fuse``: also through daemons with both FIFO routes off)."""
    a, b = nodes
    out: dict[str, float] = {}
    for label, prog in (
        ("yes | head -c 200000000", "yes abcdefghij | head -c 200000000"),
        ("seq 1 20000000", "seq 1 20000000"),
    ):
        t0 = time.perf_counter()
        subprocess.run(["bash", "-c", f"{prog} | cat > /dev/null"], check=True)
        out[f"{label}, pipe"] = time.perf_counter() - t0
        edge = EdgeId.new().hex
        out[f"{label}, edge"] = timed_pair(
            f"{prog} > {a.path(edge)}", f"cat {b.path(edge)} > /dev/null"
        )
        if fuse is not None:
            edge = EdgeId.new().hex
            out[f"{label}, edge, FUSE routes"] = timed_pair(
                f"{prog} > {fuse[0].path(edge)}", f"cat {fuse[1].path(edge)} > /dev/null"
            )
    return out


# The PaSh "oneliners" word frequencies: tr | grep | tr | sort | uniq -c | sort -rn.
PASH_STAGES = [
    "tr -cs A-Za-z '\\n'",
    "grep -v '^$'",
    "tr A-Z a-z",
    "sort",
    "uniq -c",
    "sort -rn",
]


def pash_input(path: Path, size: int) -> None:
    import random

    rng = random.Random(1)
    vocab = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)
    ]
    vocab = [w.capitalize() if i % 7 == 0 else w for i, w in enumerate(vocab)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    with open(path, "w") as f:
        written = 0
        while written < size:
            line = " ".join(rng.choices(vocab, weights, k=12)) + ",  " + str(written % 97) + ".\n"
            f.write(line)
            written += len(line)


def pash(nodes: tuple[Node, Node], work: Path, size: int) -> dict[str, float]:
    """The pipeline with plain pipes on one node, and with its stages alternating between
    two daemons joined by edges; seconds, and whether the outputs are identical."""
    a, b = nodes
    src = work / "pash-in.txt"
    if not src.exists():
        pash_input(src, size)
    env = {**os.environ, "LC_ALL": "C"}
    t0 = time.perf_counter()
    plain = subprocess.run(
        ["bash", "-c", f"cat {src} | " + " | ".join(PASH_STAGES) + " | sha256sum"],
        capture_output=True,
        env=env,
        check=True,
    ).stdout
    out = {"plain pipes, one node s": time.perf_counter() - t0}
    edges = [EdgeId.new().hex for _ in PASH_STAGES[1:]]
    node = [a, b]
    cmds = []
    for k, stage in enumerate(PASH_STAGES):
        here = node[k % 2]
        inp = f"cat {src}" if k == 0 else f"cat {here.path(edges[k - 1])}"
        dst = f"> {here.path(edges[k])}" if k < len(edges) else "| sha256sum"
        cmds.append(f"{inp} | {stage} {dst}")
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["bash", "-c", c], stdout=subprocess.PIPE, env=env) for c in cmds]
    results = [p.communicate(timeout=600)[0] for p in procs]
    out["stages over two daemons s"] = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"pash over edges: {[p.returncode for p in procs]}")
    out["edges / pipes"] = out["stages over two daemons s"] / out["plain pipes, one node s"]
    out["outputs identical"] = float(results[-1] == plain)
    return out


def print_throughput(r: dict[str, dict[str, float]], size: str, bs: str, rounds: int) -> None:
    socat = r[SOCAT]["median"]
    print(
        f"\nthroughput, {size} at bs={bs}, {rounds} interleaved rounds (MB/s: median [min-max];"
        " ratio of medians vs socat; daemons' CPU-s/GiB, median: writer's, reader's)"
    )
    for name, v in r.items():
        line = (
            f"  {name:32s} {v['median']:6.0f} [{v['min']:4.0f}-{v['max']:4.0f}]"
            f"  x{v['median'] / socat:.2f} socat"
        )
        if "writer_cpu_s_per_gib" in v:
            line += f"   cpu {v['writer_cpu_s_per_gib']:.2f} {v['reader_cpu_s_per_gib']:.2f}"
        print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="2G", help="bytes per throughput run (default 2G)")
    ap.add_argument("--bs", default="1M,64K,4K", help="block sizes (default 1M,64K,4K)")
    ap.add_argument("--small-size", default="256M", help="bytes per run at bs < 64K")
    ap.add_argument("--pash-size", default="64M", help="text for the PaSh pipeline")
    ap.add_argument(
        "--only",
        help="comma-separated sections: throughput, latency, pairing, persistence, "
        "programs, pash (default: all)",
    )
    ap.add_argument(
        "--no-secret",
        action="store_true",
        help="daemons without the cluster secret (the cost of authentication, by difference)",
    )
    ap.add_argument(
        "--no-fuse-compare",
        action="store_true",
        help="skip the comparison daemons with both FIFO routes off (fifo_writers and "
        "fifo_readers false)",
    )
    ap.add_argument(
        "--tls",
        action="store_true",
        help="also two daemons with --tls-dir (and socat over TLS): the cost of TLS",
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds per throughput row (default 3)"
    )
    ap.add_argument(
        "--compare-tree",
        help="also two daemons running the fractalfs code of this source tree (e.g. a git "
        "worktree of main): an A/B in the same run",
    )
    ap.add_argument("--compare-label", help="the name of --compare-tree's row")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    if shutil.which("socat") is None:
        print("bench: socat is needed for the baseline (apt install socat)", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    results: dict[str, Any] = {"size": size}
    with tempfile.TemporaryDirectory(prefix="fractalfs-bench-") as tmp:
        work = Path(tmp)
        secret = "" if args.no_secret else None  # None: testing's shared secret
        disc = Discovery(work / "discovery", secret_file=secret)
        disc.start()
        a = Node(work, "a", disc.url, extra=["--mode", "transient"], secret_file=secret)
        b = Node(work, "b", disc.url, extra=["--mode", "transient"], secret_file=secret)
        tls_procs: list[Process] = []
        try:
            a.start()
            b.start()
            nodes = (a, b)
            tls: tuple[tuple[Node, Node], Path] | None = None
            if args.tls and (only is None or "throughput" in only):
                tls_dir = work / "tls"
                subprocess.run([*COMMAND, "new-tls", str(tls_dir)], check=True)
                # Their own discovery over HTTPS: every node of a cluster agrees on TLS.
                tdisc = Discovery(
                    work / "tls-discovery", secret_file=secret, extra=["--tls-dir", str(tls_dir)]
                )
                tls_procs.append(tdisc)
                tdisc.start()
                extra = ["--mode", "transient", "--tls-dir", str(tls_dir)]
                ta = Node(work, "ta", tdisc.url, extra=extra, secret_file=secret)
                tb = Node(work, "tb", tdisc.url, extra=extra, secret_file=secret)
                for n in (ta, tb):
                    tls_procs.append(n)
                    n.start()
                tls = ((ta, tb), tls_dir)
            fuse: tuple[Node, Node] | None = None
            if not args.no_fuse_compare and (only is None or only & {"throughput", "programs"}):
                fuse_config = work / "fuse-routes.toml"
                fuse_config.write_text("fifo_writers = false\nfifo_readers = false\n")
                extra = ["--mode", "transient", "--config", str(fuse_config)]
                fa = Node(work, "fa", disc.url, extra=extra, secret_file=secret)
                fb = Node(work, "fb", disc.url, extra=extra, secret_file=secret)
                for n in (fa, fb):
                    tls_procs.append(n)
                    n.start()
                fuse = (fa, fb)
            compare: tuple[str, tuple[Node, Node]] | None = None
            if args.compare_tree and (only is None or "throughput" in only):
                tree = str(Path(args.compare_tree).resolve())
                # ``-m fractalfs`` imports from the working directory first.
                prefix = ["sh", "-c", 'cd "$0" && exec "$@"', tree]
                ca = Node(work, "ca", disc.url, extra=["--mode", "transient"], prefix=prefix)
                cb = Node(work, "cb", disc.url, extra=["--mode", "transient"], prefix=prefix)
                for n in (ca, cb):
                    tls_procs.append(n)
                    n.start()
                compare = (args.compare_label or Path(tree).name, (ca, cb))
            if only is None or "throughput" in only:
                rows = throughput_rows(nodes, work, tls, fuse, compare)
                for bs in args.bs.split(","):
                    small = parse_size(bs) < 64 << 10
                    run_size = parse_size(args.small_size) if small else size
                    r = throughput(rows, run_size, bs, args.rounds)
                    results[f"throughput_{bs}"] = r
                    print_throughput(r, args.small_size if small else args.size, bs, args.rounds)
            if only is None or "programs" in only:
                sw = small_writes(nodes, fuse)
                results["small_writes_s"] = sw
                print("\nsmall writes (seconds; the edge is read on the other daemon)")
                for k, v in sw.items():
                    print(f"  {k:40s} {v:8.2f}")
            if only is None or "pash" in only:
                pw = pash(nodes, work, parse_size(args.pash_size))
                results["pash_word_frequencies"] = pw
                print(f"\nPaSh word frequencies, {args.pash_size} of text")
                for k, v in pw.items():
                    print(f"  {k:40s} {v:8.2f}")
            if only is None or "latency" in only:
                lat = latency(nodes, work)
                results["line_latency_ms"] = lat
                print("\nline latency (ms: median, max of 300 lines 3 ms apart)")
                for k, (med, worst) in lat.items():
                    print(f"  {k:24s} {med:8.3f} {worst:8.3f}")
            if only is None or "persistence" in only:
                # The spill on the state disk, and on tmpfs (what the software costs
                # when the disk does not bound it).
                shm = Path(tempfile.mkdtemp(prefix="fractalfs-bench-", dir="/dev/shm"))
                for label, extra in (
                    ("disk", []),
                    ("tmpfs", ["--spill-dir", str(shm)]),
                ):
                    os.sync()  # the previous run's dirty pages must not compete with this one
                    time.sleep(1)
                    p = Node(work, f"p{label}", disc.url, extra=["--mode", "persistent", *extra])
                    p.start()
                    try:
                        per = persistence(nodes, p, size)
                    finally:
                        p.stop()
                    results[f"persistence_{label}"] = per
                    print(f"\npersistence, spill on {label} ({args.size} at bs=1M, two daemons)")
                    for k, v in per.items():
                        print(f"  {k:40s} {v:10.2f}")
                shutil.rmtree(shm, ignore_errors=True)
            if only is None or "pairing" in only:
                pair = pairing(nodes)
                results["pairing_ms"] = pair
                print("\npairing (ms, median: reader waiting, writer open -> first byte)")
                for k, v in pair.items():
                    print(f"  {k:24s} {v:8.2f}")
        finally:
            for proc in reversed(tls_procs):
                proc.stop()
            b.stop()
            a.stop()
            disc.stop()
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
