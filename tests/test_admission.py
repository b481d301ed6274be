"""Admission to the stream port: only the primary's address, within caps, refusals
summarised rather than logged one by one."""
import logging

from remus.backup.admission import Admission, addresses_of, normalise
from remus.backup.failover import FAILOVER, STALE, WAIT, FailoverJudge


def test_only_the_primarys_address_is_served():
    a = Admission({"10.0.0.1"})
    assert a.admit("10.0.0.1")
    assert a.admit("::ffff:10.0.0.1"), "the same address, IPv4-mapped"
    assert a.admit("10.0.0.9") is None
    assert a.refused_total == 1


def test_at_a_cap_the_oldest_unauthenticated_connection_makes_room():
    a = Admission(None, max_connections=5, max_per_source=2)
    aborted = []
    t1 = a.admit("10.0.0.1", lambda: aborted.append("t1"))
    a.admit("10.0.0.1", lambda: aborted.append("t2"))
    t1.authenticated = True  # the session
    t3 = a.admit("10.0.0.1", lambda: aborted.append("t3"))
    assert t3 is not None and aborted == ["t2"], "the stalled one goes, not the session"
    t3.authenticated = True
    assert a.admit("10.0.0.1") is None, "two sessions from one source: nothing to evict"
    others = [a.admit(f"10.0.0.{i}", lambda i=i: aborted.append(i)) for i in (2, 3, 4)]
    assert all(others) and len(a.tickets) == 5
    assert a.admit("10.0.0.5") and aborted[-1] == 2, "the oldest pending overall"
    a.release(t1)
    assert len(a.tickets) == 4 and a.evicted_total == 2


def test_a_flood_of_idle_connections_cannot_lock_the_primary_out():
    a = Admission({"10.0.0.1", "10.0.0.66"})
    session = a.admit("10.0.0.1")
    session.authenticated = True
    for _ in range(2000):  # an attacker at an allowed address, reopening what is closed
        a.admit("10.0.0.66")
    assert a.admit("10.0.0.1") is not None, "the primary's reconnection still gets in"
    assert session in a.tickets


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
