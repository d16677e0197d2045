"""The reader's state machine: every fault of the failure model as a transition."""

from __future__ import annotations

import errno
import random

import pytest

from fractalfs.edgestate import (
    Connect,
    Done,
    EdgeView,
    Fail,
    PullOutcome,
    Query,
    ReaderMachine,
    Unfinished,
)


def view(gen: int = 1, state: str = "open", version: int = 10, **kw: object) -> EdgeView:
    return EdgeView(True, version, gen, state, "w", "h:1", **kw)  # type: ignore[arg-type]


def machine(**kw: object) -> ReaderMachine:
    return ReaderMachine(rng=random.Random(1), **kw)  # type: ignore[arg-type]


def connected(m: ReaderMachine, gen: int = 1, received: int = 0) -> None:
    action = m.on_record(view(gen), 0.0, received)
    assert isinstance(action, Connect) and action.generation == gen
    m.on_connected(gen)


def test_a_reader_waiting_for_its_first_writer_is_made_again_from_the_version_alone() -> None:
    """A parked reader keeps only its edge's version while it waits for a first writer
    (``first_wait``); the machine and query made again from it are the ones it had."""
    m = machine(writer_lost_timeout=7, reconnect_for=3)
    q = m.on_record(view(0, "none", version=42), 0.0, 0)
    assert isinstance(q, Query)
    assert m.first_wait(q) == 42
    again, wait = m.waiting_first(42)
    assert (again, wait) == (m, q)
    assert again.on_record(view(1, version=43), 1.0, 0) == m.on_record(view(1, version=43), 1.0, 0)
    assert m.first_wait(Query(42, 1.0)) is None  # another wait: kept as it is


@pytest.mark.parametrize(
    "history",
    [
        [view(0, "none", version=-5)],  # no version yet
        [EdgeView(False, 3, 0, "none")],  # the edge did not exist
        [view(1, "open", version=5), EdgeView(True, 6, 1, "failed", "w", "")],  # a writer failed
    ],
)
def test_a_reader_that_did_more_than_wait_for_a_first_writer_keeps_its_machine(
    history: list[EdgeView],
) -> None:
    m = machine()
    action = None
    for v in history:
        action = m.on_record(v, 0.0, 0)
    assert isinstance(action, Query)
    assert m.first_wait(action) is None


def test_reader_first_waits_without_timeout() -> None:
    m = machine(writer_lost_timeout=1)
    assert m.start() == Query()
    first = m.on_record(EdgeView(False, 0, 0, "none"), 0.0, 0)
    assert first == Query(0, m.long_poll)
    waiting = m.on_record(view(0, "none", version=3), 1000.0, 0)
    assert waiting == Query(3, m.long_poll)  # no writer yet: no deadline either


def test_connection_loss_resumes_the_same_generation() -> None:
    m = machine(reconnect_for=5)
    connected(m, received=100)
    retry = m.on_pull(PullOutcome.LOST, "reset", now=1.0)
    assert isinstance(retry, Query) and 0 <= retry.delay <= 1.0
    again = m.on_record(view(1), 1.5, 100)
    assert again == Connect(1, "w", "h:1", replay=False)


def test_backoff_is_bounded_and_jittered() -> None:
    m = machine(reconnect_for=1e9)
    connected(m)
    delays = [m.on_pull(PullOutcome.LOST, "", now=float(i)) for i in range(30)]
    values = [d.delay for d in delays if isinstance(d, Query)]
    assert max(values) <= 1.0 and len(set(values)) > 20  # capped, never a fixed beat


def test_connection_lost_too_long_fails_with_eio() -> None:
    m = machine(reconnect_for=5)
    connected(m)
    m.on_pull(PullOutcome.LOST, "", now=10.0)
    assert m.on_pull(PullOutcome.LOST, "refused", now=16.0) == Fail(
        errno.EIO, "lost the writer for 5 s: refused"
    )


def test_lost_node_that_comes_back_resumes() -> None:
    m = machine(writer_lost_timeout=60)
    connected(m, received=50)
    m.on_pull(PullOutcome.LOST, "silent", 1.0)
    wait = m.on_record(view(1, "lost", version=11), 2.0, 50)
    assert isinstance(wait, Query) and wait.since == 11
    assert m.on_record(view(1, "open", version=12), 3.0, 50) == Connect(1, "w", "h:1", False)


def test_failed_writer_then_rerun_replays_with_verification() -> None:
    m = machine(writer_lost_timeout=60)
    connected(m, received=1000)
    after = m.on_pull(PullOutcome.GONE, "WRITER_FAILED", 1.0)
    assert after == Query()
    wait = m.on_record(view(1, "failed", version=11), 1.0, 1000)
    assert isinstance(wait, Query) and wait.since == 11
    rerun = m.on_record(view(2, "open", version=12), 2.0, 1000)
    assert rerun == Connect(2, "w", "h:1", replay=True)


def test_rerun_before_anything_was_delivered_needs_no_replay() -> None:
    m = machine()
    connected(m, received=0)
    m.on_pull(PullOutcome.GONE, "", 1.0)
    assert m.on_record(view(2), 2.0, 0) == Connect(2, "w", "h:1", replay=False)


def test_no_rerun_within_the_timeout_fails() -> None:
    m = machine(writer_lost_timeout=10)
    connected(m, received=5)
    m.on_pull(PullOutcome.GONE, "", 0.0)
    m.on_record(view(1, "failed"), 0.0, 5)
    fail = m.on_record(view(1, "failed", reason="writing program killed by signal 9"), 11.0, 5)
    assert isinstance(fail, Fail) and fail.errno == errno.EIO
    assert "killed by signal 9" in fail.reason


