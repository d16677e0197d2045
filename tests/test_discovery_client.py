"""The discovery client against answers that are not discovery's JSON (defect 8)."""

from __future__ import annotations

import pytest
import trio

from fractalfs.discovery.client import DiscoveryClient, DiscoveryError, Unavailable


async def _serve(answers: list[bytes], task_status: trio.TaskStatus[int]) -> None:
    """A raw HTTP server answering each request with the next of ``answers`` (the last
    one repeats)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    served = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal served
        async with stream:
            buf = b""
            while b"\r\n\r\n" not in buf:
                got = await stream.receive_some(65536)
                if not got:
                    return
                buf += got
            head, _, body = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                body += await stream.receive_some(65536)
            answer = answers[min(served, len(answers) - 1)]
            served += 1
            await stream.send_all(answer)

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


def _plain(status: str, text: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(text)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + text


async def test_a_plain_text_413_is_a_discovery_error_not_a_json_error() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, [_plain("413 Payload Too Large", b"too big")])
        client = DiscoveryClient(f"http://127.0.0.1:{port}", retry_for=0.5)
        with pytest.raises(DiscoveryError) as info:
            await client.heartbeat("n1", "boot", {"e" * 32: 1}, [])
        assert info.value.status == 413 and "too big" in str(info.value)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_proxys_502_is_retried_then_unavailable() -> None:
    ok = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}"
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, [_plain("502 Bad Gateway", b"<html>bad</html>"), ok])
        client = DiscoveryClient(f"http://127.0.0.1:{port}", retry_for=5.0)
        assert await client.get("e" * 32) == {}  # the second answer
        nursery.cancel_scope.cancel()
        await client.aclose()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, [_plain("502 Bad Gateway", b"<html>bad</html>")])
        client = DiscoveryClient(f"http://127.0.0.1:{port}", retry_for=0.3)
        with pytest.raises(Unavailable, match="502"):
            await client.get("e" * 32)
        nursery.cancel_scope.cancel()
        await client.aclose()
