"""Loaded by a daemon started with this directory on PYTHONPATH (bench/idle_memory.py).

With FRACTALFS_MEMPROBE=DIR set, a thread answers requests written to DIR/request: "snap"
(RSS and, under PYTHONTRACEMALLOC, the traced bytes and a snapshot in DIR/<n>.snap) and
"trim" (RSS before and after glibc's malloc_trim). The answer is DIR/answer (JSON). It
never touches the mount (see DEVELOPERS.md: a daemon thread's request to its own mount)."""

import os

_DIR = os.environ.pop("FRACTALFS_MEMPROBE", "")  # not for the children (the keeper)
os.environ.pop("PYTHONTRACEMALLOC", None)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _probe(directory: str) -> None:
    import ctypes
    import json
    import time
    import tracemalloc

    libc = ctypes.CDLL("libc.so.6")
    request = os.path.join(directory, "request")
    count = 0
    while True:
        time.sleep(0.1)
        try:
            with open(request) as f:
                what = f.read().strip()
        except FileNotFoundError:
            continue
        os.unlink(request)
        answer: dict[str, object] = {"rss_kib": _rss_kib(), "fds": len(os.listdir("/proc/self/fd"))}
        if what == "trim":
            libc.malloc_trim(0)
            answer["rss_kib_trimmed"] = _rss_kib()
        elif tracemalloc.is_tracing():
            count += 1
            snap = tracemalloc.take_snapshot()
            snap.dump(os.path.join(directory, f"{count}.snap"))
            answer["traced"] = tracemalloc.get_traced_memory()[0]
            answer["snap"] = count
        tmp = os.path.join(directory, "answer.tmp")
        with open(tmp, "w") as f:
            json.dump(answer, f)
        os.rename(tmp, os.path.join(directory, "answer"))


if _DIR:
    import threading

    threading.Thread(target=_probe, args=(_DIR,), daemon=True, name="memprobe").start()
