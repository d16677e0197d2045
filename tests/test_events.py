"""Live progress: the SSE event stream (resumable by Last-Event-ID) and fractalfs watch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fractalfs.testing import Node, free_port, operator_auth

from .conftest import Cluster, Programs, needs_fuse, new_edge, sh

pytestmark = needs_fuse

SLOWCAT = f"{sys.executable} {Path(__file__).with_name('slowcat.py')}"


def sse(url: str, headers: dict[str, str], until: str, timeout: float = 20) -> list[dict]:  # type: ignore[type-arg]
    events: list[dict] = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", url, headers=headers, timeout=timeout, auth=operator_auth()) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        for line in resp.iter_lines():
            if time.monotonic() > deadline:
                break
            if line.startswith(("id:", "event:", "data:")):
                key, _, value = line.partition(": ")
                current[key.rstrip(":")] = value
            elif not line and current:
                events.append(
                    {
                        "id": int(current["id"]),
                        "kind": current["event"],
                        **json.loads(current["data"]),
                    }
                )
                current = {}
                if events[-1]["kind"] == until:
                    break
    return events


def _watching(watch: subprocess.Popen[str], programs: Programs, node: Node) -> list[str]:
    """Starts collecting ``watch``'s lines and returns the list they go to, once watch is
    seen following the stream: it starts from the events written after its first request,
    and that request comes after a Python start-up of a second or more under load (a fixed
    1 s sleep lost every event of the test's edge: watch printed none of them). A waiting
    reader of a fresh edge is the mark; another one is tried until watch prints its
    claim."""
    assert watch.stdout is not None
    stdout = watch.stdout
    lines: list[str] = []

    def collect() -> None:
        for line in stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=collect, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        mark = new_edge()
        programs.start(f"exec cat {node.path(mark)} > /dev/null")
        seen = time.monotonic() + 2
        while time.monotonic() < seen:
            if any(line.startswith(f"{mark} reader connected") for line in lines):
                return lines
            assert watch.poll() is None, f"watch exited {watch.returncode}"
            time.sleep(0.05)
    raise AssertionError(f"watch printed none of its marks: {lines}")


def test_event_stream_and_watch(cluster: Cluster, programs: Programs, tmp_path: Path) -> None:
    disc = cluster.start_discovery()
    a, b = cluster.node("a"), cluster.node("b", extra=["--writer-lost-timeout", "20"])
    watch = subprocess.Popen(
        [sys.executable, "-m", "fractalfs", "watch", "--discovery", disc.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # its reconnect lines, should it fail
        text=True,
    )
    try:
        watched = _watching(watch, programs, b)
        src = tmp_path / "src"
        src.write_bytes(os.urandom(3 << 20))
        edge = new_edge()
        reader = programs.start(f"cat {b.path(edge)} > /dev/null")
        writer = programs.start(f"exec {SLOWCAT} {src} {a.path(edge)} --pause-after {1 << 20}")
        assert writer.stdout is not None and writer.stdout.readline() == b"paused\n"
        time.sleep(0.5)
        os.killpg(writer.pid, signal.SIGKILL)  # a fault, then a re-run that resumes
        sh(f"cat {src} > {a.path(edge)}")
        assert reader.wait(timeout=30) == 0
        # Until watch printed the completion (it is the last event of the edge), not a
        # fixed time: the loaded watch may print it seconds later.
        deadline = time.monotonic() + 30
        while not any(line.startswith(f"{edge} complete") for line in watched):
            assert time.monotonic() < deadline, f"watch printed no completion: {watched}"
            time.sleep(0.05)
    finally:
        watch.send_signal(signal.SIGINT)
        try:
            watch.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watch.kill()  # never leave it behind, even when the test fails
            watch.wait()
            raise
    lines = [line for line in watched if line.startswith(edge)]
    text = "\n".join(lines)
    assert f"{edge} writer registered" in text
    assert f"{edge} FAILED" in text and "killed by signal 9" in text
    assert "resumed" in text and "how=replay" in text
    assert f"complete generation=2 bytes={3 << 20}" in text and "duration=" in text

    url = f"{disc.url}/v1/events/stream"
    first = sse(url + "?after=0", {}, until="complete")
    mine = [e for e in first if e["edge"] == edge]
    assert [e["kind"] for e in mine][:2] == ["reader", "writer"] or mine[0]["kind"] == "writer"
    assert mine[-1]["kind"] == "complete"
    # A subscriber that reconnects after the first event still gets every completion.
    again = sse(url, {"Last-Event-ID": str(mine[0]["id"])}, until="complete")
    assert [e["id"] for e in again if e["kind"] == "complete"] == [mine[-1]["id"]]


def test_prometheus_metrics(cluster: Cluster, programs: Programs) -> None:

    port = free_port()  # not an ephemeral port another connect may take
    disc = cluster.start_discovery()
    a = cluster.node("a", extra=["--metrics-listen", f"127.0.0.1:{port}"])
    b = cluster.node("b")
    edge = new_edge()
    reader = programs.start(f"cat {b.path(edge)} > /dev/null")
    sh(f"head -c 3M /dev/zero > {a.path(edge)}")
    assert reader.wait(timeout=20) == 0
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", auth=disc.auth).text
    assert f'fractalfs_edge_bytes_written_total{{edge="{edge}"}} 3.145728e+06' in text
    assert 'fractalfs_fuse_request_seconds_count{op="write"}' in text
    assert "fractalfs_open_edges" in text and "fractalfs_spill_bytes" in text
    assert httpx.get(f"{disc.url}/metrics").status_code == 401
    disc_text = httpx.get(f"{disc.url}/metrics", auth=disc.auth).text
    assert 'fractalfs_discovery_edges{state="delivered"} 1.0' in disc_text
    assert 'fractalfs_discovery_nodes{alive="true"} 2.0' in disc_text


def test_node_metrics_want_the_secret(cluster: Cluster, programs: Programs) -> None:
    """A peer without the cluster secret learns no edge ids or byte counts from a node's
    metrics port, and a silent connection (slowloris) is closed, not held for good."""
    import socket

    port = free_port()  # not an ephemeral port another connect may take
    disc = cluster.start_discovery()
    a = cluster.node("a", extra=["--metrics-listen", f"127.0.0.1:{port}"])
    edge = new_edge()
    reader = programs.start(f"cat {a.path(edge)} > /dev/null")
    sh(f"head -c 1M /dev/zero > {a.path(edge)}")
    assert reader.wait(timeout=20) == 0
    url = f"http://127.0.0.1:{port}/metrics"
    refused = httpx.get(url)
    assert refused.status_code == 401 and str(edge) not in refused.text
    assert httpx.get(url, auth=("x", "not the secret")).status_code == 401
    assert str(edge) in httpx.get(url, auth=disc.auth).text
    with socket.create_connection(("127.0.0.1", port)) as silent:
        silent.settimeout(60)
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the daemon (a timeout raises)
        assert time.monotonic() - started < 30
    assert httpx.get(url, auth=disc.auth).status_code == 200  # the daemon serves on


def test_byte_counts_of_edges_gone_long_ago_leave_the_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every edge a node ever carried kept its two series: memory and every scrape grew
    without bound (a user writing and removing fresh edges in a loop). Only the most
    recent MAX_DONE_SERIES gone edges keep theirs, and an edge in use again keeps its."""
    from prometheus_client import generate_latest

    from fractalfs import metrics

    monkeypatch.setattr(metrics, "MAX_DONE_SERIES", 3)
    monkeypatch.setattr(metrics, "_done", type(metrics._done)())
    edges = [new_edge() for _ in range(6)]
    for edge in edges:
        metrics.BYTES_WRITTEN.labels(edge).inc(7)
        metrics.BYTES_READ.labels(edge).inc(7)
    for edge in edges:
        metrics.edge_done(edge, lambda e: e == edges[1])  # edges[1] is used again
    text = generate_latest(metrics.REGISTRY).decode()
    kept = [e for e in edges if f'edge="{e}"' in text]
    assert kept == [edges[1], *edges[3:]], kept
    for edge in edges:
        for family in (metrics.BYTES_WRITTEN, metrics.BYTES_READ):
            with contextlib.suppress(KeyError):
                family.remove(edge)


def test_node_metrics_cut_off_clients_that_trickle(cluster: Cluster) -> None:
    """Slowloris that trickles a header line well within each read timeout: the metrics
    port's 64 connections must not stay taken for good (each is cut off after 10 s)."""
    import socket

    from fractalfs.metrics import MAX_CONNECTIONS

    port = free_port()  # not an ephemeral port another connect may take
    disc = cluster.start_discovery()
    cluster.node("a", extra=["--metrics-listen", f"127.0.0.1:{port}"])
    url = f"http://127.0.0.1:{port}/metrics"
    assert httpx.get(url, auth=disc.auth).status_code == 200
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        for conn in slow:
            conn.sendall(b"GET /metrics HTTP/1.1\r\n")
        started = time.monotonic()
        cut: set[int] = set()
        while len(cut) < len(slow) and time.monotonic() - started < 25:
            time.sleep(1.0)
            for i, conn in enumerate(slow):
                if i in cut:
                    continue
                try:
                    conn.sendall(b"X-Slow: 1\r\n")
                    conn.settimeout(0.001)
                    if conn.recv(1) == b"":
                        cut.add(i)
                except TimeoutError:
                    pass
                except OSError:
                    cut.add(i)
        assert len(cut) == len(slow), f"{len(slow) - len(cut)} trickling clients still held"
        assert httpx.get(url, auth=disc.auth, timeout=5).status_code == 200
    finally:
        for conn in slow:
            conn.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (make test installs it)")
def test_status_page_updates_live_in_headless_chromium(
    cluster: Cluster, programs: Programs, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    disc = cluster.start_discovery()
    a, b = cluster.node("a"), cluster.node("b")
    edge = new_edge()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            # The page authenticates with HTTP Basic (any user, the secret as password);
            # its fetches and its EventSource reuse those credentials.
            user, password = operator_auth()
            page = browser.new_page(http_credentials={"username": user, "password": password})
            page.goto(disc.url + "/")
            page.wait_for_selector("#live:text('(live)')", timeout=10_000)  # SSE connected
            writer = programs.start(f"exec sleep 60 > {a.path(edge)}")  # open, no reader
            row = f'tr[data-edge="{edge}"]'
            page.wait_for_selector(f'{row}[data-state="waiting-for-reader"]', timeout=10_000)
            page.wait_for_selector(f'li[data-edge="{edge}"][data-kind="writer"]', timeout=10_000)
            os.killpg(writer.pid, signal.SIGTERM)
            writer.wait()
            # The same page, no reload: a stream comes and completes.
            other = new_edge()
            reader = programs.start(f"cat {b.path(other)} > /dev/null")
            sh(f"head -c 2M /dev/zero > {a.path(other)}")
            assert reader.wait(timeout=20) == 0
            done = f'tr[data-edge="{other}"][data-state="delivered"]'
            page.wait_for_selector(done, timeout=10_000)
            page.wait_for_selector(f'li[data-edge="{other}"][data-kind="complete"]', timeout=10_000)
            page.wait_for_function(
                f"document.querySelector('{done}').textContent.includes('2.1 MB')",
                timeout=10_000,
            )
        finally:
            browser.close()


def test_node_metrics_on_port_0_log_the_port_they_got(cluster: Cluster) -> None:
    """`--metrics-listen HOST:0` picks a free port; the log line names that port (it
    said 0, which told an operator nothing about where to scrape)."""
    disc = cluster.start_discovery()
    a = cluster.node("a", extra=["--metrics-listen", "127.0.0.1:0"])
    line = next(x for x in a.log.read_text().splitlines() if "metrics on http://" in x)
    url = line.split("metrics on ")[1].strip()
    assert not url.startswith("http://127.0.0.1:0/"), line
    assert httpx.get(url, auth=disc.auth, timeout=5).status_code == 200
