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
