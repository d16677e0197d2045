"""Heartbeats whose size does not grow with the number of ends (no I/O here).

A daemon's heartbeat used to list every end it holds; above ~1,800 ends the body passed the
64 KiB limit, was refused, and the node was declared lost. Now a heartbeat carries only the
ends that changed since the one discovery acknowledged, the digest discovery should have
before applying them (``base``) and after (``digest``). Discovery keeps each node's set in
memory; when the base does not match (discovery restarted, another replica answered, a beat
was lost) it answers ``resync`` and the daemon sends its whole set again, in pages of at
most :data:`PAGE` ends, starting with ``reset``.

The digest is the XOR of a 128-bit hash of every entry, so both sides update it per change
instead of rehashing the set: ``w<edge>:<generation>`` for a writer, ``r<edge>`` for a reader.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..edgeid import EdgeId

NODE_HEADER = "X-Fractalfs-Node"  # on every request of a daemon: a sign of its life
MAX_GENERATION = 2**63 - 1  # as every integer discovery takes (SQLite INTEGER)
PAGE = 1000  # ends per heartbeat body: ~45 KiB at most, under the 64 KiB body limit


def _h(entry: str) -> int:
    return int.from_bytes(hashlib.blake2b(entry.encode(), digest_size=16).digest(), "big")


def digest_of(writers: Mapping[str, int], readers: Iterable[str]) -> int:
    d = 0
    for edge, gen in writers.items():
        d ^= _h(f"w{edge}:{gen}")
    for edge in readers:
        d ^= _h(f"r{edge}")
    return d


@dataclass
class Ends:
    """One node's ends as one side knows them, with their digest kept up to date."""

    writers: dict[str, int] = field(default_factory=dict)
    readers: set[str] = field(default_factory=set)
    digest: int = 0

    def set_writer(self, edge: str, gen: int) -> None:
        old = self.writers.get(edge)
        if old == gen:
            return
        if old is not None:
            self.digest ^= _h(f"w{edge}:{old}")
        self.writers[edge] = gen
        self.digest ^= _h(f"w{edge}:{gen}")

    def drop_writer(self, edge: str) -> None:
        old = self.writers.pop(edge, None)
        if old is not None:
            self.digest ^= _h(f"w{edge}:{old}")

    def add_reader(self, edge: str) -> None:
        if edge not in self.readers:
            self.readers.add(edge)
            self.digest ^= _h(f"r{edge}")

    def drop_reader(self, edge: str) -> None:
        if edge in self.readers:
            self.readers.remove(edge)
            self.digest ^= _h(f"r{edge}")

    def apply(self, delta: Delta) -> None:
        for edge in delta.gone_writers:
            self.drop_writer(edge)
        for edge, gen in delta.writers.items():
            self.set_writer(edge, gen)
        for edge in delta.gone_readers:
            self.drop_reader(edge)
        for edge in delta.readers:
            self.add_reader(edge)


@dataclass
class Delta:
    reset: bool
    base: int
    digest: int
    writers: dict[str, int] = field(default_factory=dict)
    gone_writers: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    gone_readers: list[str] = field(default_factory=list)

    def size(self) -> int:
        return (
            len(self.writers) + len(self.gone_writers) + len(self.readers) + len(self.gone_readers)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "reset": self.reset,
            "base": f"{self.base:032x}",
            "digest": f"{self.digest:032x}",
            "writers": self.writers,
            "gone_writers": self.gone_writers,
            "readers": self.readers,
            "gone_readers": self.gone_readers,
        }

    @classmethod
    def from_json(cls, body: Any) -> Delta:
        """Raises ValueError with a reason on anything malformed."""
        if not isinstance(body, dict):
            raise ValueError("field 'delta' must be an object")
        try:
            base, digest = int(body["base"], 16), int(body["digest"], 16)
        except (KeyError, TypeError, ValueError):
            raise ValueError("delta needs hex 'base' and 'digest'") from None
        reset = body.get("reset", False)
        writers = body.get("writers", {})
        lists = [body.get(k, []) for k in ("gone_writers", "readers", "gone_readers")]
        if not isinstance(reset, bool):
            raise ValueError("delta 'reset' must be true or false")
        if not isinstance(writers, dict) or not all(
            isinstance(g, int) and not isinstance(g, bool) and 0 <= g <= MAX_GENERATION
            for g in writers.values()
        ):
            raise ValueError(
                "delta 'writers' must be an object of edge id -> generation (0 to 2**63-1)"
            )
        if not all(isinstance(x, list) and all(isinstance(e, str) for e in x) for x in lists):
            raise ValueError("delta 'gone_writers', 'readers', 'gone_readers' must be lists")
        delta = cls(reset, base, digest, writers, *lists)
        if not all(EdgeId.is_valid(e) for e in [*writers, *(e for x in lists for e in x)]):
            raise ValueError("delta names something that is not an edge id")
        if delta.size() > PAGE:
            raise ValueError(f"a heartbeat carries at most {PAGE} changed ends")
        return delta


