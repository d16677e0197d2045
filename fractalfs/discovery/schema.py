"""Discovery's vocabulary, typed: the states of an edge's ends, the kinds of events and
the causes of a node's loss. StrEnums: each member *is* the string on the wire and in the
database, so store, server, client and node share one spelling and a typo is a NameError.
"""

from __future__ import annotations

from enum import StrEnum


class WriterState(StrEnum):
    NONE = "none"
    OPEN = "open"
    COMPLETE = "complete"
    FAILED = "failed"
    LOST = "lost"


class ReaderState(StrEnum):
    NONE = "none"
    OPEN = "open"
    DONE = "done"  # its program read the whole stream
    CLOSED = "closed"  # its program closed early
    FAILED = "failed"
    LOST = "lost"


class LossCause(StrEnum):
    SILENT = "silent"  # stopped heartbeating; may come back with all it held
    RESTARTED = "restarted"  # a new boot id: what the old daemon held is gone
    LEFT = "left"  # said goodbye


class EventKind(StrEnum):
    WRITER = "writer"  # a writer took a new generation
    COMPLETE = "complete"
    FAILED = "failed"
    WRITER_LOST = "writer-lost"
    WRITER_BACK = "writer-back"
    # The daemon run that held a complete transient generation is gone (restarted, left)
    # while its reader on another node was still reading: only that reader's daemon knows
    # whether it had received the END; if not, it fails the generation (writer/gone).
    WRITER_GONE = "writer-gone"
    READER = "reader"  # a reader claimed the edge
    READER_DONE = "reader-done"
    READER_CLOSED = "reader-closed"
    READER_FAILED = "reader-failed"
    READER_LOST = "reader-lost"
    READER_BACK = "reader-back"
    MODE = "mode"
    RESTORED = "restored"
    DELETED = "deleted"
    RESUMED = "resumed"  # recorded by a reader's node after a fault
    DIVERGED = "diverged"  # recorded by a reader's node: a re-run's replay differed


NODE_EVENTS = frozenset({EventKind.RESUMED, EventKind.DIVERGED})
