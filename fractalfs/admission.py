"""Which connections may be in a handshake at once, shared fairly between peers (sans-I/O).

A port that authenticates its peers must hold a connection for a while before it knows who
is on the other end, and can hold only so many. A plain cap lets one peer that connects and
sends nothing (slowloris) fill it and keep every other peer out for as long as it likes.
:class:`FairSlots` keeps the cap but, once it is full, lets a newcomer take the place of
the oldest connection of the peer that holds the most, if that peer holds more than the
newcomer's does: a peer holding nothing always gets in while some peer holds two or more,
so an attacker must come from as many addresses as there are slots to keep anyone out,
and a busy honest peer (many readers dialling at once) keeps the whole cap while nobody
else wants it. An IPv6 peer is its /64 (one host may use a whole prefix of addresses).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


def peer_key(host: str) -> str:
    """The peer a connection from ``host`` counts against: the IPv4 address, an IPv6
    address's /64 (an IPv4-mapped IPv6 address is its IPv4 address)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host  # not an IP address (a Unix socket's path): itself
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class FairSlots(Generic[T]):
    """At most ``total`` tokens (connections) at once; when full, a newcomer evicts the
    oldest token of the peer holding the most, if that is more than its own peer holds."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("total must be at least 1")
        # May be lowered later (connections that leave the pool yet keep a descriptor);
        # tokens held past it stay until released, and no newcomer gets in meanwhile.
        self.total = total
        self._held: dict[str, dict[T, None]] = {}  # peer -> its tokens, oldest first
        self._count = 0
        # How many -> the peers holding exactly that many, in the order they came to: the
        # peer holding the most is found in O(1) (a scan of every peer was 0.65 ms per
        # connection at a full cap of 4,096 peers, a loop's whole time at 1,500 a second).
        self._by_count: dict[int, dict[str, None]] = {}
        self._top = 0  # the most any peer holds

    def __len__(self) -> int:
        return self._count

    def held(self, peer: str) -> int:
        return len(self._held.get(peer, ()))

    def admit(self, peer: str, token: T) -> tuple[bool, T | None]:
        """Whether ``token`` of ``peer`` may go on, and the token it evicted, if any (its
        connection must be closed now: it no longer counts)."""
        evicted: T | None = None
        if self._count >= self.total:
            if not self._held:
                return False, None  # a cap of 0: nobody's place to take
            if self._top <= self.held(peer):
                return False, None
            # The peer holding the most (of equals, the one that has held as many longest).
            top = next(iter(self._by_count[self._top]))
            evicted = next(iter(self._held[top]))
            self.release(top, evicted)
        tokens = self._held.setdefault(peer, {})
        self._move(peer, len(tokens), len(tokens) + 1)
        tokens[token] = None
        self._count += 1
        return True, evicted

    def _move(self, peer: str, was: int, now: int) -> None:
        if was:
            peers = self._by_count[was]
            del peers[peer]
            if not peers:
                del self._by_count[was]
                if self._top == was:
                    self._top = now  # a peer held ``was``; it holds ``now``: the most now
        if now:
            self._by_count.setdefault(now, {})[peer] = None
            self._top = max(self._top, now)

    def release(self, peer: str, token: T) -> None:
        """``token`` is past its handshake or gone (a no-op if it was evicted)."""
        tokens = self._held.get(peer)
        if tokens is None or token not in tokens:
            return
        self._move(peer, len(tokens), len(tokens) - 1)
        del tokens[token]
        self._count -= 1
        if not tokens:
            del self._held[peer]
