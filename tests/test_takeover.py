"""The takeover window both sides compute, and the primary's hold of its output."""
import asyncio
import time

from remus.common.config import load
from remus.common.takeover import ACTIVATION_MARGIN_S, HOLD_MARGIN_S, output_hold_s, takeover_window_s
from remus.primary.output_hold import OutputHold

BASE = ('[guest]\nname = "g"\nkernel = "k"\n[primary]\naddress = "10.0.0.2"\n'
        '[backup]\naddress = "10.0.0.3:7000"\n[tls]\ninsecure = true\n'
        '[replication]\nstream_timeout_ms = 2000\n')
HEARTBEAT = ('[heartbeat]\nlinks = [["10.0.0.2:7001", "10.0.0.3:7001"]]\ninterval_ms = 100\n'
             'miss = 5\n')
FENCING = ('[fencing]\ntimeout_s = 8\n{extra}[[fencing.level]]\n[[fencing.level.device]]\n'
           'kind = "command"\ncommand = ["/bin/true"]\n[[fencing.level]]\n'
           '[[fencing.level.device]]\nkind = "agent"\nagent = "/bin/true"\n'
           '[[fencing.level.device]]\nkind = "command"\ncommand = ["/bin/true"]\ntarget = "backup"\n')


def _cfg(tmp_path, text):
    path = tmp_path / "g.toml"
    path.write_text(text)
    return load(path)


def test_the_window_covers_detection_one_fence_round_and_activation(tmp_path):
    cfg = _cfg(tmp_path, BASE + HEARTBEAT + FENCING.format(extra=""))
    grace = 5 * 0.1 * 1.5 + 0.3
    # The primary's devices: a command (one action) and an agent (off, then status).
    assert takeover_window_s(cfg) == grace + 8 + 16 + ACTIVATION_MARGIN_S
    assert output_hold_s(cfg) == 2.0 + takeover_window_s(cfg) + HOLD_MARGIN_S
    # After a failover the pair is reversed: the backup host's device fences.
    assert takeover_window_s(cfg.reversed()) == grace + 8 + ACTIVATION_MARGIN_S


def test_an_explicit_window_wins_and_no_fencing_no_heartbeat_is_short(tmp_path):
    cfg = _cfg(tmp_path, BASE + FENCING.format(extra="takeover_window_s = 30\n"))
    assert takeover_window_s(cfg) == 30
    bare = _cfg(tmp_path, BASE)
    assert takeover_window_s(bare) == ACTIVATION_MARGIN_S


class Hooks:
    def __init__(self):
        self.calls = []

    def carry_over(self):
        self.calls.append("carry_over")

    async def unprotected(self):
        self.calls.append(("unprotected", time.monotonic()))


def _run(coro):
    return asyncio.run(coro)


def test_output_is_held_until_the_window_passes_then_released():
    async def main():
        hooks = Hooks()
        hold = OutputHold(hooks, 0.4, lambda: False)
        released = []
        hold.on_release = lambda: released.append(True)
        sent = time.monotonic() - 0.1  # the last byte went 100 ms before the loss was seen
        hold.start(sent)
        assert hold.active and hooks.calls == ["carry_over"]
        await asyncio.sleep(0.15)
        assert len(hooks.calls) == 1, "released before the window passed"
        assert 0 < hold.left_s() <= 0.2
        hold.start(time.monotonic())  # a second loss while holding: the first deadline stands
        await asyncio.sleep(0.3)
        assert hooks.calls[0] == "carry_over" and hooks.calls[1][0] == "unprotected"
        assert hooks.calls[1][1] >= sent + 0.4 and released and not hold.active
    _run(main())


def test_a_backup_that_beats_stale_ends_the_hold_at_once():
    async def main():
        hooks, gave_up = Hooks(), []
        hold = OutputHold(hooks, 60.0, lambda: bool(gave_up))
        hold.start(time.monotonic())
        await asyncio.sleep(0.15)
        assert len(hooks.calls) == 1
        gave_up.append(True)
        await asyncio.sleep(0.25)
        assert hooks.calls[-1][0] == "unprotected" and not hold.active
    _run(main())


def test_a_new_session_ends_the_hold_without_releasing_anything_itself():
    async def main():
        hooks = Hooks()
        hold = OutputHold(hooks, 0.2, lambda: False)
        hold.start(time.monotonic())
        await hold.end()
        await asyncio.sleep(0.3)
        assert hooks.calls == ["carry_over"] and not hold.active
    _run(main())
