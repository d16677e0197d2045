"""ExitWatcher.outcome: how a writing program ended, or that it is not known (defect 3)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fractalfs import procs
from fractalfs.exits import ExitWatcher
from fractalfs.writerstate import Exited, Running, Unknown


@pytest.mark.parametrize("precise", [True, False])
async def test_a_program_gone_without_a_seen_status_is_unknown_not_success(
    precise: bool,
) -> None:
    if precise and not ExitWatcher().precise:
        pytest.skip("no proc connector here (not root, or not the initial network namespace)")
    """A program whose exit nobody saw (its exit event lost, its zombie reaped between two
    looks at /proc) used to come back as None, which settled as exit status 0: COMPLETE."""
    watcher = ExitWatcher()
    if not precise and watcher._sock is not None:
        watcher._sock.close()
        watcher._sock = None  # the /proc fallback
    proc = subprocess.Popen(["sleep", "0.1"])
    watcher.watch(proc.pid)
    proc.wait()  # exited 0 and reaped before anyone looked
    if precise:  # the kernel dropped the event: take it off the socket unseen
        while True:
            try:
                watcher._raw.recv(4096, socket.MSG_DONTWAIT)  # type: ignore[union-attr]
            except BlockingIOError:
                break
    got = await watcher.outcome(proc.pid, 0.25)
    assert isinstance(got, Unknown), got
    assert got.observable is precise  # without the connector: documented as unobservable
    if watcher._sock is not None:
        watcher._sock.close()


async def test_known_statuses_and_a_program_that_runs_on() -> None:
    watcher = ExitWatcher()
    failing = subprocess.Popen(["sh", "-c", "exit 3"])
    with trio.fail_after(5):
        got = await watcher.outcome(failing.pid, 2.0)  # a zombie until we wait
    assert got == Exited(3 << 8)
    failing.wait()
    running = subprocess.Popen(["sleep", "5"])
    try:
        assert await watcher.outcome(running.pid, 0.1) == Running()
    finally:
        running.kill()
        running.wait()


async def test_an_exit_event_queued_while_the_loop_was_busy_is_not_lost() -> None:
    """With a thousand writers the reading task may not run for seconds: a program that
    exited 0 meanwhile must not be taken as unknown (its stream failed) for that."""
    watcher = ExitWatcher()
    if not watcher.precise:
        pytest.skip("no proc connector here (not root, or not the initial network namespace)")
    try:
        proc = subprocess.Popen(["sh", "-c", "exit 0"])
        watcher.watch(proc.pid)
        proc.wait()  # gone; its event waits on the socket, which nothing has read
        got = await watcher.outcome(proc.pid, 0.25)
        assert got == Exited(0), got
    finally:
        watcher._sock.close()  # type: ignore[union-attr]


async def test_one_program_holding_two_edges_keeps_its_watch_until_both_settle() -> None:
    """``tee E1 E2``: the first edge settled forgot the program, and the second one's exit
    event was dropped unwatched (exit status unknown: a failed generation)."""
    watcher = ExitWatcher()
    if not watcher.precise:
        pytest.skip("no proc connector here (not root, or not the initial network namespace)")
    try:
        proc = subprocess.Popen(["sh", "-c", "read x; exit 0"], stdin=subprocess.PIPE)
        first, second = object(), object()
        watcher.watch(proc.pid, first)
        watcher.watch(proc.pid, second)
        watcher.forget(proc.pid, first)
        watcher.forget(proc.pid, first)  # twice: harmless
        proc.communicate(b"\n")  # exits 0 and is reaped
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher.run)
            got = await watcher.outcome(proc.pid, 1.0)
            nursery.cancel_scope.cancel()
        assert got == Exited(0), got
    finally:
        if watcher._sock is not None:
            watcher._sock.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3), st.integers(0, 3)), max_size=30))
def test_a_watch_lasts_while_any_holder_keeps_it(steps: list[tuple[bool, int, int]]) -> None:
    """One holder is kept as itself, several in a set (a set each was 216 bytes per waiting
    reader's program), in one record per pid: the same answers as a set of holders per
    pid, in any order (None is a holder too: ``watch(pid)``)."""

    async def run() -> None:  # the watcher wraps its socket for trio
        watcher = ExitWatcher()
        holders = [None, *(object() for _ in range(3))]
        model: dict[int, set[int]] = {}
        try:
            for watch, pid, who in steps:
                if watch:
                    watcher.watch(pid, holders[who])
                    model.setdefault(pid, set()).add(who)
                else:
                    watcher.forget(pid, holders[who])
                    if pid in model:
                        model[pid].discard(who)
                        if not model[pid]:
                            del model[pid]
                assert set(watcher._watched) == set(model)
        finally:
            if watcher._sock is not None:
                watcher._sock.close()

    trio.run(run)


async def test_a_pipeline_peer_killed_is_seen_and_sigpipe_or_an_exit_code_is_not() -> None:
    """``slow | cat > E``: ``slow`` SIGKILLed, ``cat`` reads EOF and exits 0 with a stream
    cut short (tests/test_workloads.py). Its peers (the shell, ``slow``) are found at the
    open; the kill is seen whether its event was read or not (reaped: only the event
    tells). SIGPIPE (``yes | head -c 1``) and an exit code (``grep`` finding nothing) are
    no cut."""
    watcher = ExitWatcher()
    if not watcher.precise:
        pytest.skip("no proc connector here (not root, or not the initial network namespace)")
    try:
        # A helper the script kills (sleep 40) is a peer, not upstream: its end cuts nothing.
        script = "sleep 40 & sleep 30 | (read x; exec cat) ; sleep 30"
        shell = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE)
        with trio.fail_after(5):
            while len(kids := procs_children(shell.pid)) < 3:
                await trio.sleep(0.01)
        helper, upstream, writer = sorted(kids)
        await trio.sleep(0.2)  # the pipeline's descriptors set up
        peers, n, feeds = procs.pipeline_peers(writer)
        assert (peers, n, feeds) == ((shell.pid, upstream, helper), 1, False), (peers, kids)
        for peer in (*peers, writer):
            watcher.watch(peer)
        assert watcher.cut_short(peers, writer, (), n) is None
        os.kill(helper, signal.SIGTERM)
        await trio.sleep(0.3)
        assert watcher.status(helper) == signal.SIGTERM
        assert watcher.cut_short(peers, writer, (), n) is None
        os.kill(upstream, signal.SIGKILL)
        with trio.fail_after(5):
            while (got := watcher.cut_short(peers, writer, (), n)) is None:
                await trio.sleep(0.01)
        assert got == (upstream, signal.SIGKILL)
        shell.kill()
        shell.wait()
        scripts = (
            "yes | (sleep 0.3; head -c 1 >/dev/null)",
            "(sleep 0.3; exit 1) | (sleep 0.6; cat)",
        )
        for status_script in scripts:
            proc = subprocess.Popen(["bash", "-c", status_script + "; sleep 30"])
            with trio.fail_after(5):
                while len(kids := procs_children(proc.pid)) < 2:
                    await trio.sleep(0.01)
            _first, last = sorted(kids)
            peers, n, _feeds = procs.pipeline_peers(last)
            for peer in (*peers, last):
                watcher.watch(peer)
            await trio.sleep(1.5)  # both ended (yes by SIGPIPE, the subshell with 1)
            assert watcher.cut_short(peers, last, (), n) is None, status_script
            proc.kill()
            proc.wait()
        # A parent that fails while its child writes (split --filter='cat > E' when
        # another filter died) cut the child's stream; one that fails after it (a shell
        # with pipefail) did not.
        for script, cut in (("cat <&3 & sleep 0.3; exit 1", True), ("cat <&3; exit 1", False)):
            parent = subprocess.Popen(["sh", "-c", "exec 3<&0; " + script], stdin=subprocess.PIPE)
            with trio.fail_after(5):
                while not (kids := procs_children(parent.pid)):
                    await trio.sleep(0.01)
            child = min(kids)
            peers, n, feeds = procs.pipeline_peers(child)
            assert peers[0] == parent.pid, (peers, parent.pid)
            for peer in (*peers, child):
                watcher.watch(peer)
            if cut:
                await trio.sleep(0.6)  # sh exited 1; its cat reads on
            assert parent.stdin is not None
            parent.stdin.close()  # cat reads EOF and exits 0
            await trio.to_thread.run_sync(parent.wait)
            with trio.fail_after(5):
                while watcher.status(child) is None:  # its event read (status drains)
                    await trio.sleep(0.01)
            got = watcher.cut_short(peers, child, (), n, feeds)
            assert got == ((parent.pid, 1 << 8) if cut else None), (script, got)
    finally:
        watcher._sock.close()  # type: ignore[union-attr]


def procs_children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


async def test_a_pid_given_again_keeps_the_first_exit_status() -> None:
    """A peer exits 0; its pid goes to another process (pid_max may be 32768), which is
    killed: the watch keeps the first exit, a stream is not taken as cut short. A new
    watch of that pid (the new process opens a writer) is the new process's."""
    watcher = ExitWatcher()
    if not watcher.precise:
        pytest.skip("no proc connector here (not root, or not the initial network namespace)")
    try:
        first = subprocess.Popen(["sleep", "0.2"])
        pid = first.pid
        watcher.watch(pid)
        await trio.to_thread.run_sync(first.wait)
        with trio.fail_after(5):
            while watcher.status(pid) is None:
                await trio.sleep(0.01)
        again = given_again(pid)
        again.kill()
        again.wait()
        await trio.sleep(0.3)
        assert watcher.status(pid) == 0
        assert watcher.cut_short((pid,), os.getpid(), (), 0, True) is None
        third = given_again(pid)
        holder = object()
        watcher.watch(pid, holder)
        assert watcher.status(pid) is None  # running, not the first one's 0
        third.kill()
        third.wait()
        with trio.fail_after(5):
            while watcher.status(pid) is None:
                await trio.sleep(0.01)
        assert watcher.status(pid) == signal.SIGKILL
    finally:
        watcher._sock.close()  # type: ignore[union-attr]


def given_again(pid: int) -> subprocess.Popen[bytes]:
    for _ in range(20):  # other processes of the machine may take the pid first
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(["sleep", "30"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.skip("the pid was not given again")
