"""The FUSE boundary on its own: no handler may let a non-FUSEError escape."""

from __future__ import annotations

import inspect

import pyfuse3

from fractalfs.fs import Operations


def test_every_handler_is_guarded() -> None:
    handlers = [
        name
        for name, fn in vars(Operations).items()
        if inspect.iscoroutinefunction(fn) and hasattr(pyfuse3.Operations, name)
    ]
    assert {"lookup", "open", "read", "write", "release", "unlink"} <= set(handlers)
    unguarded = [n for n in handlers if not hasattr(getattr(Operations, n), "__wrapped__")]
    assert unguarded == []
