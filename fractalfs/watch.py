"""``fractalfs watch``: every lifecycle event as it happens (discovery's SSE stream) and,
on a terminal, a live progress bar with rate and ETA per active edge (``rich``)."""

from __future__ import annotations

import json
import queue
import ssl
import sys
import threading
import time
from typing import Any

import httpx

from .errors import QuietError
from .safetext import printable

SHOWN = {
    "writer": "writer registered",
    "reader": "reader connected",
    "mode": "mode",
    "resumed": "resumed",
    "complete": "complete",
    "failed": "FAILED",
    "diverged": "DIVERGED",
    "writer-lost": "writer's node lost",
    "writer-back": "writer's node back",
    "reader-lost": "reader's node lost",
    "reader-done": "delivered",
    "deleted": "removed",
}


def describe(event: dict[str, Any]) -> str:
    data = event.get("data") or {}
    extra = " ".join(f"{k}={v}" for k, v in data.items() if v not in ("", None))
    line = f"{event['edge']} {SHOWN.get(event['kind'], event['kind'])} {extra}".rstrip()
    return printable(line)


class Replicas:
    """The discovery URLs given (``URL1,URL2``: replicas in front of one etcd cluster),
    and which one is used now: the one that answered last."""

    def __init__(self, urls: str) -> None:
        from .discovery.client import split_urls

        self.bases = [u + "/v1" for u in split_urls(urls)]
        if not self.bases:
            raise QuietError("no discovery URL given")
        self.current = 0

    @property
    def base(self) -> str:
        return self.bases[self.current]

    def next(self) -> bool:
        """Moves on to the next replica; False once every one was tried this round."""
        self.current = (self.current + 1) % len(self.bases)
        return self.current != 0


def _follow(
    replicas: Replicas,
    after: int,
    out: queue.Queue[dict[str, Any] | str],
    auth: tuple[str, str] | None = None,
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Follows discovery's SSE stream from ``after`` (resuming where it broke off with
    ``?after=``, on the next replica if the one it was on is gone: event numbers are the
    cluster's, not a replica's) and queues every event, or a line saying why it is
    reconnecting."""
    while True:
        base = replicas.base
        try:
            with httpx.stream(
                "GET",
                f"{base}/events/stream",
                params={"after": after},
                timeout=httpx.Timeout(10.0, read=60.0),  # keep-alives every 15 s
                auth=auth,
                verify=verify,
            ) as resp:
                resp.raise_for_status()
                data = ""
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        data += line[5:].strip()
                    elif not line and data:
                        event = json.loads(data)
                        data = ""
                        after = max(after, int(event["seq"]))
                        out.put(event)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            if replicas.base == base and replicas.next():
                out.put(f"fractalfs watch: {exc}; trying {replicas.base.removesuffix('/v1')}")
                continue  # the next replica at once
            out.put(f"fractalfs watch: {exc}; reconnecting")
            time.sleep(1)


ACTIVE = ("streaming", "waiting-for-reader", "waiting-for-writer", "node-lost", "complete")


def watch(
    url: str,
    auth: tuple[str, str] | None = None,
    interval: float = 0.5,
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Events as lines; on a terminal, a live rich progress bar (rate, ETA) per active
    edge below them. ``url``: one discovery URL or several (``URL1,URL2``), taken in turn
    when one does not answer."""
    replicas = Replicas(url)
    with httpx.Client(timeout=10, auth=auth, verify=verify) as http:
        while True:
            base = replicas.base
            try:
                first = http.get(f"{base}/events", params={"after": 2**62})
                if first.status_code == 401:
                    raise QuietError(
                        f"discovery at {base[:-3]} wants the cluster secret: --secret-file"
                    )
                if first.status_code != 200:  # raise_for_status's text is two lines
                    raise ValueError(f"answered {first.status_code}, not as discovery does")
                after = int(first.json()["last"])
                break
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                if not replicas.next():
                    raise QuietError(f"discovery at {url} unreachable: {exc}") from None
        # rich is imported after the start point is fixed: nothing is missed meanwhile.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskID,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        console = Console()
        tty = console.is_terminal
        events: queue.Queue[dict[str, Any] | str] = queue.Queue()
        follow = (replicas, after, events, auth, verify)
        threading.Thread(target=_follow, args=follow, daemon=True).start()
        progress = Progress(
            TextColumn("{task.fields[edge]}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[mode]:10} {task.fields[state]}"),
            console=console,
            disable=not tty,
        )
        tasks: dict[str, TaskID] = {}
        with progress:
            next_poll = 0.0
            while True:
                try:
                    item = events.get(timeout=interval)
                except queue.Empty:
                    item = None
                if isinstance(item, str):
                    print(item, file=sys.stderr)
                elif item is not None:
                    line = describe(item)
                    if tty:
                        progress.console.print(line, markup=False, highlight=False)
                    else:
                        print(line, flush=True)
                if not tty or time.monotonic() < next_poll:
                    continue
                next_poll = time.monotonic() + interval
                try:
                    edges = http.get(f"{replicas.base}/edges").json()["edges"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue  # the event follower says why, and moves on
                shown = set()
                for e in edges:
                    if e["state"] not in ACTIVE:
                        continue
                    shown.add(e["id"])
                    done = int(e["bytes_delivered"])
                    total = int(e["bytes_written"]) if e["writer_state"] == "complete" else None
                    fields: dict[str, Any] = {
                        "edge": printable(e["id"][:12]),
                        "mode": printable(e["mode"] or "-").replace("[", "("),
                        "state": printable(e["state"]).replace("[", "("),
                    }
                    if e["id"] not in tasks:
                        tasks[e["id"]] = progress.add_task("", total=total, **fields)
                    progress.update(tasks[e["id"]], completed=done, total=total, **fields)
                for edge_id in list(tasks):
                    if edge_id not in shown:
                        progress.remove_task(tasks.pop(edge_id))
