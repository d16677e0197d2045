"""Discovery's history stays proportional to live work: delivered edges are forgotten after
a retention, and so are nodes that left or stayed lost that long.

Forgetting a delivered edge also forgets its generation: an edge id used again after the
retention starts at generation 1. Nothing of the old stream can interfere by then: its
writer finished, and its reader delivered every byte.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import DiscoveryApp

log = logging.getLogger(__name__)

RETENTION = 3600.0  # seconds a delivered edge stays visible in status and /v1/edges


async def prune_once(app: DiscoveryApp, retention: float) -> int:
    pruned = await app._do(app.store.prune, time.time() - retention)
    loop_now = asyncio.get_running_loop().time()
    for node in list(app.lost):
        if loop_now - app.last_seen.get(node, loop_now - retention - 1) > retention:
            app.lost.discard(node)
            app.last_seen.pop(node, None)
            app.boots.pop(node, None)
            await app._do(app.store.forget_boot, node)
            app.held.forget(node)
    if pruned:
        log.info("forgot %d edges delivered more than %.0f s ago", pruned, retention)
    return pruned


async def prune_forever(app: DiscoveryApp, retention: float) -> None:
    while True:
        await asyncio.sleep(min(60.0, max(retention / 10, 0.1)))
        try:
            await prune_once(app, retention)
        except Exception:  # the store is unreachable for a moment: try again later
            log.exception("pruning history failed")
