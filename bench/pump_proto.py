"""Prototype for issue 8: does moving the per-chunk loop off trio save CPU?

A pipe -> TCP -> pipe relay between two processes with the daemons' framing (5-byte DATA
headers, payload up to 1 MiB per ``sendmsg``, cumulative 9-byte ACKs every 1 MiB, an
8 MiB write window held as views of reused 1 MiB arenas), three ways:

* ``trio``: as the daemons do it: the writer's side a drain task (``wait_readable`` +
  ``readv`` into an arena, views into the window), a sender task (``sendmsg`` header and
  views) and a control task (ACKs free the window); the reader's side a receive task
  (header, then ``recv_into`` arenas, ACKs) and a pour task (``writev`` into the FIFO).
* ``thread``: the same per-chunk work in one worker thread per side looping over
  non-blocking syscalls, ``poll`` (the fd and a wake pipe, as a daemon's cancellation
  would need) on EAGAIN; the GIL is released in them. Trio keeps the control task on the
  writer's side (ACKs free the window; a full window blocks the thread on a condition).
* ``inline``: trio, the reader's receive task ``writev``ing each piece itself (the
  writer's side as ``trio``).

``dd if=/dev/zero bs=B count=N > in.fifo`` feeds the writer, ``dd if=out.fifo bs=B
of=/dev/null`` drains the reader (a run fails unless it got every byte); CPU is each
relay process's user + system time (``os.times()``, the same ticks as /proc/<pid>/stat)
from its connection's start (no interpreter start-up in it). Rounds are interleaved, the
order reversed every other round.

    .venv/bin/python bench/pump_proto.py --size 1G --bs 1M --rounds 4 --modes trio,inline,thread
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct(">BI")
CONTROL = struct.Struct(">BQ")
DATA = 1
ACK = 1
BATCH = 1 << 20
ARENA = 1 << 20
MIN_READ = 64 * 1024
WINDOW = 8 << 20
ACK_EVERY = 1 << 20
F_SETPIPE_SZ = 1031


class Arenas:
    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.spare: list[bytearray] = []
        self.buf = bytearray()
        self.fill = 0

    @property
    def room(self) -> int:
        return len(self.buf) - self.fill

    def next(self) -> None:
        spare = self.spare
        if self.buf:
            spare.append(self.buf)
        for i in range(len(spare)):
            if sys.getrefcount(spare[i]) == UNSHARED:
                self.buf = spare.pop(i)
                break
        else:
            self.buf = bytearray(ARENA)
            if len(spare) > self.keep:
                del spare[-1]
        self.fill = 0


def _refs(spare: list[bytearray], i: int) -> int:
    return sys.getrefcount(spare[i])


UNSHARED = sys.getrefcount(bytearray(1)) + 1  # list slot + argument (as in Arenas.next)


class Window:
    """Views sent, not yet acknowledged: ``end`` bytes taken, ``acked`` freed."""

    def __init__(self) -> None:
        self.views: collections.deque[memoryview] = collections.deque()
        self.end = 0
        self.base = 0  # stream offset of views[0]
        self.acked = 0

    def append(self, view: memoryview) -> None:
        self.views.append(view)
        self.end += len(view)

    def ack(self, upto: int) -> None:
        self.acked = max(self.acked, upto)
        views = self.views
        while views and self.base + len(views[0]) <= self.acked:
            self.base += len(views.popleft())


PIPE_SIZE = [1 << 20]


def _set_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE[0])
    except OSError as exc:
        print(f"F_SETPIPE_SZ {PIPE_SIZE[0]}: {exc}", file=sys.stderr)


_MARK = [0.0, 0.0]


def _cpu_now() -> float:
    t = os.times()
    return t.user + t.system


def ready() -> None:
    _MARK[0] = _cpu_now()
    _MARK[1] = os.times().user
    print("ready", flush=True)


def report() -> None:
    t = os.times()
    print(f"cpu {_cpu_now() - _MARK[0]:.4f} {t.user - _MARK[1]:.4f}", flush=True)


def _retry(poller: select.poll, call: Callable[..., int], *args: Any) -> int:
    """``call()`` on a non-blocking fd, polling (with the wake pipe) on EAGAIN, as a
    daemon's pump must (cancellation wakes the poll, never a close under the thread)."""
    while True:
        try:
            return call(*args)
        except BlockingIOError:
            poller.poll()


