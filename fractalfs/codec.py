"""The stream codec: how an edge's bytes travel on the data plane (sans-I/O).

Design, and why not the seed's escaping
---------------------------------------
Upstream FRACTAL appends the 8-byte sentinel ``d1 d2 d3 d4 d5 d6 d7 d8`` after the payload
and compares the last eight bytes when the TCP stream ends. A stream cut off right after
payload bytes that happen to equal the sentinel is then taken for complete. The seed proposes
escaping colliding payload bytes; that makes the wire length differ from the payload length,
so every resume offset would need translating, and it costs a scan of every byte in Python.

We *frame* instead: the writer's daemon sends length-prefixed frames, and the end of a stream
is its own frame that carries the sentinel together with the stream's total length::

    DATA   = 0x01 | u32 len | payload[len]
    END    = 0x02 | u32 16  | SENTINEL (8) | u64 total_length
    ABORT  = 0x03 | u32 len | u8 reason | utf-8 message
    PING   = 0x04 | u32 0                 (an idle writer's daemon is alive)

Why a cut stream can never read as complete, whatever the payload holds:

* payload bytes only ever appear inside a DATA frame whose length was announced before them,
  so the decoder never looks for a sentinel inside payload;
* an END frame is accepted only if it is whole, its body is exactly the sentinel plus a
  length, and that length equals the number of payload bytes decoded since offset 0;
* a connection that closes anywhere else (inside a header, inside a payload, between frames)
  is a truncation (:class:`Truncated`), never an end.

The sentinel is kept so a spill file (persistent mode) says on its own whether its stream is
complete: its last 21 bytes parse as an END frame whose length matches the file.

Framing costs 5 bytes per frame and no per-byte work: the hot path sends a header and the
payload with one ``sendmsg`` and the reader receives payload straight into its own buffer
(:meth:`Decoder.want` tells the I/O layer how many bytes to ask for next; large payloads
are received into one buffer per frame and counted with :meth:`Decoder.took`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

SENTINEL = bytes.fromhex("d1d2d3d4d5d6d7d8")

HEADER = struct.Struct(">BI")
END_BODY = struct.Struct(">8sQ")
MAX_FRAME = 1 << 24  # 16 MiB: far above any FUSE request (1 MiB), bounds what a peer can ask


class Kind(IntEnum):
    DATA = 0x01
    END = 0x02
    ABORT = 0x03
    PING = 0x04


class AbortReason(IntEnum):
    """Why a writer's daemon ended a stream without completing it."""

    REMOVED = 1  # the edge was removed (rm)
    WRITER_FAILED = 2  # the writing program died or exited non-zero
    SHUTDOWN = 3  # the writer's daemon is stopping
    STALE = 4  # a newer generation took the edge over
    READER_LOST = 5  # bytes the reader had were lost with it; the writer must re-run


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid stream."""


class Truncated(ProtocolError):
    """The stream ended before its END frame."""


@dataclass(frozen=True, slots=True)
class Data:
    payload: bytes


@dataclass(frozen=True, slots=True)
class End:
    total: int


@dataclass(frozen=True, slots=True)
class Abort:
    reason: AbortReason
    message: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


Event = Data | End | Abort | Ping


def data_header(length: int) -> bytes:
    """The header to send in front of ``length`` payload bytes."""
    if not 0 < length <= MAX_FRAME:
        raise ValueError(f"data frame length {length} out of range")
    return HEADER.pack(Kind.DATA, length)


def end_frame(total: int) -> bytes:
    return HEADER.pack(Kind.END, END_BODY.size) + END_BODY.pack(SENTINEL, total)


END_FRAME_SIZE = HEADER.size + END_BODY.size
PING_FRAME = HEADER.pack(Kind.PING, 0)


def abort_frame(reason: AbortReason, message: str = "") -> bytes:
    body = bytes([reason]) + message.encode()[:1000]
    return HEADER.pack(Kind.ABORT, len(body)) + body


def encode(payload: bytes) -> bytes:
    """Header and payload in one buffer (tests and small writes; the hot path uses sendmsg)."""
    return data_header(len(payload)) + payload if payload else b""


def parse_end(tail: bytes) -> int | None:
    """The stream length an END frame at the end of ``tail`` declares, else None."""
    if len(tail) < END_FRAME_SIZE:
        return None
    kind, length = HEADER.unpack_from(tail, len(tail) - END_FRAME_SIZE)
    if kind != Kind.END or length != END_BODY.size:
        return None
    sentinel, total = END_BODY.unpack_from(tail, len(tail) - END_BODY.size)
    return int(total) if sentinel == SENTINEL else None


class Decoder:
    """Turns received bytes into events; never touches a socket.

    Drive it by asking :meth:`want` how many bytes to read next (never more than one frame
    part, so payload arrives as its own buffer and is passed on without copying), then
    :meth:`feed` them. ``offset`` is the number of payload bytes decoded so far, counted
    from ``start`` (the offset the stream was resumed at).
    """

    def __init__(self, start: int = 0) -> None:
        self.offset = start
        self.start = start
        self._header = bytearray()
        self._kind: Kind | None = None
        self._remaining = 0  # bytes of the current frame's body still to come
        self._body = bytearray()  # END/ABORT bodies (small)
        self.finished = False

    @property
    def in_data(self) -> bool:
        """True while inside a DATA frame's payload."""
        return self._kind is Kind.DATA

    def want(self) -> int:
        """How many bytes the next :meth:`feed` may take (0 once the stream finished)."""
        if self.finished:
            return 0
        if self._kind is None:
            return HEADER.size - len(self._header)
        return self._remaining

    def took(self, n: int) -> None:
        """``n`` payload bytes of the current DATA frame were received by the caller
        straight into its own buffer (``recv_into``), not through :meth:`feed`: count them.
        ``n`` must not exceed :meth:`want` inside a DATA frame."""
        if self._kind is not Kind.DATA or not 0 <= n <= self._remaining:
            raise ValueError(f"{n} payload bytes outside a data frame's remaining bytes")
        self._remaining -= n
        self.offset += n
        if self._remaining == 0:
            self._kind = None

    def feed(self, data: bytes) -> list[Event]:
        """Decode ``data``; returns the events it completes (possibly none)."""
        events: list[Event] = []
        view = memoryview(data)
        while view:
            if self.finished:
                raise ProtocolError("bytes after the end of the stream")
            if self._kind is None:
                take = HEADER.size - len(self._header)
                self._header += view[:take]
                view = view[take:]
                if len(self._header) == HEADER.size:
                    self._start_frame(events)
                continue
            take = min(self._remaining, len(view))
            chunk = view[:take]
            view = view[take:]
            self._remaining -= take
            if self._kind is Kind.DATA:
                # Zero-copy when the caller fed exactly what want() asked for.
                payload = data if take == len(data) else bytes(chunk)
                self.offset += take
                events.append(Data(payload))
                if self._remaining == 0:
                    self._kind = None
            else:
                self._body += chunk
                if self._remaining == 0:
                    events.append(self._finish_control())
        return events

    def close(self) -> None:
        """The connection ended; raises :class:`Truncated` unless the stream finished."""
        if not self.finished:
            raise Truncated(f"stream cut off at offset {self.offset} before its end marker")

    def _start_frame(self, events: list[Event]) -> None:
        kind_byte, length = HEADER.unpack(bytes(self._header))
        self._header.clear()
        try:
            kind = Kind(kind_byte)
        except ValueError:
            raise ProtocolError(f"unknown frame kind 0x{kind_byte:02x}") from None
        if kind is Kind.DATA:
            if not 0 < length <= MAX_FRAME:
                raise ProtocolError(f"data frame length {length} out of range")
        elif kind is Kind.END:
            if length != END_BODY.size:
                raise ProtocolError(f"end frame length {length} != {END_BODY.size}")
        elif kind is Kind.PING:
            if length != 0:
                raise ProtocolError(f"ping frame length {length} != 0")
            events.append(Ping())
            return
        elif not 0 < length <= 1 + 1000:
            raise ProtocolError(f"abort frame length {length} out of range")
        self._kind = kind
        self._remaining = length
        self._body.clear()

    def _finish_control(self) -> Event:
        kind = self._kind
        self._kind = None
        body = bytes(self._body)
        self._body.clear()
        self.finished = True
        if kind is Kind.END:
            sentinel, total = END_BODY.unpack(body)
            if sentinel != SENTINEL:
                raise ProtocolError("end frame without the sentinel")
            if total != self.offset:
                raise ProtocolError(f"end frame declares {total} bytes but {self.offset} arrived")
            return End(total)
        try:
            reason = AbortReason(body[0])
        except ValueError:
            raise ProtocolError(f"unknown abort reason {body[0]}") from None
        return Abort(reason, body[1:].decode(errors="replace"))
