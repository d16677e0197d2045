"""Local ownership of edges: the uid that opens an edge first owns it on this node.

The mount allows every local user (``allow_other``), so without this any user could read
root's stream, write into an edge root reads, remove it or force it persistent. Rules:

* the first open (or ``setxattr``) of an edge on this node claims it for the caller's uid;
* while claimed, ``stat`` shows that uid and mode 0600, and open, unlink and xattrs by any
  other uid but root are refused (EACCES; EPERM for unlink);
* a claim lapses once the edge is idle here (no end open, nothing held for it) and at least
  ``GRACE`` seconds old, so ``setfattr`` followed by the writer's open keeps it.

Pure bookkeeping: the FUSE layer asks, :class:`Owners` answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .edgeid import EdgeId

GRACE = 60.0  # seconds an idle claim (e.g. from setfattr before the open) is kept
ROOT_UID = 0


@dataclass(slots=True)
class Claim:
    uid: int
    gid: int
    since: float


class Owners:
    def __init__(self, busy: Callable[[EdgeId], bool], clock: Callable[[], float] = time.monotonic):
        self._claims: dict[EdgeId, Claim] = {}
        self._busy = busy  # whether the edge has an end or handle on this node
        self._clock = clock

    def __len__(self) -> int:
        return len(self._claims)

    def owner(self, edge: EdgeId) -> Claim | None:
        claim = self._claims.get(edge)
        if claim is not None and self._lapsed(edge, claim):
            del self._claims[edge]
            return None
        return claim

    def allows(self, edge: EdgeId, uid: int, gid: int, *, claim: bool) -> bool:
        """Whether ``uid`` may use ``edge``; claims it first if ``claim`` and unowned."""
        current = self.owner(edge)
        if current is None:
            if claim:
                self._claims[edge] = Claim(uid, gid, self._clock())
            return True
        if current.uid == uid:
            current.since = self._clock()
            return True
        return uid == ROOT_UID

    def seed(self, edge: EdgeId, uid: int, gid: int) -> None:
        """Claims ``edge`` for ``uid`` whoever asked before: a restored stream's owner."""
        self._claims[edge] = Claim(uid, gid, self._clock())

    def drop(self, edge: EdgeId) -> None:
        self._claims.pop(edge, None)

    def prune(self) -> list[EdgeId]:
        """Forgets lapsed claims; returns their edges."""
        gone = [e for e, c in self._claims.items() if self._lapsed(e, c)]
        for edge in gone:
            del self._claims[edge]
        return gone

    def _lapsed(self, edge: EdgeId, claim: Claim) -> bool:
        return self._clock() - claim.since >= GRACE and not self._busy(edge)
