"""Who may call discovery: proof of the cluster secret on every route but ``/v1/health``,
and a node's own credential for whatever a node does in its own name.

The rules (see :mod:`fractalfs.auth` for the credentials):

* ``/nodes/{node}/...`` (heartbeat, pulse, leave): only ``node``;
* a body naming a ``node`` (writer registration, reader claim and release, restore,
  writer gone): only that node;
* ``/writer/close``, ``/mode`` and ``/writer/restore``: only the edge's writer node (a
  restarted node restores what it wrote, never another node's stream); ``/progress`` and
  ``/writer/gone`` (a generation failed for lack of its END): only its reader node
  (discovery recorded who registered what);
* everything else (reads, removal, the event log, metrics, the status page): any principal.

The operator's credential (the secret itself) may do everything.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..auth import Principal, check_basic
from . import limits
from .limits import read_body
from .store import Edge

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Get = Callable[[str], Awaitable[Edge | None]]  # an edge's record from the store
OPEN = frozenset({"/v1/health"})
REALM = 'Basic realm="fractalfs", charset="UTF-8"'
BODY_NODE = ("/writer", "/reader", "/reader/close", "/writer/restore", "/writer/gone")


def _refuse(status: int, reason: str) -> web.Response:
    headers = {"WWW-Authenticate": REALM} if status == 401 else {}
    return web.json_response({"error": reason}, status=status, headers=headers)


async def _body_node(request: web.Request, body_timeout: float) -> Any:
    try:
        body = json.loads(await read_body(request, body_timeout))
    except (ValueError, RecursionError):
        return None  # the handler answers 400 with its reason
    return body.get("node") if isinstance(body, dict) else None


async def _allowed(request: web.Request, who: Principal, get: Get, body_timeout: float) -> str:
    """Empty if ``who`` may make ``request``, else the reason it may not."""
    if who.node is None or request.method not in ("POST", "PUT"):
        return ""
    node = request.match_info.get("node")
    if node is not None:
        return "" if who.may_act_as(node) else f"node {who.node} may not act as node {node}"
    edge = request.match_info.get("edge")
    if edge is None:
        return ""
    tail = request.path.split(edge, 1)[1]
    if tail in BODY_NODE:
        named = await _body_node(request, body_timeout)
        if isinstance(named, str) and not who.may_act_as(named):
            return f"node {who.node} may not act as node {named}"
        if tail not in ("/writer/restore", "/writer/gone"):
            return ""
    if tail in ("/writer/close", "/mode", "/progress", "/writer/restore", "/writer/gone"):
        try:
            record = await get(edge)
        except ValueError:
            return ""
        if record is None:
            return ""
        # A generation is failed for lack of its END only by the node that reads it.
        reads = tail in ("/progress", "/writer/gone")
        owner = record.reader_node if reads else record.writer_node
        if not who.may_act_as(owner):  # no node yet ("") is no node's end either
            end = "reader" if reads else "writer"
            holder = f"node {owner} is" if owner else "no node is"
            return f"node {who.node} is not the {end} of edge {edge} ({holder})"
    return ""


def middleware(secret: bytes, get: Get, body_timeout: float) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN:
            return await handler(request)
        who = check_basic(secret, request.headers.get("Authorization", ""))
        if who is None:
            return _refuse(401, "this discovery server requires the cluster secret")
        # Proved: no longer pushed out by a flood, from here on (_allowed may read the
        # body, and look the edge up: a connection cut there lost a node's request).
        admission = request.app.get(limits.ADMISSION)
        if admission is not None:
            admission.prove(request.protocol)
        reason = await _allowed(request, who, get, body_timeout)
        if reason:
            return _refuse(403, reason)
        request["principal"] = who
        return await handler(request)

    return guard
