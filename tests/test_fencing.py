"""Fencing: config parsing, real fence_dummy runs, timeouts, secrets, retries, fence-test."""
import asyncio
import logging
import os
import shutil
import stat
import textwrap
import time
from pathlib import Path

import pytest

from remus.common import ctl, fencing
from remus.common.config import ConfigError

FENCE_DUMMY = shutil.which("fence_dummy") or shutil.which("fence_dummy", path=fencing.SBIN_PATH)
needs_fence_dummy = pytest.mark.skipif(
    FENCE_DUMMY is None,
    reason="fence_dummy not installed (Debian package fence-agents; scripts/install-deps installs it)")

SECRET = "s3cr3t-Pa55-hunter2"


def run(coro):
    return asyncio.run(coro)


def dummy(status_file: Path, **options) -> dict:
    return {"kind": "agent", "agent": "fence_dummy",
            "options": {"type": "file", "status_file": str(status_file), **options}}


def failing_dummy(**options) -> dict:
    # type=fail accepts off but never reaches off; power_timeout bounds its wait (default 20 s)
    return {"kind": "agent", "agent": "fence_dummy", "options": {"type": "fail", "power_timeout": 1, **options}}


def plan_of(*levels, tmp_path: Path, **top) -> fencing.FencingPlan:
    return fencing.parse({"timeout_s": 10, **top,
                          "level": [{"device": list(devs)} for devs in levels]}, tmp_path)


def status_file(tmp_path: Path, name: str = "st", state: str = "on") -> Path:
    p = tmp_path / name
    p.write_text(state)  # fence_dummy wants exactly "on" or "off", no newline
    return p


