from remus.common.status_cli import render

PRIMARY = {"role": "primary", "guest": "demo", "state": "protecting", "generation": 2,
           "last_committed_epoch": 41, "checkpoints_per_s": 4.9, "pause_p50_ms": 22.3,
           "pause_p99_ms": 26.4, "bytes_per_s": 680000, "ack_p50_ms": 7.5,
           "held_output": {"held_frames": 3, "held_bytes": 1800, "dropped_frames": 0},
           "heartbeat": {"peer_alive": True, "running": True, "peer": None, "links": [
               {"link": "a->b", "up": True, "last_beat_age_ms": 40.0, "missed": 0, "rtt_ms": 0.4},
               {"link": "c->d", "up": False, "last_beat_age_ms": None, "missed": 7, "rtt_ms": None}]}}
BACKUP = {"role": "backup", "guest": "demo", "state": "fencing", "generation": 2,
          "last_committed_epoch": 41, "replica": {"state": "committed"}, "heartbeat": None,
          "fencing": {"configured": True, "levels": 2, "last_failure": "level 1 device 1: timeout"},
          "last_failover": None, "standby_guest": {"state": "ready", "qemu_pid": 4242}}


def test_render_shows_what_an_operator_needs():
    text = render({"primary": PRIMARY, "backup": BACKUP})
    assert "primary demo: PROTECTING  generation 2  last committed epoch 41" in text
    assert "pause p50 22.3 ms" in text and "held output 3 frames" in text
    assert "link a->b: up" in text and "link c->d: DOWN  last beat never  missed 7" in text
    assert "backup demo: FENCING" in text and "LAST FAILURE: level 1 device 1: timeout" in text
    assert "heartbeat: not configured" in text
    assert "standby guest: ready (QEMU pid 4242)" in text


def test_render_names_missed_beats_only_when_they_mean_something():
    def line(**link):
        hb = {"peer_alive": True, "running": True, "peer": None, "links": [
            {"link": "a->b", "last_beat_age_ms": 40.0, "rtt_ms": None, **link}]}
        text = render({"primary": {**PRIMARY, "heartbeat": hb}})
        return next(x for x in text.splitlines() if "link a->b" in x)
    # Between two beats an up link counts one missed: its normal rhythm, not news.
    assert line(up=True, missed=0) == "  link a->b: up  last beat 40 ms ago"
    assert line(up=True, missed=1) == "  link a->b: up  last beat 40 ms ago"
    assert line(up=True, missed=2) == "  link a->b: up  last beat 40 ms ago  missed 2"
    assert line(up=False, missed=0).endswith("DOWN  last beat 40 ms ago  missed 0")
    assert line(up=False, missed=1).endswith("missed 1")


def test_render_says_when_the_standby_guest_failed_to_launch():
    failed = {**BACKUP, "standby_guest": {"state": "failed", "error": "GuestError: no qemu"}}
    assert "standby guest: LAUNCH FAILED: GuestError: no qemu" in render({"backup": failed})


def test_render_reports_unreachable_daemons_and_none():
    assert "no answer" in render({"backup": {"role": "backup", "error": "no answer on x: refused"}})
    assert "no Remus daemon" in render({})


def test_render_shows_a_running_sync_with_rate_and_eta():
    from remus.primary.replicator import SyncProgress
    sync = SyncProgress(started=100.0, ram_total=2 << 30, disk_size=20 << 30)
    sync.round_done(262144, 8 << 20)
    sync.wire_bytes = 300 << 20
    sync.disk_copy = (1 << 30, 4 << 30)
    status = {**PRIMARY, "state": "syncing", "sync": sync.describe(110.0)}
    text = render({"primary": status})
    assert ("initial sync: 1 round(s), RAM 1,024 MiB sent of 2,048 MiB, disk copy 1,024 MiB of "
            "4,096 MiB, 300 MiB on the wire at 30.0 MiB/s, ETA 30 s") in text
    sync.done_at = 112.0
    done = render({"primary": {**PRIMARY, "sync": sync.describe(200.0)}})
    assert "initial sync: done in 12.0 s, 1 pre-copy round(s), 300 MiB on the wire" in done


def test_render_shows_the_output_hold_and_a_stale_replica_with_its_reason():
    holding = {**PRIMARY, "state": "holding", "output_hold_s_left": 12.34}
    stale = {**BACKUP, "state": "stale", "stale_reason": "fencing did not succeed within the "
                                                          "takeover window"}
    text = render({"primary": holding, "backup": stale})
    assert "primary demo: HOLDING" in text and "output held 12.3 s more" in text
    assert "REPLICA STALE: fencing did not succeed within the takeover window" in text
    assert "output held" not in render({"primary": PRIMARY})


def test_render_shows_the_trigger_and_the_pipeline_window_when_there_is_one():
    output = {**PRIMARY, "trigger": "output", "interval_ms": 100, "output_triggered": 37}
    text = render({"primary": {**output, "pipeline": 3, "in_flight": 2}})
    assert "trigger: output waiting (or every 100 ms); 37 of the recent checkpoints" in text
    assert "pipeline: 2 checkpoint(s) in flight (unacknowledged), up to 3" in text
    stop_and_wait = render({"primary": {**output, "pipeline": 1, "in_flight": 0}})
    assert "pipeline" not in stop_and_wait and "trigger: output" in stop_and_wait
    assert "trigger" not in render({"primary": {**PRIMARY, "trigger": "interval"}})
