"""A daemon's pulse: "this run of node N is alive", sent from a thread of its own.

Discovery declares a node lost after :data:`~fractalfs.discovery.server.NODE_TIMEOUT`
(1.5 s) without a request from it. The heartbeat and every other request come from the
daemon's trio loop; a loop saturated by thousands of opens (or a long collection) can fall
silent for seconds while every stream it carries is fine, and the node was declared lost
although it was only busy. The pulse is a small POST (``/v1/nodes/{node}/pulse``, the
node's name and run) from an ordinary thread with its own blocking HTTP client: Python
switches threads every few milliseconds however busy the loop is, so a busy daemon pulses
on time. A stopped (SIGSTOP), killed or frozen machine does not.

What the pulse must not do is keep a stuck daemon alive: the loop marks its progress
(:meth:`Pulse.tick`, every :data:`TICK` s) and the thread pulses only while the loop made
progress within :data:`LOOP_STALL` seconds. Busy means slow, not stuck.

Discovery also takes a pulse from a node it declared lost (of the same run) as its return:
the ends it held are open again at once (see ``DiscoveryApp.pulse``).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time

import httpx
import trio

from .discovery.heartbeat import NODE_HEADER

log = logging.getLogger(__name__)

EVERY = 0.4  # seconds between pulses (discovery's timeout is 1.5 s)
TICK = 0.25  # seconds between the loop's marks of progress
LOOP_STALL = 10.0  # a loop without progress this long is stuck, not busy: no more pulses
TIMEOUT = 1.0  # one pulse's answer; the next replica is tried after it


class Pulse:
    def __init__(
        self,
        urls: list[str],
        node: str,
        boot: str,
        *,
        auth: tuple[str, str] | None = None,
        verify: ssl.SSLContext | bool = True,
        every: float = EVERY,
        loop_stall: float = LOOP_STALL,
    ) -> None:
        self.urls = list(urls)
        self.node = node
        self.boot = boot
        self.every = every
        self.loop_stall = loop_stall
        self.sent = 0  # pulses discovery answered (for tests and metrics)
        self._auth = auth
        self._verify = verify
        self._progress = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        """The loop is making progress (called from it)."""
        self._progress = time.monotonic()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Starts the thread and marks the loop's progress until cancelled; then stops it."""
        self.start()
        task_status.started()
        try:
            while True:
                self.tick()
                await trio.sleep(TICK)
        finally:
            self.stop()

    def start(self) -> None:
        self._progress = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="fractalfs-pulse", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread; returns at once (a pulse in flight ends within TIMEOUT)."""
        self._stop.set()

    def _beat(self) -> None:
        headers = {NODE_HEADER: self.node}
        current = 0
        with httpx.Client(
            auth=self._auth, verify=self._verify, timeout=TIMEOUT, headers=headers
        ) as http:
            while not self._stop.wait(self.every):
                if time.monotonic() - self._progress > self.loop_stall:
                    continue  # stuck, not busy: let discovery see the silence
                for _ in self.urls:
                    url = self.urls[current]
                    with contextlib.suppress(httpx.HTTPError):
                        resp = http.post(
                            f"{url}/v1/nodes/{self.node}/pulse", json={"boot": self.boot}
                        )
                        if resp.status_code == 404:
                            log.info("discovery takes no pulse (an older server): heartbeats only")
                            return
                        if resp.status_code < 500:
                            if resp.status_code == 200:
                                self.sent += 1
                            else:
                                log.debug("pulse: discovery answered %s", resp.status_code)
                            break
                    current = (current + 1) % len(self.urls)
