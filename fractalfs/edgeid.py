"""EdgeIDs: the 128-bit globally unique names of remote pipes."""

from __future__ import annotations

import re
import secrets

_HEX32 = re.compile(r"[0-9a-f]{32}")


class EdgeId:
    """A 128-bit edge id; its text form is 32 lowercase hex digits."""

    __slots__ = ("bytes", "hex")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 16:
            raise ValueError("an edge id is 16 bytes")
        self.bytes = bytes(raw)
        self.hex = self.bytes.hex()

    @classmethod
    def parse(cls, text: str) -> EdgeId:
        """Parses the 32-hex-digit form; raises ValueError with a reason otherwise."""
        if not _HEX32.fullmatch(text):
            raise ValueError(f"{text!r} is not an edge id (32 lowercase hex digits)")
        return cls(bytes.fromhex(text))

    @classmethod
    def new(cls) -> EdgeId:
        return cls(secrets.token_bytes(16))

    @staticmethod
    def is_valid(text: str) -> bool:
        return _HEX32.fullmatch(text) is not None

    def __str__(self) -> str:
        return self.hex

    def __repr__(self) -> str:
        return f"EdgeId({self.hex})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EdgeId) and other.bytes == self.bytes

    def __hash__(self) -> int:
        return hash(self.bytes)
