"""The "pipeline peers" rule (``ExitWatcher.cut_short``) on real scripts: a writer whose
stream is complete on plain pipes ends complete on an edge, whatever else its script's
processes do (a helper killed by the script, a peer that died before the open); the
edge's reader gets every byte and exits 0, with no re-run (none would come)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from .conftest import Pair, needs_fuse

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
