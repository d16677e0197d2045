"""The writer's side of a data connection, over a real socket pair."""

from __future__ import annotations

import os

import pytest
import trio

from fractalfs import codec, config, dataplane, handshake
from fractalfs.edgeid import EdgeId
from fractalfs.edges import ReaderEnd, WriterEnd, WriterState
from fractalfs.handshake import Control


async def test_a_data_ack_of_every_byte_is_not_the_end_acknowledged() -> None:
    """Defect 4: an ACK equal to ``end`` (the reader's daemon received every byte) used to
    mark a complete stream delivered before the END frame was acknowledged."""
    w = WriterEnd(EdgeId.new(), 1, 1 << 20, os.getpid())
    await w.write(b"x" * 1000, 0.05)
    w.finish(WriterState.COMPLETE)
    here, there = trio.socket.socketpair()
    with here, there:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dataplane.serve_edge, here, w, 0)
            await dataplane.send_all(there, [handshake.control(Control.ACK, 1000)])
            with trio.fail_after(5):
                while w.acked < 1000:
                    await w.changed.wait()
            assert not w.end_acked and not w.done
            await dataplane.send_all(there, [handshake.control(Control.END_ACK, 1000)])
            with trio.fail_after(5):
                while not w.end_acked:
                    await w.changed.wait()
            assert w.done
            there.close()  # the reader hangs up: the connection ends
    assert w.connection is None


async def test_send_all_sends_many_small_buffers_in_order() -> None:
    """Defect 12 (``list.pop(0)`` made this quadratic); an empty buffer (here the last)
    used to make it spin forever on zero-byte sendmsgs."""
    bufs = [bytes([i % 251]) * (1 + i % 7) for i in range(20_000)] + [b""]
    here, there = trio.socket.socketpair()
    got = bytearray()
    with here, there:
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                while len(got) < sum(map(len, bufs)):
                    got.extend(await there.recv(1 << 16))

            nursery.start_soon(receive)
            with trio.fail_after(10):
                await dataplane.send_all(here, bufs)
    assert bytes(got) == b"".join(bufs)


async def test_a_reader_with_the_secret_requires_the_writers_proof() -> None:
    """A peer at the writer's address that answers OK without a CHALLENGE (a port bound by
    someone else after the daemon died, an endpoint redirected) must not be streamed from:
    skipping the proof would let it inject any bytes."""
    key = b"k" * 32
    hello = handshake.Hello(EdgeId.new(), 1, 0, handshake.FLAG_HMAC, os.urandom(16))
    here, there = trio.socket.socketpair()
    with here, there:
        fake = handshake.Reply(handshake.Status.OK, 1, 0).encode()
        await there.send(fake)
        reply = await dataplane.greet(here, hello, key)
        assert reply.status is handshake.Status.AUTH_FAILED, reply


def test_an_arena_is_reused_only_once_no_view_of_it_is_alive() -> None:
    arenas = dataplane.Arenas(size=16)
    assert arenas.room == 0  # none until a large frame comes
    arenas.next()
    first = id(arenas.buf)  # ids, not references: a reference would keep it in use
    held = memoryview(arenas.buf)[0:4]  # a chunk the reading program has not read yet
    arenas.fill = 16
    arenas.next()
    second = id(arenas.buf)
    assert second != first
    arenas.fill = 16
    arenas.next()  # the first is still viewed: a new arena, not the first filled again
    assert id(arenas.buf) not in (first, second)
    assert arenas.fill == 0
    del held
    arenas.fill = 16
    arenas.next()
    assert id(arenas.buf) == first  # nothing views it any more (it is alive in the spares)


def test_arenas_covering_a_window_reuse_the_oldest_released_one() -> None:
    """A reader holding a whole window of views releases the oldest first: once it has,
    that arena is filled again, however many newer ones are still viewed (a window's worth
    of fresh arenas per window moved was a fifth of a daemon's Python time)."""
    arenas = dataplane.Arenas.covering(64, size=16)  # 4 arenas of views, plus spares
    held = []
    ids = []
    for _ in range(5):
        arenas.next()
        ids.append(id(arenas.buf))
        held.append(memoryview(arenas.buf)[0:16])
        arenas.fill = 16
    assert len(set(ids)) == 5  # each still viewed: none filled twice
    del held[0]  # the program read the oldest
    arenas.next()
    assert id(arenas.buf) == ids[0]
    assert arenas.fill == 0
    del held[:]
    arenas.trim()  # the stream fell idle: only the arena being filled stays
    assert arenas.spare == [] and id(arenas.buf) == ids[0]


