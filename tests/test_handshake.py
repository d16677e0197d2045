from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fractalfs import handshake
from fractalfs.edgeid import EdgeId
from fractalfs.handshake import HELLO, REPLY, Control, HandshakeError, Hello, Reply, Status


@given(
    st.binary(min_size=16, max_size=16),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=64),
)
def test_hello_roundtrip(raw: bytes, gen: int, off: int, auth: bytes) -> None:
    hello = Hello(EdgeId(raw), gen, off, 0, auth)
    wire = hello.encode()
    fixed = wire[: HELLO.size]
    assert Hello.auth_length(fixed) == len(auth)
    assert Hello.decode(fixed, wire[HELLO.size :]) == hello


def test_hello_rejects_foreign_bytes() -> None:
    with pytest.raises(HandshakeError, match="not a fractalfs"):
        Hello.auth_length(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * (HELLO.size - 18))


def test_hello_rejects_other_versions() -> None:
    wire = bytearray(Hello(EdgeId.new(), 1, 0).encode())
    wire[4] = 99
    with pytest.raises(HandshakeError, match="version 99"):
        Hello.auth_length(bytes(wire[: HELLO.size]))


@given(st.sampled_from(Status), st.integers(0, 2**64 - 1), st.text(max_size=50))
def test_reply_roundtrip(status: Status, gen: int, msg: str) -> None:
    wire = Reply(status, gen, 7, msg).encode()
    fixed = wire[: REPLY.size]
    assert Reply.decode(fixed, wire[REPLY.size : REPLY.size + Reply.message_length(fixed)]) == (
        Reply(status, gen, 7, msg)
    )


def test_control_roundtrip() -> None:
    assert handshake.parse_control(handshake.control(Control.ACK, 42)) == (Control.ACK, 42)
    with pytest.raises(HandshakeError):
        handshake.parse_control(b"\x09" + b"\0" * 8)


def test_edge_ids() -> None:
    e = EdgeId.new()
    assert EdgeId.parse(e.hex) == e and len(e.hex) == 32
    for bad in ["", "xyz", e.hex.upper(), e.hex + "0", e.hex[:-1]]:
        with pytest.raises(ValueError):
            EdgeId.parse(bad)


@given(st.binary(min_size=HELLO.size, max_size=HELLO.size + 64))
def test_any_hello_bytes_decode_or_raise_handshake_error(wire: bytes) -> None:
    try:
        n = Hello.auth_length(wire[: HELLO.size])
    except HandshakeError:
        return
    hello = Hello.decode(wire[: HELLO.size], wire[HELLO.size : HELLO.size + n])
    assert handshake.auth_refusal(hello) is None or not hello.offers_hmac


@given(st.binary(min_size=REPLY.size, max_size=REPLY.size + 32))
def test_any_reply_bytes_decode_or_raise_handshake_error(wire: bytes) -> None:
    try:
        n = Reply.message_length(wire[: REPLY.size])
        Reply.decode(wire[: REPLY.size], wire[REPLY.size : REPLY.size + n])
    except HandshakeError:
        pass


@given(st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1), st.binary())
def test_mutual_proof(raw: bytes, gen: int, junk: bytes) -> None:
    key, other = b"k" * 32, b"o" * 32
    hello = Hello(EdgeId(raw), gen, 7, handshake.FLAG_HMAC, b"n" * handshake.NONCE)
    challenge = handshake.challenge(key, hello, b"w" * handshake.NONCE)
    proof = handshake.check_challenge(key, hello, challenge)
    assert proof is not None and handshake.check_proof(key, hello, b"w" * 16, proof)
    assert handshake.check_challenge(other, hello, challenge) is None
    assert not handshake.check_proof(other, hello, b"w" * 16, proof)
    moved = Hello(EdgeId(raw), gen, 8, handshake.FLAG_HMAC, b"n" * handshake.NONCE)
    assert handshake.check_challenge(key, moved, challenge) is None  # bound to the offset
    assert not handshake.check_proof(key, hello, b"w" * 16, (junk + proof)[:32]) or junk == b""
    v1 = Hello.decode(HELLO.pack(b"FRFS", 1, 1, raw, gen, 0, 16), b"n" * 16)
    assert handshake.auth_refusal(v1) is not None  # version 1 cannot offer a proof
