"""Local ownership: the uid that opens an edge first owns it; other users (here `nobody`
through setpriv) can neither read, write, remove nor set attributes of it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fractalfs.edgeid import EdgeId
from fractalfs.ownership import GRACE, Owners, pack, unpack
from fractalfs.testing import Discovery, Node, Process

from .conftest import Programs, fuse_d_state, needs_fuse, new_edge, sh

D = TypeVar("D", bound=Process)
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *args], capture_output=True, text=True, timeout=30)


def py_as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return as_nobody(sys.executable, "-c", code)


@contextlib.contextmanager
def reachable_dir(prefix: str) -> Iterator[Path]:
    """A work directory `nobody` can reach (not under pytest's 0700 tmp dirs), removed
    afterwards; no process may be left in D state on a mount below it."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    work.chmod(0o755)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert not fuse_d_state(work)


@contextlib.contextmanager
def running(daemon: D) -> Iterator[D]:
    """``daemon`` started (a node's mountpoint reachable by `nobody`), stopped after."""
    try:
        daemon.start()
        if isinstance(daemon, Node):
            daemon.mountpoint.chmod(0o755)
        yield daemon
    finally:
        daemon.stop()


@contextlib.contextmanager
def configured_node(prefix: str, name: str, config: str, *extra: str) -> Iterator[Node]:
    """A node with the configuration file ``config`` and options ``extra``, in a
    :func:`reachable_dir` of its own."""
    with reachable_dir(prefix) as work:
        conf = work / "node.toml"
        conf.write_text(config)
        with running(Node(work, name, None, extra=["--config", str(conf), *extra])) as n:
            yield n


@contextlib.contextmanager
def two_nodes() -> Iterator[tuple[Discovery, Node, Node]]:
    """Nodes a and b with a discovery server, in a :func:`reachable_dir` of their own."""
    with (
        reachable_dir("fractalfs-owners-") as work,
        running(Discovery(work / "discovery")) as disc,
        running(Node(work, "a", disc.url)) as a,
        running(Node(work, "b", disc.url)) as b,
    ):
        yield disc, a, b


def claimed_but_not_removed(path: str) -> None:
    """`nobody` claims the edge at ``path`` (nobody owns it on that node: allowed) but may
    not remove it, for the edge lives on another node."""
    claim = py_as_nobody(
        f"import os; os.setxattr({str(path)!r}, 'user.fractalfs.mode', b'transient')"
    )
    assert claim.returncode == 0, claim.stderr
    rm = as_nobody("rm", "-f", str(path))
    assert rm.returncode != 0 and "not permitted" in rm.stderr, rm.stderr


@pytest.fixture
def node() -> Iterator[Node]:
    with reachable_dir("fractalfs-owners-") as work, running(Node(work, "solo", None)) as n:
        yield n


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_other_users_cannot_touch_roots_edge(node: Node, programs: Programs) -> None:
    root_mode = os.stat(node.mountpoint).st_mode
    assert stat.S_IMODE(root_mode) == 0o1777
    edge = new_edge()
    path = node.path(edge)
    before = os.stat(path)
    assert stat.S_IMODE(before.st_mode) == 0o666  # nobody's yet
    writer = programs.start(f"exec sleep 60 > {path}")  # root opens it first
    deadline = time.monotonic() + 10
    while os.stat(path).st_mode & 0o777 != 0o600 and time.monotonic() < deadline:
        time.sleep(0.05)
    st = os.stat(path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)

    read = py_as_nobody(f"open({path!r}).read()")
    assert "PermissionError" in read.stderr, read.stderr
    write = py_as_nobody(f"open({path!r}, 'w').write('forged')")
    assert "PermissionError" in write.stderr, write.stderr
    # The daemon refuses too, not only the kernel's check of the cached mode bits.
    xattr = py_as_nobody(f"import os; os.setxattr({path!r}, 'user.fractalfs.mode', b'persistent')")
    assert "PermissionError" in xattr.stderr, xattr.stderr
    got = py_as_nobody(f"import os; os.getxattr({path!r}, 'user.fractalfs.mode')")
    assert "PermissionError" in got.stderr, got.stderr
    rm = as_nobody("rm", "-f", path)
    assert rm.returncode != 0 and "not permitted" in rm.stderr, rm.stderr

    # Root's stream is intact: a root reader gets what root's writer sends.
    os.killpg(writer.pid, 9)
    writer.wait()
    other = new_edge()
    reader = programs.start(f"cat {node.path(other)}")
    sh(f"echo secret-data > {node.path(other)}")
    out, _ = reader.communicate(timeout=20)
    assert out == b"secret-data\n"


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_users_own_edge_works_and_root_may_read_it(node: Node, programs: Programs) -> None:
    edge = new_edge()
    path = node.path(edge)
    mode = py_as_nobody(f"import os; os.setxattr({path!r}, 'user.fractalfs.mode', b'transient')")
    assert mode.returncode == 0, mode.stderr
    st = os.stat(path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o600)
    writer = subprocess.Popen(
        [*NOBODY, "sh", "-c", f"echo from-nobody > {path}"], stderr=subprocess.PIPE
    )
    out = sh(f"cat {path}").stdout  # root may read anyone's edge
    assert writer.wait(timeout=20) == 0, writer.stderr.read() if writer.stderr else ""
    assert out == b"from-nobody\n"


def test_claims_lapse_only_when_idle_and_old() -> None:
    now = [0.0]
    busy: set[EdgeId] = set()
    owners = Owners(lambda e: e in busy, clock=lambda: now[0])
    e = EdgeId.new()
    assert owners.allows(e, 1000, 1000, claim=True)
    assert not owners.allows(e, 1001, 1001, claim=True)
    assert owners.allows(e, 0, 0, claim=True)  # root
    busy.add(e)
    now[0] += GRACE * 10
    assert not owners.allows(e, 1001, 1001, claim=True)  # in use: still 1000's
    busy.clear()
    assert owners.prune() == [e] and len(owners) == 0
    assert owners.allows(e, 1001, 1001, claim=True)
    claim = owners.owner(e)
    assert claim is not None and claim.uid == 1001


ID = st.integers(0, 2**32 - 1)


@given(ID, ID, st.integers(0, 2**50))
def test_a_packed_claim_unpacks_to_what_was_packed(uid: int, gid: int, ms: int) -> None:
    assert unpack(pack(uid, gid, ms)) == (uid, gid, ms)


@pytest.mark.parametrize("bad", [(-1, 0, 0), (0, 2**32, 0), (0, 0, -1)])
def test_a_claim_out_of_range_is_refused(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="cannot pack"):
        pack(*bad)


def test_a_claim_keeps_its_uid_gid_and_time_and_each_use_renews_it() -> None:
    now = [1000.0]
    owners = Owners(lambda e: False, clock=lambda: now[0])
    e = EdgeId.new()
    assert owners.allows(e, 4_000_000_000, 7, claim=True)
    now[0] += GRACE - 1
    claim = owners.owner(e)
    assert claim is not None and (claim.uid, claim.gid) == (4_000_000_000, 7)
    assert claim.since == pytest.approx(1000.0)
    assert owners.allows(e, 4_000_000_000, 7, claim=True)  # its use renews it
    now[0] += GRACE - 1
    assert owners.prune() == [] and owners.owner(e) is not None
    now[0] += 1
    assert owners.prune() == [e]


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_per_uid_memory_and_spill_limits(programs: Programs) -> None:
    with configured_node(
        "fractalfs-quota-",
        "quota",
        f"uid_memory_limit = {20 << 20}\nuid_spill_limit = {1 << 20}\n",
        "--mode",
        "transient",
    ) as n:
        # Spill: nobody's persistent edge without a reader stops at about 1 MiB on disk.
        path = n.path(new_edge())
        spill = py_as_nobody(
            "import os\n"
            f"p = {path!r}\n"
            "os.setxattr(p, 'user.fractalfs.mode', b'persistent')\n"
            "with open(p, 'wb') as f:\n"
            "    for _ in range(512): f.write(b'x' * 65536)\n"
        )
        # A FIFO writer (the default) gets a pipe's EPIPE; the daemon's log names EDQUOT.
        assert "BrokenPipeError" in spill.stderr, spill.stderr
        assert "Disk quota exceeded" in n.log.read_text()
        # Memory: two transient writers reserve 2 x 8 MiB of nobody's 20 MiB; a third fails.
        held = [
            programs.start(f"exec {' '.join(NOBODY)} sh -c 'exec sleep 60 > {n.path(new_edge())}'")
            for _ in range(2)
        ]
        time.sleep(1.0)
        assert all(p.poll() is None for p in held)
        third = as_nobody("sh", "-c", f"echo x > {n.path(new_edge())}")
        assert third.returncode != 0 and "quota" in third.stderr, third.stderr
        root = programs.start(f"exec sleep 60 > {n.path(new_edge())}")  # root is not limited
        time.sleep(0.5)
        assert root.poll() is None


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_closed_writers_keep_counting_against_the_uid_limits(programs: Programs) -> None:
    """A user who writes into edge after edge and closes each (no reader yet) leaves the
    bytes in the daemon: they count against the uid's memory (and spill) limit until
    delivered, or the user could fill the daemon's memory and the spill disk."""
    with configured_node(
        "fractalfs-quota-",
        "quota",
        f"uid_memory_limit = {40 << 20}\nuid_spill_limit = {6 << 20}\n",
        "--mode",
        "transient",
    ) as n:
        # Memory: each closed edge keeps 6 MiB (+ its records); an open reserves 8 MiB.
        edges, refused = [], ""
        for _ in range(12):
            edge = new_edge()
            got = as_nobody("sh", "-c", f"head -c 6M /dev/zero > {n.path(edge)}")
            if got.returncode != 0:
                refused = got.stderr
                break
            edges.append(edge)
        assert "quota" in refused, (len(edges), refused)
        assert 4 <= len(edges) <= 6, len(edges)
        # Nothing is lost: a reader gets every byte of a held stream, and that frees room.
        count = sh(f"wc -c < {n.path(edges[0])}")
        assert count.stdout.strip() == str(6 << 20).encode()
        time.sleep(1.2)  # the daemon recounts at most once a second
        again = as_nobody("sh", "-c", f"head -c 1M /dev/zero > {n.path(new_edge())}")
        assert again.returncode == 0, again.stderr
        root = programs.start(f"exec sleep 60 > {n.path(new_edge())}")  # root is not limited
        time.sleep(0.5)
        assert root.poll() is None
        for edge in edges[1:]:
            sh(f"rm -f {n.path(edge)}")
        time.sleep(1.2)
        # Spill: closed persistent edges keep their spill files: 4 + 4 MiB > 6 MiB.
        results = []
        for _ in range(3):
            path = n.path(new_edge())
            results.append(
                py_as_nobody(
                    "import os\n"
                    f"p = {path!r}\n"
                    "os.setxattr(p, 'user.fractalfs.mode', b'persistent')\n"
                    "with open(p, 'wb') as f:\n"
                    "    for _ in range(64): f.write(b'x' * 65536)\n"
                )
            )
        assert results[0].returncode == 0, results[0].stderr
        assert any("BrokenPipeError" in r.stderr for r in results[1:]), [r.stderr for r in results]
        assert n.alive()


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_user_cannot_remove_a_stream_live_on_another_node(programs: Programs) -> None:
    """Ownership is per node, but `rm` ends an edge everywhere: a user who claimed an edge
    on node b (setfattr claims without opening) must not end root's writer on node a."""
    with two_nodes() as (disc, a, b):
        edge = new_edge()
        writer = programs.start(f"exec sleep 60 > {a.path(edge)}")
        deadline = time.monotonic() + 10
        while os.stat(a.path(edge)).st_mode & 0o777 != 0o600 and time.monotonic() < deadline:
            time.sleep(0.05)
        claimed_but_not_removed(b.path(edge))
        assert writer.poll() is None
        got = sh(f"{sys.executable} -m fractalfs status --json --discovery {disc.url}")
        edges = {e["id"]: e for e in json.loads(got.stdout)["edges"]}
        assert edges[edge]["writer_state"] == "open"
        # Root may still remove it.
        sh(f"rm -f {b.path(edge)}")
        os.killpg(writer.pid, 9)
        writer.wait()


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_user_cannot_remove_a_finished_stream_another_node_holds() -> None:
    """Root's writer on a finished (complete) and a's daemon holds the bytes until a reader
    comes: a user on b, where nobody owns the edge yet (its name seen in `ps`), must not
    be able to end it there, or root's reader finds nothing."""
    with two_nodes() as (_disc, a, b):
        edge = new_edge()
        sh(f"seq 1 50000 > {a.path(edge)}")  # complete; no reader yet
        claimed_but_not_removed(b.path(edge))
        got = sh(f"cat {b.path(edge)} | wc -l")
        assert got.stdout.strip() == b"50000"


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_other_users_do_not_see_the_names_of_owned_edges(node: Node, programs: Programs) -> None:
    """An edge's name is what another node's reader opens: listing the mount must not hand
    another user the names of root's (or anyone's) edges."""
    edge = new_edge()
    writer = programs.start(f"exec sleep 60 > {node.path(edge)}")
    deadline = time.monotonic() + 10
    while edge not in os.listdir(node.mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert edge in os.listdir(node.mountpoint)  # root sees it
    listed = py_as_nobody(f"import os; print(os.listdir({str(node.mountpoint)!r}))")
    assert listed.returncode == 0, listed.stderr
    assert edge not in listed.stdout
    os.killpg(writer.pid, 9)
    writer.wait()


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_reader_fifos_pipe_counts_against_the_uid_memory_limit(programs: Programs) -> None:
    """A reader FIFO pins a 1 MiB kernel pipe besides its read buffer: with 4 MiB read
    buffers and a 12 MiB limit, a user gets two FIFO readers (2 x 5 MiB), not three."""
    with configured_node(
        "fractalfs-pipequota-",
        "pipequota",
        f"uid_memory_limit = {12 << 20}\nread_buffer = {4 << 20}\n",
    ) as n:
        held = []
        for _ in range(2):
            edge = new_edge()
            held.append(
                programs.start(f"exec {' '.join(NOBODY)} sh -c 'exec sleep 60 < {n.path(edge)}'")
            )
            reader = held[-1]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    if stat.S_ISFIFO(os.stat(f"/proc/{reader.pid}/fd/0").st_mode):
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            else:
                raise AssertionError("the reader did not get a FIFO")
        third = as_nobody("sh", "-c", f"cat {n.path(new_edge())}")
        assert third.returncode != 0 and "quota" in third.stderr, third.stderr
        assert all(p.poll() is None for p in held)


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_users_persisted_stream_stays_theirs_across_a_daemon_restart() -> None:
    """A persisted edge is restored from its spill file after a restart: it must still be
    its writer's, not 0666 for any user (another uid read it, before)."""
    with reachable_dir("fractalfs-owners-") as work:
        nodes = [Node(work, "solo", None, extra=["--mode", "persistent"])]
        try:
            nodes[0].start()
            nodes[0].mountpoint.chmod(0o755)
            edge = new_edge()
            path = nodes[0].path(edge)
            wrote = as_nobody("sh", "-c", f"echo nobodys-data > {path}")
            assert wrote.returncode == 0, wrote.stderr
            assert os.stat(path).st_uid == 65534
            nodes[0].stop()
            nodes.append(Node(work, "solo", None, extra=["--mode", "persistent"]))
            nodes[1].start()
            st = os.stat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o600)
            other = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups"]
            read = subprocess.run(
                [*other, "timeout", "10", "cat", path], capture_output=True, text=True, timeout=30
            )
            assert read.returncode != 0 and read.stdout == "", read.stdout
            assert "Permission denied" in read.stderr, read.stderr
            rm = subprocess.run(
                [*other, "rm", "-f", path], capture_output=True, text=True, timeout=30
            )
            assert rm.returncode != 0 and "not permitted" in rm.stderr, rm.stderr
            mine = as_nobody("timeout", "10", "cat", path)  # its owner still reads it, whole
            assert (mine.returncode, mine.stdout) == (0, "nobodys-data\n"), mine.stderr
        finally:
            for n in reversed(nodes):
                n.stop()


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_reader_fifos_memory_comes_back_however_it_ends(programs: Programs) -> None:
    """A FIFO reader's memory counts in its FIFO record (no FUSE handle): every way it
    ends gives it back. With room for two FIFO readers (2 x 5 MiB of 12 MiB), a user's
    readers are killed while waiting, read a stream to its end, and close unread (``: <``,
    which lingers first), twice over each; two new waiting readers then still get their
    FIFOs, and a third does not. (A record lives until its feed has settled how its
    reader ended: an open may be refused for a moment after, never for good.)"""
    with configured_node(
        "fractalfs-fifoquota-",
        "fifoquota",
        f"uid_memory_limit = {12 << 20}\nread_buffer = {4 << 20}\n",
    ) as n:

        def fifo_reader(
            program: str = "sleep 60", edge: str | None = None
        ) -> subprocess.Popen[bytes]:
            """``program`` reading a new edge (or ``edge``) on its stdin, once it holds
            its FIFO; an open refused for a moment (EDQUOT: a settling record still
            counts) is tried again."""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                path = n.path(edge if edge is not None else new_edge())
                reader = programs.start(f"exec {' '.join(NOBODY)} sh -c 'exec {program} < {path}'")
                while reader.poll() is None:
                    with contextlib.suppress(OSError):
                        if stat.S_ISFIFO(os.stat(f"/proc/{reader.pid}/fd/0").st_mode):
                            return reader
                    time.sleep(0.05)
                assert b"quota" in reader.communicate()[1], reader.returncode
                time.sleep(0.2)
            raise AssertionError(f"no FIFO for a waiting reader: {n.log.read_text()}")

        waiting_reader = fifo_reader

        def closed_unread() -> None:
            deadline = time.monotonic() + 10
            while True:
                done = as_nobody("sh", "-c", f": < {n.path(new_edge())}")
                if done.returncode == 0:
                    return
                assert "quota" in done.stderr and time.monotonic() < deadline, done.stderr
                time.sleep(0.2)

        for _ in range(2):  # killed while waiting
            for p in [waiting_reader(), waiting_reader()]:
                p.kill()
                p.wait()
        for _ in range(2):  # read to the end
            edges = [new_edge(), new_edge()]
            readers = [fifo_reader("cat", e) for e in edges]
            for e in edges:
                sh(f"echo x > {n.path(e)}")
            assert [r.communicate(timeout=30)[0] for r in readers] == [b"x\n", b"x\n"]
        for _ in range(4):  # closed unread
            closed_unread()
        held = [waiting_reader(), waiting_reader()]
        third = as_nobody("sh", "-c", f"cat {n.path(new_edge())}")
        assert third.returncode != 0 and "quota" in third.stderr, third.stderr
        assert all(p.poll() is None for p in held)


@needs_fuse
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_stream_whose_write_was_refused_for_spill_space_is_never_complete() -> None:
    """`nobody` writes a persistent edge through FUSE (O_SYNC: no FIFO) while the spill
    filesystem is below spill_min_free: a write fails with EDQUOT. A program that goes on
    and exits 0 must not leave a stream "complete" without those bytes (as a FIFO writer
    whose bytes were refused does not): the generation fails, and its reader waits for a
    re-run (here until `timeout` ends it) instead of reading it short with status 0."""
    floor = 1 << 60  # more than any disk has free: every spilling write of a user fails
    with configured_node(
        "fractalfs-spillfloor-", "spillfloor", f"spill_min_free = {floor}\n", "--mode", "persistent"
    ) as n:
        edge = new_edge()
        path = n.path(edge)
        script = (
            "import os\n"
            f"fd = os.open({path!r}, os.O_WRONLY | os.O_SYNC)\n"
            "took = 0\n"
            "for _ in range(3):\n"
            "    try:\n"
            "        took += os.write(fd, b'x' * 65536)\n"
            "    except OSError as exc:\n"
            "        print(exc.errno)\n"
            "try:\n"
            "    os.close(fd)\n"
            "except OSError as exc:\n"
            "    print('close', exc.errno)\n"
            "print('took', took)\n"
        )
        wrote = py_as_nobody(script)
        assert wrote.returncode == 0, wrote.stderr
        assert "122" in wrote.stdout, wrote.stdout  # EDQUOT, at least once
        took = int(wrote.stdout.split("took")[1])
        read = subprocess.run(["timeout", "20", "cat", path], capture_output=True, timeout=60)
        short = read.returncode == 0 and len(read.stdout) == took < 3 * 65536
        assert not short, (read.returncode, len(read.stdout), took)
        assert read.returncode != 0, (read.returncode, len(read.stdout), took)
