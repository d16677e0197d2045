"""The stream codec, property-tested: any payload, any chunking, any truncation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fractalfs import codec
from fractalfs.codec import SENTINEL, AbortReason, Decoder, ProtocolError, Truncated

payload_chunks = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=300),
        st.integers(1, 5).map(lambda n: SENTINEL * n),  # payload made of the end marker
        st.sampled_from([SENTINEL[:3], SENTINEL[3:], b"\x02\x00\x00\x00\x10" + SENTINEL]),
    ),
    max_size=12,
)


def encode_stream(chunks: list[bytes]) -> bytes:
    total = sum(map(len, chunks))
    return b"".join(codec.encode(c) for c in chunks) + codec.end_frame(total)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return [p for p in pieces if p]


def decode(pieces: list[bytes], start: int = 0) -> tuple[bytes, list[codec.Event]]:
    dec = Decoder(start)
    out, events = bytearray(), []
    for piece in pieces:
        for ev in dec.feed(piece):
            events.append(ev)
            if isinstance(ev, codec.Data):
                out += ev.payload
    return bytes(out), events


@given(payload_chunks, st.lists(st.integers(0, 10_000), max_size=20))
def test_roundtrip_any_chunking(chunks: list[bytes], cuts: list[int]) -> None:
    wire = encode_stream(chunks)
    out, events = decode(split(wire, cuts))
    assert out == b"".join(chunks)
    assert events[-1] == codec.End(len(out))


@given(payload_chunks, st.integers(0, 10_000))
@settings(max_examples=300)
def test_truncated_stream_never_reads_complete(chunks: list[bytes], cut: int) -> None:
    wire = encode_stream(chunks)
    cut = cut % len(wire)  # strictly shorter than the whole stream
    dec = Decoder()
    events = dec.feed(wire[:cut])
    assert not any(isinstance(e, codec.End) for e in events)
    with pytest.raises(Truncated):
        dec.close()


@given(payload_chunks)
def test_want_driven_reads_pass_payload_without_copy(chunks: list[bytes]) -> None:
    """Feeding exactly what want() asks for hands payload over as the very same object."""
    wire = memoryview(encode_stream(chunks))
    dec = Decoder()
    pos = 0
    got = []
    while dec.want():
        n = dec.want()
        piece = bytes(wire[pos : pos + n])
        pos += n
        for ev in dec.feed(piece):
            if isinstance(ev, codec.Data):
                assert ev.payload is piece
                got.append(ev.payload)
    assert b"".join(got) == b"".join(chunks)
    assert pos == len(wire)


def receive_like_the_reader(
    wire: bytes, sizes: list[int], readahead: int
) -> tuple[bytes, list[codec.Event]]:
    """What :func:`fractalfs.dataplane._receive` does: a read-ahead fed to the decoder when a
    header is due, payload received straight into a buffer and counted with took()."""
    dec = Decoder()
    pos, out, turn = 0, bytearray(), 0
    events: list[codec.Event] = []
    while dec.want():
        size = sizes[turn % len(sizes)] if sizes else 1
        turn += 1
        if dec.in_data:
            n = min(size, dec.want(), len(wire) - pos)
            out += wire[pos : pos + n]  # the caller's own buffer
            dec.took(n)
        else:
            n = min(readahead, len(wire) - pos)
            for ev in dec.feed(wire[pos : pos + n]):
                events.append(ev)
                if isinstance(ev, codec.Data):
                    out += ev.payload
        pos += n
        if not n:
            break
    return bytes(out), events


@given(payload_chunks, st.lists(st.integers(1, 400), max_size=8), st.integers(1, 700))
def test_took_counts_payload_received_out_of_band(
    chunks: list[bytes], sizes: list[int], readahead: int
) -> None:
    wire = encode_stream(chunks)
    out, events = receive_like_the_reader(wire, sizes, readahead)
    assert out == b"".join(chunks)
    assert events[-1] == codec.End(len(out))


@given(payload_chunks, st.integers(0, 10_000), st.lists(st.integers(1, 400), max_size=8))
def test_took_on_a_truncated_stream_never_reads_complete(
    chunks: list[bytes], cut: int, sizes: list[int]
) -> None:
    wire = encode_stream(chunks)
    wire = wire[: cut % len(wire)]
    _, events = receive_like_the_reader(wire, sizes, 64)
    assert not any(isinstance(e, codec.End) for e in events)


def test_took_outside_a_data_frame_is_refused() -> None:
    dec = Decoder()
    with pytest.raises(ValueError):
        dec.took(1)  # a header is due
    dec.feed(codec.data_header(10))
    with pytest.raises(ValueError):
        dec.took(11)  # more than the frame holds
    dec.took(10)
    assert (dec.offset, dec.in_data) == (10, False)


def test_empty_stream_is_just_the_end_frame() -> None:
    assert decode([codec.end_frame(0)])[1] == [codec.End(0)]


def test_end_with_wrong_length_is_rejected() -> None:
    wire = codec.encode(b"abc") + codec.end_frame(4)
    with pytest.raises(ProtocolError, match="declares 4 bytes but 3"):
        decode([wire])


def test_end_without_sentinel_is_rejected() -> None:
    bad = codec.HEADER.pack(codec.Kind.END, 16) + codec.END_BODY.pack(b"x" * 8, 0)
    with pytest.raises(ProtocolError, match="sentinel"):
        decode([bad])


@pytest.mark.parametrize(
    "wire",
    [
        b"\x07\x00\x00\x00\x01x",  # unknown kind
        codec.HEADER.pack(codec.Kind.DATA, 0),  # empty data frame
        codec.HEADER.pack(codec.Kind.DATA, codec.MAX_FRAME + 1),
        codec.HEADER.pack(codec.Kind.END, 3) + b"abc",
        codec.end_frame(0) + b"x",  # bytes after the end
    ],
)
def test_malformed_frames(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode([wire])


def test_resumed_decoder_counts_from_its_start() -> None:
    wire = codec.encode(b"world") + codec.end_frame(11)
    out, events = decode([wire], start=6)
    assert out == b"world" and events[-1] == codec.End(11)


def test_abort_frame() -> None:
    _, events = decode([codec.encode(b"ab") + codec.abort_frame(AbortReason.REMOVED, "rm")])
    assert events[-1] == codec.Abort(AbortReason.REMOVED, "rm")


def test_parse_end_tells_a_complete_spill_file() -> None:
    body = codec.encode(SENTINEL * 3)
    assert codec.parse_end(body + codec.end_frame(24)) == 24
    assert codec.parse_end(body) is None
    assert codec.parse_end(b"") is None
