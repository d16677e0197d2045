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


_ID_BITS = 32  # uids and gids are 32-bit (FUSE's request context)
_ID_MASK = (1 << _ID_BITS) - 1


def pack(uid: int, gid: int, since_ms: int) -> int:
    """One int for a claim (uid, gid, milliseconds since the Owners' epoch): a daemon
    holds a claim per waiting reader, and a Claim with its float time was 80 bytes where
    this int is 36."""
    if not (0 <= uid <= _ID_MASK and 0 <= gid <= _ID_MASK and since_ms >= 0):
        raise ValueError(f"cannot pack a claim of uid {uid}, gid {gid} at {since_ms} ms")
    return since_ms << (2 * _ID_BITS) | gid << _ID_BITS | uid


def unpack(packed: int) -> tuple[int, int, int]:
    """(uid, gid, milliseconds since the epoch) of :func:`pack`."""
    return packed & _ID_MASK, packed >> _ID_BITS & _ID_MASK, packed >> (2 * _ID_BITS)


class Owners:
    def __init__(self, busy: Callable[[EdgeId], bool], clock: Callable[[], float] = time.monotonic):
        self._claims: dict[EdgeId, int] = {}  # packed (see pack)
        self._busy = busy  # whether the edge has an end or handle on this node
        self._clock = clock
        self._epoch = clock()  # claims' times are milliseconds since

    def __len__(self) -> int:
        return len(self._claims)

    def _now_ms(self) -> int:
        return max(0, round((self._clock() - self._epoch) * 1000))

    def _claim(self, edge: EdgeId, uid: int, gid: int) -> None:
        self._claims[edge] = pack(uid & _ID_MASK, gid & _ID_MASK, self._now_ms())

    def owner(self, edge: EdgeId) -> Claim | None:
        packed = self._claims.get(edge)
        if packed is None:
            return None
        if self._lapsed(edge, packed):
            del self._claims[edge]
            return None
        uid, gid, since_ms = unpack(packed)
        return Claim(uid, gid, self._epoch + since_ms / 1000)

    def allows(self, edge: EdgeId, uid: int, gid: int, *, claim: bool) -> bool:
        """Whether ``uid`` may use ``edge``; claims it first if ``claim`` and unowned."""
        current = self.owner(edge)
        if current is None:
            if claim:
                self._claim(edge, uid, gid)
            return True
        if current.uid == uid:
            self._claim(edge, current.uid, current.gid)  # its time is now
            return True
        return uid == ROOT_UID

    def seed(self, edge: EdgeId, uid: int, gid: int) -> None:
        """Claims ``edge`` for ``uid`` whoever asked before: a restored stream's owner."""
        self._claim(edge, uid, gid)

    def drop(self, edge: EdgeId) -> None:
        self._claims.pop(edge, None)

    def prune(self) -> list[EdgeId]:
        """Forgets lapsed claims; returns their edges."""
        gone = [e for e, c in self._claims.items() if self._lapsed(e, c)]
        for edge in gone:
            del self._claims[edge]
        return gone

    def _lapsed(self, edge: EdgeId, packed: int) -> bool:
        age = self._now_ms() - (packed >> (2 * _ID_BITS))
        return age >= GRACE * 1000 and not self._busy(edge)
