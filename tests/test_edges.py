"""The trio edge ends on their own: window, acks, cursors, reads."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import xxhash

from fractalfs.codec import AbortReason
from fractalfs.edgeid import EdgeId
from fractalfs.edges import EdgeError, ReaderEnd, ReaderState, WriterEnd
from fractalfs.spill import SpillFile

POLL = 0.05


def writer(window: int = 10) -> WriterEnd:
    return WriterEnd(EdgeId.new(), 1, window, os.getpid())


async def test_writer_blocks_at_window_until_acked() -> None:
    w = writer(window=10)
    await w.write(b"x" * 6, POLL)
    await w.write(b"y" * 6, POLL)  # 6 < 10: accepted, now 12 unacked
    done = trio.Event()

    async def third() -> None:
        await w.write(b"z", POLL)
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(third)
        await trio.sleep(0.1)
        assert not done.is_set()
        w.ack(6)  # frees the first chunk: 6 unacked
        with trio.fail_after(1):
            await done.wait()
    assert (w.base, w.end, len(w.chunks)) == (6, 13, 2)


async def test_partial_ack_keeps_the_chunk() -> None:
    w = writer(window=100)
    await w.write(b"abcdef", POLL)
    w.ack(3)
    assert w.base == 0 and w.acked == 3
    w.ack(2)  # acks never go back
    assert w.acked == 3


async def test_take_from_any_offset() -> None:
    w = writer(window=100)
    for piece in (b"abc", b"defg", b"hi"):
        await w.write(piece, POLL)
    for start in range(10):
        cursor = w.locate(start)
        out = bytearray()
        while True:
            bufs, cursor = w.take(cursor, 2)
            if not bufs:
                break
            assert sum(map(len, bufs)) <= 2
            out += b"".join(bufs)
        assert bytes(out) == b"abcdefghi"[start:]
    w.ack(7)
    with pytest.raises(ValueError):
        w.locate(2)


async def test_writer_gets_epipe_when_reader_closed() -> None:
    w = writer()
    w.reader_closed = True
    with pytest.raises(EdgeError) as info:
        await w.write(b"x", POLL)
    assert info.value.errno == errno.EPIPE


async def test_blocked_write_is_interrupted_by_a_pending_signal() -> None:
    """A dead opener counts as interrupted: the handler must never wait forever."""
    w = WriterEnd(EdgeId.new(), 1, 1, pid=2**22 + 12345)  # no such process
    await w.write(b"xx", POLL)
    with trio.fail_after(2), pytest.raises(EdgeError) as info:
        await w.write(b"x", POLL)
    assert info.value.errno == errno.EINTR


async def test_reader_reads_views_and_joins_small_chunks() -> None:
    r = ReaderEnd(EdgeId.new(), 100, os.getpid())
    r.push(b"0123456789")
    assert bytes(await r.read(4, POLL)) == b"0123"
    assert bytes(await r.read(100, POLL)) == b"456789"
    for piece in (b"a", b"b", b"c"):
        r.push(piece)
    assert bytes(await r.read(100, POLL)) == b"abc"
    assert r.delivered == r.received == 13
    r.finish()
    assert await r.read(10, POLL) == b""


async def test_reader_waits_then_fails() -> None:
    r = ReaderEnd(EdgeId.new(), 100, os.getpid())
    async with trio.open_nursery() as n:

        async def later() -> None:
            await trio.sleep(0.1)
            r.fail(errno.EIO, "lost")

        n.start_soon(later)
        with pytest.raises(EdgeError) as info:
            await r.read(10, POLL)
    assert info.value.errno == errno.EIO and r.state is ReaderState.FAILED


async def test_replay_of_the_same_bytes_is_verified_and_skipped() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    from fractalfs.edges import Diverged

    @given(st.binary(min_size=1, max_size=200), st.binary(max_size=50), st.integers(1, 40))
    def check(prefix: bytes, more: bytes, piece: int) -> None:
        r = ReaderEnd(EdgeId.new(), 10_000, os.getpid())
        r.begin_stream(replay=False)
        r.accept(prefix)
        r.begin_stream(replay=True)
        stream = prefix + more
        for i in range(0, len(stream), piece):
            r.accept(stream[i : i + piece])
        assert b"".join(bytes(c) for c in r.chunks) == stream
        assert r.received == len(stream)
        r.check_end(len(stream))

        bad = ReaderEnd(EdgeId.new(), 10_000, os.getpid())
        bad.accept(prefix)
        bad.begin_stream(replay=True)
        with pytest.raises(Diverged):
            bad.accept(bytes([prefix[0] ^ 1]) + prefix[1:])
        short = ReaderEnd(EdgeId.new(), 10_000, os.getpid())
        short.accept(prefix)
        short.begin_stream(replay=True)
        short.accept(prefix[:-1])
        with pytest.raises(Diverged):
            short.check_end(len(prefix) - 1)

    check()


def test_a_connection_lost_during_a_replay_resumes_the_check_not_the_stream() -> None:
    """Defect 1: gen 1 delivered a prefix, a *different* gen 2 replays from 0 and its
    connection drops before the prefix is replayed. The redial of gen 2 (no longer a "new
    generation" to the reader machine) must go on verifying at the replay's offset; it
    used to resume at ``received`` and pass gen 1's prefix + gen 2's tail as the stream."""
    from hypothesis import given
    from hypothesis import strategies as st

    from fractalfs.edges import Diverged

    @given(st.binary(min_size=2, max_size=200), st.data())
    def check(prefix: bytes, data: st.DataObject) -> None:
        cut = data.draw(st.integers(1, len(prefix) - 1))
        r = ReaderEnd(EdgeId.new(), 10_000, os.getpid())
        r.begin_stream(replay=False)
        r.accept(prefix)
        assert r.begin_stream(replay=True) == 0
        r.accept(prefix[:cut])  # gen 2 agrees so far ...
        assert r.begin_stream(replay=False) == cut  # ... the connection broke: redial
        different = bytes([prefix[cut] ^ 1]) + prefix[cut + 1 :]
        with pytest.raises(Diverged):
            r.accept(different)  # ... and gen 2 differs after the cut
        assert b"".join(bytes(c) for c in r.chunks) == prefix  # nothing of gen 2 passed

        same = ReaderEnd(EdgeId.new(), 10_000, os.getpid())
        same.accept(prefix)
        same.begin_stream(replay=True)
        same.accept(prefix[:cut])
        assert same.begin_stream(replay=False) == cut
        same.accept(prefix[cut:] + b"tail")
        same.check_end(len(prefix) + 4)
        assert b"".join(bytes(c) for c in same.chunks) == prefix + b"tail"

    check()


async def test_complete_empty_stream_is_not_delivered_until_its_end_is_acknowledged() -> None:
    from fractalfs.edges import WriterState

    w = writer()
    w.finish(WriterState.COMPLETE)
    assert not w.done  # no reader has seen the end yet: keep it (regression: empty streams)
    w.on_end_acked(0)
    assert w.done


async def test_a_complete_end_whose_end_ack_was_lost_is_done_once_discovery_says_delivered() -> (
    None
):
    """The END_ACK can be lost with its connection; the reader, at EOF, never redials. The
    end must not stay in memory (and in every heartbeat) for good."""
    from fractalfs.edges import WriterState

    w = writer()
    await w.write(b"abc", 0.2)
    w.finish(WriterState.COMPLETE)
    w.on_reader_done(3)  # no reader got its END frame: another generation's reader
    assert not w.done
    w.end_sent = True  # the END frame went out on a connection that then broke
    w.on_reader_done(2)  # not every byte: not delivered
    assert not w.done
    w.on_reader_done(3)
    assert w.done


class FlakySpill(SpillFile):
    """A spill whose appends fail with ENOSPC after ``room`` bytes."""

    room = 0

    def append(self, data: bytes | memoryview) -> None:
        if self.end - self.start + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().append(data)


async def test_persistent_writes_spill_behind_and_a_failure_reaches_the_program(
    tmp_path: Path,
) -> None:
    w = writer(window=4)
    sp = FlakySpill.create(tmp_path, w.edge, w.generation, 0, direct=False)
    sp.room = 10
    w.persist(sp, "test")
    for piece in (b"abcd", b"efgh"):  # never blocks on the (absent) reader: disk bounds it
        await w.write(piece, POLL)
    await w.drain_spill(POLL)
    assert sp.read(0, 100) == b"abcdefgh"
    assert w.base <= sp.end  # memory freed only as far as the disk holds the bytes
    await w.write(b"ijkl", POLL)  # accepted; its append fails in the background
    with pytest.raises(EdgeError) as err:
        await w.write(b"mnop", POLL)
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(EdgeError):  # and so does the close (FLUSH)
        await w.drain_spill(POLL)
    assert sp.read(0, 100) == b"abcdefgh"  # the spill stays an exact prefix
    assert w.locate(8) and w.end == 12  # the live reader still gets ijkl from memory
    sp.remove()


async def test_abort_never_closes_the_spill_under_a_running_append(tmp_path: Path) -> None:
    w = writer(window=4)
    sp = SpillFile.create(tmp_path, w.edge, w.generation, 0)
    w.persist(sp, "test")
    await w.write(b"x" * (8 << 20), POLL)
    w.abort(AbortReason.REMOVED, "rm")  # while the append most likely still runs
    with trio.fail_after(5):
        while w.spilling:
            await trio.sleep(0.01)
    assert not sp.path.exists() and sp.fd < 0


async def test_a_switch_to_persistent_spills_the_prefix_off_the_loop(tmp_path: Path) -> None:
    w = writer(window=1 << 20)
    w.retain_limit = 1 << 30  # dynamic, undecided: every byte stays in memory
    for piece in (b"abc", b"defg"):
        await w.write(piece, POLL)
    w.ack(7)
    sp = SpillFile.create(tmp_path, w.edge, w.generation, 0, direct=False)
    w.persist(sp, "test")
    assert w.spilling  # the prefix goes to disk in a worker thread
    await w.write(b"hi", POLL)  # waits for the prefix, then appends after it
    await w.drain_spill(POLL)
    assert sp.read(0, 100) == b"abcdefghi"
    sp.remove()


async def test_a_failed_switch_leaves_the_edge_transient_and_loses_nothing(
    tmp_path: Path,
) -> None:
    failures: list[OSError] = []
    w = writer(window=1 << 20)
    w.retain_limit = 1 << 30
    w.on_switch_failed = lambda end, exc: failures.append(exc)
    for piece in (b"abc", b"defg"):
        await w.write(piece, POLL)
    w.ack(3)
    sp = FlakySpill.create(tmp_path, w.edge, w.generation, 0, direct=False)
    sp.room = 5  # the prefix does not fit
    w.persist(sp, "test")
    await w.write(b"hi", POLL)  # no error: the edge is transient again
    assert [e.errno for e in failures] == [errno.ENOSPC]
    assert w.spill is None and w.mode.value == "transient" and not sp.path.exists()
    assert w.mode_reason.startswith("spill failed")
    assert w.base == 3  # acknowledged bytes freed as for any transient edge
    out = bytearray()
    bufs, _ = w.take(w.locate(3), 100)
    for b in bufs:
        out += b
    assert bytes(out) == b"defghi"


async def test_a_failing_spill_callback_never_raises_into_trio(tmp_path: Path) -> None:
    """Defect 10: the end of a spill append is handled in a run_sync_soon callback; an
    exception there (here from on_switch_failed) ended trio's run: the daemon died."""

    def broken(end: WriterEnd, exc: OSError) -> None:
        raise RuntimeError("bug in a callback")

    w = writer(window=1 << 20)
    w.retain_limit = 1 << 30
    w.on_switch_failed = broken
    await w.write(b"abc", POLL)
    sp = FlakySpill.create(tmp_path, w.edge, w.generation, 0, direct=False)
    sp.room = 1  # the prefix does not fit: the switch fails, the callback raises
    w.persist(sp, "test")
    await w.write(b"hi", POLL)  # the loop lives on; the edge is transient again
    assert not w.spilling and w.spill is None and w.end == 5


def test_pieces_received_into_one_buffer_read_as_one_view() -> None:
    """What the data plane pushes for a large frame (views of one buffer as it fills) is
    read back as one piece, without a join; the digest sees every byte once."""
    r = ReaderEnd(EdgeId.new(), 1 << 20, 0)
    frame = bytearray(b"abcdefghij")
    view = memoryview(frame)
    r.push(view[0:3], 0)
    r.push(view[3:7], 3)
    assert len(r.chunks) == 1 and bytes(r.chunks[0]) == b"abcdefg"
    r.push(b"XY")  # a piece that is no view of the buffer: a chunk of its own
    r.push(view[7:10], 7)  # the buffer again, but not right behind the last chunk
    assert [bytes(c) for c in r.chunks] == [b"abcdefg", b"XY", b"hij"]
    assert r.received == 12
    expected = xxhash.xxh3_128(b"abcdefgXYhij").digest()
    assert r.digest is not None and r.digest.digest() == expected


async def test_idle_fifos_wake_at_the_first_change_or_hang_up_and_stop_the_rest() -> None:
    """A reader FIFO parked before its first byte has no task: the first change of its
    end (bytes, a failure) or its program closing the read end (POLLERR on the write
    end) starts its pour once; one still parked when the daemon stops is let go."""
    from fractalfs.fiforoute import FifoReader, IdleFifos

    woken: list[FifoReader] = []
    stopped: list[FifoReader] = []
    idle = IdleFifos(woken.append, stopped.append)
    pipes = [os.pipe() for _ in range(5)]
    fifos = []
    for i, (r, w) in enumerate(pipes):
        fifo = FifoReader(ReaderEnd(EdgeId.new(), 1 << 20, os.getpid()), i, (r, w))
        fifo.hold = None  # the test holds the read end
        fifos.append(fifo)
    try:
        assert not idle.park(fifos[0])  # not running: every FIFO keeps its pour task
        async with trio.open_nursery() as nursery:
            nursery.start_soon(idle.run)
            await trio.testing.wait_all_tasks_blocked()
            assert all(idle.park(f) for f in fifos[:3])
            fifos[3].reader.push(b"x")
            assert not idle.park(fifos[3])  # it has bytes: it pours now
            assert idle.park(fifos[4])
            assert woken == [] and len(idle) == 4

            fifos[0].reader.push(b"first")  # bytes
            fifos[0].reader.push(b"more")
            assert woken == [fifos[0]]
            fifos[1].reader.fail(errno.EIO, "failed")  # a failure
            assert woken == [fifos[0], fifos[1]]
            os.close(pipes[2][0])  # its program closed the read end
            with trio.fail_after(5):
                while len(woken) < 3:
                    await trio.sleep(0.01)
            assert woken[2] is fifos[2] and len(idle) == 1
            nursery.cancel_scope.cancel()
        assert stopped == [fifos[4]] and len(idle) == 0
        fifos[4].reader.push(b"late")  # let go: no wake any more
        assert len(woken) == 3
    finally:
        for i, (r, w) in enumerate(pipes):
            if i != 2:
                os.close(r)
            os.close(w)


def test_an_edge_id_copies_and_pickles_as_itself() -> None:
    """EdgeId is an int made from its 16 bytes: copy, deepcopy (dataclasses.asdict) and
    pickle rebuild an int subclass from int's own new-args, the number, which EdgeId's
    constructor refused (TypeError: no len())."""
    import copy
    import pickle

    edge = EdgeId.new()
    for again in (copy.copy(edge), copy.deepcopy(edge), pickle.loads(pickle.dumps(edge))):
        assert type(again) is EdgeId and again == edge and again.hex == edge.hex