def accept(held: Ends | None, delta: Delta) -> Ends | None:
    """Discovery's side: the node's ends after ``delta``, or None if they must be resent."""
    if delta.reset:
        held = Ends()
    elif held is None or held.digest != delta.base:
        return None
    held.apply(delta)
    return held if held.digest == delta.digest else None


@dataclass(slots=True)
class Acked:
    """The ends discovery acknowledged, as a daemon keeps them between beats: its readers
    as a tuple of the ids the daemon passed (its readers' own ``EdgeId`` objects: 8 bytes
    each, where a set entry is ~33 and a text per reader 81: a daemon has thousands)."""

    writers: dict[str, int]
    readers: tuple[Hashable, ...]
    digest: int


def deltas(
    acked: Acked | Ends | None, writers: Mapping[str, int], readers: Iterable[Hashable]
) -> list[Delta]:
    """The daemon's side: the pages that take discovery from ``acked`` (None: unknown) to
    the current ends. Steady state: one page with nothing in it.

    ``readers`` are edge ids whose ``str`` is their text (``EdgeId`` objects, or the
    texts), the same kind as ``acked``'s: only a *changed* reader's text is made, so a
    beat of a daemon with 10,000 waiting readers makes no string per reader (ten
    thousand texts twice a second made pymalloc arenas that the readers' records
    registering meanwhile then kept alive)."""
    reset = acked is None
    had_w: dict[str, int] = {} if acked is None else dict(acked.writers)
    had_r: set[Hashable] = set() if acked is None else set(acked.readers)
    have = Ends(had_w, set(), 0 if acked is None else acked.digest)
    want_r = set(readers)
    changes: list[tuple[str, str, int]] = []
    changes += [("gw", e, 0) for e in have.writers if e not in writers]
    changes += [("w", e, g) for e, g in writers.items() if have.writers.get(e) != g]
    changes += [("gr", str(e), 0) for e in had_r - want_r]
    changes += [("r", str(e), 0) for e in want_r - had_r]
    del had_r, want_r
    pages = []
    for i in range(0, max(len(changes), 1), PAGE):
        page = Delta(reset and i == 0, have.digest, 0)
        for kind, edge, gen in changes[i : i + PAGE]:
            if kind == "gw":
                page.gone_writers.append(edge)
            elif kind == "w":
                page.writers[edge] = gen
            elif kind == "gr":
                page.gone_readers.append(edge)
            else:
                page.readers.append(edge)
        if page.reset:
            have = Ends()
        # The readers' part of the digest: each one gone was held, each new one was not
        # (have.readers holds none of them: no set of every reader's text).
        have.readers = set(page.gone_readers)
        have.apply(page)
        page.digest = have.digest
        pages.append(page)
    return pages


class HeldEnds:
    """Discovery's memory of what every node (run) holds, and which of it to check.

    Checking an end costs a store read; a node with many ends gets its new ends checked at
    once and the rest in a rotating window of :data:`PAGE` per beat, so a heartbeat's cost
    is bounded while every end is still checked every ``ends / PAGE`` beats.
    """

    def __init__(self) -> None:
        self._nodes: dict[tuple[str, str], Ends] = {}
        self._turn: dict[tuple[str, str], int] = {}

    def forget(self, node: str) -> None:
        for key in [k for k in self._nodes if k[0] == node]:
            del self._nodes[key]
            self._turn.pop(key, None)

    def known(self, node: str, boot: str) -> Ends | None:
        """What run ``boot`` of ``node`` holds, as its last acknowledged beat told."""
        return self._nodes.get((node, boot))

    def receive(
        self, node: str, boot: str, delta: Delta, *, everything: bool
    ) -> tuple[dict[str, int], list[str]] | None:
        """Applies ``delta``; returns the writers and readers to check now, or None when
        the node must resend its whole set (``resync``)."""
        key = (node, boot)
        held = accept(self._nodes.pop(key, None), delta)
        if held is None:
            return None
        self._nodes[key] = held
        if everything or len(held.writers) + len(held.readers) <= PAGE:
            return dict(held.writers), sorted(held.readers)
        writers = {e: held.writers[e] for e in delta.writers if e in held.writers}
        readers = [e for e in delta.readers if e in held.readers]
        turn = self._turn.get(key, 0)
        names = sorted(held.writers)
        window = names[turn : turn + PAGE]
        writers.update((e, held.writers[e]) for e in window)
        self._turn[key] = 0 if turn + PAGE >= len(names) else turn + PAGE
        return writers, readers
