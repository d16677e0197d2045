"""The fair handshake cap (:mod:`fractalfs.admission`): pure, property-tested."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fractalfs.admission import FairSlots, peer_key


def test_peer_keys() -> None:
    assert peer_key("10.0.0.7") == "10.0.0.7"
    assert peer_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert peer_key("2001:db8:1:2:aaaa::1") == peer_key("2001:db8:1:2:ffff::9")
    assert peer_key("2001:db8:1:2::1") != peer_key("2001:db8:1:3::1")
    assert peer_key("fe80::1%eth0") == peer_key("fe80::2")
    assert peer_key("not an address") == "not an address"


def test_a_flood_from_one_peer_cannot_keep_another_out() -> None:
    slots: FairSlots[int] = FairSlots(4)
    for token in range(4):
        assert slots.admit("attacker", token) == (True, None)
    assert slots.admit("attacker", 4) == (False, None)  # its own share is the whole cap
    assert slots.admit("node", 5) == (True, 0)  # the attacker's oldest goes
    assert slots.admit("attacker", 6) == (False, None)  # 3 > 1: it cannot take it back
    assert slots.held("node") == 1 and len(slots) == 4
    slots.release("attacker", 0)  # an evicted token's release is a no-op
    assert len(slots) == 4


def test_an_honest_burst_from_one_peer_keeps_the_cap() -> None:
    slots: FairSlots[int] = FairSlots(3)
    assert [slots.admit("b", t)[0] for t in range(5)] == [True, True, True, False, False]
    slots.release("b", 1)
    assert slots.admit("b", 9) == (True, None)
    with pytest.raises(ValueError):
        FairSlots(0)


@given(
    st.integers(1, 8),
    st.lists(st.tuples(st.booleans(), st.integers(0, 4), st.integers(0, 40)), max_size=200),
)
def test_fair_slots_invariants(total: int, steps: list[tuple[bool, int, int]]) -> None:
    """Never more than ``total``; a refused newcomer's peer already holds as much as any
    peer; an eviction takes the oldest token of a peer holding more than the newcomer's."""
    slots: FairSlots[int] = FairSlots(total)
    live: dict[int, str] = {}  # token -> peer, in admission order
    tokens = itertools.count()
    for admit, peer_no, pick in steps:
        peer = f"p{peer_no}"
        if admit or not live:
            token = next(tokens)
            before = {p: slots.held(p) for p in {*live.values(), peer}}
            ok, evicted = slots.admit(peer, token)
            if not ok:
                assert len(live) == total
                assert max(before.values()) <= before[peer]
                continue
            if evicted is not None:
                victim = live.pop(evicted)
                assert before[victim] > before[peer]
                assert before[victim] == max(before.values())
                assert all(t > evicted for t, p in live.items() if p == victim)  # its oldest
            else:
                assert len(live) < total
            live[token] = peer
        else:
            token = list(live)[pick % len(live)]
            slots.release(live.pop(token), token)
        assert len(slots) == len(live) <= total
        for p in set(live.values()):
            assert slots.held(p) == sum(1 for q in live.values() if q == p)


def test_a_proven_connection_leaves_the_pool_and_shrinks_it() -> None:
    """What discovery's Admission.prove does: release the token, lower the cap by one."""
    slots: FairSlots[int] = FairSlots(2)
    assert slots.admit("node", 1) == (True, None)
    slots.release("node", 1)
    slots.total = 1  # node's connection 1 proved the secret
    assert slots.admit("flood", 2) == (True, None)
    assert slots.admit("flood", 3) == (False, None)
    assert slots.admit("other", 4) == (True, 2)  # the flood's, never the proven one
    slots.release("other", 4)
    slots.total = 0  # every connection proved: nobody else gets in
    assert slots.admit("other", 5) == (False, None)