def test_stale_generation_is_never_read_again() -> None:
    m = machine()
    connected(m, gen=3)
    m.on_pull(PullOutcome.GONE, "STALE", 1.0)
    wait = m.on_record(view(3, "open", version=20), 1.0, 0)
    assert isinstance(wait, Query)  # generation 3 is dead even if the record lags


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (PullOutcome.END, Done()),
        (PullOutcome.CLOSED, Done()),
        (PullOutcome.REMOVED, Fail(errno.ECANCELED, "the edge was removed")),
        (PullOutcome.DIVERGED, Fail(errno.EIO, "replay diverged: bytes differ")),
    ],
)
def test_terminal_outcomes(outcome: PullOutcome, expected: object) -> None:
    m = machine()
    connected(m)
    assert m.on_pull(outcome, "bytes differ", 1.0) == expected


def test_removed_edge_fails_waiting_reader() -> None:
    m = machine()
    m.on_record(view(0, "none"), 0.0, 0)
    assert m.on_record(EdgeView(False, 0, 0, "none"), 1.0, 0) == Fail(
        errno.ECANCELED, "the edge was removed"
    )


def test_a_failed_generation_still_served_gives_its_prefix_once() -> None:
    m = machine(writer_lost_timeout=60)
    # A re-run reader; the writer's daemon restarted and serves its failed spill's prefix.
    first = m.on_record(view(1, "failed", version=5), 0.0, 0)
    assert first == Connect(1, "w", "h:1", replay=False)
    m.on_connected(1)
    assert m.on_pull(PullOutcome.GONE, "WRITER_FAILED", 1.0) == Query()
    wait = m.on_record(view(1, "failed", version=5), 1.0, 3000)
    assert isinstance(wait, Query) and wait.since == 5  # never twice: wait for the re-run
    assert m.on_record(view(2, "open", version=6), 2.0, 3000) == Connect(2, "w", "h:1", True)
    # Without an endpoint (nothing serves it) a failed generation is not dialled at all.
    other = machine()
    no_endpoint = EdgeView(True, 5, 1, "failed", "w", "")
    assert isinstance(other.on_record(no_endpoint, 0.0, 0), Query)


def test_a_complete_generation_its_daemon_no_longer_holds_is_reported_unfinished() -> None:
    """A complete generation whose writer's daemon (a new run) holds no writer of the edge:
    this reader lacks its END for good, so it has discovery fail it (only the reader knows
    it lacks the END), then waits for the re-run as for a failed program."""
    m = machine(writer_lost_timeout=10)
    assert isinstance(m.on_record(view(1, "complete"), 0.0, 5), Connect)
    m.on_connected(1)
    assert isinstance(m.on_pull(PullOutcome.LOST, "reset", 1.0), Query)
    assert m.on_record(view(1, "complete"), 1.0, 5) == Connect(1, "w", "h:1", replay=False)
    assert m.on_pull(PullOutcome.UNHELD, "NO_EDGE", 2.0) == Unfinished(1)
    # Until discovery has failed it, the record may still say complete: not read again.
    assert isinstance(m.on_record(view(1, "complete", version=11), 2.0, 5), Query)
    assert isinstance(m.on_record(view(1, "failed", version=12), 2.0, 5), Query)
    rerun = m.on_record(view(2, "open", version=13), 3.0, 5)
    assert rerun == Connect(2, "w", "h:1", replay=True)


@pytest.mark.parametrize(
    ("state", "outcome"),
    [
        ("open", PullOutcome.UNHELD),  # its program may still be writing elsewhere: wait
        ("complete", PullOutcome.GONE),  # e.g. STALE or aborted: not "held by nobody"
    ],
)
def test_only_an_unheld_complete_generation_is_reported(state: str, outcome: PullOutcome) -> None:
    m = machine()
    assert isinstance(m.on_record(view(1, state), 0.0, 0), Connect)
    assert m.on_pull(outcome, "", 1.0) == Query()


def test_a_complete_generation_whose_record_lost_its_endpoint_is_reported_unfinished() -> None:
    """Discovery clears the endpoint of a complete generation whose daemon run restarted or
    left while its reader elsewhere was reading: a reader that missed the writer-gone
    event (its redials refused: the node came back on another port) sees it there."""
    m = machine()
    connected(m, received=5)
    assert isinstance(m.on_pull(PullOutcome.LOST, "refused", 1.0), Query)
    gone = EdgeView(True, 11, 1, "complete", "w", "")
    assert m.on_record(gone, 1.0, 5) == Unfinished(1)
    assert isinstance(m.on_record(gone, 2.0, 5), Query)  # told once, then it waits


def test_a_lost_generation_whose_record_lost_its_endpoint_is_reported_unfinished() -> None:
    """Discovery clears the endpoint of a generation lost with its daemon run before its
    end was recorded, while its reader elsewhere was reading (the END may have come): a
    reader that missed the writer-gone event sees it there. A lost one that keeps its
    endpoint is only silent: the reader waits."""
    m = machine()
    connected(m, received=5)
    assert isinstance(m.on_pull(PullOutcome.LOST, "refused", 1.0), Query)
    assert isinstance(m.on_record(EdgeView(True, 11, 1, "lost", "w", "h:1"), 1.0, 5), Query)
    gone = EdgeView(True, 12, 1, "lost", "w", "")
    assert m.on_record(gone, 1.0, 5) == Unfinished(1)
    assert isinstance(m.on_record(gone, 2.0, 5), Query)  # told once, then it waits
