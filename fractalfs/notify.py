"""systemd's notify protocol (sd_notify), without libsystemd: one datagram per state."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Sends ``state`` (e.g. "READY=1") to $NOTIFY_SOCKET; False if not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