async def test_a_deferred_ack_goes_out_when_its_gap_ends_without_more_data() -> None:
    """ACKs are rate-limited; one held back must still be sent when the writer sends
    nothing more (a writer blocked on its window waits for exactly that ACK)."""
    reader = ReaderEnd(EdgeId.new(), 8 << 20, 0)
    sizes = [300 * 1024, 300 * 1024]  # within one ACK gap of each other
    total = sum(sizes)
    here, there = trio.socket.socketpair()
    with here, there:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dataplane._receive, there, reader, 0)
            for size in sizes:
                await dataplane.send_all(here, [codec.data_header(size), b"y" * size])
            acked = 0
            with trio.fail_after(1):  # not the 3.5 s silence timeout
                while acked < total:
                    raw = await dataplane.recv_exact(here, handshake.CONTROL.size)
                    kind, acked = handshake.parse_control(raw)
                    assert kind is Control.ACK
            assert acked == total == reader.received
            nursery.cancel_scope.cancel()
    assert b"".join(bytes(c) for c in reader.chunks) == b"y" * total


async def test_fewer_bytes_than_an_ack_step_are_acknowledged_once_the_stream_pauses() -> None:
    """ACKs come once per ACK_EVERY bytes; a writer whose window is smaller than that (here
    64 KiB, the write_window setting) blocks with fewer unacknowledged: the pause itself
    must bring the ACK, or both daemons wait for each other for good."""
    reader = ReaderEnd(EdgeId.new(), 8 << 20, 0)
    size = 64 * 1024
    assert size < dataplane.ACK_EVERY
    here, there = trio.socket.socketpair()
    with here, there:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dataplane._receive, there, reader, 0)
            await dataplane.send_all(here, [codec.data_header(size), b"z" * size])
            with trio.fail_after(1):  # not the 3.5 s silence timeout
                raw = await dataplane.recv_exact(here, handshake.CONTROL.size)
            assert handshake.parse_control(raw) == (Control.ACK, size)
            nursery.cancel_scope.cancel()


async def test_controls_batched_or_split_across_receives_are_each_applied() -> None:
    """The writer's daemon takes every control that has arrived in one receive: several in
    one segment, and one cut between two segments, must each count once and in order."""
    w = WriterEnd(EdgeId.new(), 1, 1 << 20, os.getpid())
    await w.write(b"x" * 3000, 0.05)
    w.finish(WriterState.COMPLETE)
    ack1, ack2 = handshake.control(Control.ACK, 1000), handshake.control(Control.ACK, 2000)
    end_ack = handshake.control(Control.END_ACK, 3000)
    here, there = trio.socket.socketpair()
    with here, there:
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dataplane._receive_controls, here, w, scope)
            await there.send(ack1 + ack2 + end_ack[:4])
            with trio.fail_after(5):
                while w.acked < 2000:
                    await w.changed.wait()
            assert w.acked == 2000 and not w.end_acked
            await there.send(end_ack[4:] + handshake.control(Control.CLOSE, 3000))
            with trio.fail_after(5):
                while not w.end_acked:
                    await w.changed.wait()
            assert w.acked == 3000
        assert w.reader_closed and scope.cancel_called


async def test_a_writer_on_the_smallest_window_allowed_is_acknowledged() -> None:
    """A reader acknowledges once ACK_EVERY bytes are unacknowledged: a writer whose window
    was smaller blocked forever (100,000 bytes: delivered, acked 0 on 0fa3b97; now it
    stalls ACK_IDLE per window), so a write_window under two ACK steps is a configuration
    error, and the smallest allowed one streams."""
    with pytest.raises(config.ConfigError, match="write_window"):
        config.check_node_config(config.NodeConfig("/fractal", write_window=100_000))
    assert config.MIN_WRITE_WINDOW >= 2 * dataplane.ACK_EVERY
    w = WriterEnd(EdgeId.new(), 1, config.MIN_WRITE_WINDOW, os.getpid())
    r = ReaderEnd(w.edge, 1 << 24, 0)
    here, there = trio.socket.socketpair()
    got = 0
    with here, there:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dataplane.serve_edge, here, w, 0)
            nursery.start_soon(dataplane._receive, there, r, 0)

            async def write() -> None:
                for _ in range(100):
                    await w.write(b"q" * 30_001, 0.05)
                w.finish(WriterState.COMPLETE)

            nursery.start_soon(write)
            with trio.fail_after(20):
                while chunk := await r.read(1 << 20, 0.05):
                    got += len(chunk)
            nursery.cancel_scope.cancel()
    assert got == 100 * 30_001
