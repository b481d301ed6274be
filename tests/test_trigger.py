"""Output-triggered checkpoints: when the next pause comes, and what tells the
replicator that output waits."""
import logging
from types import SimpleNamespace

import pytest

from remus.common.netbuf import UserspaceNetBuffer
from remus.common.nicgroup import NicGroup
from remus.primary.protecting import Protecting
from remus.primary.trigger import DISK, HANDOVER, INTERVAL, OUTPUT, next_due, pause_trigger

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
