"""Real shell workloads split across three hosts, with faults at the worst moment.

Three network namespaces on a bridge (``fractalfs.cluster.NetCluster``): discovery (SQLite)
on h0, a daemon on each of h0, h1 and h2, every daemon and program entered with
``nsenter --net=`` only. A pipeline's stages run on different hosts joined by edges; each
output is compared byte for byte with the same pipeline on plain pipes.

Faults follow README "Failure semantics": a stage that fails (exit status not 0) is
re-run, as FRACTAL's supervisor would (:class:`Pipeline`); the final output must be
exactly the plain-pipe output, no program may stay blocked, no process in D state and no
mount may be left behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fractalfs.cluster import Host, NetCluster, available

from .conftest import needs_fuse, new_edge, size, wait_for

pytestmark = [
    needs_fuse,
    pytest.mark.skipif(available() is not None, reason=str(available())),
]

# Tiers, to keep `make test` short: unmarked cases run in about a minute; ``slow`` ones
# (two) still run; the rest of the matrix (every fault in both modes,
# every stage) only with FRACTALFS_FAULT_MATRIX=1 (about ten minutes).
FULL_MATRIX = os.environ.get("FRACTALFS_FAULT_MATRIX") == "1"
MATRIX = pytest.mark.skipif(not FULL_MATRIX, reason="full fault matrix: FRACTALFS_FAULT_MATRIX=1")


def tiered(
    cases: Sequence[tuple[str, ...]], core: set[tuple[str, ...]], slow: set[tuple[str, ...]]
) -> list[object]:
    """``cases`` as pytest params: ``core`` unmarked, ``slow`` marked slow, the rest
    only in the full matrix."""
    marks = {c: () for c in core} | {c: (pytest.mark.slow,) for c in slow}
    return [pytest.param(*c, marks=marks.get(c, (pytest.mark.slow, MATRIX))) for c in cases]


SLOWCAT = f"{sys.executable} {Path(__file__).with_name('slowcat.py')}"
KiB, MiB = 1 << 10, 1 << 20
WORDS = ["the", "quick", "Brown", "fox", "jumps", "over", "lazy", "DOGS", "Alpha", "beta"]
WORDS += ["GAMMA", "stream", "pipe", "edge", "re-run", "fence", "reader", "writer", "once"]


def text(path: Path, nbytes: int, seed: int) -> Path:
    """Deterministic text with mixed case and punctuation, ``nbytes`` long."""
    rng = random.Random(seed)
    words = WORDS + [f"w{rng.randrange(5000)}x" for _ in range(3000)]
    out, n = [], 0
    while n < nbytes:
        line = " ".join(rng.choice(words) for _ in range(rng.randrange(3, 14)))
        line += rng.choice([".", ",", "!", "", ";"]) + "\n"
        out.append(line)
        n += len(line)
    path.write_text("".join(out)[:nbytes])
    return path


def plain(cmd: str) -> bytes:
    """What ``cmd`` prints on plain pipes, on this host."""
    return subprocess.run(
        ["bash", "-c", f"set -o pipefail; export LC_ALL=C; {cmd}"],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout


def record(net: NetCluster, edge: str) -> dict[str, object]:
    import json

    try:
        return json.loads(net.api(f"/v1/edges/{edge}"))  # type: ignore[no-any-return]
    except (ValueError, subprocess.SubprocessError):
        return {}


@dataclass
class Stage:
    """One stage of a pipeline: a bash command template run on a host. ``{E1}``, ``{E2}``
    ... name edges; they become the edge's path on the host the stage runs on."""

    name: str
    host: Host
    cmd: str
    writes: str = ""  # the edge it writes, if any
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    exits: list[int] = field(default_factory=list)


