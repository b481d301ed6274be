from remus.backup.failover import FAILOVER, STALE, WAIT, FailoverJudge, Verdict


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


def test_link_down_says_another_link_answers_only_when_one_does(caplog):
    import asyncio
    import logging
    from types import SimpleNamespace

    from remus.backup.standing_by import follow_heartbeat
    from remus.common.heartbeat import LinkDown

    class FakeHeartbeat:
        """Two links; each LinkDown is seen once the view already has that link down."""
        def __init__(self):
            self.up = {"lan": True, "hb": True}

        def view(self):
            return SimpleNamespace(links=[{"link": k, "up": v} for k, v in self.up.items()])

        async def events(self):
            for name in ("hb", "lan"):
                self.up[name] = False
                yield LinkDown(name, missed=5)

    receiver = SimpleNamespace(judge=SimpleNamespace(peer=lambda alive: None),
                               changed=asyncio.Event(), peer_generation=0)
    with caplog.at_level(logging.WARNING):
        asyncio.run(follow_heartbeat(FakeHeartbeat(), receiver))
    lines = [r.getMessage() for r in caplog.records if "link-down" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "link=hb" in lines[0] and "another link answers (lan up)" in lines[0], lines[0]
    assert "link=lan" in lines[1] and "another link answers" not in lines[1], lines[1]
    assert "every heartbeat link is down" in lines[1], lines[1]


def _committed_judge(heartbeat: bool, grace_s: float = 0.7) -> FailoverJudge:
    j = FailoverJudge(heartbeat=heartbeat, grace_s=grace_s)
    j.session_started()
    j.committed()
    return j


def test_a_new_judge_waits_and_trusts_the_heartbeat_until_told_otherwise():
    for heartbeat in (True, False):
        j = FailoverJudge(heartbeat=heartbeat, grace_s=0.7)
        assert (j.heartbeat, j.grace_s) == (heartbeat, 0.7)
        assert j.peer_alive is heartbeat  # with a heartbeat, the peer counts as alive
        assert j.resumable is False and j.stale is False and j.stale_reason is None
        assert j.lost_at is None and j.lost_reason == "" and j.handover is None
        assert j.verdict(100) == Verdict(WAIT, "")


def test_verdicts_name_the_reason_and_fence_unless_handed_over():
    no_hb = _committed_judge(heartbeat=False)
    no_hb.stream_lost(1, "EOF")
    assert no_hb.verdict(1) == Verdict(
        FAILOVER, "EOF (no heartbeat configured: the stream is the only sign of life)", fence=True)

    silent = _committed_judge(heartbeat=True)
    silent.stream_lost(1, "timeout")
    silent.peer(alive=False)
    assert silent.verdict(1) == Verdict(
        FAILOVER, "timeout, and the primary is silent on every heartbeat link", fence=True)

    beating = _committed_judge(heartbeat=True)
    beating.stream_lost(1, "reset")
    assert beating.verdict(1.5) == Verdict(
        WAIT, "stream lost; waiting for the heartbeat's verdict")
    stale = beating.verdict(2)
    assert stale.action == STALE and stale.fence
    assert stale.reason.startswith("reset, but the primary still beats: it is alive and runs "
                                   "unprotected; not activating, the replica is stale")
    assert beating.stale and beating.stale_reason == stale.reason


def test_the_heartbeat_gets_exactly_its_grace_period():
    j = _committed_judge(heartbeat=True, grace_s=2.0)
    j.stream_lost(10.0, "EOF")
    assert j.verdict(11.999).action == WAIT
    assert j.verdict(12.0).action == STALE  # grace over at lost_at + grace_s, not after


def test_the_first_loss_of_a_session_is_the_one_that_counts():
    j = _committed_judge(heartbeat=True, grace_s=1.0)
    j.stream_lost(10.0, "EOF")
    j.stream_lost(10.9, "later error")
    assert (j.lost_at, j.lost_reason) == (10.0, "EOF")
    assert j.verdict(11.0).action == STALE  # timed from the first loss


def test_a_local_session_failure_is_a_loss_with_a_heartbeat_and_stale_without():
    with_hb = _committed_judge(heartbeat=True)
    with_hb.session_failed(3.0, "disk error here")
    assert (with_hb.lost_at, with_hb.lost_reason) == (3.0, "disk error here")
    assert not with_hb.stale
    with_hb.peer(alive=False)
    assert with_hb.verdict(3.1) == Verdict(
        FAILOVER, "disk error here, and the primary is silent on every heartbeat link")

    without = _committed_judge(heartbeat=False)
    without.session_failed(3.0, "disk error here")
    assert without.stale and without.stale_reason == "disk error here"
    assert without.lost_at is None
    without.stream_lost(4.0, "EOF")  # the primary's stream then drops too: still no resume
    assert without.verdict(4.0).action == WAIT


def test_a_new_session_clears_what_the_last_one_left():
    j = _committed_judge(heartbeat=False)
    j.stream_lost(1.0, "EOF")
    j.mark_stale("resync needed")
    j.session_started()
    assert j.resumable is False and j.stale is False
    assert j.stale_reason is None and j.lost_at is None
    j.committed()
    j.stream_lost(5.0, "reset")
    assert j.lost_at == 5.0
    assert j.verdict(5.0).action == FAILOVER


def test_handover_skips_fencing_and_the_heartbeat_but_needs_a_commit():
    early = FailoverJudge(heartbeat=True, grace_s=0.7)
    early.session_started()
    early.handed_over(2.0, "operator stop")
    assert early.handover == "operator stop" and early.lost_at == 2.0
    assert early.verdict(2.0).action == WAIT  # nothing committed: nothing to resume

    j = _committed_judge(heartbeat=True)
    j.handed_over(2.0, "operator stop")  # the peer still beats: no matter
    assert j.verdict(2.0) == Verdict(
        FAILOVER, "the primary handed the guest over (operator stop)", fence=False)


def test_a_peer_heard_again_before_the_grace_ends_keeps_the_backup_waiting():
    j = _committed_judge(heartbeat=True, grace_s=1.0)
    j.stream_lost(10.0, "EOF")
    j.peer(alive=False)
    j.peer(alive=True)  # a late beat: the primary is alive after all
    assert j.peer_alive is True
    assert j.verdict(10.5).action == WAIT
    assert j.verdict(11.0).action == STALE
