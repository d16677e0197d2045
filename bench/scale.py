#!/usr/bin/env python3
"""Scale rows: N edges open at once between two daemons, and discovery with a long history.

    make bench                          # N = 1000; history on SQLite and on etcd
    .venv/bin/python bench/scale.py --edges 1000 --history 100000

Edges: N readers open first on daemon B (threads of helper processes, 100 each, each
open()+read() on the mount), then N writers on daemon A each write 64 KiB and close.
Reported: time to pair all, pairing latency (writer's open() to its reader's first byte)
p50/p99, every stream sha256-exact, nodes declared lost, and RSS/CPU of each process.
History: discovery's
request latency with H delivered edges in its history (rows inserted directly), on SQLite
and on a one-member etcd.
Results also go to bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fractalfs.discovery.etcd import EtcdStore, _edge_value, _put
from fractalfs.discovery.store import Edge, Store
from fractalfs.edgeid import EdgeId
from fractalfs.etcdtesting import EtcdCluster, have_etcd
from fractalfs.testing import Discovery, Node, Process

HERE = Path(__file__).resolve().parent
SIZE = 64 * 1024


def rss_mib(pid: int, field: str = "VmRSS:") -> float:
    """The process's RSS (``VmHWM:``: its peak so far), MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def usage(procs: dict[str, Process]) -> dict[str, dict[str, float]]:
    return {
        name: {"rss_mib": round(rss_mib(p.pid), 1), "cpu_s": round(cpu_s(p.pid), 2)}
        for name, p in procs.items()
    }


def fifo_ends(pid: int) -> int:
    """How many reader FIFO write ends (``MOUNT/.fifo/<ino>``) process ``pid`` holds: the
    waiting readers that got a kernel FIFO (the others read through FUSE)."""
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held += "/.fifo/" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return held


def payload(i: int) -> bytes:
    return random.Random(i).randbytes(SIZE)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def lost_events(url: str, auth: tuple[str, str] | None) -> int:
    lost, after = 0, 0
    with httpx.Client(timeout=30, auth=auth) as http:
        while True:
            got = http.get(f"{url}/v1/events", params={"after": after}).json()
            if not got["events"]:
                return lost
            lost += sum(e["kind"] in ("writer-lost", "reader-lost") for e in got["events"])
            after = got["events"][-1]["seq"]


SPAWNER = """
import os, shutil, sys, threading, time
DD = shutil.which("dd")
lock = threading.Lock()
started = {}
def say(text):
    with lock:
        sys.stdout.write(text + "\\n")
        sys.stdout.flush()
def reap():  # one thread waits for every writer (not a thread per writer: pids run out)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            if done_reading.is_set():
                return
            time.sleep(0.01)
            continue
        with lock:
            i = started.pop(pid)
        say(f"done {i} {os.waitstatus_to_exitcode(status)}")
done_reading = threading.Event()
reaper = threading.Thread(target=reap)
reaper.start()
for line in sys.stdin:  # each writer starts as soon as its line arrives
    i, src, dst = line.split()
    fd = os.open(src, os.O_RDONLY)
    with lock:
        t = time.monotonic()
        pid = os.posix_spawn(DD, ["dd", "of=" + dst, "bs=65536", "status=none"],
                             os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0)])
        started[pid] = i
    os.close(fd)
    say(f"start {i} {t}")
done_reading.set()
reaper.join()
"""


READERS = """
import hashlib, sys, threading, time
threading.stack_size(256 * 1024)  # a reader thread needs little
lock = threading.Lock()
def say(text):
    with lock:
        sys.stdout.write(text + "\\n")
        sys.stdout.flush()
def read(i, path):
    try:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            say(f"open {i} 0")  # the open returns once the daemon registered the reader
            chunk = f.read(SIZE)
            say(f"first {i} {time.monotonic()}")
            while chunk:
                h.update(chunk)
                chunk = f.read(SIZE)
        say(f"done {i} {h.hexdigest()}")
    except OSError as exc:
        say(f"error {i} {exc}")
for line in sys.stdin:  # each reader starts as soon as its line arrives
    i, path = line.split()
    threading.Thread(target=read, args=(int(i), path), daemon=True).start()
while threading.active_count() > 1:
    time.sleep(0.05)
""".replace("SIZE", str(SIZE))


