"""Errors a person causes: one line on stderr and an exit code, never a traceback."""

from __future__ import annotations


class QuietError(Exception):
    """A user-facing failure: ``str(self)`` is printed as one line, then exit ``exitcode``."""

    def __init__(self, message: str, exitcode: int = 1) -> None:
        super().__init__(message)
        self.exitcode = exitcode
