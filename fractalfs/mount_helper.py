"""``mount.fuse.fractalfs``: what mount(8) runs for ``-t fuse.fractalfs``.

    mount -t fuse.fractalfs http://disc:7700 /fractal -o node=a,mode=persistent
    # /etc/fstab:
    http://disc:7700  /fractal  fuse.fractalfs  defaults,_netdev,node=a  0  0

mount(8) calls ``/sbin/mount.fuse.fractalfs SOURCE MOUNTPOINT [-o OPTIONS]``. SOURCE is the
discovery URL (``embedded`` embeds a discovery server). Options named like configuration
keys (``data_listen=``, ``node=``, ``mode=``, ``state_dir=``, ``config=`` ...) set them;
the generic mount options (``rw``, ``defaults``, ``_netdev``, ``noauto`` ...) are ignored.
Like sshfs, the helper returns once the mount answers and leaves the daemon running in the
background; errors are one line and a non-zero exit.
"""

from __future__ import annotations

import os
import select
import stat
import subprocess
import sys
import time
from typing import BinaryIO

from .config import NodeConfig, field_types

GENERIC = {
    "rw",
    "ro",
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "async",
    "sync",
    "atime",
    "noatime",
    "relatime",
    "x-systemd.automount",
}
READY_TIMEOUT = 30.0


class HelperError(Exception):
    pass


def parse(argv: list[str]) -> tuple[str, str, dict[str, str]]:
    positional: list[str] = []
    options: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            for opt in next(args, "").split(","):
                key, _, value = opt.partition("=")
                if not key or key in GENERIC or key.startswith(("x-", "comment=")):
                    continue
                options[key.replace("-", "_")] = value
        elif arg in ("-n", "-v", "-f", "-s"):  # mount(8)'s flags for helpers: nothing to do
            continue
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise HelperError("usage: mount.fuse.fractalfs DISCOVERY-URL MOUNTPOINT [-o OPTIONS]")
    known = set(field_types(NodeConfig)) | {"config"}
    for key in options:
        if key not in known:
            raise HelperError(f"unknown mount option {key!r}")
    return positional[0], positional[1], options


def open_log(path: str) -> BinaryIO:
    """The daemon's log, for appending: created 0600, and never readable by every user
    (its lines name edges, and an edge's name is all another node's user needs to open
    it first there): an existing file loses its bits for others."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o007 and st.st_uid == os.geteuid():
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o007)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, "ab")


def main(argv: list[str] | None = None) -> int:
    try:
        source, mountpoint, options = parse(sys.argv[1:] if argv is None else argv)
    except HelperError as exc:
        print(f"mount.fuse.fractalfs: {exc}", file=sys.stderr)
        return 1
    env = dict(os.environ)
    # -P: mount(8) may run in any directory; a `fractalfs` package planted there must not
    # be what the daemon imports (as root).
    cmd = [sys.executable, "-P", "-m", "fractalfs", "mount", mountpoint]
    if source not in ("embedded", ""):
        cmd += ["--discovery", source]
    if "config" in options:
        cmd += ["--config", options.pop("config")]
    for key, value in options.items():
        env[f"FRACTALFS_{key.upper()}"] = value  # the same typed checks as the config file
    log_path = env.get("FRACTALFS_LOG", "/var/log/fractalfs.log")
    try:
        log = open_log(log_path)
    except OSError as exc:
        print(f"mount.fuse.fractalfs: log {log_path}: {exc.strerror}", file=sys.stderr)
        return 1
    with log:
        start = log.tell()
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # the daemon outlives mount(8)
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready and proc.stdout.readline():
            return 0  # mounted and answering; the daemon carries on in the background
        if proc.poll() is not None:
            with open(log_path, "rb") as f:
                f.seek(start)
                lines = f.read().decode(errors="replace").strip().splitlines()
            print(
                f"mount.fuse.fractalfs: {lines[-1] if lines else 'daemon exited'}", file=sys.stderr
            )
            return 1
    proc.kill()
    print(
        f"mount.fuse.fractalfs: {mountpoint} not mounted after {READY_TIMEOUT:g} s", file=sys.stderr
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
