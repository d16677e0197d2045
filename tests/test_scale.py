"""Discovery's cost follows live work: waiters woken per edge, paged edge lists, capped
events, pruned history."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from fractalfs.discovery.server import Changes
from fractalfs.testing import Discovery

from .conftest import new_edge


def test_a_change_wakes_only_the_waiters_of_its_edge() -> None:
    async def main() -> None:
        changes = Changes()
        woken: list[str] = []
        edges = [new_edge() for _ in range(1000)]

        async def waiter(edge: str) -> None:
            checks = 0

            def ready() -> bool:
                nonlocal checks
                checks += 1
                return checks > 1  # the first look is before any change

            await changes.wait_until(ready, 5.0, edge)
            woken.append(edge)

        tasks = [asyncio.create_task(waiter(e)) for e in edges]
        await asyncio.sleep(0.05)
        assert changes.waiting() == 1000
        changes.notify(edges[7])
        await asyncio.sleep(0.05)
        assert woken == [edges[7]]  # not the other 999
        changes.notify()  # a change of many edges (a node lost) wakes everyone
        await asyncio.gather(*tasks)
        assert len(woken) == 1000 and changes.waiting() == 0

        # Waiters that time out leave nothing behind.
        await asyncio.gather(*(changes.wait_until(lambda: False, 0.01, e) for e in edges[:50]))
        assert changes.waiting() == 0

    asyncio.run(main())


@pytest.fixture
def discovery(tmp_path: Path) -> Iterator[Discovery]:
    disc = Discovery(tmp_path / "discovery")
    disc.start()
    try:
        yield disc
    finally:
        disc.stop()
