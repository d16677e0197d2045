"""Optional TLS for the data plane and discovery (``--tls-dir DIR``, alias ``--tls``).

The scheme is deliberately small: ``fractalfs new-tls DIR`` makes a private CA and **one**
certificate and key for the whole cluster, signed by it, and throws the CA's key away::

    DIR/ca.pem    the cluster's CA certificate (what every end verifies against)
    DIR/cert.pem  the cluster certificate (every node and discovery present it)
    DIR/key.pem   its private key (mode 0600: refused if group or others may read it)

Copy DIR to every node and discovery server (as the cluster secret). A peer is trusted if
its certificate chains to ``ca.pem``; host names are not checked (one certificate serves
every host, so identity is "holds the cluster key", as with the secret). The data plane is
mutual TLS (both ends present ``cert.pem``), and the HMAC HELLO still runs inside it.
Discovery serves HTTPS and checks no client certificate (browsers; HTTP Basic with the
secret still authenticates every request); its clients verify the server against the CA.
Rotating: run ``new-tls`` again and restart everything with the new DIR.

Nothing here does network I/O; :class:`TlsConn` wraps a trio socket for the data plane.
"""

from __future__ import annotations

import os
import shutil
import ssl
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import trio

CA = "ca.pem"
CERT = "cert.pem"
KEY = "key.pem"
DAYS = 3650


class TlsError(ValueError):
    """The TLS files are missing, unsafe or unusable; the message says which."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: str
    cert: str
    key: str


def check_dir(directory: str) -> TlsFiles:
    """The three files of ``directory``; refuses missing files and a key others may read."""
    files = TlsFiles(*(os.path.join(directory, n) for n in (CA, CERT, KEY)))
    for path in (files.ca, files.cert, files.key):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise TlsError(
                f"TLS file {path}: {exc.strerror} (make them with `fractalfs new-tls {directory}`)"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise TlsError(f"TLS file {path}: not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            # Its owner could swap in their own CA or key: refused, like the secret's.
            raise TlsError(f"TLS file {path} is owned by uid {st.st_uid}, not by this user or root")
    mode = os.stat(files.key).st_mode
    if mode & 0o077:
        raise TlsError(
            f"TLS key {files.key} is accessible by others (mode {mode & 0o777:o}); chmod 600 it"
        )
    return files


def _context(files: TlsFiles, purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=files.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # one certificate for every host: the CA is the identity
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT  # a self-made CA of `openssl req` is fine
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"TLS files {files.cert}, {files.key}: {exc}") from None
    return ctx


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """Verifies the server against the CA; presents the cluster certificate if asked."""
    return _context(files, ssl.Purpose.SERVER_AUTH)


def server_context(files: TlsFiles, *, mutual: bool) -> ssl.SSLContext:
    """``mutual``: the client must present a certificate of the CA (the data plane)."""
    ctx = _context(files, ssl.Purpose.CLIENT_AUTH)
    ctx.verify_mode = ssl.CERT_REQUIRED if mutual else ssl.CERT_NONE
    return ctx


@dataclass(frozen=True)
class Tls:
    """The contexts one process needs (built once: a context per connection is slow)."""

    files: TlsFiles
    client: ssl.SSLContext
    data_server: ssl.SSLContext
    http_server: ssl.SSLContext


def load(directory: str) -> Tls:
    files = check_dir(directory)
    return Tls(
        files,
        client_context(files),
        server_context(files, mutual=True),
        server_context(files, mutual=False),
    )


def new_tls(directory: str) -> None:
    """Creates DIR with a fresh CA certificate and the cluster's certificate and key."""
    if shutil.which("openssl") is None:
        raise TlsError("new-tls needs the openssl command (apt install openssl)")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for name in (CA, CERT, KEY):
        if os.path.lexists(os.path.join(directory, name)):
            raise TlsError(f"{os.path.join(directory, name)} exists; remove it or use a new DIR")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    old = os.umask(0o077)
    try:
        with tempfile.TemporaryDirectory(prefix="fractalfs-ca-") as tmp:
            ca_key, csr, ext = (os.path.join(tmp, n) for n in ("ca.key", "csr", "ext"))
            with open(ext, "w") as f:
                f.write(
                    "basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n"
                    "subjectAltName=DNS:fractalfs\n"
                    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
                )
            steps = [
                ["req", "-x509", *ec, "-keyout", ca_key, "-out", os.path.join(tmp, CA),
                 "-days", str(DAYS), "-subj", "/CN=fractalfs cluster CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                ["req", *ec, "-keyout", os.path.join(tmp, KEY), "-out", csr,
                 "-subj", "/CN=fractalfs"],
                ["x509", "-req", "-in", csr, "-CA", os.path.join(tmp, CA), "-CAkey", ca_key,
                 "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
                 "-days", str(DAYS), "-extfile", ext, "-out", os.path.join(tmp, CERT)],
            ]  # fmt: skip
            for step in steps:
                done = subprocess.run(["openssl", *step], capture_output=True, text=True)
                if done.returncode != 0:
                    raise TlsError(f"openssl {step[0]} failed: {done.stderr.strip()[-300:]}")
            for name in (CA, CERT, KEY):  # the CA key stays behind: nothing else is signed
                shutil.copyfile(os.path.join(tmp, name), os.path.join(directory, name))
                os.chmod(os.path.join(directory, name), 0o600)
    finally:
        os.umask(old)


