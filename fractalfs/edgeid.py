"""EdgeIDs: the 128-bit globally unique names of remote pipes."""

from __future__ import annotations

import builtins
import re
import secrets

_HEX32 = re.compile(r"[0-9a-f]{32}")


class EdgeId(int):
    """A 128-bit edge id; its text form is 32 lowercase hex digits.

    The id is the number itself (an int, no slots): a daemon holds one per waiting
    reader, and an object holding the text was 121 bytes (the object 40, its 32-digit
    text 81) where the number is 60. The text and the bytes are made when asked for
    (paths, requests, logs, the HELLO and spill headers). An EdgeId equals only an
    EdgeId of the same id (not the plain int, nor the text)."""

    __slots__ = ()

    def __new__(cls, raw: builtins.bytes) -> EdgeId:
        if len(raw) != 16:
            raise ValueError("an edge id is 16 bytes")
        return int.__new__(cls, int.from_bytes(raw, "big"))

    def __getnewargs__(self) -> tuple[builtins.bytes]:  # type: ignore[override]
        # copy, deepcopy (dataclasses.asdict) and pickle call __new__ with these: int's
        # own are the number, which __new__ refuses.
        return (self.bytes,)

    @property
    def hex(self) -> str:
        return f"{int(self):032x}"

    @property
    def bytes(self) -> builtins.bytes:
        return self.to_bytes(16, "big")

    @classmethod
    def parse(cls, text: str) -> EdgeId:
        """Parses the 32-hex-digit form; raises ValueError with a reason otherwise."""
        if not isinstance(text, str) or not _HEX32.fullmatch(text):
            raise ValueError(f"{text!r} is not an edge id (32 lowercase hex digits)")
        return int.__new__(cls, int(text, 16))

    @classmethod
    def new(cls) -> EdgeId:
        return cls(secrets.token_bytes(16))

    @staticmethod
    def is_valid(text: str) -> bool:
        return _HEX32.fullmatch(text) is not None

    def __str__(self) -> str:
        return self.hex

    def __format__(self, spec: str) -> str:
        return format(self.hex, spec)

    def __repr__(self) -> str:
        return f"EdgeId({self.hex})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EdgeId) and int.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = int.__hash__

    def __bool__(self) -> bool:
        return True  # an id, not a number: the all-zero id is an id too
