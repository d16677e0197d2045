"""Text from the network shown to a person: control characters never reach a terminal.

A node name, reason or event field is chosen by whoever talks to discovery; printed raw, an
escape sequence in it could rewrite the operator's screen or title bar.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(value: object) -> str:
    """``str(value)`` with every control character shown as ``\\xNN`` / ``\\uNNNN``."""

    def escape(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(escape, str(value))
