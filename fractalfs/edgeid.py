"""EdgeIDs: the 128-bit globally unique names of remote pipes."""

from __future__ import annotations

import builtins
import re
import secrets

_HEX32 = re.compile(r"[0-9a-f]{32}")


class EdgeId:
    """A 128-bit edge id; its text form is 32 lowercase hex digits.

    Only the text is kept (the bytes are made when asked for, by the HELLO and spill
    headers): a daemon holds one per waiting reader, and the bytes object beside the
    text was 49 bytes more each (see DEVELOPERS.md, idle readers)."""

    __slots__ = ("hex",)

    def __init__(self, raw: builtins.bytes) -> None:
        if len(raw) != 16:
            raise ValueError("an edge id is 16 bytes")
        self.hex = raw.hex()

    @property
    def bytes(self) -> builtins.bytes:
        return bytes.fromhex(self.hex)

    @classmethod
    def parse(cls, text: str) -> EdgeId:
        """Parses the 32-hex-digit form; raises ValueError with a reason otherwise."""
        if not _HEX32.fullmatch(text):
            raise ValueError(f"{text!r} is not an edge id (32 lowercase hex digits)")
        edge = cls.__new__(cls)
        edge.hex = text
        return edge

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
        return isinstance(other, EdgeId) and other.hex == self.hex

    def __hash__(self) -> int:
        return hash(self.hex)
