"""``fractalfs watch``: live progress of active edges and every lifecycle event."""

from __future__ import annotations

import sys
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


def _bar(done: int, total: int, width: int = 24) -> str:
    if total <= 0:
        return "[" + "?" * width + "]"
    filled = min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def watch(url: str, auth: tuple[str, str] | None = None, interval: float = 0.5) -> None:
    tty = sys.stdout.isatty()
    base = url.rstrip("/") + "/v1"
    with httpx.Client(timeout=10, auth=auth) as http:
        try:
            first = http.get(f"{base}/events", params={"after": 2**62})
            if first.status_code == 401:
                raise QuietError(f"discovery at {url} wants the cluster secret: --secret-file")
            after = int(first.json()["last"])
        except httpx.HTTPError as exc:
            raise QuietError(f"discovery at {url} unreachable: {exc}") from None
        last: dict[str, tuple[float, int]] = {}
        drawn = 0
        while True:
            try:
                got = http.get(
                    f"{base}/events",
                    params={"after": after, "wait": interval},
                    timeout=interval + 10,
                ).json()
                edges = http.get(f"{base}/edges").json()["edges"]
            except httpx.HTTPError as exc:
                print(f"fractalfs watch: {exc}; retrying", file=sys.stderr)
                time.sleep(1)
                continue
            after = int(got["last"])
            lines = []
            now = time.monotonic()
            for e in edges:
                if e["state"] not in (
                    "streaming",
                    "waiting-for-reader",
                    "waiting-for-writer",
                    "node-lost",
                    "complete",
                ):
                    continue
                done = int(e["bytes_delivered"])
                t0, b0 = last.get(e["id"], (now, done))
                rate = (done - b0) / (now - t0) / 1e6 if now > t0 else 0.0
                last[e["id"]] = (now, done)
                total = int(e["bytes_written"]) if e["writer_state"] == "complete" else 0
                lines.append(
                    f"{printable(e['id'][:12])} {_bar(done, total)} {done / 1e6:10.1f} MB "
                    f"{rate:8.1f} MB/s  {printable(e['mode'] or '-'):10s} {printable(e['state'])}"
                )
            if tty and drawn:
                sys.stdout.write(f"\x1b[{drawn}F\x1b[J")  # redraw the progress block
            for event in got["events"]:
                print(describe(event))
            if tty:
                for line in lines:
                    print(line)
                drawn = len(lines)
            sys.stdout.flush()
