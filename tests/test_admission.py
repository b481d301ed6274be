"""Admission to the stream port: only the primary's address, within caps, refusals
summarised rather than logged one by one."""
import logging

from remus.backup.admission import Admission, addresses_of, normalise
from remus.backup.failover import FAILOVER, STALE, WAIT, FailoverJudge


def test_only_the_primarys_address_is_served():
    a = Admission({"10.0.0.1"})
    assert a.admit("10.0.0.1")
    assert a.admit("::ffff:10.0.0.1"), "the same address, IPv4-mapped"
    assert not a.admit("10.0.0.9")
    assert a.refused_total == 1


def test_caps_in_total_and_per_source_and_release_makes_room():
    a = Admission(None, max_connections=5, max_per_source=2)
    assert a.admit("10.0.0.1") and a.admit("10.0.0.1")
    assert not a.admit("10.0.0.1"), "a third from one source"
    assert a.admit("10.0.0.2") and a.admit("10.0.0.2") and a.admit("10.0.0.3")
    assert not a.admit("10.0.0.4"), "past the total"
    a.release("10.0.0.1")
    assert a.admit("10.0.0.4"), "room again"
    assert not a.admit("10.0.0.5"), "full again"
    assert sum(a.open.values()) == 5


def test_refusals_are_summarised_not_logged_each(caplog):
    now = [0.0]
    a = Admission({"10.0.0.1"}, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for i in range(2000):
            now[0] = i * 0.01  # 2000 attempts over 20 s
            a.admit(f"10.9.{i % 7}.1")
    lines = [r for r in caplog.records if "stream-connections-refused" in r.getMessage()]
    assert 2 <= len(lines) <= 4, len(lines)
    assert a.refused_total == 2000


def test_addresses_resolve_and_unspecified_means_anyone():
    assert addresses_of("127.0.0.1") == {"127.0.0.1"}
    assert addresses_of("") is None and addresses_of("0.0.0.0") is None
    assert addresses_of("no-such-host.invalid") is None
    assert normalise("::ffff:192.0.2.7") == "192.0.2.7" and normalise("fe80::1%eth0") == "fe80::1"


def test_a_session_failing_here_makes_the_replica_stale_without_a_heartbeat():
    judge = FailoverJudge(heartbeat=False, grace_s=1.0)
    judge.session_started()
    judge.committed()
    judge.session_failed(10.0, "EMFILE")
    assert judge.verdict(10.0).action == WAIT and judge.stale
    judge.session_started()
    assert not judge.stale


def test_a_session_failing_here_is_a_lost_stream_with_a_heartbeat():
    judge = FailoverJudge(heartbeat=True, grace_s=1.0)
    judge.session_started()
    judge.committed()
    judge.session_failed(10.0, "EMFILE")
    assert judge.verdict(10.5).action == WAIT
    assert judge.verdict(11.5).action == STALE, "the primary still beats"
    judge = FailoverJudge(heartbeat=True, grace_s=1.0)
    judge.session_started()
    judge.committed()
    judge.session_failed(10.0, "EMFILE")
    judge.peer(alive=False)
    assert judge.verdict(10.1).action == FAILOVER
