"""Output-triggered checkpoints: when the next pause comes, and what tells the
replicator that output waits."""
import logging
import time
from types import SimpleNamespace

import pytest

from remus.common.netbuf import UserspaceNetBuffer
from remus.common.nicgroup import NicGroup
from remus.primary.protecting import Protecting
from remus.primary.trigger import (DISK, HANDOVER, INTERVAL, OUTPUT, next_due, pause_trigger,
                                   rate_floor)

LAST, GAP, DUE = 100.0, 0.02, 100.2  # last pause at 100 s, min gap 20 ms, interval 200 ms


@pytest.mark.parametrize("now, output, expected", [
    (100.05, False, (None, DUE)),          # quiet guest: wait for the interval
    (100.01, True, (None, LAST + GAP)),    # output, too soon after the last pause
    (LAST + GAP, True, (OUTPUT, LAST + GAP)),  # the min gap has passed exactly
    (100.05, True, (OUTPUT, 100.05)),
    (DUE, False, (INTERVAL, DUE)),         # the interval's end, output or not
    (DUE, True, (INTERVAL, DUE)),
    (100.3, False, (INTERVAL, 100.3)),
])
def test_output_brings_the_pause_forward_but_never_closer_than_the_min_gap(now, output, expected):
    trigger, look_again = pause_trigger(now, DUE, LAST, GAP, output)
    assert trigger == expected[0] and look_again == pytest.approx(expected[1])


def test_a_min_gap_longer_than_the_interval_waits_for_the_interval_only():
    assert pause_trigger(100.1, DUE, LAST, 0.5, True) == (None, DUE)


@pytest.mark.parametrize("now, expected", [
    (100.05, (None, 100.08)),   # past the min gap, not yet past the rate's floor
    (100.08, (OUTPUT, 100.08)),
    (DUE, (INTERVAL, DUE)),     # the interval is never held back by the rate
])
def test_max_rate_holds_output_back_to_its_floor_but_not_the_interval(now, expected):
    got = pause_trigger(now, DUE, LAST, GAP, True, rate_floor=100.08)
    assert got[0] == expected[0] and got[1] == pytest.approx(expected[1])


def test_a_rate_floor_before_the_min_gap_leaves_the_min_gap():
    assert pause_trigger(100.01, DUE, LAST, GAP, True, rate_floor=99.0) == (None, LAST + GAP)


def test_a_handover_or_a_full_disk_is_not_held_back_by_the_rate():
    assert pause_trigger(100.001, DUE, LAST, GAP, False, True, rate_floor=101.0)[0] == HANDOVER
    assert pause_trigger(100.001, DUE, LAST, GAP, False, False, True, 101.0)[0] == DISK


@pytest.mark.parametrize("recent, max_rate, expected", [
    ([], 3, float("-inf")),                 # fewer pauses than the rate so far
    ([10.0, 10.2], 3, float("-inf")),
    ([10.0, 10.2, 10.4], 3, 11.0),          # the third latest pause + 1 s
    ([9.0, 10.0, 10.2, 10.4], 3, 11.0),
    ([10.0, 10.2, 10.4], 1, 11.4),
    ([10.0, 10.2, 10.4], 0, float("-inf")),  # 0: no bound
])
def test_the_rate_floor_is_a_second_after_the_max_rate_th_latest_pause(recent, max_rate, expected):
    assert rate_floor(recent, max_rate) == pytest.approx(expected)


def test_paced_by_the_floor_no_second_holds_more_than_max_rate_output_pauses():
    """Output waits all the time: the pauses that follow never number more than
    max_rate in any one-second window, and come as soon as allowed."""
    max_rate, gap, now, pauses = 5, 0.01, 0.0, []
    while now < 3.0:
        trigger, look_again = pause_trigger(now, 1e9, pauses[-1] if pauses else -1.0, gap, True,
                                            rate_floor=rate_floor(pauses, max_rate))
        if trigger is None:
            now = look_again
            continue
        pauses.append(now)
        now += 0.001
    for t in pauses:
        assert sum(t <= u < t + 1.0 for u in pauses) <= max_rate
    assert len(pauses) == 15  # five a second for three seconds


@pytest.mark.parametrize("handover, disk_full, expected", [
    (True, False, HANDOVER), (False, True, DISK), (True, True, HANDOVER)])
def test_a_handover_or_a_full_disk_epoch_pauses_at_once(handover, disk_full, expected):
    assert pause_trigger(100.001, DUE, LAST, GAP, False, handover, disk_full) == \
        (expected, 100.001)


def test_the_buffer_reports_the_first_held_frame_of_each_epoch_only(tmp_path):
    nb = UserspaceNetBuffer("unused", tmp_path / "net.sock", 1 << 20)
    calls, sent = [], []
    nb.output_listener = lambda: calls.append(len(nb.queue.open))
    nb._write_tap = sent.append
    nb._from_guest(b"u" * 60)              # unprotected: straight out, nothing held
    assert calls == [] and sent == [b"u" * 60]
    nb.protecting = True
    for _ in range(3):
        nb._from_guest(b"a" * 60)
    assert calls == [1], "one call for the epoch's first held frame"
    nb.queue.seal(1)
    nb._from_guest(b"b" * 60)
    assert calls == [1, 1], "the next epoch's first frame calls again"


