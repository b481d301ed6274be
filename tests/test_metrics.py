"""The metrics endpoint's HTTP server, for real on 127.0.0.1 (no daemon, no QEMU)."""
from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from remus.common import metrics as metrics_mod
from remus.common.config import parse
from remus.common.localpair import free_port
from remus.common.metrics import Metrics
from remus.common.status import RoleName, Status

TIMEOUT_S = 1.0


def _status() -> Status:
    return Status(RoleName("primary"), "primary", "demo", "protecting", os.getpid(), 3, None, 7)


@pytest.fixture
def endpoint(monkeypatch):
    """A Metrics endpoint on 127.0.0.1 with a short request timeout."""
    monkeypatch.setattr(metrics_mod, "REQUEST_TIMEOUT_S", TIMEOUT_S, raising=False)
    m = Metrics(_status)
    port = free_port()
    m.serve(f"127.0.0.1:{port}")
    yield m, port
    if hasattr(m, "close"):
        m.close()


def scrape(port: int, timeout: float = 3.0) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    return {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset)."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_a_scrape_is_answered():
    m = Metrics(_status)
    port = free_port()
    m.serve(f"127.0.0.1:{port}")
    try:
        m.checkpoints.inc(4)
        got = scrape(port)
        assert got["remus_checkpoints_total"].value == 4
        assert got["remus_generation"].value == 3
        assert got["remus_state"].labels == {"role": "primary", "state": "protecting"}
    finally:
        m.close()


def test_idle_connections_are_closed_and_scrapes_answer_during_and_after(endpoint):
    """300 connections that never send a request: prometheus_client's server held a
    thread for each, for good. Now at most a few are held, each for at most the
    request timeout, and a scrape gets through while they wait and after."""
    m, port = endpoint
    threads_before = threading.active_count()
    idle = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setblocking(False)
            idle.append(s)
        time.sleep(0.2)
        assert scrape(port)["remus_generation"].value == 3, "a scrape during the flood"
        assert threading.active_count() <= threads_before + 2
        deadline = time.monotonic() + TIMEOUT_S + 3.0
        while time.monotonic() < deadline and not all(_closed(s) for s in idle):
            time.sleep(0.1)
        assert all(_closed(s) for s in idle), \
            f"{sum(not _closed(s) for s in idle)} idle connections still open"
        assert scrape(port)["remus_generation"].value == 3, "a scrape after the flood"
    finally:
        for s in idle:
            s.close()


def test_a_slow_request_is_cut_off_within_the_timeout(endpoint):
    """A client that sends its request a byte at a time is closed once the request
    timeout has passed, however steadily it sends."""
    m, port = endpoint
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        start = time.monotonic()
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 40
        for i in range(len(request)):
            try:
                s.sendall(request[i:i + 1])
            except ConnectionError:
                break
            s.setblocking(False)
            if _closed(s):
                break
            s.setblocking(True)
            time.sleep(0.05)
        took = time.monotonic() - start
        assert took < TIMEOUT_S + 1.0, took
    finally:
        s.close()


@pytest.mark.parametrize("request_line, status", [
    (b"GET /nope HTTP/1.1", 404),
    (b"POST /metrics HTTP/1.1", 405),
    (b"garbage", 400),
])
def test_other_requests_get_an_error(endpoint, request_line, status):
    m, port = endpoint
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request_line + b"\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(f"HTTP/1.1 {status} ".encode())


def test_a_failing_collector_is_a_500_and_the_server_goes_on(monkeypatch):
    state = {"fail": True}

    def status():
        if state["fail"]:
            raise RuntimeError("boom")
        return _status()
    m = Metrics(status)
    port = free_port()
    m.serve(f"127.0.0.1:{port}")
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            scrape(port)
        assert info.value.code == 500
        state["fail"] = False
        assert scrape(port)["remus_generation"].value == 3
    finally:
        m.close()


def test_close_stops_serving():
    m = Metrics(_status)
    port = free_port()
    m.serve(f"127.0.0.1:{port}")
    scrape(port)
    m.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize("given, address", [
    (":9101", "127.0.0.1:9101"),
    ("9101", "127.0.0.1:9101"),
    ("10.0.0.1:9101", "10.0.0.1:9101"),
    ("0.0.0.0:9101", "0.0.0.0:9101"),
    ("[::1]:9101", "[::1]:9101"),
    ("", ""),
])
def test_an_address_without_a_host_means_this_host_only(tmp_path, given, address):
    cfg = parse({"guest": {"name": "g", "kernel": "/k"},
                 "primary": {"address": "10.0.0.1", "state_dir": "/a"},
                 "backup": {"address": "10.0.0.2:7788", "state_dir": "/b"},
                 "metrics": {"primary": given},
                 "tls": {"insecure": True}},
                tmp_path / "g.toml")
    assert cfg.metrics.primary == address


def test_a_reply_bigger_than_the_socket_buffers_arrives_whole():
    from prometheus_client import Counter
    m = Metrics(_status)
    many = Counter("remus_test_many", "padding", ["n"], registry=m.registry)
    for i in range(5000):
        many.labels(str(i)).inc(i)
    port = free_port()
    m.serve(f"127.0.0.1:{port}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert len(text) > 256 << 10
        assert 'remus_test_many_total{n="4999"} 4999.0' in text
    finally:
        m.close()


def test_the_checkpoints_in_flight_are_a_gauge_where_the_status_has_them():
    from remus.common.status import PrimaryStatus
    primary = PrimaryStatus(RoleName("primary"), "primary", "demo", "protecting", os.getpid(), 3,
                            None, 7, in_flight=2, pipeline=3)
    m = Metrics(lambda: primary)
    port = free_port()
    m.serve(f"127.0.0.1:{port}")
    try:
        assert scrape(port)["remus_checkpoints_in_flight"].value == 2
    finally:
        m.close()
    m = Metrics(_status)  # a role with no checkpoint stream has no such figure
    port = free_port()
    m.serve(f"127.0.0.1:{port}")
    try:
        assert "remus_checkpoints_in_flight" not in scrape(port)
    finally:
        m.close()
