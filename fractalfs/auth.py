"""The cluster secret and what is derived from it.

Threat model (see README, "Security"): whoever can reach a node's data port or discovery
over the network but does not hold the cluster secret must not read, inject, fence off,
delete or squat any stream, nor learn generations and offsets. Every node and operator of
the cluster holds the same secret; keys are derived from it per purpose:

* **operator**: HTTP Basic with any user name and, as password, ``operator_key(secret)``
  (what the CLI sends) or the secret itself (what a person types into the status page's
  login, which EventSource then reuses, and Prometheus' ``basic_auth``) may do anything.
  The CLI never sends the secret itself: over plain HTTP whoever listens where it
  connects (another local user who bound a loopback port discovery is not on) reads the
  password, and the derived key gives no data-plane or node key;
* **node X**: HTTP Basic with user name X (percent-encoded) and ``node_key(secret, X)``
  may act only as X (heartbeat, leave, claims, registrations, progress of X's ends). As
  every node holds the secret, this protects against mistakes and against requests that
  merely name another node, not against a node's owner deliberately forging another's key;
* **data plane**: ``data_key(secret)`` keys the mutual HMAC challenge of the HELLO
  (:mod:`fractalfs.handshake`).

Nothing here does I/O but reading and creating the secret file.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from urllib.parse import quote, unquote

SECRET_NAME = "secret"
MIN_SECRET = 16  # characters


class SecretError(ValueError):
    """The secret file is missing, unsafe or malformed; the message says which."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def load_secret(path: str) -> bytes:
    """The secret in ``path``; refuses a file others may read, or a short secret."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretError(f"secret file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"secret file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise SecretError(
                f"secret file {path} is accessible by others (mode {st.st_mode & 0o777:o}); "
                f"chmod 600 it"
            )
        if st.st_uid not in (os.geteuid(), 0):
            # Whoever owns it chose the secret (one planted in a directory others can
            # write, a state dir made by someone else): they would hold the cluster's key.
            raise SecretError(
                f"secret file {path} is owned by uid {st.st_uid}, not by this user or root"
            )
        data = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(data) < MIN_SECRET or b"\n" in data:
        raise SecretError(f"secret file {path}: want one line of at least {MIN_SECRET} chars")
    return data


def ensure_secret(path: str) -> bytes:
    """Loads ``path``, creating it (0600, a fresh secret) if it does not exist."""
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise SecretError(f"secret file {path}: {exc.strerror}") from None
    else:
        with os.fdopen(fd, "w") as f:
            f.write(new_secret() + "\n")
    return load_secret(path)


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, b"fractalfs\0" + label, hashlib.sha256).digest()


def node_key(secret: bytes, node: str) -> str:
    return _derive(secret, b"node\0" + node.encode()).hex()


def operator_key(secret: bytes) -> str:
    return _derive(secret, b"operator").hex()


def data_key(secret: bytes) -> bytes:
    return _derive(secret, b"data-plane v1")


def node_credentials(secret: bytes, node: str) -> tuple[str, str]:
    """HTTP Basic user and password with which node ``node`` talks to discovery."""
    return quote(node, safe=""), node_key(secret, node)


def operator_credentials(secret: bytes) -> tuple[str, str]:
    """What the CLI sends: a key derived for the operator, never the secret itself."""
    return "fractalfs", operator_key(secret)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request proved to be: the operator (node None) or one node."""

    node: str | None

    def may_act_as(self, node: str) -> bool:
        return self.node is None or self.node == node


def check_basic(secret: bytes, header: str) -> Principal | None:
    """The principal an ``Authorization: Basic`` header proves, or None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or len(encoded) > 4096:
        return None
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not sep:
        return None
    node = unquote(user)
    if node and hmac.compare_digest(password.encode(), node_key(secret, node).encode()):
        return Principal(node)
    proof = password.encode()
    operator = hmac.compare_digest(proof, operator_key(secret).encode())
    if hmac.compare_digest(proof, secret) | operator:
        return Principal(None)
    return None


def secret_path_for(state_dir: str) -> str:
    return os.path.join(state_dir, SECRET_NAME)
