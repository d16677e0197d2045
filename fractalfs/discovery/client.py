"""A trio-native client of the discovery API (httpx on trio, no second event loop).

It takes one discovery URL or several (``http://a:7700,http://b:7700``: replicas in front of
one etcd cluster). A request that cannot reach a replica, or that a replica answers with a
5xx (its etcd is unreachable), is sent to the next one at once; only when every replica has
failed does it back off and retry until its deadline. The replica that answered last is
the one tried first.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Hashable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from ..edgestate import backoff
from .heartbeat import NODE_HEADER, Acked, deltas

log = logging.getLogger(__name__)


UNAVAILABLE = frozenset({502, 503, 504})  # a replica that cannot reach its store, or a proxy


class DiscoveryError(Exception):
    """Discovery answered with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Conflict(DiscoveryError):
    """409: e.g. another node holds the edge's writer or reader."""


class Unavailable(Exception):
    """Discovery could not be reached before the deadline."""


def split_urls(url: str) -> list[str]:
    """``URL1,URL2`` -> [URL1, URL2] (blanks and trailing slashes dropped)."""
    urls = [u.strip().rstrip("/") for u in url.split(",")]
    return [u for u in urls if u]


def check_discovery_urls(url: str) -> str:
    """One discovery URL or several, comma-separated (replicas of one cluster), checked
    before any request: ValueError with a one-line reason (httpx's InvalidURL, or
    urlsplit's "Invalid IPv6 URL", would otherwise end a command in a traceback)."""
    urls = split_urls(url)
    if not urls:
        raise ValueError("no discovery URL given")
    for one in urls:
        try:
            parts = urlsplit(one)
            _ = parts.port
            httpx.URL(one)
        except (ValueError, httpx.InvalidURL) as exc:
            raise ValueError(f"{one}: bad discovery URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{one}: discovery URL must look like http://HOST:PORT")
    return ",".join(urls)


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


MAX_CONNECTIONS = 1024  # a daemon's connections to discovery (heartbeats aside)
# Short requests (registrations, reads, reports) in flight at once; the rest wait their
# turn here. httpcore's pool matches every queued request against every connection on
# each change (O(queued x connections)): 10,000 pumps asking at once kept daemon B's loop
# busy in AsyncConnectionPool._assign_requests_to_connections for minutes (py-spy,
# N = 10,000). Long-polls (a wait) are not counted: they hold a connection for seconds.
SHORT_IN_FLIGHT = 32


