"""Running it on nodes: configuration layering and errors, systemd units, notify protocol."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fractalfs.config import NodeConfig, apply, load_file
from fractalfs.testing import is_mounted, unmount

ROOT = Path(__file__).resolve().parent.parent
CMD = [sys.executable, "-m", "fractalfs"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CMD, *args], capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})}
    )


def test_example_configs_load_and_match_the_defaults() -> None:
    config = NodeConfig(mountpoint="/fractal")
    apply(config, load_file(str(ROOT / "daemon" / "fractalfs.toml"), True), "example")
    config.finalize()
    default = NodeConfig(mountpoint="/fractal")
    default.finalize()
    assert config == default


def test_unknown_key_and_bad_value_stop_startup_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('mountpoint = "/x"\nwrite_windo = 5\n')
    got = run("mount", "--config", str(bad))
    assert got.returncode == 2 and got.stderr.strip().splitlines() == [
        f"fractalfs: {bad}: unknown key 'write_windo'"
    ]
    bad.write_text('write_window = "lots"\n')
    got = run("mount", str(tmp_path), "--config", str(bad))
    assert got.returncode == 2 and "write_window must be int" in got.stderr
    got = run("mount", str(tmp_path), env={"FRACTALFS_SIGNAL_POLL": "soon"})
    assert got.returncode == 2 and "environment: signal_poll must be float" in got.stderr
    got = run("discovery", "--config", str(tmp_path / "missing.toml"))
    assert got.returncode == 2 and "no such file" in got.stderr


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    conf = tmp_path / "f.toml"
    conf.write_text('mountpoint = "/from/file"\ndata_listen = "1.2.3.4:x"\n')
    # The file's bad port is overridden by the environment, whose mountpoint is overridden
    # by the command line; the command line's missing directory is what gets reported.
    got = run(
        "mount",
        str(tmp_path / "from-flag"),
        "--config",
        str(conf),
        env={"FRACTALFS_DATA_LISTEN": "127.0.0.1:0", "FRACTALFS_MOUNTPOINT": "/from/env"},
    )
    assert "from-flag: mountpoint does not exist" in got.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_verify(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("fractalfs")
    for unit in (ROOT / "systemd").glob("*.service"):
        text = unit.read_text().replace("/usr/local/bin/fractalfs", str(exe))
        (tmp_path / unit.name).write_text(text)
    got = subprocess.run(
        ["systemd-analyze", "verify", *map(str, tmp_path.glob("*.service"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in got.stderr.splitlines()
        if ("fractalfs" in line and "Failed to" not in line) or "Unknown" in line
    ]
    assert got.returncode == 0 and not problems, got.stderr


def exec_start(unit: str, config: Path) -> list[str]:
    text = (ROOT / "systemd" / unit).read_text()
    line = re.search(r"^ExecStart=(.*)$", text, re.M)
    assert line is not None
    argv = shlex.split(line.group(1))
    assert argv[0] == "/usr/local/bin/fractalfs"
    return [*CMD, *[str(config) if a.startswith("/etc/fractalfs/") else a for a in argv[1:]]]


def notifications(sock: socket.socket, want: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while want not in got and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return got


@pytest.mark.parametrize("unit", ["fractalfs-discovery.service", "fractalfs.service"])
def test_units_command_lines_notify_ready_and_stopping(unit: str, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = tmp_path / "test.toml"
    if unit == "fractalfs.service":
        config.write_text(
            f'mountpoint = "{mnt}"\nstate_dir = "{tmp_path / "state"}"\n'
            'discovery_listen = "127.0.0.1:0"\ndata_listen = "127.0.0.1:0"\n'
        )
    else:
        config.write_text(f'listen = "127.0.0.1:0"\ndb = "{tmp_path / "d.db"}"\n')
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        proc = subprocess.Popen(
            exec_start(unit, config),
            env={**os.environ, "NOTIFY_SOCKET": path},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            got = notifications(sock, "READY=1", 20)
            assert got == ["READY=1"], proc.stderr
            if unit == "fractalfs.service":
                assert is_mounted(mnt)
                os.statvfs(mnt)  # READY means the mount answers
            proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in notifications(sock, "STOPPING=1", 10)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if is_mounted(mnt):
                unmount(mnt)
    assert not is_mounted(mnt)


HELPER = Path("/sbin/mount.fuse.fractalfs")


@pytest.fixture
def mount_helper(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Installs the mount helper where mount(8) looks for it (removed afterwards)."""
    if HELPER.exists() and "fractalfs" not in HELPER.read_text():
        pytest.skip(f"{HELPER} belongs to something else")
    HELPER.write_text(
        f"#!/bin/sh\nFRACTALFS_LOG={tmp_path / 'helper.log'} "
        f'exec {sys.executable} -P -m fractalfs.mount_helper "$@"\n'
    )
    HELPER.chmod(0o755)
    try:
        yield tmp_path / "helper.log"
    finally:
        HELPER.unlink(missing_ok=True)


def test_the_helpers_log_is_not_readable_by_every_user(tmp_path: Path) -> None:
    """A log left world-readable (as an older helper created it) loses its bits for others
    at the next mount, also one that fails (here: no such mountpoint)."""
    log = tmp_path / "helper.log"
    log.write_text("edge 0123456789abcdef0123456789abcdef: writer opened\n")
    log.chmod(0o644)
    got = subprocess.run(
        [sys.executable, "-P", "-m", "fractalfs.mount_helper", "embedded", str(tmp_path / "no")],
        env={**os.environ, "FRACTALFS_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 1 and got.stderr.startswith("mount.fuse.fractalfs: "), got.stderr
    assert log.stat().st_mode & 0o777 == 0o640
    assert log.read_text().startswith("edge 0123")  # appended to, never truncated


def test_mount_command_and_fstab_style_options(mount_helper: Path, tmp_path: Path) -> None:
    from fractalfs.testing import Discovery

    disc = Discovery(tmp_path / "disc")
    disc.start()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"defaults,_netdev,node=helper,data_listen=127.0.0.1:0,state_dir={tmp_path}/st"
    try:
        got = subprocess.run(
            ["mount", "-t", "fuse.fractalfs", disc.url, str(mnt), "-o", opts],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert got.returncode == 0, got.stderr
        assert is_mounted(mnt)  # mount(8) returned: the daemon runs in the background
        # Its log names edges (another node's user needs no more to open one there first).
        assert mount_helper.stat().st_mode & 0o777 == 0o600
        edge = "ab" * 16
        subprocess.run(["bash", "-c", f"echo via mount > {mnt}/{edge}"], check=True, timeout=20)
        assert (mnt / edge).read_bytes() == b"via mount\n"
        bad = subprocess.run(
            ["mount", "-t", "fuse.fractalfs", disc.url, str(tmp_path), "-o", "colour=blue"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode != 0 and "unknown mount option 'colour'" in bad.stderr
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        time.sleep(0.5)
        if is_mounted(mnt):
            unmount(mnt)
        disc.stop()
    assert not is_mounted(mnt)
