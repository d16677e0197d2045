"""A trio-native client of the discovery API (httpx on trio, no second event loop)."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import trio

from ..edgestate import backoff

log = logging.getLogger(__name__)


class DiscoveryError(Exception):
    """Discovery answered with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Conflict(DiscoveryError):
    """409: e.g. another node holds the edge's writer or reader."""


class Unavailable(Exception):
    """Discovery could not be reached before the deadline."""


_PROXY_ERRORS = frozenset({502, 503, 504})


def _json_object(resp: httpx.Response) -> dict[str, Any] | None:
    """The answer's JSON object ({} for an empty body), or None if it is anything else (a
    proxy's HTML, a plain-text 413): every caller then gets a typed error, never a
    ``JSONDecodeError`` that would end its loop."""
    if not resp.content:
        return {}
    try:
        data = resp.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _snippet(resp: httpx.Response) -> str:
    text = resp.content[:120].decode("utf-8", "replace")
    return " ".join(text.split()) or "(empty)"


class DiscoveryClient:
    def __init__(self, url: str, *, retry_for: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.retry_for = retry_for
        self._http = httpx.AsyncClient(
            base_url=self.url + "/v1",
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float = 10.0,
        retry_for: float | None = None,
    ) -> dict[str, Any]:
        deadline = trio.current_time() + (self.retry_for if retry_for is None else retry_for)
        attempt = 0
        while True:
            try:
                resp = await self._http.request(
                    method, path, json=body, params=params, timeout=timeout
                )
            except httpx.TransportError as exc:
                if trio.current_time() >= deadline:
                    raise Unavailable(f"discovery at {self.url} unreachable: {exc}") from exc
                await trio.sleep(backoff(attempt, cap=2.0))
                attempt += 1
                continue
            data = _json_object(resp)
            if data is None and resp.status_code in _PROXY_ERRORS:
                # A proxy's (or a restarting server's) plain 502/503/504: transient.
                if trio.current_time() >= deadline:
                    raise Unavailable(
                        f"discovery at {self.url} answered {resp.status_code} "
                        f"{resp.reason_phrase}: {_snippet(resp)}"
                    )
                await trio.sleep(backoff(attempt, cap=2.0))
                attempt += 1
                continue
            if data is None:
                raise DiscoveryError(
                    resp.status_code,
                    f"discovery answered {resp.status_code} {resp.reason_phrase} without a "
                    f"JSON object: {_snippet(resp)}",
                )
            if resp.status_code == 409:
                raise Conflict(409, str(data.get("error", "conflict")))
            if resp.status_code >= 400:
                raise DiscoveryError(resp.status_code, str(data.get("error", resp.reason_phrase)))
            return data

    async def health(self, *, retry_for: float | None = None) -> dict[str, Any]:
        return await self._call("GET", "/health", retry_for=retry_for)

    async def get(self, edge: str, *, wait: float = 0.0, since: int = -1) -> dict[str, Any]:
        # Without a version to compare against there is nothing to wait for: answer now.
        params = {"wait": wait, "since": since} if wait and since >= 0 else None
        return await self._call("GET", f"/edges/{edge}", params=params, timeout=wait + 10.0)

    async def edges(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/edges"))["edges"]  # type: ignore[no-any-return]

    async def delete(self, edge: str) -> None:
        await self._call("DELETE", f"/edges/{edge}")

    async def register_writer(self, edge: str, node: str, endpoint: str) -> dict[str, Any]:
        return await self._call(
            "POST", f"/edges/{edge}/writer", body={"node": node, "endpoint": endpoint}
        )

    async def close_writer(
        self, edge: str, generation: int, state: str, written: int, reason: str = ""
    ) -> dict[str, Any]:
        return await self._call(
            "POST",
            f"/edges/{edge}/writer/close",
            body={"generation": generation, "state": state, "bytes": written, "reason": reason},
        )

    async def claim_reader(self, edge: str, node: str) -> dict[str, Any]:
        return await self._call("POST", f"/edges/{edge}/reader", body={"node": node})

    async def release_reader(
        self, edge: str, node: str, state: str, delivered: int, claim: int = 0
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"node": node, "state": state, "bytes": delivered}
        if claim:
            body["claim"] = claim  # which claim of this node ends (not a newer one)
        return await self._call("POST", f"/edges/{edge}/reader/close", body=body)

    async def set_mode(self, edge: str, generation: int, mode: str, reason: str) -> None:
        await self._call(
            "POST",
            f"/edges/{edge}/mode",
            body={"generation": generation, "mode": mode, "reason": reason},
        )

    async def restore_writer(
        self, edge: str, generation: int, node: str, endpoint: str, complete: bool
    ) -> None:
        await self._call(
            "POST",
            f"/edges/{edge}/writer/restore",
            body={
                "generation": generation,
                "node": node,
                "endpoint": endpoint,
                "complete": complete,
            },
        )

    async def record(self, edge: str, kind: str, data: dict[str, Any]) -> None:
        await self._call("POST", f"/edges/{edge}/event", body={"kind": kind, "data": data})

    async def progress(self, edge: str, delivered: int) -> None:
        await self._call("POST", f"/edges/{edge}/progress", body={"bytes": delivered})

    async def events(self, after: int, *, wait: float = 0.0) -> dict[str, Any]:
        params = {"after": after, "wait": wait}
        return await self._call("GET", "/events", params=params, timeout=wait + 10.0, retry_for=0.0)

    async def heartbeat(
        self, node: str, boot: str, writers: dict[str, int], readers: list[str]
    ) -> list[str]:
        """Reports this node's ends; returns the writer edges that are fenced off."""
        got = await self._call(
            "POST",
            f"/nodes/{node}/heartbeat",
            body={"boot": boot, "writers": writers, "readers": readers},
            timeout=2.0,
            retry_for=0.0,
        )
        return list(got.get("stale", []))

    async def leave(self, node: str) -> None:
        await self._call("POST", f"/nodes/{node}/leave", timeout=2.0, retry_for=0.0)
