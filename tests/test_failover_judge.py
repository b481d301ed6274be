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
