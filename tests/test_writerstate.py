"""The writer lifecycle machine: unit rules and properties over event sequences."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fractalfs.codec import AbortReason
from fractalfs.writerstate import (
    Abort,
    Complete,
    EndAcked,
    Exited,
    FailWriter,
    GcDue,
    Keep,
    NewerGeneration,
    Phase,
    ReaderLost,
    Released,
    RemoveSpill,
    Running,
    Unknown,
    WriterMachine,
    settle,
)


def test_an_unknown_outcome_never_completes() -> None:
    """Defect 3: a lost exit event (None) used to settle as exit status 0 -> COMPLETE."""
    assert isinstance(settle(Unknown("exit events lost")), FailWriter)
    assert "unknown" in settle(Unknown("x")).why  # type: ignore[union-attr]
    assert settle(Exited(0)) == Complete()
    assert settle(Running()) == Complete()
    assert settle(Exited(9)).why == "writing program killed by signal 9"  # type: ignore[union-attr]
    assert "status 1" in settle(Exited(1 << 8)).why  # type: ignore[union-attr]
    assert isinstance(settle(Exited(0), spill_error="ENOSPC"), FailWriter)
    assert settle(Unknown("no connector", observable=False)) == Complete()  # documented


def test_reader_lost_aborts_only_a_transient_writer_whose_reader_is_gone() -> None:
    lost = WriterMachine().step(ReaderLost("restarted", True, 10, False))
    assert lost == Abort(AbortReason.READER_LOST, "the reader's node was lost")
    assert WriterMachine().step(ReaderLost("silent", True, 10, False)) == Keep()
    assert isinstance(WriterMachine().step(ReaderLost("silent", False, 10, False)), Abort)
    assert WriterMachine().step(ReaderLost("left", False, 10, True)) == Keep()  # persistent
    assert WriterMachine().step(ReaderLost("left", False, 0, False)) == Keep()  # nothing freed


def test_gc_removes_only_what_no_reader_needs() -> None:
    m = WriterMachine()
    m.step(Released(Exited(0)))
    assert m.step(GcDue(False, False, True, True)) == Keep()  # not delivered: never
    assert m.step(GcDue(True, True, True, True)) == Keep()  # served right now
    assert m.step(GcDue(True, False, False, False)) == Keep()  # retention not over
    assert isinstance(m.step(GcDue(True, False, True, False)), RemoveSpill)
    failed = WriterMachine()
    failed.step(Released(Unknown("x")))
    assert isinstance(failed.step(GcDue(False, False, True, False)), RemoveSpill)


exits = st.one_of(
    st.builds(Exited, st.integers(0, 0xFFFF)),
    st.just(Running()),
    st.builds(Unknown, st.text(), st.booleans()),
)
inputs = st.one_of(
    st.builds(Released, exits, st.sampled_from(["", "ENOSPC"])),
    st.builds(
        ReaderLost,
        st.sampled_from(["silent", "restarted", "left"]),
        st.booleans(),
        st.integers(0, 10),
        st.booleans(),
    ),
    st.just(NewerGeneration()),
    st.builds(EndAcked, st.integers(0, 3), st.integers(0, 3)),
    st.builds(GcDue, st.booleans(), st.booleans(), st.booleans(), st.booleans()),
)
ORDER = {Phase.OPEN: 0, Phase.COMPLETE: 1, Phase.FAILED: 1, Phase.ABORTED: 2}


@given(st.lists(inputs, max_size=30))
def test_properties_over_event_sequences(events: list[object]) -> None:
    m = WriterMachine()
    completed = False
    for event in events:
        before = m.phase
        action = m.step(event)  # type: ignore[arg-type]
        assert ORDER[m.phase] >= ORDER[before]  # never back to open
        if before is Phase.FAILED:
            assert m.phase in (Phase.FAILED, Phase.ABORTED)  # a failure never completes
        if isinstance(action, Complete):
            assert not completed and before is Phase.OPEN  # at most once, from open
            assert isinstance(event, Released) and not event.spill_error
            assert (
                isinstance(event.exit, Running)
                or event.exit == Exited(0)
                or (isinstance(event.exit, Unknown) and not event.exit.observable)
            )
            completed = True
        if isinstance(action, RemoveSpill):
            assert isinstance(event, GcDue) and not event.connected
            assert m.phase is Phase.FAILED or event.delivered
        if m.delivered:
            assert m.phase in (Phase.COMPLETE, Phase.ABORTED)
