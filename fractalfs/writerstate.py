"""How a writer's end finishes, decided without I/O (the counterpart of
:mod:`fractalfs.edgestate`'s reader machine).

:class:`WriterMachine` takes what the writer's daemon observes about one generation — its
program's file released and how the program ended, a failed spill append, the reader's node
lost, a newer generation, an acknowledged END, garbage collection due — and answers what to
do: complete the generation, fail it (and why), abort it, or keep it.

Rules (each one a promise of the README's failure semantics):

* **An unknown outcome never reads as success.** A program whose exit status is known to be
  0, or that closed its end and runs on (it meant to close), completes its generation; a
  non-zero status, a spill that failed, or a program gone without a known status fails it.
  One exception, documented: without the proc connector (not the initial network
  namespace) a program reaped between two looks at /proc cannot be observed at all.
* **A failed or aborted generation never completes later**, and nothing returns to open.
* **Reader lost:** a transient writer whose reader's daemon acknowledged bytes it has freed
  can only be served again by a re-run: abort it once the reader's daemon is known gone (a
  restart or a departure), or silent *and* without a data connection. A persistent writer
  still has every byte: keep it.
* **Garbage collection** removes a spill only when no reader can need it: its stream was
  *delivered* (a reader's program read it to the end: discovery recorded the reader done
  with every byte), or the generation failed (a re-run reproduces its prefix) — and only
  once retention passed or the quota is exceeded, never while a connection is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .codec import AbortReason
from .procs import describe_status

# -- how the program ended -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exited:
    """The program exited (or was killed) with this wait status."""

    status: int


@dataclass(frozen=True, slots=True)
class Running:
    """The program closed its end and was still running after the grace period."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """The program is gone and how it ended was not seen. ``observable``: this host could
    have seen it (the proc connector works, but the event was lost) — a failure; without
    the connector a program reaped between two looks at /proc leaves no trace at all, and
    that case keeps the behaviour documented for it (complete, with a warning)."""

    why: str
    observable: bool = True


Exit = Exited | Running | Unknown


# -- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Released:
    exit: Exit
    spill_error: str = ""  # a spill append or the spill's completion failed


@dataclass(frozen=True, slots=True)
class ReaderLost:
    cause: str  # silent | restarted | left
    connected: bool  # a data connection of the reader is still up
    acked: int  # bytes the reader's daemon acknowledged (freed unless persistent)
    persistent: bool  # a spill holds every byte


@dataclass(frozen=True, slots=True)
class NewerGeneration:
    pass


@dataclass(frozen=True, slots=True)
class EndAcked:
    total: int
    end: int


@dataclass(frozen=True, slots=True)
class GcDue:
    delivered: bool  # a reader's program read the whole stream (discovery says so)
    connected: bool
    expired: bool  # retention passed since the generation finished
    over_quota: bool


Input = Released | ReaderLost | NewerGeneration | EndAcked | GcDue


# -- outputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Complete:
    pass


@dataclass(frozen=True, slots=True)
class FailWriter:
    why: str


@dataclass(frozen=True, slots=True)
class Abort:
    reason: AbortReason
    message: str


@dataclass(frozen=True, slots=True)
class RemoveSpill:
    why: str


@dataclass(frozen=True, slots=True)
class Keep:
    pass


Action = Complete | FailWriter | Abort | RemoveSpill | Keep


class Phase(Enum):
    OPEN = "open"
    COMPLETE = "complete"
    FAILED = "failed"
    ABORTED = "aborted"


def settle(exit: Exit, spill_error: str = "") -> Complete | FailWriter:
    """How a released generation ends: never complete on an unknown outcome."""
    if spill_error:
        return FailWriter(f"spill file failed: {spill_error}")
    if isinstance(exit, Exited):
        if exit.status:
            return FailWriter(f"writing program {describe_status(exit.status)}")
        return Complete()
    if isinstance(exit, Running):
        return Complete()  # it closed its end on purpose and carries on
    if not exit.observable:
        return Complete()  # no exit events here (documented); the daemon logs a warning
    return FailWriter(f"exit status of the writing program unknown ({exit.why})")


@dataclass
class WriterMachine:
    """One writer generation's lifecycle. ``step`` returns what to do; the phase only
    moves forward (OPEN -> COMPLETE | FAILED | ABORTED, COMPLETE | FAILED -> ABORTED)."""

    phase: Phase = Phase.OPEN
    delivered: bool = False  # an END frame of the complete stream was acknowledged

    def step(self, event: Input) -> Action:
        if isinstance(event, Released):
            if self.phase is not Phase.OPEN:
                return Keep()
            verdict = settle(event.exit, event.spill_error)
            self.phase = Phase.COMPLETE if isinstance(verdict, Complete) else Phase.FAILED
            return verdict
        if isinstance(event, NewerGeneration):
            if self.phase is Phase.ABORTED:
                return Keep()
            self.phase = Phase.ABORTED
            return Abort(AbortReason.STALE, "a newer writer generation took the edge over")
        if isinstance(event, ReaderLost):
            gone = event.cause != "silent" or not event.connected
            if self.phase is Phase.OPEN and gone and event.acked > 0 and not event.persistent:
                self.phase = Phase.ABORTED
                return Abort(AbortReason.READER_LOST, "the reader's node was lost")
            return Keep()
        if isinstance(event, EndAcked):
            if self.phase is Phase.COMPLETE and event.total == event.end:
                self.delivered = True
            return Keep()
        return collect(self.phase, event)


def collect(phase: Phase, due: GcDue) -> RemoveSpill | Keep:
    """Whether a spill may go: never while served, never before retention or the quota
    says so, and only if no reader can need it (delivered to a reader's *program*, or the
    prefix of a failed generation, which a re-run reproduces)."""
    if due.connected or not (due.expired or due.over_quota):
        return Keep()
    if phase is Phase.FAILED:
        return RemoveSpill("a failed generation's prefix (a re-run reproduces it)")
    if phase is Phase.COMPLETE and due.delivered:
        return RemoveSpill("retention passed" if due.expired else "over quota")
    return Keep()
