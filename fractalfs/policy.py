"""The dynamic-persistence policy: a pure function of what the writer's daemon observes.

Upstream FRACTAL persists every edge unless the whole job is one subgraph. We compare costs
instead, per edge and while it runs:

* **replay cost** — what re-running the producer to regenerate the bytes so far would take:
  the CPU time its process group spent since it opened the edge, plus a share of the rest of
  the elapsed time, less the time it spent inside our write handler (the rest is time
  spent waiting on its own inputs, which a re-run partly waits on again);
* **persistence cost** — what writing those bytes to the spill directory takes: bytes over
  the spill bandwidth the daemon measured.

An edge turns persistent when replay would cost more than ``MARGIN`` times persisting and
at least ``MIN_REPLAY`` (the margin and the floor keep cheap producers like
``head -c 1G /dev/zero`` transient), and — whatever the
costs — when its reader is absent or slow and the replay window is full: spilling beats
blocking the producer. Persistent is final for a generation (never spill half a stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Mode(Enum):
    TRANSIENT = "transient"
    PERSISTENT = "persistent"
    DYNAMIC = "dynamic"


@dataclass(frozen=True, slots=True)
class Observation:
    configured: Mode  # the node's mode, or the edge's override
    current: Mode  # TRANSIENT or PERSISTENT: what the edge does now
    bytes_written: int
    cpu_seconds: float  # CPU time of the writing process group since open
    elapsed: float  # seconds since open, less time in our handler and on the run queue
    spill_bandwidth: float  # bytes per second the spill directory absorbs
    window_full: bool  # the writer would block on its reader
    prefix_retained: bool  # every byte since offset 0 is still at hand


@dataclass(frozen=True, slots=True)
class Decision:
    mode: Mode
    reason: str


WAIT_WEIGHT = 0.25  # time off-CPU is only partly input waiting (a busy node looks the same)
MARGIN = 2.0
MIN_REPLAY = 0.5  # seconds: below this there is too little evidence to switch (or to care)


def replay_cost(obs: Observation) -> float:
    waited = max(0.0, obs.elapsed - obs.cpu_seconds)
    return obs.cpu_seconds + WAIT_WEIGHT * waited


def persist_cost(obs: Observation) -> float:
    return obs.bytes_written / max(obs.spill_bandwidth, 1.0)


def decide(obs: Observation) -> Decision:
    if obs.configured is Mode.TRANSIENT:
        return Decision(Mode.TRANSIENT, "configured transient")
    if obs.configured is Mode.PERSISTENT:
        return Decision(Mode.PERSISTENT, "configured persistent")
    if obs.current is Mode.PERSISTENT:
        return Decision(Mode.PERSISTENT, "already persistent")
    if obs.window_full:
        return Decision(Mode.PERSISTENT, "reader absent or slow: spill instead of blocking")
    replay, persist = replay_cost(obs), persist_cost(obs)
    if obs.prefix_retained and replay > MARGIN * persist and replay > MIN_REPLAY:
        return Decision(
            Mode.PERSISTENT,
            f"replay {replay:.2f} s > {MARGIN:g} x persist {persist:.3f} s",
        )
    return Decision(
        Mode.TRANSIENT,
        f"replay {replay:.2f} s <= {MARGIN:g} x persist {persist:.3f} s",
    )