class Readers:
    """Reader threads in helper processes of at most ``per`` readers each: an open on the
    FIFO route looks at the opener's descriptors (a process holding 10,000 read ends
    would make that O(N) per open), and a real workload is many small programs."""

    def __init__(self, per: int) -> None:
        self.per = per
        self.procs: list[subprocess.Popen[str]] = []
        self.opened: set[int] = set()
        self.first_byte: dict[int, float] = {}
        self.digests: dict[int, str] = {}
        self.errors: list[str] = []
        self.done = threading.Condition()
        self._count = 0
        self._threads: list[threading.Thread] = []
        self._mine: list[list[int]] = []  # the readers of each helper process

    def start(self, i: int, path: str) -> None:
        if self._count % self.per == 0:
            proc = subprocess.Popen(
                [sys.executable, "-c", READERS],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            self.procs.append(proc)
            self._mine.append([])
            t = threading.Thread(target=self._follow, args=(proc, self._mine[-1]), daemon=True)
            t.start()
            self._threads.append(t)
        self._count += 1
        self._mine[-1].append(i)
        stdin = self.procs[-1].stdin
        assert stdin is not None
        stdin.write(f"{i} {path}\n")
        stdin.flush()

    def _follow(self, proc: subprocess.Popen[str], mine: list[int]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, i_text, rest = line.rstrip("\n").split(" ", 2)
            i = int(i_text)
            with self.done:
                if kind == "open":
                    self.opened.add(i)
                elif kind == "first":
                    self.first_byte[i] = float(rest)
                elif kind == "done":
                    self.digests[i] = rest
                else:
                    self.errors.append(f"reader {i}: {rest}")
                self.done.notify_all()
        status = proc.wait()
        with self.done:  # a helper killed (a FIFO reader's holders are, on a failure)
            for i in mine:
                if i in self.digests:
                    continue
                if not any(e.startswith(f"reader {i}:") for e in self.errors):
                    self.errors.append(f"reader {i}: its helper process ended ({status})")
            self.done.notify_all()

    def finished(self, i: int) -> bool:
        return i in self.digests or any(f"reader {i}:" in e for e in self.errors)

    def wait(self, i: int, timeout: float) -> None:
        with self.done:
            self.done.wait_for(lambda: self.finished(i), timeout)

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in self._threads:
            t.join(5)


def profilers(procs: dict[str, Process], out: Path | None) -> list[subprocess.Popen[bytes]]:
    """py-spy (if asked for and installed) on every process: collapsed stacks in ``out``."""
    if out is None:
        return []
    spy = Path(sys.executable).parent / "py-spy"
    out.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                str(spy),
                "record",
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                "-o",
                str(out / ("".join(name.split()[:2]) + ".txt")),
                "-p",
                str(p.pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, p in procs.items()
    ]


def raise_limits(n: int) -> str:
    """What N edges at once need here, or why they cannot run (empty: they can).

    The reader's daemon holds one descriptor per waiting reader (its FIFO's write end,
    which is also what the keeper client hands a replaced keeper: `fifokeeper`), each
    keeper one, and each daemon a data connection per edge that is streaming (with
    64 KiB streams, a part of N at a time): N and some descriptors (the daemons inherit
    the limit; root may raise the hard one). A blocked read
    holds a pyfuse3 task (``max_tasks``, from the environment the daemons inherit). Pids:
    a reader thread and a `dd` per edge (the spawner waits for all with one thread)."""
    import resource

    want = n + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        except (ValueError, OSError) as exc:
            # A daemon near its limit hands out FUSE opens (no descriptor) instead of
            # FIFOs (fs.Operations._short_of_descriptors): N fit with N + 4,096.
            if hard < n + 4096:
                return f"needs {n + 4096} descriptors, the limit is {hard} ({exc})"
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            print(
                f"# {n} edges: {want} descriptors wanted, the hard limit is {hard}: readers "
                "past the daemon's descriptor reserve read through FUSE",
                file=sys.stderr,
            )
    with open("/proc/sys/kernel/pid_max") as f:
        if int(f.read()) < 2 * n + 4096:
            return f"needs {2 * n + 4096} pids (kernel.pid_max is lower)"
    os.environ["FRACTALFS_MAX_TASKS"] = str(n + 4096)
    threading.stack_size(256 * 1024)  # a reader thread needs little
    return ""


def edges_row(
    work: Path, n: int, profile: Path | None = None, pairs: int = 200, per_process: int = 100
) -> dict[str, Any]:
    why = raise_limits(n + pairs)
    if why:
        return {"edges": n, "skipped": why}
    disc = Discovery(work / "discovery")
    disc.start()
    a = Node(work, "a", disc.url, extra=["--mode", "transient"])
    b = Node(work, "b", disc.url, extra=["--mode", "transient"])
    procs: dict[str, Process] = {
        "discovery": disc,
        "daemon A (writers)": a,
        "daemon B (readers)": b,
    }
    errors: list[str] = []
    helpers: list[Readers] = []
    spawners: list[subprocess.Popen[str]] = []
    try:
        a.start()
        b.start()
        before = usage(procs)
        spies = profilers(procs, profile)
        edges = [EdgeId.new().hex for _ in range(n + pairs)]
        readers = Readers(per_process)
        helpers.append(readers)
        started: dict[int, float] = {}

        # Writers are processes (one `dd` each): the daemon takes a writer thread that ends
        # while its process lives on for a vanished program. They are started by a helper
        # that holds no file of the mount: a fork of this process would inherit the
        # readers' 1,000 open files, and every child closing them sends FUSE a FLUSH each.
        spawner = subprocess.Popen(
            [sys.executable, "-c", SPAWNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        spawners.append(spawner)
        assert spawner.stdin is not None and spawner.stdout is not None
        for i in range(n + pairs):
            (work / f"payload-{i}").write_bytes(payload(i))

        t_readers = time.monotonic()
        for i in range(n):
            readers.start(i, b.path(edges[i]))
        http = httpx.Client(timeout=30, auth=disc.auth)
        deadline = time.monotonic() + max(300, 0.06 * n)
        # Every reader registered with discovery: its open returned. (Not by listing every
        # edge again and again: at N = 10,000 each listing held discovery's loop ~1 s.)
        while len(readers.opened) + len(readers.errors) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"readers did not all register ({len(readers.opened)} of {n})")
            time.sleep(0.2)
        listed = http.get(f"{disc.url}/v1/edges").json()["edges"]
        registered = sum(e["reader_state"] == "open" for e in listed)
        if registered < n:
            raise RuntimeError(f"{registered} of {n} readers registered with discovery")
        registering_s = time.monotonic() - t_readers
        time.sleep(1.0)
        idle = usage(procs)
        peak_idle = rss_mib(b.pid, "VmHWM:")  # B's peak while the readers registered
        fifos_idle = fifo_ends(b.pid)
        descriptors_idle = len(os.listdir(f"/proc/{b.pid}/fd"))

        def spawned() -> tuple[str, int, str]:
            assert spawner.stdout is not None
            kind, i_text, rest = spawner.stdout.readline().rstrip("\n").split(" ", 2)
            if kind == "start":
                started[int(i_text)] = float(rest)
            elif rest != "0":
                errors.append(f"writer {i_text}: {rest}")
            return kind, int(i_text), rest

        # With the N readers waiting: M more edges paired one at a time (reader open and
        # registered, then its writer), each stream read to its end before the next.
        pairing_readers = Readers(pairs)
        helpers.append(pairing_readers)
        for i in range(n, n + pairs):
            pairing_readers.start(i, b.path(edges[i]))
            while http.get(f"{disc.url}/v1/edges/{edges[i]}").json().get("reader_state") != "open":
                if time.monotonic() > deadline or pairing_readers.finished(i):
                    raise RuntimeError(f"reader {i} did not register")
                time.sleep(0.005)
            spawner.stdin.write(f"{i} {work / f'payload-{i}'} {a.path(edges[i])}\n")
            spawner.stdin.flush()
            while spawned()[0] != "done":
                pass
            pairing_readers.wait(i, 60)
        first_byte = {**readers.first_byte, **pairing_readers.first_byte}
        paired = [
            (first_byte[i] - started[i]) * 1000 for i in range(n, n + pairs) if i in first_byte
        ]
        idle_after_pairs = usage(procs)
        print(  # in case the row does not finish (10,000 writers at once)
            json.dumps(
                {
                    "edges": n,
                    "pairs_ms_p50": round(statistics.median(paired), 1) if paired else None,
                    "pairs_ms_p99": round(percentile(paired, 99), 1) if paired else None,
                    "idle": idle,
                    "after_pairs": idle_after_pairs,
                    "before": before,
                }
            ),
            file=sys.stderr,
            flush=True,
        )

        t0 = time.monotonic()
        deadline = t0 + max(300, 0.1 * n)  # N = 7,700 took 431 s here (0.056 s each)

        def feed_spawner() -> None:
            # From a thread: the spawner answers a line per writer on its stdout, which
            # fills (64 KiB, ~2,000 answers) unless read meanwhile: both would block.
            assert spawner.stdin is not None
            for i in range(n):
                spawner.stdin.write(f"{i} {work / f'payload-{i}'} {a.path(edges[i])}\n")
            spawner.stdin.close()

        feeding = threading.Thread(target=feed_spawner, daemon=True)
        feeding.start()
        for _ in range(2 * n):
            spawned()
        feeding.join()
        spawner.wait()
        readers.close(max(1.0, deadline - time.monotonic()))
        pairing_readers.close(5)
        elapsed = time.monotonic() - t0
        first_byte = {**readers.first_byte, **pairing_readers.first_byte}
        digests = {**readers.digests, **pairing_readers.digests}
        errors += readers.errors + pairing_readers.errors
        after = usage(procs)
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        exact = sum(
            digests.get(i) == hashlib.sha256(payload(i)).hexdigest() for i in range(n + pairs)
        )
        pairing = [(first_byte[i] - started[i]) * 1000 for i in range(n) if i in first_byte]
        return {
            "edges": n,
            "exact": exact,
            "exact_of": n + pairs,
            "pairs_one_at_a_time": pairs,
            "pairs_ms_p50": round(statistics.median(paired), 1) if paired else None,
            "pairs_ms_p99": round(percentile(paired, 99), 1) if paired else None,
            "pairs_ms_max": round(max(paired), 1) if paired else None,
            "errors": errors[:5],
            "time_to_pair_all_s": (
                round(max(first_byte[i] for i in range(n) if i in first_byte) - t0, 2)
                if any(i in first_byte for i in range(n))
                else None
            ),
            "all_done_s": round(elapsed, 2),
            "readers_registered_s": round(registering_s, 2),
            "pairing_ms_p50": round(statistics.median(pairing), 1) if pairing else None,
            "pairing_ms_p99": round(percentile(pairing, 99), 1) if pairing else None,
            "nodes_lost_events": lost_events(disc.url, disc.auth),
            "idle_rss_kib_per_edge_B": round(
                (idle["daemon B (readers)"]["rss_mib"] - before["daemon B (readers)"]["rss_mib"])
                * 1024
                / n,
                2,
            ),
            "peak_rss_kib_per_edge_B": round(
                (peak_idle - before["daemon B (readers)"]["rss_mib"]) * 1024 / n, 2
            ),
            "fifo_readers_idle_B": fifos_idle,
            "descriptors_idle_B": descriptors_idle,
            "usage_before": before,
            "usage_idle_readers": idle,
            "usage_after_pairs": idle_after_pairs,
            "usage_after": after,
        }
    except BaseException as exc:
        errors.append(f"row failed: {exc!r}")
        raise
    finally:
        for helper in helpers:
            for proc in helper.procs:
                proc.kill()
                proc.wait()
        for proc in spawners:  # a row that failed midway: its reaper thread would wait on
            proc.kill()
            proc.wait()
        b.stop()
        a.stop()
        disc.stop()
        if errors:  # keep the logs of a failed row for a look
            (HERE / "results").mkdir(exist_ok=True)
            for name, p in (("discovery", disc), ("a", a), ("b", b)):
                (HERE / "results" / f"scale-n{n}-{name}.log").write_text(p.log.read_text())


def _delivered(now: float) -> Edge:
    return Edge(
        EdgeId.new().hex,
        generation=1,
        writer_node="old",
        writer_endpoint="h:1",
        writer_state="complete",
        bytes_written=10,
        reader_node="old2",
        reader_state="done",
        bytes_delivered=10,
        created=now,
        updated=now,
    )


def history_row(
    work: Path, history: int, backend: str = "sqlite", samples: int = 200
) -> dict[str, Any]:
    now = time.time() - 60
    cluster: EtcdCluster | None = None
    if backend == "etcd":
        cluster = EtcdCluster(work / "etcd", members=1)
        cluster.start()
        store = EtcdStore.from_url(cluster.url)
        for _ in range(0, history, 100):
            puts = []
            for _ in range(100):
                e = _delivered(now)
                puts.append(_put(store._key(e.id), _edge_value(e)))
            store.gateway.txn([], puts)
        store.close()
        args = ["--store", cluster.url]
    else:
        db = work / "history.db"
        Store(db).close()  # the schema and indexes
        with sqlite3.connect(db) as conn:
            conn.executemany(
                "INSERT INTO edges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (astuple(_delivered(now)) for _ in range(history)),
            )
        args = ["--db", str(db)]
    proc = Process(["discovery", "--listen", "127.0.0.1:0", *args], work / f"hist-{backend}.log")
    url = proc.start().split(" listening on ")[1].split()[0]
    try:
        out: dict[str, Any] = {"backend": backend, "history_edges": history}
        with httpx.Client(base_url=url + "/v1", timeout=30) as http:
            live = [EdgeId.new().hex for _ in range(10)]
            for edge in live:
                http.post(f"/edges/{edge}/writer", json={"node": "n1", "endpoint": "h:1"})
            hb = {"boot": "b", "writers": dict.fromkeys(live, 1), "readers": []}
            some = EdgeId.new().hex

            def register() -> None:
                http.post(f"/edges/{EdgeId.new().hex}/reader", json={"node": "n2"})

            requests: dict[str, Callable[[], object]] = {
                "GET /v1/health": lambda: http.get("/health"),
                "GET /v1/edges/{id}": lambda: http.get(f"/edges/{some}"),
                "POST /v1/edges/{id}/reader (new edge)": register,
                "POST /v1/nodes/{node}/heartbeat (10 ends)": lambda: http.post(
                    "/nodes/n1/heartbeat", json=hb
                ),
                "GET /v1/edges?limit=100": lambda: http.get("/edges", params={"limit": 100}),
            }
            for name, call in requests.items():
                times = []
                for _ in range(samples):
                    t = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - t) * 1000)
                out[name] = {
                    "p50_ms": round(statistics.median(times), 2),
                    "p99_ms": round(percentile(times, 99), 2),
                }
            t = time.perf_counter()
            http.post("/nodes/n1/leave")
            out["POST /v1/nodes/{node}/leave (node lost, 10 open ends)_ms"] = round(
                (time.perf_counter() - t) * 1000, 2
            )
        out["discovery_rss_mib"] = round(rss_mib(proc.pid), 1)
        return out
    finally:
        proc.stop()
        if cluster is not None:
            cluster.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edges", type=int, action="append", help="N (repeatable; default 1000)")
    ap.add_argument("--history", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=200, help="M edges paired one at a time")
    ap.add_argument("--profile", type=Path, help="py-spy every process; stacks go here")
    ap.add_argument(
        "--readers-per-process", type=int, default=100, help="reader threads per helper process"
    )
    args = ap.parse_args()
    results: dict[str, Any] = {"edges": [], "history": []}
    with tempfile.TemporaryDirectory(prefix="fractalfs-scale-") as tmp:
        for n in args.edges or [1000]:
            row = edges_row(
                Path(tmp) / f"n{n}", n, args.profile, args.pairs, args.readers_per_process
            )
            results["edges"].append(row)
            print(json.dumps(row, indent=1), flush=True)
        for backend in ("sqlite", "etcd") if args.history else ():
            if backend == "etcd" and not have_etcd():
                continue
            row = history_row(Path(tmp), args.history, backend)
            results["history"].append(row)
            print(json.dumps(row, indent=1), flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scale.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
