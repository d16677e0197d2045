"""The data-plane handshake and the reader's control messages (sans-I/O).

A reader's daemon dials the writer's daemon (one listening port per node; edges are
multiplexed by this handshake, not by one port per edge as upstream) and sends a HELLO::

    magic "FRFS" | u8 version | u8 flags | edge id (16) | u64 generation | u64 offset
    | u16 auth_len | auth[auth_len]

Version 2 with ``FLAG_HMAC`` carries the reader's fresh 16-byte nonce in ``auth``. A node
that holds the cluster secret then answers with a CHALLENGE before anything else::

    u8 CHALLENGE | writer nonce (16) | HMAC-SHA256(key, "writer" | HELLO | writer nonce)

proving to the reader that it holds the secret; the reader answers with its own proof,
``HMAC-SHA256(key, "reader" | HELLO | writer nonce)`` (32 bytes). Both MACs cover the edge,
generation, offset and both nonces, so neither proof can be replayed on another connection
or for another edge. A HELLO without the flag (or version 1) gets ``AUTH_REQUIRED``, a
wrong proof ``AUTH_FAILED``; both replies carry generation and offset 0 and the writer's
state is never looked at. The writer's daemon then answers with one REPLY::

    u8 status | u64 generation | u64 offset | u16 msg_len | msg

and, if the status is OK, the stream's frames (see :mod:`fractalfs.codec`) follow from
``offset``. While frames flow, the reader sends fixed-size control messages back::

    u8 kind | u64 value        ACK: bytes up to value are safely received
                               CLOSE: the reading program closed early (value = offset)
                               END_ACK: the END frame arrived and checked (value = total)
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

from .edgeid import EdgeId

MAGIC = b"FRFS"
VERSION = 2
VERSIONS = frozenset({1, 2})  # 1: no auth field use; answered AUTH_REQUIRED by secure nodes
FLAG_HMAC = 0x01
NONCE = 16
MAC = 32
CHALLENGE_TAG = 0xC5  # first byte of a CHALLENGE: no REPLY status has this value
CHALLENGE = struct.Struct(f">B{NONCE}s{MAC}s")
HELLO = struct.Struct(">4sBB16sQQH")
REPLY = struct.Struct(">BQQH")
CONTROL = struct.Struct(">BQ")
MAX_AUTH = 1024
MAX_MESSAGE = 1024


class HandshakeError(Exception):
    """The peer's handshake bytes are malformed."""


class Status(IntEnum):
    OK = 0
    NO_EDGE = 1  # this node holds no writer for the edge
    STALE_GENERATION = 2  # the generation asked for is not the one this node serves
    BAD_OFFSET = 3  # the offset is no longer (or not yet) available
    BUSY = 4  # another reader is attached
    AUTH_REQUIRED = 5
    BAD_VERSION = 6
    AUTH_FAILED = 7


class Control(IntEnum):
    ACK = 1
    CLOSE = 2
    END_ACK = 3  # the END frame arrived and was verified (value = total): delivered


@dataclass(frozen=True, slots=True)
class Hello:
    edge: EdgeId
    generation: int
    offset: int
    flags: int = 0
    auth: bytes = b""

    def encode(self) -> bytes:
        return (
            HELLO.pack(
                MAGIC,
                VERSION,
                self.flags,
                self.edge.bytes,
                self.generation,
                self.offset,
                len(self.auth),
            )
            + self.auth
        )

    @staticmethod
    def auth_length(fixed: bytes) -> int:
        """Validates the fixed part; returns how many auth bytes follow it."""
        magic, version, _flags, _edge, _gen, _off, auth_len = HELLO.unpack(fixed)
        if magic != MAGIC:
            raise HandshakeError("not a fractalfs data connection")
        if version not in VERSIONS:
            raise HandshakeError(f"unsupported protocol version {version}")
        if auth_len > MAX_AUTH:
            raise HandshakeError(f"auth field of {auth_len} bytes is too long")
        return int(auth_len)

    @classmethod
    def decode(cls, fixed: bytes, auth: bytes) -> Hello:
        _magic, version, flags, edge, gen, off, _ = HELLO.unpack(fixed)
        if version < 2:
            flags = 0  # version 1 has no authentication, whatever its flags say
        return cls(EdgeId(edge), gen, off, flags, auth)

    @property
    def offers_hmac(self) -> bool:
        return bool(self.flags & FLAG_HMAC) and len(self.auth) == NONCE


def _mac(key: bytes, role: bytes, hello: Hello, writer_nonce: bytes) -> bytes:
    return hmac.new(key, role + hello.encode() + writer_nonce, hashlib.sha256).digest()


def challenge(key: bytes, hello: Hello, writer_nonce: bytes) -> bytes:
    """The writer's CHALLENGE: its nonce and its proof of the key."""
    return CHALLENGE.pack(CHALLENGE_TAG, writer_nonce, _mac(key, b"writer", hello, writer_nonce))


def check_challenge(key: bytes, hello: Hello, data: bytes) -> bytes | None:
    """The reader's proof if ``data`` (a CHALLENGE) proves the writer holds ``key``."""
    _tag, writer_nonce, proof = CHALLENGE.unpack(data)
    if not hmac.compare_digest(proof, _mac(key, b"writer", hello, writer_nonce)):
        return None
    return _mac(key, b"reader", hello, writer_nonce)


def check_proof(key: bytes, hello: Hello, writer_nonce: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(proof, _mac(key, b"reader", hello, writer_nonce))


def auth_refusal(hello: Hello) -> Reply | None:
    """For a node holding a key: the reply to a HELLO that offers no HMAC, else None."""
    if hello.offers_hmac:
        return None
    return Reply(Status.AUTH_REQUIRED, message="this node requires the cluster secret")


@dataclass(frozen=True, slots=True)
class Reply:
    status: Status
    generation: int = 0
    offset: int = 0
    message: str = ""

    def encode(self) -> bytes:
        msg = self.message.encode()[:MAX_MESSAGE]
        return REPLY.pack(self.status, self.generation, self.offset, len(msg)) + msg

    @staticmethod
    def message_length(fixed: bytes) -> int:
        length = int(REPLY.unpack(fixed)[3])
        if length > MAX_MESSAGE:
            raise HandshakeError(f"reply message of {length} bytes is too long")
        return length

    @classmethod
    def decode(cls, fixed: bytes, message: bytes) -> Reply:
        status, gen, off, _ = REPLY.unpack(fixed)
        try:
            st = Status(status)
        except ValueError:
            raise HandshakeError(f"unknown reply status {status}") from None
        return cls(st, gen, off, message.decode(errors="replace"))


def control(kind: Control, value: int) -> bytes:
    return CONTROL.pack(kind, value)


def parse_control(data: bytes) -> tuple[Control, int]:
    kind, value = CONTROL.unpack(data)
    try:
        return Control(kind), int(value)
    except ValueError:
        raise HandshakeError(f"unknown control message {kind}") from None
