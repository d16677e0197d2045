"""The dynamic-persistence policy as a pure function of observations."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fractalfs.policy import Mode, Observation, decide

GB = 1e9


def obs(**kw: object) -> Observation:
    base: dict[str, object] = dict(
        configured=Mode.DYNAMIC,
        current=Mode.TRANSIENT,
        bytes_written=0,
        cpu_seconds=0.0,
        elapsed=0.0,
        spill_bandwidth=1 * GB,
        window_full=False,
        prefix_retained=True,
    )
    base.update(kw)
    return Observation(**base)  # type: ignore[arg-type]


def test_configured_modes_win() -> None:
    assert decide(obs(configured=Mode.TRANSIENT, window_full=True)).mode is Mode.TRANSIENT
    assert decide(obs(configured=Mode.PERSISTENT)).mode is Mode.PERSISTENT


def test_cheap_fast_producer_stays_transient() -> None:
    # head -c 1G /dev/zero: a gigabyte in half a CPU second; persisting it costs ~1 s.
    d = decide(obs(bytes_written=int(1 * GB), cpu_seconds=0.4, elapsed=0.5))
    assert d.mode is Mode.TRANSIENT and "replay" in d.reason


def test_expensive_producer_turns_persistent() -> None:
    # A CPU-bound producer: 10 MB in 3 CPU seconds; persisting them costs 10 ms.
    d = decide(obs(bytes_written=10_000_000, cpu_seconds=3.0, elapsed=3.1))
    assert d.mode is Mode.PERSISTENT and "replay 3.02 s" in d.reason


def test_absent_reader_spills_instead_of_blocking() -> None:
    d = decide(obs(window_full=True, bytes_written=8 << 20, cpu_seconds=0.01, elapsed=0.02))
    assert d.mode is Mode.PERSISTENT and "spill instead of blocking" in d.reason


def test_without_the_prefix_cost_alone_never_switches() -> None:
    d = decide(obs(bytes_written=1000, cpu_seconds=100.0, elapsed=100.0, prefix_retained=False))
    assert d.mode is Mode.TRANSIENT


@given(
    st.integers(0, 10**12),
    st.floats(0, 1e4),
    st.floats(0, 1e4),
    st.floats(1, 1e10),
    st.booleans(),
    st.booleans(),
)
def test_persistent_is_final_and_decisions_are_total(
    n: int, cpu: float, elapsed: float, bw: float, full: bool, retained: bool
) -> None:
    o = obs(
        bytes_written=n,
        cpu_seconds=cpu,
        elapsed=elapsed,
        spill_bandwidth=bw,
        window_full=full,
        prefix_retained=retained,
    )
    chosen = decide(o).mode
    if not full and not retained:
        # Without the whole prefix in memory a switch would lose bytes a re-run reader
        # needs: only a blocked producer (window full) may spill from where it is.
        assert chosen is Mode.TRANSIENT
    more_costly = obs(
        bytes_written=n,
        cpu_seconds=cpu * 2 + 1,
        elapsed=elapsed,
        spill_bandwidth=bw,
        window_full=full,
        prefix_retained=retained,
    )
    if chosen is Mode.PERSISTENT:  # a costlier replay never argues against persisting
        assert decide(more_costly).mode is Mode.PERSISTENT
    persistent = obs(current=Mode.PERSISTENT, bytes_written=n, cpu_seconds=cpu)
    assert decide(persistent).mode is Mode.PERSISTENT
    if full:
        assert decide(o).mode is Mode.PERSISTENT
