"""Event lines (logfmt) and RateLimited, with an injected clock."""
from __future__ import annotations

import logging

import pytest

from remus.common import log

NAME = "remus.test-log"


class Clock:
    def __init__(self):
        self.now = 1000.0
        self.timers = []

    def __call__(self):
        return self.now

    def schedule(self, delay, fn):
        self.timers.append((self.now + delay, fn))

    def advance(self, seconds):
        """Move on, running each timer that comes due at its time, as the event loop
        would."""
        end = self.now + seconds
        while self.timers and min(self.timers, key=lambda t: t[0])[0] <= end:
            timer = min(self.timers, key=lambda t: t[0])
            self.timers.remove(timer)
            self.now = timer[0]
            timer[1]()
        self.now = end


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger=NAME)
    return lambda: [r.getMessage() for r in caplog.records if r.name == NAME]


def limited(clock, **kw):
    return log.RateLimited(log.get(NAME), clock=clock, schedule=clock.schedule, **kw)


def test_the_first_n_per_interval_are_logged_then_one_summary(lines):
    clock = Clock()
    rl = limited(clock, burst=3, interval=10.0)
    logged = []
    for i in range(100):
        logged.append(rl.error("tls-handshake-failed", "10.0.0.9", peer=f"10.0.0.9:{i}",
                               reason="not a TLS 1.3 client hello"))
        clock.now += 0.05  # 100 attempts in 5 s
    assert logged == [True] * 3 + [False] * 97
    assert len(lines()) == 3
    clock.advance(5.1)  # the interval is over: the timer summarises
    out = lines()
    assert len(out) == 4
    assert out[3] == ('tls-handshake-failed peer=10.0.0.9 suppressed=97 seconds=10.000 '
                      'detail="suppressed 97 similar events in the last 10 s"')
    # a new interval starts afresh
    assert rl.error("tls-handshake-failed", "10.0.0.9", peer="10.0.0.9:7")
    assert len(lines()) == 5


def test_without_a_timer_the_summary_comes_with_the_next_event(lines):
    clock = Clock()
    rl = log.RateLimited(log.get(NAME), burst=1, interval=10.0, clock=clock,
                         schedule=lambda delay, fn: None)
    for _ in range(4):
        rl.warning("handshake-timeout", "10.0.0.9", peer="10.0.0.9:1")
    assert len(lines()) == 1
    clock.now += 30
    rl.warning("handshake-timeout", "10.0.0.9", peer="10.0.0.9:2")
    out = lines()
    assert out[1].startswith("handshake-timeout peer=10.0.0.9 suppressed=3 seconds=30.000 ")
    assert out[2] == "handshake-timeout peer=10.0.0.9:2"


def test_each_event_and_source_has_its_own_budget(lines):
    clock = Clock()
    rl = limited(clock, burst=2, interval=60.0)
    for _ in range(5):
        rl.error("stream-refused", "10.0.0.8", peer="a")
        rl.error("stream-refused", "10.0.0.9", peer="b")
        rl.error("session-failed", "10.0.0.8", peer="a")
    assert len(lines()) == 6
    clock.advance(61)
    summaries = [x for x in lines() if "suppressed=" in x]
    assert sorted(summaries) == sorted([
        'session-failed peer=10.0.0.8 suppressed=3 seconds=60.000 detail="suppressed 3 '
        'similar events in the last 60 s"',
        'stream-refused peer=10.0.0.8 suppressed=3 seconds=60.000 detail="suppressed 3 '
        'similar events in the last 60 s"',
        'stream-refused peer=10.0.0.9 suppressed=3 seconds=60.000 detail="suppressed 3 '
        'similar events in the last 60 s"'])


def test_nothing_suppressed_means_no_summary_and_quiet_sources_are_forgotten(lines):
    clock = Clock()
    rl = limited(clock, burst=5, interval=10.0)
    rl.error("stream-refused", "10.0.0.9", peer="x")
    clock.advance(11)
    rl.flush()
    assert lines() == ["stream-refused peer=x"]
    assert rl._windows == {}


def test_many_sources_share_one_window_past_the_cap(lines):
    clock = Clock()
    rl = limited(clock, burst=1, interval=10.0, max_sources=4)
    for i in range(1000):
        rl.error("tls-handshake-failed", f"10.1.{i // 256}.{i % 256}", peer=str(i))
    assert len(rl._windows) <= 5
    assert len(lines()) == 5  # four sources, then "other" once
    clock.advance(11)
    assert lines()[-1].startswith("tls-handshake-failed peer=other suppressed=995 ")


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        log.RateLimited(log.get(NAME), burst=0)
    with pytest.raises(ValueError):
        log.RateLimited(log.get(NAME), interval=0)