class Pipeline:
    """Stages joined by edges, supervised as FRACTAL would: a stage that exits non-zero is
    re-run (on the host its :attr:`Stage.host` names then), and so is one that exited 0
    whose transient output discovery later fails (README: a finished writer's generation
    fails when its bytes are gone, "so that the writer is re-run"); at most ``max_runs``
    times each."""

    def __init__(self, net: NetCluster, edges: list[str], max_runs: int = 4) -> None:
        self.net = net
        self.edges = {name: new_edge() for name in edges}
        self.stages: dict[str, Stage] = {}
        self.max_runs = max_runs
        # The go-ahead of stages held mid-stream (:meth:`hold`, :func:`midstream`).
        self.go = net.workdir / f"go-{os.urandom(4).hex()}"

    def hold(self, nbytes: int) -> str:
        """slowcat's options to wait after ``nbytes`` until :meth:`release`: a fault then
        hits the stage mid-stream by construction, not by timing (under load, the first
        stage used to finish before its reader's progress showed the fault's point)."""
        return f"--hold-after {nbytes} --until {self.go}"

    def release(self) -> None:
        self.go.touch()

    def add(self, name: str, host: Host, cmd: str, writes: str = "") -> Stage:
        """``writes``: the edge the stage writes (default: the one it redirects to)."""
        writes = writes or next((e for e in self.edges if f"> {{{e}}}" in cmd), "")
        self.stages[name] = Stage(name, host, cmd, writes)
        return self.stages[name]

    def _output_failed(self, stage: Stage) -> bool:
        """``stage`` finished, but discovery has its output's generation failed, and no
        other writer holds the edge."""
        if not stage.writes:
            return False
        got = record(self.net, self.edges[stage.writes])
        return got.get("writer_state") == "failed"

    def command(self, stage: Stage) -> str:
        node = stage.host.node
        assert node is not None
        paths = {name: node.path(edge) for name, edge in self.edges.items()}
        return f"set -o pipefail; export LC_ALL=C; {stage.cmd.format(**paths)}"

    def start(self, name: str) -> subprocess.Popen[bytes]:
        stage = self.stages[name]
        stage.runs += 1
        stage.proc = self.net.run(stage.host, self.command(stage))
        return stage.proc

    def start_all(self) -> None:
        for name in reversed(self.stages):  # readers first: the worst order for pairing
            self.start(name)

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        proc = self.stages[name].proc
        assert proc is not None
        os.killpg(proc.pid, signum)

    def supervise(self, timeout: float = 90) -> None:
        """Re-runs failed stages until every stage exited 0; fails on a stage that keeps
        failing or on a pipeline still running after ``timeout``."""
        self.release()
        deadline = time.monotonic() + timeout
        looked = time.monotonic()
        while True:
            done = True
            look = time.monotonic() - looked > 1.0
            for stage in self.stages.values():
                assert stage.proc is not None
                code = stage.proc.poll()
                if code is None:
                    done = False
                elif (
                    code == 0
                    and look
                    and any(s.proc and s.proc.poll() is None for s in self.stages.values())
                    and self._output_failed(stage)
                ):
                    looked = time.monotonic()
                    if len(stage.exits) < stage.runs:
                        stage.exits.append(0)
                    assert stage.runs < self.max_runs, self.report()
                    self.start(stage.name)
                    done = False
                elif code != 0 and len(stage.exits) < stage.runs:
                    stage.exits.append(code)
                    assert stage.runs < self.max_runs, self.report()
                    self.start(stage.name)
                    done = False
                elif code == 0 and len(stage.exits) < stage.runs:
                    stage.exits.append(0)
            if look:
                looked = time.monotonic()
            if done:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"pipeline still running after {timeout} s\n{self.report()}")
            time.sleep(0.05)

    def report(self) -> str:
        lines = []
        for stage in self.stages.values():
            err = b""
            if stage.proc is not None and stage.proc.poll() is not None and stage.proc.stderr:
                err = stage.proc.stderr.read()
            lines.append(
                f"{stage.name} on {stage.host.name}: runs {stage.runs} exits {stage.exits} "
                f"stderr {err[-400:]!r}"
            )
        return "\n".join(lines)


WORDFREQ = "cat {src} | tr -cs A-Za-z '\\n' | tr A-Z a-z | sort | uniq -c | sort -rn"


def wordfreq(net: NetCluster, src: Path, out: Path, pace: str, hold: int = 0) -> Pipeline:
    """PaSh's word frequencies in three stages over two edges: h0 splits words into E1, h1
    folds case from E1 into E2, h2 counts. ``pace`` paces the first stage's input; with
    ``hold`` it waits after that many bytes of it for the go-ahead (:func:`midstream`).
    E1 is ~57% of the input (most words are ``w1234x``, which ``tr -cs`` cuts to ``w x``)."""
    h0, h1, h2 = net.hosts
    p = Pipeline(net, ["E1", "E2"])
    if hold:
        pace += " " + p.hold(hold)
    p.add("split", h0, f"{SLOWCAT} {src} /dev/stdout {pace} | tr -cs A-Za-z '\\n' > {{E1}}")
    p.add("fold", h1, "tr A-Z a-z < {E1} > {E2}")
    p.add("count", h2, f"sort < {{E2}} | uniq -c | sort -rn > {out}")
    return p


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text(tmp_path_factory.mktemp("words") / "words.txt", 6 * MiB, seed=16)


