"""Process-wide settings of fractalfs's long-running programs (node daemon, discovery)."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Keeps the garbage collector's full passes short.

    A full (generation 2) collection walks every tracked object: with trio, pyfuse3,
    aiohttp and httpx loaded that took 25-40 ms, a stall every few seconds that showed as
    20-45 ms outliers in line latency. What exists at start-up lives for the whole run:
    freezing it leaves the collector only what the run creates (``bench/bench.py``
    latency; DEVELOPERS.md).
    """
    gc.collect()
    gc.freeze()
