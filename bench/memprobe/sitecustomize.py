"""Loaded by a daemon started with this directory on PYTHONPATH (bench/idle_memory.py).

With FRACTALFS_MEMPROBE=DIR set, a thread answers requests written to DIR/request: "snap"
(RSS and, under PYTHONTRACEMALLOC, the traced bytes and a snapshot in DIR/<n>.snap),
"trim" (RSS before and after glibc's malloc_trim) and "types" (live objects by type). The
answer is DIR/answer (JSON). It never touches the mount (see DEVELOPERS.md: a daemon
thread's request to its own mount)."""

import os

_DIR = os.environ.pop("FRACTALFS_MEMPROBE", "")  # not for the children (the keeper)
os.environ.pop("PYTHONTRACEMALLOC", None)


def _rss_kib(field: str = "VmRSS:") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _types() -> dict[str, list[int]]:
    """Live objects by type: gc-tracked objects and the untracked ones they refer to
    (str, bytes, int, ...), each counted once: [count, bytes (sys.getsizeof)]."""
    import gc
    import sys

    seen: set[int] = set()
    out: dict[str, list[int]] = {}

    def add(obj: object) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        kind = type(obj)
        row = out.setdefault(f"{kind.__module__}.{kind.__qualname__}", [0, 0])
        row[0] += 1
        row[1] += sys.getsizeof(obj)

    tracked = gc.get_objects()
    mine = {id(seen), id(out), id(tracked)}  # the probe's own, not the daemon's
    tracked = [obj for obj in tracked if id(obj) not in mine]
    mine.add(id(tracked))
    for obj in tracked:
        add(obj)
    for obj in tracked:
        for ref in gc.get_referents(obj):
            if not gc.is_tracked(ref):
                add(ref)
    # The large containers (per-edge maps), named by what holds them: "map <owner>.<attr>".
    for obj in tracked:
        if isinstance(obj, (dict, set, list)) and len(obj) >= 500:
            name = "?"
            for holder in gc.get_referrers(obj):
                if id(holder) in mine:
                    continue
                attrs = getattr(holder, "__dict__", None)  # 3.11: values held inline
                for attr in (*getattr(type(holder), "__slots__", ()), *(attrs or {})):
                    if attr != "__dict__" and getattr(holder, attr, None) is obj:
                        name = f"{type(holder).__qualname__}.{attr}"
                if type(holder) is dict:  # an instance's __dict__, or a module's
                    keys = [k for k, v in holder.items() if v is obj]
                    for owner in gc.get_referrers(holder):
                        if getattr(owner, "__dict__", None) is holder and keys:
                            name = (
                                f"{getattr(owner, '__name__', type(owner).__qualname__)}.{keys[0]}"
                            )
                if name != "?":
                    break
            size = sys.getsizeof(obj)
            ints = sum(1 for x in gc.get_referents(obj) if type(x) is int and not -5 <= x <= 256)
            out[f"map {name} ({type(obj).__name__}, {len(obj)} items, {ints} ints)"] = [1, size]
    return out


def _holders() -> dict[str, int]:
    """Who holds the untracked long strings and large ints (str of 32 characters and more,
    int above 256): counts by "<held type> in <holder type>[.<slot>]" (a tuple named by
    what holds it). What keeps a per-reader text or number alive."""
    import gc

    out: dict[str, int] = {}
    tracked = gc.get_objects()
    seen: set[int] = set()
    for obj in tracked:
        kind = type(obj)
        slots = [a for c in kind.__mro__ for a in getattr(c, "__slots__", ()) if a != "__dict__"]
        for ref in gc.get_referents(obj):
            if gc.is_tracked(ref) or id(ref) in seen:
                continue
            if (type(ref) is str and len(ref) >= 32) or (
                type(ref) is int and not -5 <= ref <= 256
            ):
                seen.add(id(ref))
                where = kind.__qualname__
                for attr in slots:
                    if getattr(obj, attr, None) is ref:
                        where += "." + attr
                        break
                if kind is dict and len(obj) >= 500:
                    where += f" ({len(obj)} items)"
                if kind is tuple:  # named by what holds the tuple
                    up = [type(h).__qualname__ for h in gc.get_referrers(obj) if h is not tracked]
                    where += f"[{len(obj)}] in {'/'.join(sorted(set(up))) or '?'}"
                held = type(ref).__name__
                if isinstance(ref, str):
                    held = "edge text" if len(ref) == 32 else f"str({len(ref) // 16 * 16}+)"
                key = f"{held} in {where}"
                out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:40])


def _pymalloc() -> dict[str, int]:
    """pymalloc's totals (sys._debugmallocstats, which prints to the C stderr): bytes in
    arenas, in used blocks, and free in pools and arenas: how much of what pymalloc holds
    live objects use."""
    import sys
    import tempfile

    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)  # the daemon's log lines of this instant land here too
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    got: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.rpartition("=")
        key = key.strip()
        if "unused pools" in key:
            key = "# bytes in unused pools"
        if key.startswith("#"):
            number = value.strip().replace(",", "")
            if number.isdigit():
                got[key] = int(number)
    return got


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
        answer: dict[str, object] = {
            "rss_kib": _rss_kib(),
            "hwm_kib": _rss_kib("VmHWM:"),  # the peak RSS so far
            "fds": len(os.listdir("/proc/self/fd")),
        }
        if what == "types":
            answer["types"] = _types()
        elif what == "holders":
            answer["holders"] = _holders()
        elif what == "pymalloc":
            answer["pymalloc"] = _pymalloc()
        elif what == "trim":
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