class DiscoveryClient:
    def __init__(
        self,
        url: str,
        *,
        retry_for: float = 30.0,
        auth: tuple[str, str] | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """``verify``: the cluster's TLS client context for https URLs (``--tls-dir``)."""
        self.urls = split_urls(url)
        if not self.urls:
            raise ValueError("no discovery URL given")
        self.auth = auth
        self.verify = verify  # for the pulse's own client (fractalfs.pulse)
        self.retry_for = retry_for
        self._current = 0
        self._short = trio.CapacityLimiter(SHORT_IN_FLIGHT)
        self._acked: dict[str, Acked | None] = {}  # node -> its ends as discovery has them
        # Heartbeats have their own small pool: never queued behind a thousand long-polls.
        self._beats = httpx.AsyncClient(
            auth=auth,
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=4),
            verify=verify,
        )
        self._http = httpx.AsyncClient(
            auth=auth,
            timeout=httpx.Timeout(10.0),
            # Bounded: 10,000 readers opening at once made 10,000 connections, over
            # discovery's cap (4,096): refused, retried, the daemon declared lost. Beyond
            # this many, requests queue in the pool (each within its own timeout).
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=32),
            verify=verify,
        )

    @property
    def url(self) -> str:
        """The replica requests go to now."""
        return self.urls[self._current]

    def _next_replica(self) -> None:
        self._current = (self._current + 1) % len(self.urls)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._beats.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float = 10.0,
        retry_for: float | None = None,
        beat: bool = False,
    ) -> dict[str, Any]:
        deadline = trio.current_time() + (self.retry_for if retry_for is None else retry_for)
        attempt = 0
        failed = 0  # replicas that failed this request since the last backoff
        while True:
            url = self.url
            try:
                if beat or (params is not None and params.get("wait")):
                    resp = await (self._beats if beat else self._http).request(
                        method, f"{url}/v1{path}", json=body, params=params, timeout=timeout
                    )
                else:
                    async with self._short:
                        resp = await self._http.request(
                            method, f"{url}/v1{path}", json=body, params=params, timeout=timeout
                        )
                why = "" if resp.status_code not in UNAVAILABLE else f"answered {resp.status_code}"
            except httpx.TransportError as exc:
                why = f"unreachable: {exc}"
            if why:
                # Every replica gets one try, even past the deadline; then back off.
                self._next_replica()
                failed += 1
                if failed < len(self.urls):
                    log.info("discovery at %s %s; trying %s", url, why, self.url)
                    continue
                if trio.current_time() >= deadline:
                    raise Unavailable(f"discovery at {url} {why}")
                await trio.sleep(backoff(attempt, cap=2.0))
                attempt += 1
                failed = 0
                continue
            # A 502/503/504 (a proxy's plain page included) went to the next replica above.
            data = _json_object(resp)
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

    async def changes(self, feed: str, after: int, *, wait: float = 0.0) -> dict[str, Any]:
        """Which edges changed after position ``after`` of ``feed`` (see the server's
        ``edge_changes``); one try per replica, no retries: the caller follows the feed."""
        params = {"feed": feed, "after": after, "wait": wait}
        return await self._call(
            "GET", "/changes", params=params, timeout=wait + 10.0, retry_for=0.0
        )

    async def edges(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/edges"))["edges"]  # type: ignore[no-any-return]

    async def delete(self, edge: str) -> None:
        await self._call("DELETE", f"/edges/{edge}")

    async def register_writer(
        self, edge: str, node: str, endpoint: str, mode: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        """``mode``: (mode, reason) of the new generation, recorded with it (a discovery
        that does not know the field answers without them: see the record's ``mode``)."""
        body = {"node": node, "endpoint": endpoint}
        if mode is not None:
            body["mode"], body["reason"] = mode
        return await self._call("POST", f"/edges/{edge}/writer", body=body)

    async def close_writer(
        self, edge: str, generation: int, state: str, written: int, reason: str = ""
    ) -> dict[str, Any]:
        return await self._call(
            "POST",
            f"/edges/{edge}/writer/close",
            body={"generation": generation, "state": state, "bytes": written, "reason": reason},
        )

    async def writer_gone(self, edge: str, node: str, generation: int) -> dict[str, Any]:
        return await self._call(
            "POST", f"/edges/{edge}/writer/gone", body={"node": node, "generation": generation}
        )

    async def claim_reader(self, edge: str, node: str) -> dict[str, Any]:
        return await self._call("POST", f"/edges/{edge}/reader", body={"node": node})

    async def release_reader(
        self,
        edge: str,
        node: str,
        state: str,
        delivered: int,
        claim: int = 0,
        generation: int = 0,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"node": node, "state": state, "bytes": delivered}
        if claim:
            body["claim"] = claim  # which claim of this node ends (not a newer one)
        if generation:
            body["generation"] = generation  # the one it last pulled (its event says so)
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
        self, node: str, boot: str, writers: dict[str, int], readers: Sequence[Hashable]
    ) -> list[str]:
        """Reports this node's ends; returns the writer edges that are fenced off.

        Only the changes since the last acknowledged beat go out (see heartbeat.py); when
        discovery asks for a resync, the whole set follows in pages.
        """
        for http in (self._http, self._beats):
            http.headers[NODE_HEADER] = node
        stale: list[str] = []
        for _ in range(2):
            pages = deltas(self._acked.get(node), writers, readers)
            self._acked[node] = None  # unknown until every page is answered
            for page in pages:
                got = await self._call(
                    "POST",
                    f"/nodes/{node}/heartbeat",
                    body={"boot": boot, "delta": page.to_json()},
                    timeout=2.0,
                    retry_for=0.0,
                    beat=True,
                )
                stale += got.get("stale", [])
                if got.get("resync"):
                    break
            else:
                self._acked[node] = Acked(dict(writers), tuple(readers), pages[-1].digest)
                break
        return sorted(set(stale))

    async def leave(self, node: str) -> None:
        await self._call("POST", f"/nodes/{node}/leave", timeout=2.0, retry_for=0.0, beat=True)
