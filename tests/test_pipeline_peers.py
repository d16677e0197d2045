"""The "pipeline peers" rule (``ExitWatcher.cut_short``) on real scripts: a writer whose
stream is complete on plain pipes ends complete on an edge, whatever else its script's
processes do (a helper killed by the script, a peer that died before the open); the
edge's reader gets every byte and exits 0, with no re-run (none would come)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import Pair, needs_fuse, sh, wait_for

pytestmark = needs_fuse

# {E}: the edge, {src}: the input. Each script exits 0 on plain pipes with {E} whole.
WHOLE = {
    # A helper (a keep-alive, a progress monitor) the script kills while the writer writes.
    "helper-killed-midstream": "bash -c 'sleep 100 & H=$!; "
    "{{ sleep 0.3; kill $H; cat {src}; }} | cat > {E}; wait'",
    # ... or kills once the writer is done (the exit event comes just after the writer's).
    "helper-killed-after": "bash -c 'sleep 100 & H=$!; cat {src} > {E}; kill $H; wait'",
    "helper-killed-by-trap": "bash -c 'sleep 100 & trap \"kill $!\" EXIT; cat {src} > {E}'",
    # dash reaps a background job only when it next waits: the killed helper is a zombie
    # peer when the writer opens.
    "dead-before-open-dash": "sh -c 'sleep 100 & kill $!; sleep 0.2; cat {src} > {E}'",
    # Fan-out: one of several background jobs killed by the script (a timeout of its own).
    "fan-out-sibling-killed": "bash -c '(sleep 0.6; exec cat {src}) > {E} & W=$!; "
    "sleep 100 & S=$!; sleep 0.3; kill -9 $S; wait $W'",
    # The script's stdout and stderr one pipe (2>&1 | logger): every process writes it,
    # the helper is still not upstream of the writer.
    "helper-killed-stderr-pipe": "bash -c 'sleep 100 & H=$!; "
    "{{ sleep 0.3; kill $H; cat {src}; }} | cat > {E}; wait' 2>&1 | cat",
    # SIGPIPE of the upstream: head had all it wanted (no cut).
    "yes-head": "bash -c 'yes | head -c 200000 > {E}'",
    "seq-head": "sh -c 'seq 1000000 | head -n 5000 > {E}'",
    # make -j, xargs -P: another job killed by a signal (make and xargs fail on plain
    # pipes for that job; the writer's stream is whole).
    "make-j": "printf 'all: a b\\na:\\n\\texec cat {src} > {E}\\nb:\\n\\tsleep 0.1; "
    "kill -9 $$$$\\n' > {src}.mk && make -s -j2 -f {src}.mk 2>/dev/null || true",
    "xargs-P": "printf '%s\\n' 1 2 3 | xargs -P3 -I@ sh -c "
    "'if [ @ = 1 ]; then exec cat {src} > {E}; else sleep 0.1; kill -9 $$$$; fi' "
    "2>/dev/null || true",
    # The helper killed while the writer (exec'd by the shell, or a subshell) writes.
    "exec": "bash -c 'sleep 100 & H=$!; (sleep 0.3; kill $H) & exec cat {src} > {E}'",
    "subshell-writer": "bash -c 'sleep 100 & H=$!; (sleep 0.3; kill $H; cat {src}) > {E}'",
    # A python parent killed once its writer is done (just after: no order of the events
    # is asked of a parent that feeds the writer, as split does).
    "python-parent-killed-after": "python3 -c 'import subprocess,os,signal; "
    'p = subprocess.Popen(["sh", "-c", "cat {src} > {E}"]); p.wait(); '
    "os.kill(os.getpid(), signal.SIGTERM)' || true",
    # The writer's parent is init (setsid, daemonized): no peers.
    "setsid": "setsid -w sh -c 'cat {src} > {E}'",
}


@pytest.mark.parametrize("name", list(WHOLE))
def test_a_whole_stream_ends_complete_whatever_the_scripts_other_processes_did(
    pair: Pair, tmp_path: Path, name: str
) -> None:
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 800)  # 200 KiB
    _edge, w, r = pair.paths()
    out = tmp_path / "out"
    reader = subprocess.Popen(["bash", "-c", f"cat {shlex.quote(r)} > {out}"])
    try:
        cmd = WHOLE[name].format(src=src, E=shlex.quote(w))
        ref = subprocess.run(["bash", "-c", WHOLE[name].format(src=src, E=tmp_path / "ref")])
        assert ref.returncode == 0, name
        writer = subprocess.run(["bash", "-c", cmd], timeout=30)
        assert writer.returncode == 0, name
        # A failed generation makes the reader wait for a re-run that never comes.
        assert reader.wait(timeout=20) == 0, name
        assert out.read_bytes() == (tmp_path / "ref").read_bytes(), name
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


SLOWCAT = str(Path(__file__).parent / "slowcat.py")
SLOW = f"{sys.executable} {SLOWCAT} {{src}} /dev/stdout --pause-after 65536"
# The slow copy is SIGKILLed midstream; every other process exits 0 (no pipefail).
CUT = {
    "a-b-c": "bash -c '{slow} | cat | cat > {E}'",
    "process-substitution": "bash -c 'cat <({slow}) > {E}'",
    "nohup": "bash -c 'nohup {slow} 2>/dev/null | cat > {E}'",
    "two-inputs": "bash -c 'paste -d= <({slow}) <(cat {src}) > {E}'",
    "dash": "sh -c '{slow} | cat > {E}'",
    "timeout": "bash -c 'timeout 60 {slow} | cat > {E}'",
    "setsid": "bash -c 'setsid {slow} | cat > {E}'",
}


@pytest.mark.parametrize("name", list(CUT))
def test_a_stream_cut_short_by_a_killed_upstream_process_is_no_end(
    pair: Pair, tmp_path: Path, name: str
) -> None:
    """The process feeding the writer through pipes, directly or not, is SIGKILLed: the
    writer reads EOF and exits 0, its script too, but its stream is short. The edge's
    reader must not end (it waits for a re-run)."""
    src = tmp_path / "src"
    src.write_bytes(b"0123456789abcde\n" * 16384)  # 256 KiB
    _edge, w, r = pair.paths()
    out = tmp_path / "out"
    reader = subprocess.Popen(["bash", "-c", f"cat {shlex.quote(r)} > {out}"])
    script = None
    try:
        cmd = CUT[name].format(slow=SLOW.format(src=src), src=src, E=shlex.quote(w))
        script = subprocess.Popen(["bash", "-c", cmd], start_new_session=True)
        wait_for(lambda: out.exists() and out.stat().st_size > 0, 30, "the first bytes")
        os.kill(slowcat_of(src), signal.SIGKILL)
        assert script.wait(timeout=20) == 0, name
        time.sleep(3)
        assert reader.poll() is None, (name, out.stat().st_size)
        whole = tmp_path / "whole"
        sh(CUT[name].format(slow=f"cat {src}", src=src, E=whole))
        assert out.stat().st_size < whole.stat().st_size
    finally:
        for proc in (reader, script):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def slowcat_of(src: Path) -> int:
    """The slow copy of ``src``."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if f.read().split(b"\0")[1:3] == [SLOWCAT.encode(), bytes(src)]:
                    found.append(int(name))
        except OSError:
            continue
    assert len(found) == 1, found
    return found[0]
