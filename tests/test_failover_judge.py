from remus.backup.failover import FAILOVER, STALE, WAIT, FailoverJudge


def test_without_heartbeat_stream_loss_is_enough():
    j = FailoverJudge(heartbeat=False, grace_s=1)
    j.session_started()
    j.stream_lost(0, "reset")
    assert j.verdict(0).action == WAIT  # nothing committed: nothing to resume
    j.committed()
    assert j.verdict(0).action == FAILOVER


def test_stream_and_every_link_lost_means_failover():
    j = FailoverJudge(heartbeat=True, grace_s=0.7)
    j.session_started()
    j.committed()
    j.stream_lost(10.0, "EOF")
    assert j.verdict(10.1).action == WAIT  # the heartbeat has not decided yet
    j.peer(alive=False)
    v = j.verdict(10.5)
    assert v.action == FAILOVER and "every heartbeat link" in v.reason


def test_stream_lost_while_beats_continue_never_activates():
    j = FailoverJudge(heartbeat=True, grace_s=0.7)
    j.session_started()
    j.committed()
    j.stream_lost(10.0, "timeout")
    assert j.verdict(10.8).action == STALE
    j.peer(alive=False)  # the primary dies later: the replica is stale by then
    assert j.verdict(20).action == WAIT
    j.session_started()  # a new session resynchronises
    j.committed()
    j.stream_lost(30, "EOF")
    j.peer(alive=False)
    assert j.verdict(30.1).action == FAILOVER


def test_heartbeat_loss_alone_is_no_failover():
    j = FailoverJudge(heartbeat=True, grace_s=0.7)
    j.session_started()
    j.committed()
    j.peer(alive=False)
    assert j.verdict(5).action == WAIT
