"""What the daemon can learn about a requesting process from /proc.

pyfuse3 ignores FUSE_INTERRUPT, so a program blocked in a read or write we have not answered
cannot even be SIGKILLed. Waiting handlers therefore poll :func:`signal_pending` for the
process that opened the file and answer EINTR when it has a deliverable signal, which lets
the kernel deliver it (a fatal one kills the program; a caught one runs its handler).

:func:`exit_status` tells, at FLUSH time, whether the closing process is exiting and how:
a writer killed by a signal or exiting non-zero closes its files exactly like one that
finished, and only this tells the two apart (upstream FRACTAL cannot).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import time

PF_EXITING = 0x4


def _mask(value: str) -> int:
    return int(value, 16)


SIGKILL_BIT = 1 << (9 - 1)


#: The inode number of the initial pid namespace (PROC_PID_INIT_INO, fixed by the kernel).
INIT_PID_NS = 0xEFFFFFFC


def sees_every_process() -> bool:
    """Whether this process's /proc shows every process of the machine: it is in the
    initial pid namespace, and /proc is that namespace's (``/proc/self`` is us). A daemon
    in a container sees only the container's processes: a holder of one of its files
    elsewhere is invisible to it, and cannot be found or killed."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
        me = os.readlink("/proc/self")
    except OSError:
        return False
    return ns == INIT_PID_NS and me == str(os.getpid())


def visible(pid: int) -> bool:
    """Whether ``pid`` (a FUSE requester: 0 when the kernel cannot name it in this
    daemon's pid namespace) is a process this daemon's /proc shows."""
    return pid > 0 and os.path.exists(f"/proc/{pid}")


def tgid(tid: int) -> int:
    """The process (thread group) id of thread ``tid``. FUSE's ``ctx.pid`` is the id of the
    requesting *thread*: a worker thread that opened a file may exit long before its
    process closes it, so liveness and exit statuses are the process's, taken from this.
    ``tid`` itself if /proc cannot tell (it is gone, or not a positive id)."""
    if tid <= 0:
        return tid
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return tid


def _status_paths(pid: int, tgid: int) -> tuple[str, ...]:
    """Where to read the signal state of thread ``pid`` of process ``tgid``: the thread's
    own view (its blocked mask, its pending signals and the process's shared ones) while
    it exists, else the process's main thread's. Through ``task/`` so that a thread id
    reused by another process after the thread exited is never read."""
    if tgid <= 0 or tgid == pid:
        return (f"/proc/{pid}/status",)
    return (f"/proc/{tgid}/task/{pid}/status", f"/proc/{tgid}/status")


def _signal_masks(pid: int, tgid: int = 0) -> tuple[int, int, int, bool] | None:
    """(pending, blocked, ignored) signal masks of thread ``pid`` (of process ``tgid``;
    0: ``pid`` is the process) from /proc, and whether it is a zombie, or None if the
    process no longer exists (other OSErrors propagate)."""
    for path in _status_paths(pid, tgid):
        try:
            with open(path, "rb") as f:
                text = f.read()
            break
        except (FileNotFoundError, ProcessLookupError):
            continue
    else:
        return None
    pending = blocked = ignored = 0
    zombie = False
    for line in text.split(b"\n"):
        if line.startswith(b"State:"):
            zombie = line.split()[1:2] in ([b"Z"], [b"X"])
        elif line.startswith((b"SigPnd:", b"ShdPnd:")):
            pending |= _mask(line.split()[1].decode())
        elif line.startswith(b"SigBlk:"):
            blocked = _mask(line.split()[1].decode())
        elif line.startswith(b"SigIgn:"):
            ignored = _mask(line.split()[1].decode())
    return pending, blocked, ignored, zombie


def signal_pending(pid: int, tgid: int = 0) -> bool:
    """True if thread ``pid`` (of process ``tgid``; 0: ``pid`` is the process) has a
    pending signal that is neither blocked nor ignored. Once that thread has exited, the
    process's main thread answers: its shared pending signals are the process's.

    A process that no longer exists counts as interrupted: nobody is waiting any more.
    """
    if pid <= 0:
        return False
    try:
        masks = _signal_masks(pid, tgid)
    except OSError:
        return False
    if masks is None:
        return True
    pending, blocked, ignored, zombie = masks
    if pending & SIGKILL_BIT or pending & ~blocked & ~ignored:
        return True
    return zombie and _group_killed(tgid or pid)


