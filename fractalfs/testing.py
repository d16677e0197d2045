"""Real processes for tests and benchmarks: a discovery server and node daemons.

Each wrapper starts the real ``fractalfs`` command as a subprocess, waits for its ready
line, and on :meth:`stop` terminates it, unmounts whatever it left and reaps it, so a
failing test never leaves a mount or a process behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

COMMAND = [sys.executable, "-m", "fractalfs"]
_SECRET: Path | None = None


def shared_secret_file() -> Path:
    """One cluster secret (0600) for every daemon this process starts, removed at exit."""
    global _SECRET
    if _SECRET is None:
        from .auth import new_secret

        directory = Path(tempfile.mkdtemp(prefix="fractalfs-secret-"))
        atexit.register(shutil.rmtree, directory, True)
        path = directory / "secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_secret() + "\n")
        _SECRET = path
    return _SECRET


def operator_auth(secret_file: Path | None = None) -> tuple[str, str]:
    """HTTP Basic credentials of the operator (for httpx ``auth=``)."""
    from .auth import load_secret, operator_credentials

    return operator_credentials(load_secret(str(secret_file or shared_secret_file())))


class StartError(RuntimeError):
    pass


def _read_ready(proc: subprocess.Popen[str], timeout: float, log: Path) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line.strip()
        if proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise StartError(f"{' '.join(proc.args)} did not start:\n{log.read_text()[-3000:]}")  # type: ignore[arg-type]


def unmount(path: str | Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


def is_mounted(path: str | Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


class Process:
    """A started fractalfs subprocess with its log file."""

    def __init__(self, args: list[str], log: Path, prefix: list[str] | None = None) -> None:
        self.args = args
        self.log = log
        self.prefix = prefix or []
        self.proc: subprocess.Popen[str] | None = None
        self.ready_line = ""

    def start(self, timeout: float = 15.0) -> str:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen(
                [*self.prefix, *COMMAND, *self.args],
                stdout=subprocess.PIPE,
                stderr=logf,
                text=True,
                start_new_session=True,
            )
        self.ready_line = _read_ready(self.proc, timeout, self.log)
        return self.ready_line

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def stop_later(self, timeout: float = 10.0) -> None:
        """SIGTERM now; the wait for the exit (SIGKILL after ``timeout``) goes on in a
        thread, which the interpreter joins at exit. For a teardown that nothing after it
        depends on: a discovery server waits up to its 1 s shutdown timeout for the
        long-polls of nodes that are gone."""
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        threading.Thread(target=self.stop, args=(timeout,), name="stop-later").start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def log_tails(processes: list[Process], lines: int = 40) -> str:
    """The end of each process's log: for a failed test's report."""
    out = []
    for proc in processes:
        if proc.log.exists():
            out.append(f"--- {proc.log} (alive: {proc.alive()})")
            out.extend(proc.log.read_text(errors="replace").splitlines()[-lines:])
    return "\n".join(out)


class Discovery(Process):
    def __init__(
        self,
        workdir: Path,
        listen: str = "127.0.0.1:0",
        prefix: list[str] | None = None,
        secret_file: Path | str | None = None,
        extra: list[str] | None = None,
    ):
        """``secret_file`` None: the shared test secret; "": serve without one."""
        self.extra = extra or []
        self.workdir = workdir
        self.db = workdir / "discovery.db"
        self.listen = listen
        self.url = ""
        self.secret_file = str(shared_secret_file() if secret_file is None else secret_file)
        super().__init__([], workdir / "discovery.log", prefix)

    @property
    def auth(self) -> tuple[str, str] | None:
        return operator_auth(Path(self.secret_file)) if self.secret_file else None

    def start(self, timeout: float = 15.0) -> str:
        self.args = ["discovery", "--listen", self.listen, "--db", str(self.db)]
        self.args += ["--secret-file", self.secret_file, *self.extra]
        line = super().start(timeout)
        self.url = line.split(" listening on ")[1].split()[0]
        # A restart must come back on the same port.
        self.listen = self.url.split("://", 1)[1]
        return line


class Node(Process):
    def __init__(
        self,
        workdir: Path,
        name: str,
        discovery_url: str | None,
        *,
        listen: str = "127.0.0.1:0",
        advertise: str = "",
        extra: list[str] | None = None,
        prefix: list[str] | None = None,
        secret_file: Path | str | None = None,
    ) -> None:
        """``secret_file`` None: the shared test secret; "": none (state_dir/secret if an
        embedded discovery creates it)."""
        self.name = name
        self.secret_file = str(shared_secret_file() if secret_file is None else secret_file)
        self.mountpoint = workdir / f"mnt-{name}"
        if not is_mounted(self.mountpoint):  # a dead mount may sit there on purpose
            self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.state = workdir / f"state-{name}"
        args = ["mount", str(self.mountpoint), "--node", name, "--data-listen", listen]
        args += ["--state-dir", str(self.state), "--secret-file", self.secret_file]
        if discovery_url:
            args += ["--discovery", discovery_url]
        else:
            args += ["--discovery-listen", "127.0.0.1:0"]
        if advertise:
            args += ["--advertise", advertise]
        args += extra or []
        super().__init__(args, workdir / f"node-{name}.log", prefix)
        self.discovery_url = discovery_url or ""

    def start(self, timeout: float = 15.0) -> str:
        line = super().start(timeout)
        if not self.discovery_url:
            self.discovery_url = line.split("discovery ")[-1].rstrip(")")
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if time.monotonic() > deadline:
                raise StartError(f"{self.mountpoint} not mounted:\n{self.log.read_text()}")
            time.sleep(0.02)
        return line

    def path(self, edge: str) -> str:
        return str(self.mountpoint / edge)

    def stop(self, timeout: float = 10.0) -> int | None:
        code = super().stop(timeout)
        if is_mounted(self.mountpoint):
            unmount(self.mountpoint)
        return code


class Flood:
    """Connections from ``source`` (a loopback address of its own: another peer) to
    ``endpoint`` that send nothing, each reopened as soon as the server closes it: a
    slowloris that keeps ``count`` connections at the port for as long as it runs.
    ``trickle``: each sends a byte every 0.2 s instead (a request head that never ends).
    Used by tests/test_attacks.py and bench/flood.py."""

    def __init__(self, endpoint: str, source: str, count: int, trickle: bool = False) -> None:
        host, _, port = endpoint.rpartition(":")
        self.target, self.source, self.count = (host, int(port)), source, count
        self.trickle = trickle
        self.socks: list[socket.socket] = []
        self.opened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            while len(self.socks) < self.count and not self.stop.is_set():
                s = socket.socket()
                try:
                    s.settimeout(3)  # a full backlog drops SYNs: the kernel resends after 1 s
                    s.bind((self.source, 0))
                    s.connect(self.target)
                    s.setblocking(False)  # with a timeout, even MSG_DONTWAIT polls first
                except OSError:
                    s.close()
                    break
                self.socks.append(s)
                self.opened += 1
            alive = []
            for s in self.socks:
                try:
                    if s.recv(1) == b"":
                        s.close()  # the server closed it: reopened on the next round
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    continue
                if self.trickle:
                    with contextlib.suppress(OSError):
                        s.send(b"G")
                alive.append(s)
            self.socks = alive
            self.stop.wait(0.2 if self.trickle else 0.005)

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        for s in self.socks:
            s.close()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now, for a process started next to bind. Not from the
    kernel's ephemeral range: a port 0 bind handed out a port that another process's
    connect (a test on the other worker) then took as its own source port before etcd
    bound it ("bind: address already in use", a member never healthy; CI, once)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10000, max(10001, low))
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