def test_a_frame_dropped_at_the_cap_does_not_report_output(tmp_path):
    nb = UserspaceNetBuffer("unused", tmp_path / "net.sock", 100)
    calls = []
    nb.output_listener = lambda: calls.append(True)
    nb.protecting = True
    nb._from_guest(b"x" * 60)  # 60 + overhead > 100: dropped
    assert calls == [] and nb.queue.dropped_frames == 1


def test_the_interval_keeps_its_cadence_when_the_loop_is_a_little_late():
    # due at 10.0, paused at 10.004: the next is due at 10.1, not 10.104
    assert next_due(INTERVAL, 10.0, 10.004, 0.1) == pytest.approx(10.1)


def test_a_pause_more_than_an_interval_late_starts_the_cadence_afresh():
    assert next_due(INTERVAL, 10.0, 10.25, 0.1) == pytest.approx(10.35)


@pytest.mark.parametrize("trigger", [OUTPUT, DISK, HANDOVER])
def test_a_pause_brought_forward_starts_a_full_interval(trigger):
    assert next_due(trigger, 10.0, 9.96, 0.1) == pytest.approx(10.06)


def test_exactly_an_interval_late_starts_afresh():
    assert next_due(INTERVAL, 10.0, 10.25, 0.25) == 10.5


def _wire(trigger: str, netbuf) -> SimpleNamespace:
    role = SimpleNamespace(cfg=SimpleNamespace(replication=SimpleNamespace(trigger=trigger)),
                           replicator=SimpleNamespace(output_waiting=lambda: None),
                           trigger="interval")
    Protecting._wire_output_trigger(role, netbuf)
    return role


class _Plug:
    def set_output_listener(self, listener) -> bool:
        return False  # the kernel holds the frames: nothing to tell


def _events(caplog, level) -> list[str]:
    return [r.getMessage().split()[0] for r in caplog.records if r.levelno == level]


def test_the_default_trigger_without_an_output_buffer_is_not_a_warning(caplog):
    with caplog.at_level(logging.INFO):
        assert _wire("output", None).trigger == "interval"
    assert "trigger-interval-only" in _events(caplog, logging.INFO)
    assert not _events(caplog, logging.WARNING)


def test_the_plug_buffer_cannot_bring_checkpoints_forward_and_says_so(caplog):
    with caplog.at_level(logging.INFO):
        assert _wire("output", _Plug()).trigger == "interval"
    assert _events(caplog, logging.WARNING) == ["trigger-unavailable"]


def test_the_userspace_buffer_reports_output(tmp_path, caplog):
    nb = UserspaceNetBuffer("unused", tmp_path / "net.sock", 1 << 20)
    with caplog.at_level(logging.INFO):
        assert _wire("output", NicGroup([nb], [])).trigger == "output"
    assert nb.output_listener is not None and not caplog.records


def test_trigger_interval_asks_nothing_of_the_buffer(tmp_path, caplog):
    nb = UserspaceNetBuffer("unused", tmp_path / "net.sock", 1 << 20)
    with caplog.at_level(logging.INFO):
        assert _wire("interval", NicGroup([nb], [])).trigger == "interval"
    assert nb.output_listener is None and not caplog.records


@pytest.mark.integration
def test_max_rate_paces_the_pauses_a_busy_client_brings(guest_image, lan, tmp_path):
    """A client that always has a request out: with max_rate = 8 no second holds more
    than 8 pauses, and output still brings them as often as that allows."""
    import json

    from remus.common.localpair import Pair, wait_until
    from remus.common.probe import read_replies

    pair = Pair(guest_image, tmp_path, lan=lan, interval_ms=1000, trigger="output",
                min_interval_ms=5, max_rate=8)
    stats = tmp_path / "epochs.jsonl"
    try:
        pair.start_backup()
        pair.start_primary("--stats", str(stats))
        pair.primary.wait_for(r"protecting epoch=\d+", 60)
        wait_until(lambda: pair.try_get("get"), 120, "the guest's counter service")
        probe = pair.start_probe()
        wait_until(lambda: len(read_replies(probe.log())) >= 3, 30, "the client's first replies")
        start = time.time()
        wait_until(lambda: time.time() - start > 4 and len(read_replies(probe.log())) > 20, 30,
                   "four seconds of the client's requests")
        probe.stop()
    finally:
        pair.cleanup()
    epochs = [json.loads(line) for line in stats.read_text().splitlines()]
    paused = [e["taken_at"] for e in epochs if start <= e["taken_at"] <= start + 4]
    # (taken_at is the wall clock, read beside the monotonic one the floor uses)
    busiest = max(sum(t <= u < t + 0.98 for u in paused) for t in paused)
    assert busiest <= 8, f"{busiest} pauses in one second with max_rate = 8"
    assert len(paused) >= 4 * 6, f"only {len(paused)} pauses in 4 s: output did not bring them"
    assert sum(e["trigger"] == "output" for e in epochs) >= 20
