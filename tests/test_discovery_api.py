"""The discovery HTTP API of a real server process: reasons for every 4xx, long-polls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fractalfs.testing import Discovery

E = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[httpx.Client]:
    disc = Discovery(tmp_path)
    disc.start()
    try:
        with httpx.Client(base_url=disc.url + "/v1", timeout=20, auth=disc.auth) as client:
            yield client
    finally:
        disc.stop()


def error(resp: httpx.Response, status: int, needle: str) -> None:
    assert resp.status_code == status, resp.text
    assert needle in resp.json()["error"]


def test_bad_requests_get_a_reason(api: httpx.Client) -> None:
    error(api.get("/edges/nothex"), 400, "not an edge id")
    error(api.post(f"/edges/{E}/writer", content=b"{"), 400, "not JSON")
    error(api.post(f"/edges/{E}/writer", json=[1]), 400, "JSON object")
    error(api.post(f"/edges/{E}/writer", json={"node": "a"}), 400, "'endpoint'")
    error(api.post(f"/edges/{E}/writer", json={"node": 5, "endpoint": "x"}), 400, "'node'")
    error(api.get(f"/edges/{E}", params={"wait": "soon"}), 400, "number")
    error(api.get(f"/edges/{E}", params={"wait": 1e9}), 400, "between")
    big = {"node": "a" * 100_000, "endpoint": "x"}
    assert api.post(f"/edges/{E}/writer", json=big).status_code == 413
    error(api.delete(f"/edges/{E}"), 404, "no edge")
    error(api.post(f"/edges/{E}/writer/gone", json={"node": "a"}), 400, "'generation'")
    error(api.post(f"/edges/{E}/writer/gone", json={"node": "a", "generation": 1}), 404, "no edge")


def test_generations_and_conflicts(api: httpx.Client) -> None:
    first = api.post(f"/edges/{E}/writer", json={"node": "a", "endpoint": "h:1"}).json()
    assert first["generation"] == 1 and first["state"] == "waiting-for-reader"
    error(api.post(f"/edges/{E}/writer", json={"node": "b", "endpoint": "h:2"}), 409, "node a")
    body = {"generation": 1, "state": "done", "bytes": 1}
    error(api.post(f"/edges/{E}/writer/close", json=body), 400, "complete or failed")
    body["state"] = "complete"
    assert api.post(f"/edges/{E}/writer/close", json=body).json()["writer_state"] == "complete"
    second = api.post(f"/edges/{E}/writer", json={"node": "b", "endpoint": "h:2"}).json()
    assert second["generation"] == 2
    error(api.post(f"/edges/{E}/writer/close", json=body), 409, "stale")


def test_long_poll_answers_on_change_and_on_timeout(api: httpx.Client) -> None:
    rec = api.get(f"/edges/{E}").json()
    assert rec["exists"] is False
    t0 = time.monotonic()
    same = api.get(f"/edges/{E}", params={"wait": 0.5, "since": rec["version"]}).json()
    assert 0.4 < time.monotonic() - t0 < 5 and same["version"] == rec["version"]
    api.post(f"/edges/{E}/reader", json={"node": "r"})
    t0 = time.monotonic()
    changed = api.get(f"/edges/{E}", params={"wait": 30, "since": rec["version"]}).json()
    assert time.monotonic() - t0 < 1 and changed["reader_node"] == "r"
    events = api.get("/events", params={"after": 0}).json()
    assert [e["kind"] for e in events["events"]] == ["reader"]


def test_every_waiter_on_an_edge_is_answered(api: httpx.Client) -> None:
    """Upstream replaced an edge's waiter with the next one and leaked the first: here
    every long-poll on the edge is answered by the change, none is lost or left hanging."""
    rec = api.get(f"/edges/{E}").json()
    answers: list[tuple[float, str | None]] = []

    def wait() -> None:
        with httpx.Client(base_url=str(api.base_url), timeout=20, auth=api.auth) as own:
            got = own.get(f"/edges/{E}", params={"wait": 15, "since": rec["version"]}).json()
            answers.append((time.monotonic(), got["reader_node"]))

    waiters = [threading.Thread(target=wait) for _ in range(5)]
    for t in waiters:
        t.start()
    time.sleep(0.5)  # all five are waiting
    changed_at = time.monotonic()
    api.post(f"/edges/{E}/reader", json={"node": "r"})
    for t in waiters:
        t.join(timeout=10)
    assert len(answers) == 5
    assert all(node == "r" and at - changed_at < 2 for at, node in answers), answers


def test_more_events_than_one_page_are_all_delivered(api: httpx.Client) -> None:
    """Defect 9: with more than 1,000 events pending, "last" was the head of the log and
    a follower continuing from it skipped every event beyond the first page."""
    first = int(api.get("/health").json()["last_event"])
    for _ in range(1100):
        assert api.post(f"/edges/{E}/reader", json={"node": "n"}).status_code == 200
    seen: list[int] = []
    after = first
    while True:
        got = api.get("/events", params={"after": after}).json()
        if not got["events"]:
            break
        seen += [e["seq"] for e in got["events"]]
        after = int(got["last"])
    assert len(seen) == 1100 and seen == sorted(set(seen))


def test_a_writer_registers_with_its_mode_in_one_request(api: httpx.Client) -> None:
    """The writer's daemon sends the new generation's mode with its registration (one
    request per open, not two); a bad mode takes no generation."""
    error(
        api.post(f"/edges/{E}/writer", json={"node": "a", "endpoint": "h:1", "mode": "x"}),
        400,
        "'mode'",
    )
    assert api.get(f"/edges/{E}").json()["generation"] == 0
    body = {"node": "a", "endpoint": "h:1", "mode": "persistent", "reason": "configured persistent"}
    rec = api.post(f"/edges/{E}/writer", json=body).json()
    assert (rec["generation"], rec["mode"], rec["mode_reason"]) == (
        1,
        "persistent",
        "configured persistent",
    )
    kinds = [e["kind"] for e in api.get("/events", params={"after": 0}).json()["events"]]
    assert kinds[-2:] == ["writer", "mode"]  # as two requests would have recorded it
    rec = api.post(f"/edges/{E}/writer", json={"node": "a", "endpoint": "h:1"}).json()
    assert rec["generation"] == 2  # without the field: as before


def test_a_reader_release_carries_the_generation_it_pulled(api: httpx.Client) -> None:
    """The reader-closed event names the generation its reader last pulled (a writer's
    daemon does not take a late one for a newer generation's "no more"); a bad one: 400."""
    claim = api.post(f"/edges/{E}/reader", json={"node": "r"}).json()["reader_claim"]
    api.post(f"/edges/{E}/writer", json={"node": "a", "endpoint": "h:1"})
    body = {"node": "r", "state": "closed", "bytes": 10, "claim": claim, "generation": "x"}
    error(api.post(f"/edges/{E}/reader/close", json=body), 400, "'generation'")
    body["generation"] = 1
    assert api.post(f"/edges/{E}/reader/close", json=body).json()["reader_state"] == "closed"
    events = api.get("/events", params={"after": 0}).json()["events"]
    assert events[-1]["kind"] == "reader-closed"
    assert events[-1]["data"] == {"node": "r", "bytes": 10, "generation": 1}