def test_wordfreq_across_three_hosts_is_the_plain_pipe_output(
    net: NetCluster, words: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    p = wordfreq(net, words, out, "--chunk 262144")
    p.start_all()
    p.supervise()
    assert out.read_bytes() == plain(WORDFREQ.format(src=words))
    assert all(s.runs == 1 for s in p.stages.values()), p.report()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for i in range(40):
        d = tree / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(random.Random(i).randbytes(37 * KiB * (i % 5 + 1)))
        text(d / f"t{i}.txt", 50 * KiB, seed=i)
    return tree


@pytest.mark.parametrize(
    "fault",
    tiered(
        [(f,) for f in ("none", "pack-killed", "unpack-killed", "unpack-daemon-killed")]
        + [("pack-partitioned",)],
        core={("none",)},
        slow=set(),
    ),
)
def test_tar_gzip_to_gunzip_tar_across_hosts(
    net: NetCluster, tree: Path, tmp_path: Path, fault: str
) -> None:
    h0, h1, h2 = net.hosts
    dst = tmp_path / "restored"
    dst.mkdir()
    p = Pipeline(net, ["E"])
    # gzip -n: a re-run must write the same bytes (no time stamp), as FRACTAL requires.
    pack = f"{SLOWCAT} <(tar -C {tree} -c . | gzip -n) {{E}} --chunk 65536 --delay 0.03"
    pack += " " + p.hold(3 * MiB // 2)
    p.add("pack", h1, pack, "E")
    p.add("unpack", h2, f"rm -rf {dst}/*; gunzip < {{E}} | tar -x -C {dst}")
    p.start_all()
    if fault != "none":
        midstream(p, "E", 1 * MiB)
    if fault == "pack-partitioned":
        # h1 is cut off; once its writer is lost the supervisor re-runs the stage on h0
        # (generation 2) while the old one runs on; the partition heals mid-re-run.
        old = p.stages["pack"].proc
        assert old is not None
        net.link(h1, up=False)
        try:
            wait_for(
                lambda: record(net, p.edges["E"]).get("writer_state") == "lost",
                20,
                "h1's writer lost",
            )
            p.stages["pack"].host = h0
            p.start("pack")
            wait_for(lambda: record(net, p.edges["E"]).get("generation") == 2, 20, "gen 2")
        finally:
            net.link(h1, up=True)
        # It ends: by EPIPE if it writes after learning of generation 2; a persistent one
        # may have finished into its spill while cut off (exit 0, its bytes fenced off).
        old.wait(timeout=30)
    else:
        kill(p, fault)
    p.supervise()
    diff = subprocess.run(["diff", "-r", str(tree), str(dst)], capture_output=True)
    assert diff.returncode == 0, (diff.stdout[-2000:], p.report())


@pytest.mark.parametrize(
    "fault",
    tiered(
        [("none",), ("left-killed",), ("merge-killed",), ("merge-daemon-killed",)],
        core={("none",)},
        slow=set(),
    ),
)
def test_split_and_sort_merge_of_two_edges(
    net: NetCluster, words: Path, tmp_path: Path, fault: str
) -> None:
    h0, h1, h2 = net.hosts
    half = tmp_path / "half"
    subprocess.run(["split", "-n", "l/2", str(words), f"{half}."], check=True)
    out = tmp_path / "out"
    p = Pipeline(net, ["A", "B"])
    pace = f"--chunk 65536 --delay 0.08 {p.hold(3 * MiB // 2)}"
    p.add("left", h0, f"{SLOWCAT} <(sort {half}.aa) {{A}} {pace}", "A")
    p.add("right", h1, f"{SLOWCAT} <(sort {half}.ab) {{B}} {pace}", "B")
    p.add("merge", h2, f"sort -m {{A}} {{B}} > {out}")
    p.start_all()
    if fault != "none":
        midstream(p, "A", 1 * MiB)
    kill(p, fault)
    p.supervise()
    assert out.read_bytes() == plain(f"sort {words}"), p.report()


def delivered(net: NetCluster, edge: str) -> int:
    """Bytes of ``edge`` its reader's daemon reported delivered (discovery's record)."""
    import json

    try:
        return int(json.loads(net.api(f"/v1/edges/{edge}")).get("bytes_delivered") or 0)
    except (ValueError, subprocess.SubprocessError):
        return 0


def midstream(p: Pipeline, edge: str, nbytes: int, timeout: float = 30) -> None:
    """Waits until ``nbytes`` of ``edge`` were delivered, with every stage still running,
    then releases the stages held past that point (:meth:`Pipeline.hold`): the fault that
    follows hits a stream in flow."""
    running = [s.proc for s in p.stages.values() if s.proc is not None]
    wait_for(
        lambda: delivered(p.net, p.edges[edge]) >= nbytes, timeout, f"{edge} mid-stream", running
    )
    for s in p.stages.values():
        assert s.proc is not None and s.proc.poll() is None, f"{s.name} ended early\n{p.report()}"
    p.release()


def restart_daemon(net: NetCluster, host: Host) -> None:
    """SIGKILLs ``host``'s daemon and starts it again."""
    assert host.node is not None
    host.node.kill()
    net.start_node(host)


def kill(p: Pipeline, fault: str) -> None:
    """``<stage>-killed``: SIGKILL that stage; ``<stage>-daemon-killed``: the daemon of
    the host it runs on, started again at once; "none": nothing."""
    if fault.endswith("-daemon-killed"):
        restart_daemon(p.net, p.stages[fault.removesuffix("-daemon-killed")].host)
    elif fault.endswith("-killed"):
        p.kill(fault.removesuffix("-killed"))
    else:
        assert fault == "none", fault


FAULTS = [
    "first-stage-killed",
    "first-daemon-killed",
    "last-daemon-killed",
    "first-daemon-stopped",
    "last-daemon-stopped",
    "link-down-first",
    "drop-last",
    "middle-stage-killed",
    "middle-stage-killed-rerun-elsewhere",
    "last-stage-killed",
    "middle-daemon-killed",
    "discovery-restarted",
    "link-down",
    "drop",
    "middle-daemon-stopped",
]


@pytest.mark.parametrize(
    ("fault", "net"),
    tiered(
        [(f, m) for m in ("dynamic", "transient") for f in FAULTS],
        core={("middle-stage-killed", "dynamic"), ("middle-daemon-stopped", "transient")},
        slow={("middle-daemon-killed", "transient")},
    ),
    indirect=["net"],
)
def test_wordfreq_fault_then_rerun_is_the_plain_pipe_output(
    net: NetCluster, words: Path, tmp_path: Path, fault: str
) -> None:
    h0, h1, h2 = net.hosts
    out = tmp_path / "out"
    p = wordfreq(net, words, out, "--chunk 65536 --delay 0.04", hold=9 * MiB // 2)
    p.start_all()
    midstream(p, "E1", 2 * MiB)
    if fault == "first-stage-killed":
        p.kill("split")
    elif fault == "middle-stage-killed":
        p.kill("fold")
    elif fault == "middle-stage-killed-rerun-elsewhere":
        p.stages["fold"].host = h0
        p.kill("fold")
    elif fault == "last-stage-killed":
        p.kill("count")
    elif fault == "middle-daemon-killed":
        restart_daemon(net, h1)
    elif fault in ("first-daemon-killed", "last-daemon-killed"):
        restart_daemon(net, h0 if fault.startswith("first") else h2)
    elif fault in ("first-daemon-stopped", "last-daemon-stopped"):
        host = h0 if fault.startswith("first") else h2
        assert host.node is not None
        host.node.signal(signal.SIGSTOP)
        time.sleep(5)
        host.node.signal(signal.SIGCONT)
    elif fault == "link-down-first":
        net.link(h0, up=False)
        time.sleep(3)
        net.link(h0, up=True)
    elif fault == "drop-last":
        net.drop(h2)
        time.sleep(3)
        net.undrop(h2)
    elif fault == "discovery-restarted":
        assert net.discovery is not None
        net.discovery.kill()
        time.sleep(2)
        net.start_discovery()
    elif fault == "link-down":
        net.link(h1, up=False)
        time.sleep(3)
        net.link(h1, up=True)
    elif fault == "drop":
        net.drop(h1)
        time.sleep(3)
        net.undrop(h1)
    elif fault == "middle-daemon-stopped":
        assert h1.node is not None
        h1.node.signal(signal.SIGSTOP)
        time.sleep(5)
        h1.node.signal(signal.SIGCONT)
    p.supervise()
    assert out.read_bytes() == plain(WORDFREQ.format(src=words)), p.report()
    print(p.report())


SELF_KILL = """
import os, signal, sys
src = open(sys.argv[1], "rb").read()
for path in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:  # the writing program: half the stream, then SIGKILL
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, src[: len(src) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)  # its parent reaps it at once
"""


def test_a_killed_writer_reaped_at_once_in_a_network_namespace_is_not_an_end(
    net: NetCluster, tmp_path: Path
) -> None:
    """A daemon in a network namespace (every host here) used to read exit statuses only
    from /proc: a writer SIGKILLed and reaped by its parent before the daemon looked was
    "taken as complete", and its reader exited 0 with half the stream (a pipeline stage
    killed mid-stream: its next stage delivered a wrong result as complete)."""
    h0, h1, h2 = net.hosts
    assert h1.node is not None and h2.node is not None
    src = tmp_path / "src"
    src.write_bytes(os.urandom(256 * KiB))
    edges = [new_edge() for _ in range(6)]
    outs = [tmp_path / f"out{i}" for i in range(len(edges))]
    readers = [
        net.run(h2, f"exec cat {h2.node.path(e)} > {o}") for e, o in zip(edges, outs, strict=True)
    ]
    time.sleep(0.5)
    script = tmp_path / "selfkill.py"
    script.write_text(SELF_KILL)
    paths = " ".join(h1.node.path(e) for e in edges)
    killer = net.run(h1, f"{sys.executable} {script} {src} {paths}")
    assert killer.wait(timeout=30) == 0, killer.stderr.read() if killer.stderr else ""
    time.sleep(2)  # an end taken as complete reaches its reader well within this
    ended = [i for i, r in enumerate(readers) if r.poll() is not None]
    assert not ended, (
        f"readers {ended} ended on a killed writer: {[readers[i].returncode for i in ended]}"
    )
    for edge in edges:  # the re-runs, on another host
        rerun = net.run(h0, f"cat {src} > {h0.node.path(edge) if h0.node else ''}")
        assert rerun.wait(timeout=30) == 0
    for reader, out in zip(readers, outs, strict=True):
        assert reader.wait(timeout=30) == 0
        assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    ("heal", "net"),
    tiered(
        [(h, m) for m in ("dynamic", "transient") for h in ("after-the-rerun", "during-the-rerun")],
        core=set(),
        slow={("during-the-rerun", "transient")},
    ),
    indirect=["net"],
)
def test_a_partitioned_middle_stage_is_fenced_by_its_rerun_elsewhere(
    net: NetCluster, words: Path, tmp_path: Path, heal: str
) -> None:
    """h1 (the middle stage: reader of E1, writer of E2) is cut off mid-stream; discovery
    (SQLite, on h0) marks its ends lost and the supervisor re-runs the stage on h0, which
    takes E2's generation 2. The partitioned stage runs on meanwhile; once healed it must
    fail, and nothing of it may reach the last stage. It used to redial E1 beside its
    re-run and read it whole (exit 0; 1 of 2 runs); in transient mode the two readers'
    acknowledgements freed each other's bytes and every re-run of the first stage got
    EPIPE (the pipeline never finished; 1 of 3 runs)."""
    h0, h1, _h2 = net.hosts
    out = tmp_path / "out"
    p = wordfreq(net, words, out, "--chunk 65536 --delay 0.04", hold=9 * MiB // 2)
    p.start_all()
    midstream(p, "E1", 2 * MiB)
    old = p.stages["fold"].proc
    assert old is not None
    net.link(h1, up=False)
    healed = False
    try:
        wait_for(
            lambda: record(net, p.edges["E2"]).get("writer_state") == "lost",
            20,
            "h1's writer of E2 lost",
        )
        p.stages["fold"].host = h0
        p.start("fold")  # the re-run, while the old one still runs on the far side
        if heal == "during-the-rerun":
            wait_for(lambda: record(net, p.edges["E2"]).get("generation") == 2, 20, "generation 2")
            net.link(h1, up=True)
            healed = True
        # Only the new fold and the others are supervised; the old one is judged below.
        p.supervise()
        if not healed:
            net.link(h1, up=True)
            healed = True
    finally:
        if not healed:
            net.link(h1, up=True)
    assert out.read_bytes() == plain(WORDFREQ.format(src=words)), p.report()
    # The old stage could not read the rest of E1 while cut off; once healed it must not
    # read it beside its re-run (its reader is failed: another reader claimed E1), nor
    # succeed: it ends, never with 0, never blocked for good.
    assert old.wait(timeout=30) != 0, "the cut-off stage read its input beside its re-run"


@pytest.mark.parametrize("net", ["transient"], indirect=True)
def test_a_stopped_reader_daemon_that_redials_on_waking_loses_nothing(
    net: NetCluster, tmp_path: Path
) -> None:
    """Transient streams flow from h1 to h2; h2's daemon is stopped 5 s mid-stream and
    discovery declares it lost (silent). On waking it takes its writers' connections for
    silent (5 s without a byte) and redials; that close used to reach h1 before the news
    that h2 is back, and h1 failed the generation ("the reader's node was lost with
    acknowledged bytes"): its writer got EPIPE, and a writer that had finished left its
    reader to be killed 30 s later. Silence is not death: nothing may fail."""
    _h0, h1, h2 = net.hosts
    assert h1.node is not None and h2.node is not None
    src = tmp_path / "src"
    src.write_bytes(os.urandom(2 * MiB))
    edges = [new_edge() for _ in range(4)]
    outs = [tmp_path / f"out{i}" for i in range(len(edges))]
    readers = [
        net.run(h2, f"exec cat {h2.node.path(e)} > {o}") for e, o in zip(edges, outs, strict=True)
    ]
    writers = [
        net.run(h1, f"exec {SLOWCAT} {src} {h1.node.path(e)} --chunk 32768 --delay 0.05")
        for e in edges
    ]
    wait_for(lambda: all(size(o) >= 256 * KiB for o in outs), 20, "every stream flowing")
    h2.node.signal(signal.SIGSTOP)
    time.sleep(5)
    h2.node.signal(signal.SIGCONT)
    for proc in writers + readers:
        _, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, (proc.args, err)
    for out in outs:
        assert out.read_bytes() == src.read_bytes()
    assert "lost with acknowledged bytes" not in h1.node.log.read_text()


EOF_FAULTS = [
    "writer-daemon-killed-after-exit",
    "writer-daemon-stopped-after-exit",
    "reader-daemon-killed-holding-tail",
    "reader-daemon-stopped-holding-tail",
    "reader-link-down-holding-tail",
    "writer-link-down-at-end",
    "discovery-killed-at-end",
    "discovery-killed-while-registering",
]


@pytest.mark.parametrize(
    ("fault", "net"),
    tiered(
        [(f, m) for m in ("dynamic", "transient") for f in EOF_FAULTS],
        core={("writer-daemon-killed-after-exit", "transient")},
        slow={("reader-daemon-killed-holding-tail", "transient")},
    ),
    indirect=["net"],
)
def test_a_fault_at_the_end_of_a_stream_is_exactly_once(
    net: NetCluster, tmp_path: Path, fault: str
) -> None:
    """Faults at the worst moment of a stream, its end: the writing program (h1) exited 0
    with its last bytes still in its daemon (or its FIFO), or the reader's daemon (h2) has
    the END while its program has not read the tail. The output is the source byte for
    byte; a stage whose daemon only stalled or was cut off runs once; none exits 0 with a
    short stream (the supervisor would then never re-run it, and the compare fails)."""
    _h0, h1, h2 = net.hosts
    reader_side = fault.startswith("reader")
    src = tmp_path / "src"
    src.write_bytes(random.Random(fault).randbytes((6 if reader_side else 3) * MiB))
    out = tmp_path / "out"
    p = Pipeline(net, ["E"])
    if reader_side:  # a fast writer, a slow reader: its daemon holds the END and a tail
        p.add("produce", h1, f"cat {src} > {{E}}", "E")
        p.add("consume", h2, f"{SLOWCAT} {{E}} /dev/stdout --chunk 65536 --delay 0.05 > {out}")
    else:
        p.add("produce", h1, f"{SLOWCAT} {src} {{E}} --chunk 32768 --delay 0.05", "E")
        p.add("consume", h2, f"cat {{E}} > {out}")
    if fault == "discovery-killed-while-registering":
        assert net.discovery is not None
        net.discovery.kill()
        try:
            p.start_all()  # both opens wait for discovery
            time.sleep(2)
        finally:
            net.start_discovery()
    else:
        p.start_all()
    producer, consumer = p.stages["produce"].proc, p.stages["consume"].proc
    assert producer is not None and consumer is not None
    running = [producer, consumer]
    assert h1.node is not None and h2.node is not None
    if fault == "discovery-killed-while-registering":
        pass
    elif reader_side:
        assert producer.wait(timeout=30) == 0, p.report()
        time.sleep(1.0)  # the END reaches h2's daemon; its program reads 1.3 MB/s
        assert consumer.poll() is None and size(out) < src.stat().st_size - MiB, p.report()
        if fault == "reader-daemon-killed-holding-tail":
            h2.node.kill()
            net.start_node(h2)
        elif fault == "reader-link-down-holding-tail":
            net.link(h2, up=False)  # its END_ACK and its release wait for the link
            time.sleep(3)
            net.link(h2, up=True)
        else:
            h2.node.signal(signal.SIGSTOP)
            time.sleep(3)
            h2.node.signal(signal.SIGCONT)
    else:
        # Within the writer's FIFO (1 MiB) of its end: the rest fits while its daemon stalls.
        near = src.stat().st_size - 768 * KiB
        wait_for(lambda: size(out) >= near, 30, "the stream near its end", running)
        if fault == "writer-daemon-killed-after-exit":
            h1.node.signal(signal.SIGSTOP)
            try:
                assert producer.wait(timeout=20) == 0, p.report()
            finally:
                h1.node.kill()
            net.start_node(h1)
        elif fault == "writer-daemon-stopped-after-exit":
            h1.node.signal(signal.SIGSTOP)
            try:
                assert producer.wait(timeout=20) == 0, p.report()
                time.sleep(3)
            finally:
                h1.node.signal(signal.SIGCONT)
        elif fault == "writer-link-down-at-end":
            net.link(h1, up=False)
            try:
                assert producer.wait(timeout=20) == 0, p.report()
                time.sleep(3)
            finally:
                net.link(h1, up=True)
        elif fault == "discovery-killed-at-end":
            assert net.discovery is not None
            net.discovery.kill()
            try:
                assert producer.wait(timeout=20) == 0, p.report()
                time.sleep(2)
            finally:
                net.start_discovery()
    p.supervise()
    assert out.read_bytes() == src.read_bytes(), p.report()
    if "killed" not in fault or fault.startswith("discovery"):
        # Nothing died but the discovery: nothing is re-run.
        assert all(s.runs == 1 for s in p.stages.values()), p.report()
    print(p.report())


def in_open(pid: int, timeout: float = 5.0) -> bool:
    """Waits until ``pid`` is inside openat(2) (x86-64: 257), as its daemon serves the
    open; False if it was not seen there (it may have got through already)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as f:
                if f.read().split(" ", 1)[0] == "257":
                    return True
        except OSError:
            return False
        time.sleep(0.0005)
    return False


STALLS = [
    "writer-daemon-stopped-registering",
    "reader-daemon-stopped-pairing",
    "writer-daemon-stopped-as-end-travels",
    "reader-daemon-stopped-as-end-travels",
]


@pytest.mark.parametrize(
    ("stall", "net"),
    tiered(
        [(s, "transient") for s in STALLS],
        core={("reader-daemon-stopped-pairing", "transient")},
        slow=set(),
    ),
    indirect=["net"],
)
def test_a_daemon_stopped_at_the_worst_moment_loses_nothing(
    net: NetCluster, tmp_path: Path, stall: str
) -> None:
    """A daemon starved of CPU (SIGSTOP 4 s, past the 1.5 s silence timeout: discovery
    takes its node for lost) at the worst moments: the writer's while its program's open
    is being served (the writer registers), the reader's then (it is about to pair), and
    either as the writing program closes its end (the END on its way). Nothing died: each
    stage runs once, its output is the source byte for byte, exit statuses 0."""
    _h0, h1, h2 = net.hosts
    assert h1.node is not None and h2.node is not None
    src = tmp_path / "src"
    src.write_bytes(random.Random(stall).randbytes(3 * MiB + 11))
    out = tmp_path / "out"
    p = Pipeline(net, ["E"])
    p.add("produce", h1, f"exec {SLOWCAT} {src} {{E}} --chunk 65536 --delay 0.01 --announce", "E")
    p.add("consume", h2, f"exec cat {{E}} > {out}")
    p.start_all()  # the reader first: it waits for the writer
    producer = p.stages["produce"].proc
    assert producer is not None and producer.stdout is not None
    daemon = h1.node if stall.startswith("writer") else h2.node
    assert producer.stdout.readline() == b"opening\n", p.report()
    if stall.endswith("as-end-travels"):
        assert producer.stdout.readline() == b"closing\n", p.report()
    else:
        in_open(producer.pid)
    daemon.signal(signal.SIGSTOP)
    try:
        time.sleep(4)
    finally:
        daemon.signal(signal.SIGCONT)
    p.supervise()
    assert out.read_bytes() == src.read_bytes(), p.report()
    assert all(s.runs == 1 and s.exits == [0] for s in p.stages.values()), p.report()


@pytest.mark.slow
@MATRIX
@pytest.mark.parametrize("net", ["transient"], indirect=True)
def test_a_rerun_writer_elsewhere_races_the_stopped_first_writers_late_data(
    net: NetCluster, tmp_path: Path
) -> None:
    """h1's daemon is stopped mid-stream, generation 1's bytes in its window and FIFO;
    discovery takes its writer for lost and the stage is re-run on h0 (generation 2),
    replayed to the reader on h2. h1 wakes while generation 2 streams, its connection to
    the reader and its late bytes with it: none of them may reach the reader (its
    replayed prefix is checked against what it delivered), the old writer must not end
    well, and the output is the source exactly once."""
    h0, h1, h2 = net.hosts
    assert h1.node is not None
    src = tmp_path / "src"
    # Paced (3.2 MB/s): the old writer is still writing when its daemon stops (unpaced,
    # it wrote 16 MiB into the window, the reader's read buffer and the FIFOs first).
    src.write_bytes(random.Random(7).randbytes(16 * MiB + 5))
    out = tmp_path / "out"
    p = Pipeline(net, ["E"])
    pace = f"--chunk 65536 --delay 0.02 {p.hold(2 * MiB)}"
    p.add("produce", h1, f"exec {SLOWCAT} {src} {{E}} {pace}", "E")
    # A slow reader: the writer's window fills while it reads.
    p.add("consume", h2, f"exec {SLOWCAT} {{E}} /dev/stdout --chunk 65536 --delay 0.03 > {out}")
    p.start_all()
    midstream(p, "E", 1 * MiB)
    old = p.stages["produce"].proc
    assert old is not None
    time.sleep(0.5)
    h1.node.signal(signal.SIGSTOP)
    assert old.poll() is None, p.report()
    try:
        wait_for(lambda: record(net, p.edges["E"]).get("writer_state") == "lost", 20, "lost")
        p.stages["produce"].host = h0
        p.start("produce")  # the go-ahead exists: the re-run does not hold
        wait_for(lambda: record(net, p.edges["E"]).get("generation") == 2, 20, "generation 2")
        time.sleep(0.3)  # the re-run's replay under way
    finally:
        h1.node.signal(signal.SIGCONT)
    p.supervise()
    assert out.read_bytes() == src.read_bytes(), p.report()
    assert old.wait(timeout=30) != 0, "the fenced-off writer ended well"
    assert all(s.exits[-1:] == [0] for s in p.stages.values()), p.report()


@pytest.mark.slow
@MATRIX
@pytest.mark.parametrize("net", ["persistent"], indirect=True)
def test_a_spilled_edges_reader_rerun_on_a_third_host_after_its_host_was_cut_off(
    net: NetCluster, tmp_path: Path
) -> None:
    """A persistent edge from h1 to h2; h2 is cut off mid-stream, discovery takes its
    reader for lost, and the stage is re-run on h0, which reads the stream from its first
    byte out of h1's spill (the writer is not re-run). Healed, the old reader must not end
    well (it is killed: another node claimed the edge), and nothing of it may slow or cut
    the re-run's stream."""
    h0, h1, h2 = net.hosts
    src = tmp_path / "src"
    src.write_bytes(random.Random(9).randbytes(6 * MiB + 3))
    out, again = tmp_path / "out", tmp_path / "again"
    p = Pipeline(net, ["E"])
    pace = f"--chunk 65536 --delay 0.02 {p.hold(3 * MiB)}"
    p.add("produce", h1, f"exec {SLOWCAT} {src} {{E}} {pace}", "E")
    p.add("consume", h2, f"exec cat {{E}} > {out}")
    p.start_all()
    midstream(p, "E", 1 * MiB)
    old = p.stages["consume"].proc
    assert old is not None
    net.link(h2, up=False)
    try:
        wait_for(lambda: record(net, p.edges["E"]).get("reader_state") == "lost", 20, "lost")
        stage = p.stages["consume"]
        stage.host, stage.cmd = h0, f"exec cat {{E}} > {again}"
        p.start("consume")
        wait_for(lambda: record(net, p.edges["E"]).get("reader_node") == h0.name, 20, "claim")
    finally:
        net.link(h2, up=True)
    p.supervise()
    assert again.read_bytes() == src.read_bytes(), p.report()
    assert p.stages["produce"].runs == 1, p.report()
    assert old.wait(timeout=30) != 0, "the cut-off reader ended well beside its re-run"