def _group_killed(tgid: int) -> bool:
    """Whether a thread of process ``tgid`` has SIGKILL pending: the process is exiting
    (``exit_group`` from one thread, or a fatal signal, SIGKILLs the others). Asked when
    the thread a handler watches is a zombie: the thread that opened an edge has exited
    with its program, another of its threads still waits in a read or write of it, and
    only the daemon's answer lets that thread (and so the program) end."""
    try:
        tasks = os.listdir(f"/proc/{tgid}/task")
    except OSError:
        return True  # gone: nobody waits any more
    for tid in tasks:
        try:
            with open(f"/proc/{tgid}/task/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"SigPnd:"):
                        if _mask(line.split()[1].decode()) & SIGKILL_BIT:
                            return True
                        break
        except OSError:
            continue
    return False


GONE = -1


def stat_fields(path: str) -> list[bytes]:
    """The fields of a ``/proc/<pid>/stat`` file after the command name (which may hold
    spaces and parentheses): ``fields[0]`` is field 3 (state), field N is ``fields[N - 3]``.
    OSError if the task is gone."""
    with open(path, "rb") as f:
        text = f.read()
    return text[text.rindex(b")") + 2 :].split()


def parent(pid: int) -> int | None:
    """The parent process id of ``pid``, None if it is gone."""
    try:
        return int(stat_fields(f"/proc/{pid}/stat")[4 - 3])
    except (OSError, IndexError, ValueError):
        return None


def _exiting(path: str) -> int | None:
    """The exit code in the ``stat`` file at ``path`` if its task is exiting or a zombie,
    ``GONE`` if there is no such task, else None."""
    try:
        fields = stat_fields(path)
    except OSError:
        return GONE
    state = fields[0]
    flags = int(fields[9 - 3])
    if not (flags & PF_EXITING or state in (b"Z", b"X")):
        return None
    return int(fields[52 - 3]) if len(fields) > 52 - 3 else 0


# close(2) by machine
_CLOSE_SYSCALL = {"x86_64": 3, "aarch64": 57}.get(os.uname().machine, -1)


def closing_a_file(pid: int) -> bool:
    """True if ``pid`` is blocked in close(2) of a descriptor it no longer has: the FLUSH
    being served is (all but certainly) its own. The kernel drops the descriptor from the
    table before it flushes the file, and the program waits in close until we answer, so
    ``/proc/<pid>/syscall`` shows the close while we look. Any doubt answers False."""
    if _CLOSE_SYSCALL < 0 or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/syscall", "rb") as f:
            fields = f.read().split()
        if int(fields[0]) != _CLOSE_SYSCALL:
            return False
        fd = int(fields[1], 16)
    except (OSError, ValueError, IndexError):
        return False  # gone, or running ("running" is not a number)
    try:
        os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return os.path.exists(f"/proc/{pid}")  # in close, the descriptor out of its table
    except OSError:
        return False
    return False  # the descriptor it closes is open again (reused): not ours to judge


def exit_status(pid: int) -> int | None:
    """The wait status of process ``pid`` if it is exiting (or a zombie), else None.

    Reads ``/proc/<pid>/stat``: the process flags (field 9, PF_EXITING) and the exit code
    (field 52, set by the kernel before it closes the exiting process's files). A main
    thread that ended alone (``pthread_exit``) looks the same while other threads run on:
    the process is exiting only once none of its threads is still running.
    """
    status = _exiting(f"/proc/{pid}/stat")
    if status is None or status == GONE:
        return None
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return status
    for tid in threads:
        if tid != str(pid) and _exiting(f"/proc/{pid}/task/{tid}/stat") is None:
            return None  # that thread still runs: so does the process
    return status


def failing_in_group(pgid: int, exclude: int) -> int | None:
    """The wait status of a process of group ``pgid`` descended from ``exclude`` (the
    opener) that is exiting with a non-zero status right now, else None.

    A FLUSH comes from the process closing the file, and a process dying with the file
    open closes it while exiting. When the opener itself runs on, the close was made by
    another holder: a child it handed the file to (``subprocess.Popen(stdout=f)``, or a
    shell's ``exec 3>E; producer >&3``), which shares its process group. Only the
    opener's descendants count: every command of a non-interactive shell script shares
    one group, and a sibling (`grep` finding nothing, exit 1) ending at the moment of a
    holder's close must not fail the stream.
    """
    if pgid <= 0:
        return None
    try:
        names = os.listdir("/proc")
    except OSError:  # out of descriptors: no holder seen failing (the close must not fail)
        return None
    for name in names:
        if not name.isdigit() or int(name) == exclude:
            continue
        try:
            fields = stat_fields(f"/proc/{name}/stat")
            if int(fields[5 - 3]) != pgid or not int(fields[9 - 3]) & PF_EXITING:
                continue
            status = int(fields[52 - 3]) if len(fields) > 52 - 3 else 0
            ppid = int(fields[4 - 3])
        except (OSError, IndexError, ValueError):
            continue
        if status and _descends(ppid, exclude):
            return status
    return None


PEERS_MAX = 64  # a parent with more children (a pool of writers) counts alone
FDS_MAX = 64  # a writer's pipes looked for among its first this many descriptors


def pipeline_peers(pid: int) -> tuple[tuple[int, ...], int, bool]:
    """The processes next to ``pid`` in its pipeline, as they are now, and how many of
    them are upstream of it: its parent (first), then the parent's children feeding it
    through a pipe (the ``n`` after the parent), then its other children of ``pid``'s
    process group (a non-interactive shell runs a whole script in one group; the stage's
    supervisor is in another); alive ones only (a zombie ended before the open: it cut
    nothing). In ``a | b | c > E`` (or ``c <(a) > E``) ``a`` and ``b`` are upstream of
    ``c``: the stdout of each is a pipe ``c`` or another upstream one reads. In ``split
    --filter='cat > E'`` the peers are ``split`` and the other filters, none upstream
    but the parent. Last, whether the parent feeds ``pid`` itself (holds a pipe ``pid``
    reads: ``split``). Empty when the parent is in another group or they cannot be read."""
    try:
        fields = stat_fields(f"/proc/{pid}/stat")
        ppid, pgid = int(fields[4 - 3]), int(fields[5 - 3])
    except (OSError, IndexError, ValueError):
        return (), 0, False
    if ppid <= 1 or _group(ppid) != pgid:
        return (), 0, False  # the parent is another group's (a supervisor): none of its children
    candidates = [ppid]
    with contextlib.suppress(OSError, ValueError):
        for tid in os.listdir(f"/proc/{ppid}/task"):
            with open(f"/proc/{ppid}/task/{tid}/children") as f:
                candidates.extend(int(c) for c in f.read().split())
    if len(candidates) > PEERS_MAX + 1:
        candidates = [ppid]
    groups = {p: _group(p) for p in dict.fromkeys(candidates[1:]) if p != pid}
    # Upstream: a child whose stdout is a pipe that pid, or an upstream one, reads; of
    # any group (setsid a | b > E, timeout 9 a | b > E), but alive.
    pipes = _read_pipes(pid)
    feeds = bool(pipes & _pipes(ppid))
    writes: dict[str, list[int]] = {}  # pipe -> the live children writing it as stdout
    if pipes:
        for p, group in groups.items():
            if group != -1 and (link := _link(p, 1)).startswith("pipe:"):
                writes.setdefault(link, []).append(p)
    upstream: list[int] = []
    while pipes and writes:
        found = [p for pipe in pipes for p in writes.pop(pipe, ())]
        upstream += found
        pipes = set().union(*(_read_pipes(p, ("0",)) for p in found))
    up = set(upstream)
    others = [p for p, group in groups.items() if group == pgid and p not in up]
    return (ppid, *upstream, *others), len(upstream), feeds


def _read_pipes(pid: int, fds: tuple[str, ...] = ()) -> set[str]:
    """The pipes ``pid`` reads among ``fds`` (default: its first ``FDS_MAX``), as /proc
    names them. Read ends only: a script's stdout and stderr are often one pipe (``2>&1 |
    logger``), which every process of it writes."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in fds or sorted(os.listdir(f"/proc/{pid}/fd"), key=int)[:FDS_MAX]:
            link = _link(pid, fd)
            if not link.startswith("pipe:"):
                continue
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("flags:") and int(line.split()[1], 8) & os.O_ACCMODE == 0:
                        found.add(link)
                        break
    return found


def _pipes(pid: int) -> set[str]:
    """The pipes among ``pid``'s first ``FDS_MAX`` descriptors, either end."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int)[:FDS_MAX]:
            if (link := _link(pid, fd)).startswith("pipe:"):
                found.add(link)
    return found


def _link(pid: int, fd: int | str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def _group(pid: int) -> int:
    """``pid``'s process group, -1 if it is gone or a zombie."""
    try:
        fields = stat_fields(f"/proc/{pid}/stat")
        return -1 if fields[0] in (b"Z", b"X") else int(fields[5 - 3])
    except (OSError, IndexError, ValueError):
        return -1


def _descends(pid: int, ancestor: int, depth: int = 32) -> bool:
    """True if ``pid`` is ``ancestor`` or one of its descendants (by /proc parent links)."""
    for _ in range(depth):
        if pid == ancestor:
            return True
        up = parent(pid) if pid > 1 else None
        if up is None:
            return False
        pid = up
    return False


def dying(pid: int) -> bool:
    """True if process ``pid`` is gone, exiting, or has a SIGKILL pending: its files are
    being or about to be closed, though the kernel may not have sent their RELEASE yet."""
    if exit_status(pid) is not None:
        return True
    try:
        masks = _signal_masks(pid)
    except OSError:
        return True
    return masks is None or bool(masks[0] & SIGKILL_BIT)


CLK_TCK = os.sysconf("SC_CLK_TCK")


_scan: tuple[float, dict[int, tuple[int, int]]] = (float("-inf"), {})
SCAN_AGE = 0.05  # a /proc scan serves every caller this long (a burst of opens: one scan)


def _scan_groups() -> dict[int, tuple[int, int]]:
    """pgid -> (CPU ticks, run-queue ns) of every process group, from one /proc scan."""
    groups: dict[int, tuple[int, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:  # out of descriptors: no times (an open must not fail for them)
        return groups
    for name in names:
        if not name.isdigit():
            continue
        try:
            fields = stat_fields(f"/proc/{name}/stat")
            pgid = int(fields[5 - 3])
            cpu = sum(int(x) for x in fields[14 - 3 : 18 - 3])
            with open(f"/proc/{name}/schedstat", "rb") as f:
                queued = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        old_cpu, old_queued = groups.get(pgid, (0, 0))
        groups[pgid] = (old_cpu + cpu, old_queued + queued)
    return groups


def group_times(pgid: int, max_age: float = SCAN_AGE) -> tuple[float, float]:
    """(CPU seconds, run-queue seconds) of process group ``pgid``.

    CPU is user + system, own and reaped children's (/proc/<pid>/stat). Run-queue time is
    how long its processes were runnable but not running (/proc/<pid>/schedstat): on a busy
    node that is waiting for a core, not waiting on inputs, and a replay would not repeat it.
    One scan of /proc answers for every group, and serves every call within ``max_age``
    seconds: a thousand writers opened at once cost one scan, not a thousand.
    """
    global _scan
    now = time.monotonic()
    if now - _scan[0] > max_age:
        _scan = (now, _scan_groups())
    cpu, queued = _scan[1].get(pgid, (0, 0))
    return cpu / CLK_TCK, queued / 1e9


# A reader that ends with one of these signals asked for no more, as every program at the
# head of a shell pipeline does: SIGPIPE (its own output was closed, `cat E | head -1`),
# SIGINT (Ctrl-C), SIGTERM (`kill`, a job being cancelled), SIGHUP (its terminal went).
# Anything else that kills it (SIGKILL, SIGSEGV, SIGABRT, ...) or a non-zero exit is a
# failure, and its writer keeps the bytes for a re-run reader.
EARLY_CLOSE_SIGNALS = frozenset({1, 2, 13, 15})  # SIGHUP, SIGINT, SIGPIPE, SIGTERM
#: A reader closed before it read a byte, by a program still running (bzip2 checks its
#: input with an open and a close, then opens it again and reads): how long it may take
#: to open the edge again before that close counts as "no more" (both reader routes).
REOPEN_GRACE = 0.5


def reader_closed_early(status: int | None) -> bool:
    """Whether a reader that closed before the end, with wait status ``status`` (None: it
    was still running), means "no more" (the writer gets EPIPE, as through a pipe) rather
    than "failed" (the stream is kept for a re-run)."""
    if status is None or status == 0:
        return True
    signum = status & 0x7F
    return signum in EARLY_CLOSE_SIGNALS


# write(2), pwrite64(2), writev(2), pwritev(2), pwritev2(2) by machine
_WRITE_SYSCALLS = {
    "x86_64": frozenset({1, 18, 20, 296, 328}),
    "aarch64": frozenset({64, 66, 68, 70, 287}),
}.get(os.uname().machine, frozenset())


def link_path(target: str) -> str:
    """The path of a ``/proc/<pid>/fd`` link. Edge entries are never cached: a later
    lookup of the same name (another open, a stat) that answers another inode leaves the
    open file's dentry unhashed, and the kernel shows it as "<path> (deleted)"."""
    return target.removesuffix(" (deleted)")


def mount_id(fd: int) -> int | None:
    """The mount id of this process's open file ``fd`` (fdinfo ``mnt_id``), or None."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f.read().splitlines():
                if line.startswith(b"mnt_id:"):
                    return int(line.split(b":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def holds_file(
    pid: int, name: str, ino: int | None = None, mnt: int | None = None, *, writing: bool = False
) -> bool:
    """Whether process ``pid`` holds a file whose path ends in ``/name``, open for reading
    (``writing``: for writing), of inode ``ino`` on mount ``mnt`` (:func:`mount_id` of the
    daemon's own end of it; None: any).

    Link text first, then ``/proc/<pid>/fdinfo``: never a ``stat`` through the link, which
    for a file on this daemon's mount is a request to this very daemon, maybe from the
    thread that must answer it. An inode number names an inode only within one mount
    (another fractalfs mount numbers its inodes alike, any file elsewhere may be called
    ``name``): with ``mnt`` the fdinfo ``mnt_id`` must match too."""
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return False
    suffix = "/" + name
    unwanted = os.O_RDONLY if writing else os.O_WRONLY
    for fd in fds:
        try:
            if not link_path(os.readlink(f"{base}/{fd}")).endswith(suffix):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                info = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
            if int(info.get(b"flags", b"0").strip(), 8) & os.O_ACCMODE == unwanted:
                continue
            seen_ino = info.get(b"ino")
            if ino is not None and seen_ino is not None and int(seen_ino.strip()) != ino:
                continue
            seen_mnt = info.get(b"mnt_id")
            if mnt is not None and (seen_mnt is None or int(seen_mnt.strip()) != mnt):
                continue
        except (OSError, ValueError):
            continue
        return True
    return False


def _writing_to(task: str, name: str) -> bool:
    """Whether the thread at ``task`` (a /proc directory) is inside a write to a file whose
    path ends in ``name``."""
    try:
        with open(f"{task}/syscall", "rb") as f:
            fields = f.read().split()
        if int(fields[0]) not in _WRITE_SYSCALLS:
            return False
        return link_path(os.readlink(f"{task}/fd/{int(fields[1], 16)}")).endswith(name)
    except (OSError, ValueError, IndexError):
        return False


def sigpipe_writer(pid: int, name: str, tid: int = 0) -> bool:
    """Sends SIGPIPE to process ``pid`` if one of its threads (``tid`` first, the one that
    opened the file) is now inside a write to a file whose path ends in ``name``, as the
    kernel's pipe code does before failing a write with EPIPE. A FUSE filesystem can only
    answer EPIPE, which a program that (like most) leaves SIGPIPE at its default takes for
    an error (`yes: standard output: Broken pipe`, exit 1) where a pipe would have ended it
    quietly (killed by SIGPIPE, status 141 in a shell)."""
    if not _writing_to(f"/proc/{pid}/task/{tid or pid}", name) and not _any_task_writing(pid, name):
        # The opener may have handed its descriptor to a child that writes: `timeout 60
        # yes > E` (the shell opens E, execs timeout, which forks yes), `(a; b) > E`.
        for child in _descendants(pid):
            if _any_task_writing(child, name):
                pid = child
                break
        else:
            return False
    try:
        os.kill(pid, 13)  # SIGPIPE
    except OSError:
        return False
    return True


def _any_task_writing(pid: int, name: str) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(_writing_to(f"/proc/{pid}/task/{t}", name) for t in tasks)


def _descendants(pid: int, limit: int = 4096) -> list[int]:
    """``pid``'s children, theirs, ... (breadth first, at most ``limit``)."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < limit:
        parent_pid = todo.pop(0)
        try:
            tids = os.listdir(f"/proc/{parent_pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent_pid}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def describe_status(status: int) -> str:
    if status & 0x7F:
        return f"killed by signal {status & 0x7F}"
    return f"exited with status {(status >> 8) & 0xFF}"


# -- exit events -------------------------------------------------------------------------
#
# GNU tools close stdout in an atexit handler and only then exit, so their FLUSH and RELEASE
# come while they still run and /proc cannot tell yet how they will end. The kernel's proc
# connector reports every process exit with its code, even after the parent has reaped it.
# It only works in the initial network namespace (and as root); elsewhere we poll /proc.

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXIT = 0x80000000
_NLMSG = struct.Struct("=IHHII")
_CNMSG = struct.Struct("=IIIIHH")
_EVENT_OFFSET = _NLMSG.size + _CNMSG.size
_EXIT = struct.Struct("=IIII")  # pid, tgid, exit_code, exit_signal


# The connector sends every fork, exec, uid/gid/sid change, comm change and thread exit of
# the host. A classic BPF filter on the socket keeps only the exits of whole processes
# (pid == tgid), so a busy host's other programs neither wake the daemon nor fill the
# socket's buffer (ENOBUFS: the events lost make outcomes unknown). `BPF_ABS` loads are
# big-endian: the event type 0x80000000, little-endian in memory, reads as 0x00000080.
_WHAT_AT = _EVENT_OFFSET
_PID_AT = _EVENT_OFFSET + 16
_BPF = struct.Struct("=HBBI")
_EXIT_AS_LOADED = int.from_bytes(struct.pack("=I", PROC_EVENT_EXIT), "big")
SO_ATTACH_FILTER = 26
_EXITS_ONLY = [
    (0x20, 0, 0, _WHAT_AT),  # ld [what]
    (0x15, 0, 4, _EXIT_AS_LOADED),  # jeq EXIT ? next : drop
    (0x20, 0, 0, _PID_AT + 4),  # ld [tgid]
    (0x07, 0, 0, 0),  # tax
    (0x20, 0, 0, _PID_AT),  # ld [pid]
    (0x1D, 1, 0, 0),  # jeq x ? keep : drop
    (0x06, 0, 0, 0),  # drop: ret 0
    (0x06, 0, 0, 0xFFFF),  # keep: ret 65535
]


def _attach_exits_only(sock: socket.socket) -> None:
    code = b"".join(_BPF.pack(*ins) for ins in _EXITS_ONLY)
    buf = ctypes.create_string_buffer(code)
    prog = struct.pack("HL", len(_EXITS_ONLY), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def open_exit_events() -> socket.socket | None:
    """A netlink socket receiving every exit of a whole process, or None where that is
    unavailable. Without the filter (refused) it receives every event, parsed the same."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError:
        return None
    try:
        with contextlib.suppress(OSError):
            _attach_exits_only(sock)
        sock.bind((0, CN_IDX_PROC))
        op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        cn = _CNMSG.pack(CN_IDX_PROC, 1, 0, 0, len(op), 0)
        sock.send(_NLMSG.pack(_NLMSG.size + len(cn) + len(op), 3, 0, 0, 0) + cn + op)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    except OSError:
        sock.close()
        return None
    return sock


def parse_exit_event(data: bytes) -> tuple[int, int] | None:
    """(tgid, wait status) of a PROC_EVENT_EXIT message, else None."""
    if len(data) < _EVENT_OFFSET + 16 + _EXIT.size:
        return None
    (what,) = struct.unpack_from("=I", data, _EVENT_OFFSET)
    if what != PROC_EVENT_EXIT:
        return None
    pid, tgid, code, _sig = _EXIT.unpack_from(data, _EVENT_OFFSET + 16)
    return (tgid, code) if pid == tgid else None  # the whole process, not one thread
