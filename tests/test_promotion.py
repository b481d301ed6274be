"""Under Pacemaker the backup never takes over on its own: it waits to be promoted,
and refuses a promotion that could resume a replica missing released output."""
from pathlib import Path

import pytest

from remus.backup.failover import FAILOVER, WAIT, FailoverJudge
from remus.backup.promotion import PromotionGate
from remus.common.config import ConfigError, parse
from remus.common.takeover import takeover_window_s

WINDOW = 10.0


def synced_gate(heartbeat: bool = False) -> PromotionGate:
    judge = FailoverJudge(heartbeat=heartbeat, grace_s=1.0)
    judge.session_started()
    judge.committed()
    return PromotionGate(judge, WINDOW)


def test_a_lost_primary_is_reported_but_not_taken_over_until_promoted():
    gate = synced_gate()
    gate.judge.stream_lost(100.0, "stream reset")
    judged = gate.judge.verdict(100.5)
    assert judged.action == FAILOVER
    decided = gate.decide(judged, 100.5)
    assert decided.action == WAIT
    assert "stream reset" in decided.reason and "promote" in decided.reason
    assert gate.promote(101.0, stream_live=False) is None
    promoted = gate.decide(gate.judge.verdict(101.0), 101.0)
    assert promoted.action == FAILOVER and promoted.fence, \
        "a promotion after a loss keeps the takeover window (fence=True)"
    assert "promoted by the cluster manager" in promoted.reason


def test_a_handed_over_guest_is_resumed_on_promotion_without_a_window():
    gate = synced_gate()
    gate.judge.handed_over(100.0, "primary stopped by operator")
    assert gate.decide(gate.judge.verdict(100.0), 100.0).action == WAIT
    assert gate.promote(100.0 + 10 * WINDOW, stream_live=False) is None
    promoted = gate.decide(gate.judge.verdict(200.0), 200.0)
    assert promoted.action == FAILOVER and not promoted.fence
    assert "handed the guest over" in promoted.reason
    assert not gate.judge.stale


@pytest.mark.parametrize("setup, live, refusal", [
    (lambda g: None, True, "still sending checkpoints"),
    (lambda g: None, False, "still sending checkpoints"),  # no loss seen yet
    (lambda g: g.judge.session_started(), False, "no committed checkpoint"),
    (lambda g: g.judge.mark_stale("the primary runs on"), False, "stale: the primary runs on"),
])
def test_promotion_refused_while_the_replica_may_not_be_resumed(setup, live, refusal):
    gate = synced_gate()
    setup(gate)
    assert refusal in gate.promote(50.0, stream_live=live)
    assert gate.promoted is None
    assert gate.decide(gate.judge.verdict(50.0), 50.0).action != FAILOVER


def test_a_replica_not_promoted_within_the_takeover_window_turns_stale():
    gate = synced_gate()
    gate.judge.stream_lost(100.0, "stream EOF")
    gate.decide(gate.judge.verdict(100.0 + WINDOW), 100.0 + WINDOW)
    assert not gate.judge.stale, "at the window's end the replica is still resumable"
    gate.decide(gate.judge.verdict(100.0 + WINDOW + 0.01), 100.0 + WINDOW + 0.01)
    assert gate.judge.stale and "takeover window (10 s" in gate.judge.stale_reason
    refused = gate.promote(100.0 + WINDOW + 0.02, stream_live=False)
    assert refused is not None and "stale" in refused


def test_the_window_is_checked_on_promotion_itself():
    gate = synced_gate()
    gate.judge.stream_lost(100.0, "stream EOF")
    assert gate.promote(100.0 + WINDOW + 1, stream_live=False) is not None


BASE = {
    "guest": {"name": "vm", "kernel": "/boot/vmlinuz"},
    "primary": {"address": "10.0.0.1"},
    "backup": {"address": "10.0.0.2:7000"},
    "tls": {"insecure": True},
}


def config(**tables):
    return parse({**BASE, **tables}, Path("/etc/remus/vm.toml"))


def test_the_cluster_manager_defaults_to_remus_itself():
    cfg = config()
    assert cfg.cluster.manager == "remus" and not cfg.pacemaker


def test_under_pacemaker_its_fence_timeout_is_in_the_takeover_window():
    own = config()
    pcmk = config(cluster={"manager": "pacemaker", "fence_timeout_s": 42})
    assert pcmk.pacemaker
    assert takeover_window_s(pcmk) == pytest.approx(takeover_window_s(own) + 42)


def test_under_pacemaker_remus_fencing_devices_are_refused():
    fencing = {"level": [{"device": [{"kind": "command", "command": ["true"]}]}]}
    with pytest.raises(ConfigError) as err:
        config(cluster={"manager": "pacemaker"}, fencing=fencing)
    assert str(err.value) == (
        "[fencing]: with [cluster] manager = \"pacemaker\", Pacemaker fences (its stonith "
        "devices); remove [fencing], and give Pacemaker's fencing time as [cluster] "
        "fence_timeout_s")


@pytest.mark.parametrize("cluster, message", [
    ({"manager": "corosync"}, r"\[cluster\] manager: must be one of remus, pacemaker"),
    ({"fence_timeout_s": 0}, r"\[cluster\] fence_timeout_s: must be between 1 and 3600"),
    ({"quorum": 2}, r"\[cluster\] quorum: unknown key"),
])
def test_bad_cluster_settings_are_named(cluster, message):
    with pytest.raises(ConfigError, match=message):
        config(cluster=cluster)


@pytest.mark.parametrize("primary, backup, side", [
    ("127.0.0.1", "192.0.2.7:7000", "primary"),
    ("192.0.2.7", "127.0.0.1:7000", "backup"),
    ("127.0.0.1", "127.0.0.1:7000", "both"),
    ("192.0.2.7", "192.0.2.8:7000", "neither"),
])
def test_the_agent_finds_its_side_of_the_config_by_its_own_addresses(primary, backup, side):
    from remus.node.ocf_agent import AgentError, local_side
    cfg = config(primary={"address": primary}, backup={"address": backup})
    if side in ("primary", "backup"):
        assert local_side(cfg) == side
    else:
        with pytest.raises(AgentError, match=f"side=auto: {side} of the config's"):
            local_side(cfg)