TLS_RECV = 1 << 18  # ciphertext bytes per socket recv


class TlsConn:
    """A data connection over TLS with the two calls the data plane makes on a raw trio
    socket (``recv`` and ``sendmsg``), so :mod:`fractalfs.dataplane` serves both unchanged
    and the raw path stays a bare socket.

    An ``ssl.SSLObject`` over memory BIOs, driven by hand rather than through
    ``trio.SSLStream``: one ``recv`` returns as much plaintext as is buffered (many 16 KiB
    records per call, not one) and one ``sendmsg`` encrypts a whole batch and sends it in
    one go, which more than triples the throughput. One task may receive while another
    sends (the writer's daemon reads ACKs while it streams). Broken TLS raises
    ``ConnectionResetError`` (an ``OSError``, as a raw socket's failures); EOF is ``b""``.
    """

    def __init__(self, sock: trio.socket.SocketType, ctx: ssl.SSLContext, *, server: bool):
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server)
        self._sending = trio.Lock()  # records leave in the order they were made
        self._eof = False

    async def _flush(self) -> None:
        async with self._sending:
            data = memoryview(self._out.read())
            while data:
                sent = await self.sock.send(data)
                data = data[sent:]

    async def _fill(self) -> None:
        data = await self.sock.recv(TLS_RECV)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
            self._eof = True

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if self._eof:
                    raise ConnectionResetError("TLS: closed during the handshake") from None
                await self._fill()
            except ssl.SSLError as exc:
                with trio.move_on_after(1):
                    await self._flush()  # the alert tells the peer why
                raise ConnectionResetError(f"TLS: {exc}") from None
        await self._flush()

    async def recv(self, n: int, /) -> bytes:
        parts: list[bytes] = []
        size = 0
        waited = False
        while size < n:
            try:
                data = self._tls.read(n - size)
            except ssl.SSLWantReadError:
                if parts:
                    break
                if self._out.pending:
                    with trio.CancelScope(shield=True):  # records half sent: never
                        await self._flush()
                if self._eof:
                    return b""  # an EOF without close_notify: the frames tell truncation
                await self._fill()
                waited = True
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"TLS: {exc}") from None
            if not data:
                break
            parts.append(data)
            size += len(data)
        if not waited:
            # All from the buffer: still let others run, but a cancel here would lose what
            # was read (the data plane cancels a receive to send a deferred ACK).
            await trio.lowlevel.cancel_shielded_checkpoint()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def recv_into(self, buffer: memoryview, /) -> int:
        data = await self.recv(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    async def sendmsg(self, buffers: Sequence[bytes | memoryview], /) -> int:
        sent = 0
        try:
            for buf in buffers:  # records straight from the caller's buffers
                sent += self._tls.write(buf)
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"TLS: {exc}") from None
        await self._flush()
        return sent