def script(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


# A fake agent: reads key=value lines; off "succeeds" without doing anything,
# status answers with the exit code in $STATUS_RC (0 = on), metadata without status
# when $NO_STATUS is set.
FAKE_AGENT = """\
action=""
while IFS='=' read -r k v; do
    [ "$k" = action ] && action="$v"
done
case "$action" in
  off) echo "Success: Powered OFF"; exit 0 ;;
  status) echo "Status: ON"; exit {status_rc} ;;
  monitor) exit 0 ;;
  metadata) echo '<resource-agent><actions><action name="off"/>{status_action}<action name="monitor"/></actions></resource-agent>'; exit 0 ;;
esac
exit 1
"""


def fake_agent(tmp_path: Path, status_rc: int, with_status: bool = True) -> Path:
    return script(tmp_path, f"fake_agent_{status_rc}_{int(with_status)}", FAKE_AGENT.format(
        status_rc=status_rc, status_action='<action name="status"/>' if with_status else ""))


# ---------------------------------------------------------------- parsing

def test_no_fencing_table_means_not_configured(tmp_path):
    plan = fencing.parse(None, tmp_path)
    assert not plan.configured and plan.levels == ()


@needs_fence_dummy
def test_parse_valid_plan(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text(SECRET + "\n")
    plan = fencing.parse({
        "timeout_s": 5, "retry_min_s": 0.5, "retry_max_s": 30, "on_fence_failure": "activate",
        "notify": ["true", "x"],
        "level": [{"device": [{**dummy(tmp_path / "st", ssl=True, port=3), "secrets": {"password": "pw"}},
                              {"kind": "command", "command": ["true", "primary"]}]}],
    }, tmp_path)
    dev, cmd = plan.levels[0]
    assert dev.agent == FENCE_DUMMY and dev.name == "fence_dummy"
    assert dict(dev.options) == {"type": "file", "status_file": str(tmp_path / "st"), "ssl": "1", "port": "3"}
    assert dev.secrets[0].value == SECRET and dev.secrets[0].path == str(secret)
    assert SECRET not in repr(plan)
    assert cmd.command[1:] == ("primary",) and os.path.isabs(cmd.command[0])
    assert plan.unsafe and plan.timeout_s == 5 and plan.notify[1] == "x"


@pytest.mark.parametrize("table, message", [
    ({"timeout": 3, "level": []}, "[fencing] unknown key 'timeout'"),
    ({"timeout_s": "3"}, "[fencing] timeout_s: expected a number"),
    ({"timeout_s": 0}, "[fencing] timeout_s: must be more than 0"),
    ({"retry_min_s": 10, "retry_max_s": 5}, "[fencing] retry_max_s: must be at least retry_min_s"),
    ({"on_fence_failure": "yolo"}, "[fencing] on_fence_failure: must be"),
    ({"notify": "mail"}, "[fencing] notify: expected a list of strings"),
    ({"notify": ["/nonexistent/notify"]}, "[fencing] notify: '/nonexistent/notify' is not an executable"),
    ({}, "[fencing] level: at least one [[fencing.level]]"),
    ({"level": [{}]}, "[fencing] level 1: needs at least one [[fencing.level.device]]"),
    ({"level": [{"devices": []}]}, "[fencing] level 1: unknown key 'devices'"),
    ({"level": [{"device": [{"kind": "command", "command": ["true"]}]}, {"device": [{"agent": "x"}]}]},
     "[fencing] level 2 device 1 kind: required"),
    ({"level": [{"device": [{"kind": "ssh"}]}]}, "[fencing] level 1 device 1 kind: must be"),
    ({"level": [{"device": [{"kind": "agent"}]}]}, "[fencing] level 1 device 1 agent: required"),
    ({"level": [{"device": [{"kind": "command"}]}]}, "[fencing] level 1 device 1 command: required"),
    ({"level": [{"device": [{"kind": "command", "command": []}]}]},
     "[fencing] level 1 device 1 command: must not be empty"),
    ({"level": [{"device": [{"kind": "command", "command": "true"}]}]},
     "[fencing] level 1 device 1 command: expected a list of strings"),
    ({"level": [{"device": [{"kind": "command", "command": ["true"], "agent": "x"}]}]},
     "[fencing] level 1 device 1: unknown key 'agent'"),
    ({"level": [{"device": [{"kind": "agent", "agent": "fence_no_such_agent"}]}]},
     "[fencing] level 1 device 1 agent: 'fence_no_such_agent' not found on PATH"),
    ({"level": [{"device": [{"kind": "command", "command": ["no-such-program-xyz"]}]}]},
     "[fencing] level 1 device 1 command: 'no-such-program-xyz' not found on PATH"),
])
def test_parse_errors_name_the_key(tmp_path, table, message):
    with pytest.raises(ConfigError) as exc:
        fencing.parse(table, tmp_path)
    assert message in str(exc.value)


@needs_fence_dummy
@pytest.mark.parametrize("device, message", [
    ({"optons": {}}, "[fencing] level 2 device 1: unknown key 'optons'"),
    ({"options": {"a=b": "1"}}, "[fencing] level 2 device 1 options: key 'a=b'"),
    ({"options": {"ip": "1.2.3.4\naction=on"}}, "[fencing] level 2 device 1 options.ip: newline"),
    ({"options": {"ip": " 1.2.3.4"}}, "[fencing] level 2 device 1 options.ip: leading or trailing"),
    ({"options": {"action": "reboot"}}, "[fencing] level 2 device 1 options: key 'action'"),
    ({"options": {"ssl": False}}, "[fencing] level 2 device 1 options.ssl: false is not sendable"),
    ({"options": {"ip": ["a"]}}, "[fencing] level 2 device 1 options.ip: expected a string"),
    ({"options": "ip=1"}, "[fencing] level 2 device 1 options: expected a table"),
    ({"secrets": {"password": "missing-file"}}, "[fencing] level 2 device 1 secrets.password: cannot read"),
    ({"secrets": {"password": "two-lines"}}, "[fencing] level 2 device 1 secrets.password: "),
    ({"secrets": {"password": "empty"}}, "[fencing] level 2 device 1 secrets.password: "),
    ({"options": {"password": "x"}, "secrets": {"password": "pw"}},
     "[fencing] level 2 device 1 secrets.password: also given in options"),
])
def test_parse_agent_device_errors(tmp_path, device, message):
    (tmp_path / "two-lines").write_text("a\nb\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "pw").write_text(SECRET)
    table = {"level": [{"device": [{"kind": "command", "command": ["true"]}]},
                       {"device": [{"kind": "agent", "agent": "fence_dummy", **device}]}]}
    with pytest.raises(ConfigError) as exc:
        fencing.parse(table, tmp_path)
    assert message in str(exc.value)
    assert "a\nb" not in str(exc.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_secret_is_refused(tmp_path):
    (tmp_path / "pw").write_text(SECRET)
    (tmp_path / "pw").chmod(0)
    with pytest.raises(ConfigError, match=r"secrets.password: cannot read .*Permission denied"):
        fencing.parse({"level": [{"device": [{"kind": "agent", "agent": str(fake_agent(tmp_path, 0)),
                                              "secrets": {"password": "pw"}}]}]}, tmp_path)


def _one_device(device: dict, **top) -> dict:
    return {**top, "level": [{"device": [device]}]}


def test_parse_keeps_every_setting_and_resolves_programs_against_the_config_dir(tmp_path):
    agent = fake_agent(tmp_path, 2)
    (tmp_path / "bin").mkdir()
    cmd = script(tmp_path / "bin", "cut-power", "exit 0\n")
    (tmp_path / "pw").write_text(" Xyz-secret \n")  # surrounding whitespace is not part of it
    plan = fencing.parse({
        "timeout_s": 86400, "retry_min_s": 2, "retry_max_s": 2, "takeover_window_s": 90,
        "notify": [f"./bin/{cmd.name}", "--now"],
        "level": [{"device": [{"kind": "agent", "agent": f"./{agent.name}",
                               "options": {"plug": "X1", "port": 3, "delay": 1.5, "ssl": True},
                               "secrets": {"passwd": "pw"}, "target": "backup", "name": "ipmi-X"}]},
                  {"device": [{"kind": "command", "command": ["bin/cut-power", "X"]}]}],
    }, tmp_path)
    assert (plan.timeout_s, plan.retry_min_s, plan.retry_max_s, plan.takeover_window_s) == (86400, 2, 2, 90)
    assert plan.on_fence_failure == "stay-passive" and not plan.unsafe and plan.configured
    assert plan.notify == (str(cmd), "--now")
    (dev,), (command,) = plan.levels
    assert dev == fencing.AgentDevice(
        name="ipmi-X", agent=str(agent),
        options=(("plug", "X1"), ("port", "3"), ("delay", "1.5"), ("ssl", "1")),
        secrets=(fencing.Secret("passwd", str(tmp_path / "pw"), "Xyz-secret"),), target="backup")
    assert dev.secrets[0].value == "Xyz-secret"
    assert command == fencing.CommandDevice(name="cut-power", command=(str(cmd), "X"))
    assert plan.secret_values() == {"Xyz-secret"}


def test_parse_defaults(tmp_path):
    plan = fencing.parse(_one_device({"kind": "command", "command": ["true"]}), tmp_path)
    assert (plan.timeout_s, plan.retry_min_s, plan.retry_max_s) == (20.0, 1.0, 60.0)
    assert plan.on_fence_failure == "stay-passive" and plan.notify == ()
    assert plan.takeover_window_s is None
    assert plan.levels[0][0].target == "primary" and plan.levels[0][0].name == "true"


def test_a_plan_for_one_host_keeps_the_plan_settings(tmp_path):
    plan = fencing.parse({
        "timeout_s": 3, "retry_min_s": 4, "retry_max_s": 5, "on_fence_failure": "activate",
        "notify": ["true"], "takeover_window_s": 40,
        "level": [{"device": [{"kind": "command", "command": ["true"], "target": "backup"}]}]},
        tmp_path)
    backup = plan.for_target("backup")
    assert backup == plan  # every device fences the backup host: nothing dropped
    primary = plan.for_target("primary")
    assert primary.levels == () and not primary.configured
    assert (primary.timeout_s, primary.retry_min_s, primary.retry_max_s, primary.on_fence_failure,
            primary.notify, primary.takeover_window_s) == (3, 4, 5, "activate", plan.notify, 40)


def test_a_round_is_bounded_by_two_timeouts_per_agent_and_one_per_command(tmp_path):
    agent = str(fake_agent(tmp_path, 2))
    plan = fencing.parse({"timeout_s": 5, "level": [
        {"device": [{"kind": "agent", "agent": agent}, {"kind": "command", "command": ["true"]}]},
        {"device": [{"kind": "command", "command": ["true"]}]}]}, tmp_path)
    assert plan.round_bound_s() == 5 * 2 + 5 + 5
    assert fencing.FencingPlan().round_bound_s() == 0


def test_programs_are_found_in_the_sbin_directories_when_not_on_path(tmp_path, monkeypatch):
    (tmp_path / "sbin").mkdir()
    agent = script(tmp_path / "sbin", "fence_site", "exit 0\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(fencing.plan, "SBIN_PATH", str(tmp_path / "sbin"))
    plan = fencing.parse(_one_device({"kind": "agent", "agent": "fence_site"}), tmp_path)
    assert plan.levels[0][0].agent == str(agent)


@pytest.mark.parametrize("device, message", [
    ("fence_x", r"^\[fencing\] level 1 device 1: expected a table \(\[\[fencing.level.device\]\]\), "
                r"got 'fence_x'$"),
    ({"kind": "command", "command": ["true"], "options": {}},
     r"^\[fencing\] level 1 device 1: unknown key 'options' for kind = \"command\" "
     r"\(known: kind, command, name, target\)$"),
    ({"kind": "command", "command": ["true"], "name": ""}, r"name: expected a one-line string, got ''$"),
    ({"kind": "command", "command": ["true"], "name": "a\nb"}, r"name: expected a one-line string"),
    ({"kind": "command", "command": ["true"], "name": 5}, r"name: expected a one-line string, got 5$"),
    ({"kind": "command", "command": ["true"], "target": "both"},
     r"device 1 target: must be \"primary\" or \"backup\" \(the host this device powers off; "
     r"got 'both'\)$"),
    ({"kind": "agent", "agent": ""}, r"device 1 agent: expected a program name or path, got ''$"),
    ({"kind": "agent", "agent": 5}, r"device 1 agent: expected a program name or path, got 5$"),
    ({"kind": "agent", "agent": "fence_no_such_agent"},
     r"agent: 'fence_no_such_agent' not found on PATH nor in /usr/sbin, /sbin "
     r"\(fence agents come with Debian's fence-agents package\)$"),
    ({"kind": "command", "command": ["no-such-program-xyz"]},
     r"command: 'no-such-program-xyz' not found on PATH nor in /usr/sbin, /sbin$"),
    ({"kind": "command", "command": ["not-executable"]},
     r"command: 'not-executable' not found on PATH"),
    ({"kind": "command", "command": ["./not-executable"]},
     r"command: '.*/not-executable' is not an executable file$"),
    ({"kind": "command", "command": ["./no-such-file"]},
     r"command: '.*/no-such-file' is not an executable file$"),
    ({"kind": "command", "command": ["true", "a\0b"]}, r"command: NUL character in an argument$"),
    ({"kind": "command", "command": ["true", 1]}, r"command: expected a list of strings \(an argv\), "
                                                  r"got \['true', 1\]$"),
    ({"kind": "agent", "agent": "AGENT", "options": {"ip": ["a"]}},
     r"options.ip: expected a string, number or true, got list \['a'\]$"),
    ({"kind": "agent", "agent": "AGENT", "options": {"ip": "1.2.3.4\r"}},
     r"options.ip: newline or NUL in the value \(options are sent one key=value a line\)$"),
    ({"kind": "agent", "agent": "AGENT", "options": {"ip": "1\0"}}, r"options.ip: newline or NUL"),
    ({"kind": "agent", "agent": "AGENT", "options": {"ip": "1.2.3.4 "}},
     r"options.ip: leading or trailing whitespace \(fence-agents strip it\)$"),
    ({"kind": "agent", "agent": "AGENT", "options": {"ACTION": "on"}},
     r"options: key 'action': Remus sets the action itself \(off, status, monitor\)$"),
    ({"kind": "agent", "agent": "AGENT", "options": {"-ip": "1"}},
     r"options: key '-ip': letters, digits, '_' and '-' only"),
    ({"kind": "agent", "agent": "AGENT", "options": {"ip addr": "1"}}, r"options: key 'ip addr'"),
    ({"kind": "agent", "agent": "AGENT", "options": ["ip=1"]},
     r"device 1 options: expected a table of key = value, got \['ip=1'\]$"),
    ({"kind": "agent", "agent": "AGENT", "secrets": ["pw"]},
     r"device 1 secrets: expected a table of key = \"file\", got \['pw'\]$"),
    ({"kind": "agent", "agent": "AGENT", "secrets": {"pass word": "pw"}}, r"secrets: key 'pass word'"),
    ({"kind": "agent", "agent": "AGENT", "secrets": {"password": ""}},
     r"secrets.password: expected the path of a file holding the value, got ''$"),
    ({"kind": "agent", "agent": "AGENT", "secrets": {"password": 5}},
     r"secrets.password: expected the path of a file holding the value, got 5$"),
    ({"kind": "agent", "agent": "AGENT", "secrets": {"password": "missing"}},
     r"secrets.password: cannot read .*/missing: No such file or directory$"),
    ({"kind": "agent", "agent": "AGENT", "secrets": {"password": "cr"}},
     r"secrets.password: .*/cr must hold one line \(the value is sent as one key=value line\)$"),
    ({"kind": "agent", "agent": "AGENT", "secrets": {"password": "nul"}}, r"/nul must hold one line"),
    ({"kind": "agent", "agent": "AGENT", "secrets": {"password": "blank"}}, r"/blank is empty$"),
    ({"kind": "agent", "agent": "AGENT", "secrets": {"password": "latin1"}},
     r"/latin1 is not UTF-8 text$"),
])
def test_parse_device_errors_say_what_is_wrong(tmp_path, device, message):
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    (tmp_path / "cr").write_text("a\rb")
    (tmp_path / "nul").write_text("a\0b")
    (tmp_path / "blank").write_text("  \n")
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    if device != "fence_x" and device.get("agent") == "AGENT":
        device = {**device, "agent": str(fake_agent(tmp_path, 2))}
    with pytest.raises(ConfigError, match=message):
        fencing.parse(_one_device(device), tmp_path)


@pytest.mark.parametrize("table, message", [
    ([], r"^\[fencing\] must be a table$"),
    ({"timeout": 3}, r"^\[fencing\] unknown key 'timeout' \(known: timeout_s, retry_min_s, retry_max_s, "
                     r"on_fence_failure, notify, takeover_window_s, level\)$"),
    ({"timeout_s": True}, r"^\[fencing\] timeout_s: expected a number of seconds, got bool True$"),
    ({"retry_min_s": -1}, r"^\[fencing\] retry_min_s: must be more than 0 and at most 86400 \(got -1\)$"),
    ({"retry_max_s": 86400.5},
     r"^\[fencing\] retry_max_s: must be more than 0 and at most 86400 \(got 86400.5\)$"),
    ({"takeover_window_s": 0}, r"^\[fencing\] takeover_window_s: must be more than 0"),
    ({"takeover_window_s": "50"}, r"^\[fencing\] takeover_window_s: expected a number"),
    ({"retry_min_s": 2.5, "retry_max_s": 2}, r"^\[fencing\] retry_max_s: must be at least "
                                             r"retry_min_s \(2.5\)$"),
    ({"on_fence_failure": "Activate"}, r"^\[fencing\] on_fence_failure: must be \"stay-passive\" or "
                                       r"\"activate\" \(\"activate\" is UNSAFE: see the docs\) "
                                       r"\(got 'Activate'\)$"),
    ({"notify": []}, r"^\[fencing\] level: at least one \[\[fencing.level\]\] is needed \(leave "
                     r"\[fencing\] out entirely to run without fencing\)$"),
    ({"level": {"device": []}},
     r"^\[fencing\] level: expected an array of tables \(\[\[fencing.level\]\]\)$"),
    ({"level": ["x"]}, r"^\[fencing\] level 1: expected a table \(\[\[fencing.level\]\]\), got 'x'$"),
    ({"level": [{"device": {}}]},
     r"^\[fencing\] level 1 device: expected an array of tables \(\[\[fencing.level.device\]\]\)$"),
    ({"level": [{"device": []}]}, r"^\[fencing\] level 1: needs at least one \[\[fencing.level.device\]\]$"),
    ({"level": [{"device": [{"kind": "command", "command": ["true"]}], "name": "x"}]},
     r"^\[fencing\] level 1: unknown key 'name' \(known: device\)$"),
    ({"level": [{"device": [{"kind": "command", "command": ["true"]}, {"kind": "command"}]}]},
     r"^\[fencing\] level 1 device 2 command: required for kind = \"command\" \(argv; exit 0 = fenced\)$"),
    ({"level": [{"device": [{"kind": "agent"}]}]},
     r"^\[fencing\] level 1 device 1 agent: required for kind = \"agent\" \(a fence-agents program\)$"),
    ({"level": [{"device": [{}]}]},
     r"^\[fencing\] level 1 device 1 kind: required \(\"agent\" or \"command\"\)$"),
    ({"level": [{"device": [{"kind": "ssh"}]}]},
     r"^\[fencing\] level 1 device 1 kind: must be \"agent\" or \"command\" \(got 'ssh'\)$"),
    ({"notify": ["true", 2]}, r"^\[fencing\] notify: expected a list of strings"),
])
def test_parse_plan_errors_say_what_is_wrong(tmp_path, table, message):
    if isinstance(table, dict) and "level" not in table and "notify" not in table:
        table = {**table, "level": [{"device": [{"kind": "command", "command": ["true"]}]}]}
    with pytest.raises(ConfigError, match=message):
        fencing.parse(table, tmp_path)


# ---------------------------------------------------------------- fencing with fence_dummy

@needs_fence_dummy
def test_fence_dummy_level_fences_and_status_file_ends_off(tmp_path):
    st = status_file(tmp_path)
    result = run(fencing.Fencer(plan_of([dummy(st)], tmp_path=tmp_path)).fence())
    assert result.ok and result.level == 1
    assert st.read_text() == "off"
    (d,) = result.devices
    assert d.ok and "status: exit 2 = off" in d.detail and (d.level, d.device) == (1, 1)


@needs_fence_dummy
def test_fence_dummy_type_fail_fails(tmp_path):
    result = run(fencing.Fencer(plan_of([failing_dummy()], tmp_path=tmp_path)).fence())
    assert not result.ok and result.level is None
    (d,) = result.devices
    assert not d.ok and d.detail.startswith("off: exit 1") and "Timed out waiting to power OFF" in d.detail


@needs_fence_dummy
def test_a_level_fails_if_any_device_fails_and_the_next_level_is_tried(tmp_path):
    st1, st2 = status_file(tmp_path, "st1"), status_file(tmp_path, "st2")
    plan = plan_of([dummy(st1), failing_dummy()], [dummy(st2)], tmp_path=tmp_path)
    result = run(fencing.Fencer(plan).fence())
    assert result.ok and result.level == 2
    assert [(d.level, d.device, d.ok) for d in result.devices] == [(1, 1, True), (1, 2, False), (2, 1, True)]
    assert st2.read_text() == "off"


@needs_fence_dummy
def test_fence_dummy_status_file_with_a_newline_is_not_confirmed(tmp_path):
    st = status_file(tmp_path, state="on\n")
    result = run(fencing.Fencer(plan_of([dummy(st)], tmp_path=tmp_path)).fence())
    # fence_dummy reads "on\n" as neither on nor off: off fails before writing
    assert not result.ok and "Unable to obtain correct plug status" in result.devices[0].detail


def test_command_device_past_the_timeout_fails_and_is_killed_with_its_group(tmp_path):
    pids = tmp_path / "pids"
    cmd = script(tmp_path, "hang", f"""\
        sleep 30 &
        echo $$ $! > {pids}
        wait
        """)
    plan = plan_of([{"kind": "command", "command": [str(cmd)]}], tmp_path=tmp_path, timeout_s=0.5)
    t0 = time.monotonic()
    result = run(fencing.Fencer(plan).fence())
    assert time.monotonic() - t0 < 4
    assert not result.ok
    assert "timed out after 0.5 s (killed)" in result.devices[0].detail
    for pid in map(int, pids.read_text().split()):
        assert _gone(pid), f"pid {pid} still running"


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):  # killed, not yet reaped by whoever inherited it
            return True
        time.sleep(0.02)
    return False


def test_command_device_exit_codes(tmp_path):
    plan = plan_of([{"kind": "command", "command": ["sh", "-c", "echo no power >&2; exit 3"]}],
                   [{"kind": "command", "command": ["true"]}], tmp_path=tmp_path)
    result = run(fencing.Fencer(plan).fence())
    assert result.ok and result.level == 2
    assert result.devices[0].detail == "exit 3: no power"


def test_agent_whose_status_still_reports_on_after_off_fails(tmp_path):
    plan = plan_of([{"kind": "agent", "agent": str(fake_agent(tmp_path, 0))}],
                   [{"kind": "agent", "agent": str(fake_agent(tmp_path, 1))}], tmp_path=tmp_path)
    result = run(fencing.Fencer(plan).fence())
    assert not result.ok
    on, unreachable = result.devices
    assert "off: exit 0, but status: exit 0 = still ON after off" in on.detail
    assert "exit 1 = unreachable or unknown" in unreachable.detail


@needs_fence_dummy
def test_secret_values_never_appear_in_logs_or_details(tmp_path, caplog):
    (tmp_path / "pw").write_text(SECRET + "\n")
    st = status_file(tmp_path)
    secret_dev = lambda d: {**d, "secrets": {"password": "pw"}}  # noqa: E731
    plan = plan_of([secret_dev(failing_dummy())], [secret_dev(dummy(st))], tmp_path=tmp_path,
                   notify=["sh", "-c", 'echo "$REMUS_FENCE_DETAIL"; exit 1'])
    caplog.set_level(logging.DEBUG)
    fencer = fencing.Fencer(plan)
    result = run(fencer.fence())
    checks = run(fencer.check())
    run(fencer.run_notify(result, 1, 1.0))
    assert result.ok and result.level == 2
    details = " ".join(d.detail for d in result.devices + checks)
    # fence_dummy does not know 'password': it echoes the whole line to stderr as a warning
    assert "password=" + fencing.SCRUBBED in details
    assert SECRET not in details
    assert SECRET not in caplog.text and "fence-attempt level=1 device=1" in caplog.text
    assert "fence-result level=2 device=1 name=fence_dummy ok=True" in caplog.text
    assert "password=" + fencing.SCRUBBED in caplog.text


def test_fence_without_levels_fails(tmp_path):
    result = run(fencing.Fencer(fencing.FencingPlan()).fence())
    assert not result.ok and result.devices == []


# ---------------------------------------------------------------- retries

def test_fence_with_retry_retries_until_the_failure_goes_away(tmp_path):
    flag, events = tmp_path / "power-cut", tmp_path / "events"
    plan = plan_of([{"kind": "command", "command": ["test", "-e", str(flag)]}], tmp_path=tmp_path,
                   retry_min_s=0.05, retry_max_s=0.1,
                   notify=["sh", "-c", f'echo "$REMUS_EVENT $REMUS_FENCE_ROUND" >> {events}'])
    failures = []

    async def on_failure(result):
        failures.append(result)
        if len(failures) == 3:
            flag.touch()

    result = run(fencing.fence_with_retry(fencing.Fencer(plan), asyncio.Event(), on_failure))
    assert result.ok and len(failures) == 3 and not any(f.ok for f in failures)
    assert events.read_text().splitlines() == ["fencing-failed 1", "fencing-failed 2", "fencing-failed 3"]


def test_fence_with_retry_stops_when_asked(tmp_path):
    plan = plan_of([{"kind": "command", "command": ["sleep", "30"]}], tmp_path=tmp_path, timeout_s=20)
    calls = []

    async def main():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        return await fencing.fence_with_retry(fencing.Fencer(plan), stop, calls.append)

    t0 = time.monotonic()
    result = run(main())
    assert not result.ok and calls == [] and time.monotonic() - t0 < 3


def test_fence_with_retry_backs_off_and_survives_a_failing_callback(tmp_path):
    plan = plan_of([{"kind": "command", "command": ["false"]}], tmp_path=tmp_path,
                   retry_min_s=0.05, retry_max_s=0.2)
    stamps = []

    def on_failure(result):
        stamps.append(time.monotonic())
        raise RuntimeError("status file write failed")

    async def main():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, stop.set)
        return await fencing.fence_with_retry(fencing.Fencer(plan), stop, on_failure)

    assert not run(main()).ok
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(stamps) >= 4 and gaps[0] < 0.15 and all(0.15 < g < 0.5 for g in gaps[2:])


# ---------------------------------------------------------------- check / fence-test

@needs_fence_dummy
def test_check_never_changes_the_status_file_nor_runs_commands(tmp_path):
    st_on, st_off = status_file(tmp_path, "on"), status_file(tmp_path, "off", "off")
    marker = tmp_path / "command-ran"
    plan = plan_of([dummy(st_on), {"kind": "command", "command": ["touch", str(marker)]}],
                   [dummy(st_off)], tmp_path=tmp_path)
    before = [(p.read_text(), p.stat().st_mtime_ns) for p in (st_on, st_off)]
    results = run(fencing.Fencer(plan).check())
    assert [(p.read_text(), p.stat().st_mtime_ns) for p in (st_on, st_off)] == before
    assert not marker.exists()
    on, cmd, off = results
    assert on.ok and on.detail.startswith("status: exit 0 = on")
    assert not cmd.ok and cmd.detail == "not checkable: command devices are only run to fence"
    assert off.ok and off.detail.startswith("status: exit 2 = OFF")


def test_check_reports_monitor_too_when_status_is_not_supported(tmp_path):
    plan = plan_of([{"kind": "agent", "agent": str(fake_agent(tmp_path, 1, with_status=False))}],
                   [{"kind": "agent", "agent": str(fake_agent(tmp_path, 1))}], tmp_path=tmp_path)
    results = run(fencing.Fencer(plan).check())
    assert [(r.level, r.ok) for r in results] == [(1, False), (1, True), (2, False)]
    assert results[0].detail.startswith("status: not supported")
    assert results[1].detail == "monitor: exit 0"
    assert results[2].detail.startswith("status: exit 1")


def _config_file(tmp_path: Path, fencing_toml: str) -> Path:
    cfg = tmp_path / "g.toml"
    cfg.write_text('[guest]\nname = "x"\nkernel = "k"\n[primary]\naddress = "127.0.0.1"\n'
                   '[backup]\naddress = "127.0.0.1:7788"\n[tls]\ninsecure = true\n' + textwrap.dedent(fencing_toml))
    return cfg


@needs_fence_dummy
def test_remusctl_fence_test(tmp_path, capsys):
    st = status_file(tmp_path)
    (tmp_path / "pw").write_text(SECRET)
    cfg = _config_file(tmp_path, f"""
        [fencing]
        [[fencing.level]]
        [[fencing.level.device]]
        kind = "agent"
        agent = "fence_dummy"
        options = {{ type = "file", status_file = "{st}" }}
        secrets = {{ password = "pw" }}
        [[fencing.level.device]]
        kind = "command"
        command = ["true"]
        """)
    assert ctl.main(["fence-test", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "status: exit 0 = on" in out and "not run" in out and "all 1 agent device(s) answered" in out
    assert SECRET not in out and st.read_text() == "on"

    agent = fake_agent(tmp_path, 1)
    cfg = _config_file(tmp_path, f"""
        [fencing]
        [[fencing.level]]
        [[fencing.level.device]]
        kind = "agent"
        agent = "{agent}"
        """)
    assert ctl.main(["fence-test", "--config", str(cfg)]) == 1
    assert "1 of 1 agent device(s) did not answer status" in capsys.readouterr().out


def test_remusctl_fence_test_config_errors(tmp_path, capsys):
    cfg = _config_file(tmp_path, """
        [fencing]
        [[fencing.level]]
        [[fencing.level.device]]
        kind = "command"
        comand = ["true"]
        """)
    assert ctl.main(["fence-test", "--config", str(cfg)]) == 2
    assert "[fencing] level 1 device 1: unknown key 'comand'" in capsys.readouterr().err
    cfg = _config_file(tmp_path, "[replication]\ninterval_ms = -1\n[fencing]\n")
    assert ctl.main(["fence-test", "--config", str(cfg)]) == 2
    assert "[replication] interval_ms" in capsys.readouterr().err
    cfg = _config_file(tmp_path, "")
    assert ctl.main(["fence-test", "--config", str(cfg)]) == 1
    assert "fencing is not configured" in capsys.readouterr().err


def test_devices_are_chosen_by_the_host_they_power_off(tmp_path):
    plan = fencing.parse({"level": [
        {"device": [{"kind": "command", "command": ["true"], "name": "a-ipmi"},
                    {"kind": "command", "command": ["true"], "name": "b-ipmi", "target": "backup"}]},
        {"device": [{"kind": "command", "command": ["true"], "name": "b-pdu", "target": "backup"}]},
    ]}, tmp_path)
    assert [[d.name for d in lv] for lv in plan.for_target("primary").levels] == [["a-ipmi"]]
    assert [[d.name for d in lv] for lv in plan.for_target("backup").levels] == [["b-ipmi"], ["b-pdu"]]
    with pytest.raises(ConfigError, match="target: must be"):
        fencing.parse({"level": [{"device": [{"kind": "command", "command": ["true"],
                                              "target": "both"}]}]}, tmp_path)