# -- writer's side --------------------------------------------------------------------


def writer_trio(fifo: str, port: int) -> None:
    import trio

    async def main() -> None:
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ready()
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        _set_pipe(fd)
        window = Window()
        changed = trio.Event()
        state = {"eof": False}
        arenas = Arenas(WINDOW // ARENA + 2)

        def notify() -> None:
            nonlocal changed
            changed.set()
            changed = trio.Event()

        async def drain() -> None:
            while True:
                while window.end - window.acked >= WINDOW:
                    await changed.wait()
                await trio.lowlevel.wait_readable(fd)
                if arenas.room < MIN_READ:
                    arenas.next()
                at = arenas.fill
                try:
                    n = os.readv(fd, [memoryview(arenas.buf)[at:]])
                except BlockingIOError:
                    continue
                if not n:
                    state["eof"] = True
                    notify()
                    return
                arenas.fill += n
                window.append(memoryview(arenas.buf)[at : at + n])
                notify()
                await trio.lowlevel.checkpoint()

        async def send() -> None:
            pos = 0
            while True:
                # views from pos
                bufs: list[memoryview] = []
                size = 0
                off = window.base
                for v in window.views:
                    if off + len(v) > pos:
                        skip = max(0, pos - off)
                        part = v[skip:]
                        if size + len(part) > BATCH:
                            part = part[: BATCH - size]
                        bufs.append(part)
                        size += len(part)
                        if size >= BATCH:
                            break
                    off += len(v)
                if bufs:
                    out: list[bytes | memoryview] = [HEADER.pack(DATA, size), *bufs]
                    while out:
                        sent = await sock.sendmsg(out)
                        while sent:
                            if sent >= len(out[0]):
                                sent -= len(out.pop(0))
                            else:
                                out[0] = memoryview(out[0])[sent:]
                                sent = 0
                    pos += size
                    continue
                if state["eof"]:
                    await sock.sendmsg([HEADER.pack(2, 0)])
                    return
                await changed.wait()

        async def controls() -> None:
            pending = b""
            while True:
                data = await sock.recv(4096)
                if not data:
                    return
                pending += data
                usable = len(pending) - len(pending) % CONTROL.size
                for at in range(0, usable, CONTROL.size):
                    _, value = CONTROL.unpack_from(pending, at)
                    window.ack(value)
                pending = pending[usable:]
                notify()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            nursery.start_soon(controls)
            await send()
            # wait for the reader to acknowledge and hang up
            while window.acked < window.end:
                await changed.wait()
            nursery.cancel_scope.cancel()
        sock.close()
        os.close(fd)

    trio.run(main)


def writer_thread(fifo: str, port: int) -> None:
    import trio

    async def main() -> None:
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ready()
        fd = os.open(fifo, os.O_RDONLY)
        os.set_blocking(fd, False)
        _set_pipe(fd)
        window = Window()
        cond = threading.Condition()
        raw = socket.socket(fileno=os.dup(sock.fileno()))
        raw.setblocking(False)
        wake_r, wake_w = os.pipe()
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def pump() -> None:
            arenas = Arenas(WINDOW // ARENA + 2)
            rpoll = select.poll()
            rpoll.register(fd, select.POLLIN)
            rpoll.register(wake_r, select.POLLIN)
            wpoll = select.poll()
            wpoll.register(raw.fileno(), select.POLLOUT)
            wpoll.register(wake_r, select.POLLIN)
            while True:
                if window.end - window.acked >= WINDOW:
                    with cond:
                        while window.end - window.acked >= WINDOW:
                            cond.wait()
                if arenas.room < MIN_READ:
                    arenas.next()
                at = arenas.fill
                room = [memoryview(arenas.buf)[at:]]
                n = _retry(rpoll, os.readv, fd, room)
                if not n:
                    _retry(wpoll, raw.send, HEADER.pack(2, 0))
                    break
                arenas.fill += n
                view = memoryview(arenas.buf)[at : at + n]
                out: list[bytes | memoryview] = [HEADER.pack(DATA, n), view]
                while out:
                    sent = _retry(wpoll, raw.sendmsg, out)
                    while sent:
                        if sent >= len(out[0]):
                            sent -= len(out.pop(0))
                        else:
                            out[0] = memoryview(out[0])[sent:]
                            sent = 0
                with cond:
                    window.append(view)
            token.run_sync_soon(done.set)

        async def controls() -> None:
            pending = b""
            while True:
                data = await sock.recv(4096)
                if not data:
                    return
                pending += data
                usable = len(pending) - len(pending) % CONTROL.size
                with cond:
                    for at in range(0, usable, CONTROL.size):
                        _, value = CONTROL.unpack_from(pending, at)
                        window.ack(value)
                    cond.notify()
                pending = pending[usable:]
                if done.is_set() and window.acked >= window.end:
                    return

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        await controls()
        thread.join()
        raw.close()
        sock.close()
        os.close(fd)
        os.close(wake_r)
        os.close(wake_w)

    trio.run(main)


# -- reader's side --------------------------------------------------------------------


def reader_trio(fifo: str, listener: socket.socket) -> None:
    import trio

    async def main() -> None:
        conn_raw, _ = listener.accept()
        listener.close()
        ready()
        sock = trio.socket.from_stdlib_socket(conn_raw)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = os.open(fifo, os.O_WRONLY)
        os.set_blocking(fd, False)
        _set_pipe(fd)
        queue: collections.deque[memoryview] = collections.deque()
        changed = trio.Event()
        state = {"eof": False, "queued": 0}
        arenas = Arenas((8 << 20) // ARENA + 2)
        header = bytearray(HEADER.size)

        def notify() -> None:
            nonlocal changed
            changed.set()
            changed = trio.Event()

        async def receive() -> None:
            got = 0
            acked = 0
            while True:
                while state["queued"] >= 8 << 20:
                    await changed.wait()
                hv = memoryview(header)
                k = 0
                while k < HEADER.size:
                    n = await sock.recv_into(hv[k:])
                    if not n:
                        raise ConnectionError("eof in header")
                    k += n
                kind, length = HEADER.unpack(header)
                if kind == 2:
                    state["eof"] = True
                    notify()
                    if got > acked:
                        await sock.send(CONTROL.pack(ACK, got))
                    return
                while length:
                    if arenas.room < MIN_READ:
                        arenas.next()
                    at = arenas.fill
                    view = memoryview(arenas.buf)[at : at + min(length, arenas.room)]
                    n = await sock.recv_into(view)
                    if not n:
                        raise ConnectionError("eof in payload")
                    arenas.fill += n
                    length -= n
                    got += n
                    queue.append(view[:n])
                    state["queued"] += n
                    notify()
                    if got - acked >= ACK_EVERY:
                        acked = got
                        await sock.send(CONTROL.pack(ACK, got))

        async def pour() -> None:
            while True:
                if not queue:
                    if state["eof"]:
                        return
                    await changed.wait()
                    continue
                parts = list(queue)[:64]
                try:
                    n = os.writev(fd, parts)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
                    continue
                state["queued"] -= n
                while n:
                    head = queue[0]
                    if len(head) <= n:
                        n -= len(head)
                        queue.popleft()
                    else:
                        queue[0] = head[n:]
                        n = 0
                notify()
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await pour()
        os.close(fd)
        sock.close()

    trio.run(main)


def reader_thread(fifo: str, listener: socket.socket) -> None:
    import trio

    async def main() -> None:
        conn_raw, _ = listener.accept()
        listener.close()
        ready()
        conn_raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = os.open(fifo, os.O_WRONLY)
        os.set_blocking(fd, False)
        _set_pipe(fd)
        conn_raw.setblocking(False)
        wake_r, wake_w = os.pipe()  # a cancel would write wake_w

        def pump() -> None:
            arenas = Arenas((8 << 20) // ARENA + 2)
            header = bytearray(HEADER.size)
            hv = memoryview(header)
            got = acked = 0
            rpoll = select.poll()
            rpoll.register(conn_raw.fileno(), select.POLLIN)
            rpoll.register(wake_r, select.POLLIN)
            wpoll = select.poll()
            wpoll.register(fd, select.POLLOUT)
            wpoll.register(wake_r, select.POLLIN)
            wpoll_s = select.poll()
            wpoll_s.register(conn_raw.fileno(), select.POLLOUT)
            wpoll_s.register(wake_r, select.POLLIN)
            while True:
                k = 0
                while k < HEADER.size:
                    part = hv[k:]
                    n = _retry(rpoll, conn_raw.recv_into, part)
                    if not n:
                        raise ConnectionError("eof in header")
                    k += n
                kind, length = HEADER.unpack(header)
                if kind == 2:
                    if got > acked:
                        _retry(wpoll_s, conn_raw.send, CONTROL.pack(ACK, got))
                    return
                while length:
                    if arenas.room < MIN_READ:
                        arenas.next()
                    at = arenas.fill
                    view = memoryview(arenas.buf)[at : at + min(length, arenas.room)]
                    n = _retry(rpoll, conn_raw.recv_into, view)
                    if not n:
                        raise ConnectionError("eof in payload")
                    arenas.fill += n
                    length -= n
                    got += n
                    out = view[:n]
                    while out:
                        w = _retry(wpoll, os.writev, fd, [out])
                        out = out[w:]
                    if got - acked >= ACK_EVERY:
                        acked = got
                        _retry(wpoll_s, conn_raw.send, CONTROL.pack(ACK, got))

        await trio.to_thread.run_sync(pump)
        os.close(wake_r)
        os.close(wake_w)
        os.close(fd)
        conn_raw.close()

    trio.run(main)


def reader_inline(fifo: str, listener: socket.socket) -> None:
    """trio, one task: each received piece is written into the FIFO before the next
    receive (no separate pour task, no queue): which part of the thread's saving is the
    thread, and which is the single loop."""
    import trio

    async def main() -> None:
        conn_raw, _ = listener.accept()
        listener.close()
        ready()
        sock = trio.socket.from_stdlib_socket(conn_raw)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = os.open(fifo, os.O_WRONLY)
        os.set_blocking(fd, False)
        _set_pipe(fd)
        arenas = Arenas((8 << 20) // ARENA + 2)
        header = bytearray(HEADER.size)
        hv = memoryview(header)
        got = acked = 0
        while True:
            k = 0
            while k < HEADER.size:
                n = await sock.recv_into(hv[k:])
                if not n:
                    raise ConnectionError("eof in header")
                k += n
            kind, length = HEADER.unpack(header)
            if kind == 2:
                if got > acked:
                    await sock.send(CONTROL.pack(ACK, got))
                break
            while length:
                if arenas.room < MIN_READ:
                    arenas.next()
                at = arenas.fill
                view = memoryview(arenas.buf)[at : at + min(length, arenas.room)]
                n = await sock.recv_into(view)
                if not n:
                    raise ConnectionError("eof in payload")
                arenas.fill += n
                length -= n
                got += n
                out = view[:n]
                while out:
                    try:
                        w = os.writev(fd, [out])
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(fd)
                        continue
                    out = out[w:]
                if got - acked >= ACK_EVERY:
                    acked = got
                    await sock.send(CONTROL.pack(ACK, got))
        os.close(fd)
        sock.close()

    trio.run(main)


# -- driver ---------------------------------------------------------------------------


def one(mode: str, size: int, bs: int) -> tuple[float, ...]:
    with tempfile.TemporaryDirectory() as tmp:
        fin, fout = f"{tmp}/in", f"{tmp}/out"
        os.mkfifo(fin)
        os.mkfifo(fout)
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        port = lst.getsockname()[1]
        me = [sys.executable, __file__]
        rd = subprocess.Popen(
            [*me, "--role", f"reader-{mode}", "--fifo", fout, "--fd", str(lst.fileno())],
            pass_fds=[lst.fileno()],
            stdout=subprocess.PIPE,
            text=True,
        )
        lst.close()
        wr = subprocess.Popen(
            [*me, "--role", f"writer-{mode}", "--fifo", fin, "--port", str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert wr.stdout is not None and rd.stdout is not None
        assert wr.stdout.readline().strip() == "ready"
        assert rd.stdout.readline().strip() == "ready"
        count = size // bs
        t0 = time.monotonic()
        sink = subprocess.Popen(
            ["dd", f"if={fout}", "of=/dev/null", f"bs={bs}"], stderr=subprocess.PIPE, text=True
        )
        src = subprocess.Popen(
            ["dd", "if=/dev/zero", f"of={fin}", f"bs={bs}", f"count={count}"],
            stderr=subprocess.DEVNULL,
        )
        assert sink.stderr is not None
        copied = sink.stderr.read()
        sink.wait()
        dt = time.monotonic() - t0
        last = {}
        for key, p in (("w", wr), ("r", rd)):
            assert p.stdout is not None
            line = p.stdout.readline().split()
            last[key] = float(line[1]) if line else float("nan")
            last[key + "u"] = float(line[2]) if line else float("nan")
        src.wait()
        for p in (wr, rd):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if sink.returncode or src.returncode:
            raise SystemExit(f"dd failed {src.returncode} {sink.returncode}")
        if f"{size} bytes" not in copied:
            raise SystemExit(f"{mode}: the sink did not get {size} bytes: {copied}")
        gib = size / (1 << 30)
        return (
            size / dt / 1e6,
            last["w"] / gib,
            last["r"] / gib,
            last["wu"] / gib,
            last["ru"] / gib,
        )


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role")
    ap.add_argument("--fifo")
    ap.add_argument("--port", type=int)
    ap.add_argument("--fd", type=int)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--bs", default="1M")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--modes", default="trio,thread")
    args = ap.parse_args()
    if args.role:
        side, mode = args.role.split("-")
        if ":" in mode:
            mode, pipe = mode.split(":")
            PIPE_SIZE[0] = parse_size(pipe)
        if side == "writer":
            (writer_thread if mode == "thread" else writer_trio)(args.fifo, args.port)
        else:
            lst = socket.socket(fileno=args.fd)
            readers = {"trio": reader_trio, "thread": reader_thread, "inline": reader_inline}
            readers[mode](args.fifo, lst)
        report()
        return
    size, bs = parse_size(args.size), parse_size(args.bs)
    modes = args.modes.split(",")
    results: dict[str, list[tuple[float, ...]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        for m in order:
            res = one(m, size, bs)
            results[m].append(res)
            print(
                f"round {r} {m:6} {res[0]:7.0f} MB/s  cpu/GiB w {res[1]:.3f} r {res[2]:.3f}"
                f" (user w {res[3]:.3f} r {res[4]:.3f})"
                f"  load {_load()}",
                flush=True,
            )
    for m in modes:
        rs = results[m]
        print(
            f"{m:6} median {statistics.median(x[0] for x in rs):7.0f} MB/s  cpu/GiB "
            f"w {statistics.median(x[1] for x in rs):.3f} "
            f"r {statistics.median(x[2] for x in rs):.3f} "
            f"sum {statistics.median(x[1] + x[2] for x in rs):.3f} "
            f"user sum {statistics.median(x[3] + x[4] for x in rs):.3f}"
        )


if __name__ == "__main__":
    main()
