"""`remusctl drill`: rehearse a failover and report what a client saw.

Runs the client probe against the guest, makes the primary die at a chosen
point of its checkpoint cycle (the original Remus drill commands s s2 r r2
c c2) or kills it outright, waits for the backup to take over, and reports
detection, fencing and activation times, the downtime the client saw, the
replies lost (must be 0) and a timeline. Both daemons' control sockets must
be on this host (a lab pair, or namespaces as in the tests and the demo).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from remus.common.config import load
from remus.common.control import query, request
from remus.common.probe import read_replies, taken_back
from remus.common.waiting import wait_until
from remus.common.hooks import DRILL_POINTS
from remus.common.status import BackupState, RoleName
from remus.common.takeover import output_hold_s

PHASES = {**{v: v for v in DRILL_POINTS.values()}, **DRILL_POINTS}


def add_parser(sub) -> None:
    p = sub.add_parser("drill", help="rehearse a failover and report what a client saw",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, metavar="FILE")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--die-at", choices=sorted(PHASES), metavar="PHASE",
                     help="the primary dies at this point of the next checkpoint: "
                          + ", ".join(f"{v} ({k})" for k, v in DRILL_POINTS.items()))
    how.add_argument("--kill", action="store_true", help="kill -9 the primary daemon and its QEMU")
    how.add_argument("--partition", action="store_true",
                     help="the primary falls silent on every heartbeat link and its stream is cut, "
                          "as in a network partition; the backup must fence it before taking over")
    how.add_argument("--backup-crash", action="store_true",
                     help="kill -9 the backup daemon; the primary must carry on (or pause) and no "
                          "reply may be lost")
    p.add_argument("--probe-url", required=True, metavar="URL",
                   help="a URL of the guest whose body is an increasing counter (demo: /cgi-bin/inc)")
    p.add_argument("--probe-netns", metavar="NS", help="run the probe in this network namespace")
    p.add_argument("--yes", action="store_true",
                   help="run even if the config does not mark the pair as a drill target")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _replies(path: Path) -> list[tuple[float, int]]:
    return read_replies(path.read_text())


def _try_status(state_dir: Path) -> dict:
    try:
        return query(state_dir)
    except (OSError, ValueError, RuntimeError):
        return {}


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    args.hold_s = output_hold_s(cfg)
    if not (cfg.primary.drill_target or args.yes):
        print("remusctl drill: refusing: this pair is not marked as a drill target "
              "([primary] drill_target = true) and --yes was not given", file=sys.stderr)
        return 2
    primary_dir, backup_dir = Path(cfg.primary.state_dir), Path(cfg.backup.state_dir)
    try:
        primary = query(primary_dir)
        backup = query(backup_dir)
    except (OSError, RuntimeError) as exc:
        print(f"remusctl drill: both daemons must answer on this host: {exc}", file=sys.stderr)
        return 2
    if primary.get("role") == RoleName.BACKUP.value and backup.get("role") == RoleName.PRIMARY.value:
        # Re-protected after a failover: the hosts have exchanged roles.
        primary, backup, primary_dir, backup_dir = backup, primary, backup_dir, primary_dir
    if primary["state"] != "protecting" or backup["state"] != BackupState.STANDBY.value:
        print(f"remusctl drill: the pair is not ready (primary {primary['state']}, backup "
              f"{backup['state']}); a drill needs protecting/standby", file=sys.stderr)
        return 1
    fd, name = tempfile.mkstemp(prefix="remus-drill-", suffix=".jsonl")
    os.close(fd)
    out = Path(name)
    try:
        return _drill(args, primary, backup, primary_dir, backup_dir, out)
    except TimeoutError as exc:
        print(f"remusctl drill: {exc}", file=sys.stderr)
        return 1
    finally:
        out.unlink(missing_ok=True)


def _drill(args, primary: dict, backup: dict, primary_dir: Path, backup_dir: Path, out: Path) -> int:
    prefix = ["ip", "netns", "exec", args.probe_netns] if args.probe_netns else []
    with open(out, "w") as sink:
        probe = subprocess.Popen([*prefix, sys.executable, "-m", "remus.common.probe", args.probe_url],
                                 stdout=sink, stderr=subprocess.DEVNULL)
    timeline = []
    try:
        wait_until(lambda: len(_replies(out)) >= 3, 60, "the probe's first replies")
        injected = time.time()
        timeline.append(("inject", injected, _inject(args, primary, backup, primary_dir)))
        after = _await_outcome(args, primary_dir, backup_dir, out, injected, timeline)
        time.sleep(0.5)  # a few more replies, to see none is taken back
    finally:
        probe.send_signal(signal.SIGTERM)
        probe.wait(10)
    report = _report(args, _replies(out), injected, after, timeline)
    _print_report(report, args.json)
    return 0 if not report["replies_lost"] else 1


def _inject(args, primary: dict, backup: dict, primary_dir: Path) -> str:
    """Break the pair as asked; what was done, for the timeline."""
    if args.kill:
        for pid in (primary.get("qemu_pid"), primary.get("pid")):
            if pid:
                os.kill(pid, signal.SIGKILL)
        return "kill -9 primary daemon and QEMU"
    if args.partition:
        request(primary_dir, "partition")
        return "primary cut off: heartbeat muted, stream cut"
    if args.backup_crash:
        os.kill(backup["pid"], signal.SIGKILL)
        return "kill -9 backup daemon"
    point = PHASES[args.die_at]
    request(primary_dir, f"drill {point}")
    return f"primary armed to die at {point}"


def _await_outcome(args, primary_dir: Path, backup_dir: Path, out: Path, injected: float,
                   timeline: list) -> dict:
    """Wait for what the drill should lead to; the status of the host that carries on."""
    if args.backup_crash:
        return _await_unprotected(primary_dir, out, injected, timeline, args.hold_s)
    after = wait_until(lambda: (s := _try_status(backup_dir)).get("role") == RoleName.ACTIVE.value
                       and s, 120, "the backup to activate")
    wait_until(lambda: any(t > injected for t, _ in _replies(out)), 60,
               "a reply from the activated guest")
    return after


def _await_unprotected(primary_dir: Path, out: Path, injected: float, timeline: list,
                       hold_s: float) -> dict:
    """The backup died: the primary holds its output for the takeover window, then runs
    on unprotected (or stays paused, with on_backup_loss = pause)."""
    def state() -> dict | bool:
        s = _try_status(primary_dir)
        return s.get("state") in ("holding", "degraded", "paused") and s
    after = wait_until(state, 60, "the primary to notice the backup's loss")
    if after["state"] == "holding":
        timeline.append(("primary-holding", time.time(),
                         f"output held for up to {hold_s:.1f} s (the takeover window)"))
        after = wait_until(lambda: (s := state()) and s["state"] != "holding" and s,
                           hold_s + 30, "the primary to release its output")
    timeline.append((f"primary-{after['state']}", time.time(), "primary runs without a backup"))
    if after["state"] == "degraded":  # with on_backup_loss = pause no reply comes
        wait_until(lambda: sum(t > injected for t, _ in _replies(out)) >= 3, 60,
                   "replies from the unprotected primary")
    return after


def _report(args, replies: list, injected: float, after: dict, timeline: list) -> dict:
    values = [v for _, v in replies]
    before = [t for t, _ in replies if t <= injected]
    first_after = next(((t, v) for t, v in replies if t > injected), None)
    failover = after.get("last_failover") or {}
    if failover:
        timeline.append(("activated", failover["at"], f"backup active at generation {failover['generation']}"))
    if first_after is not None:
        timeline.append(("first-reply", first_after[0], f"client got {first_after[1]}"))
    end = first_after[0] if first_after else time.time()
    return {
        "drill": ("kill" if args.kill else "partition" if args.partition
                  else "backup-crash" if args.backup_crash else PHASES[args.die_at]),
        "detection_ms": failover.get("detect_ms"), "fencing_ms": failover.get("fence_ms"),
        "downtime_ms": (end - (before[-1] if before else injected)) * 1000,
        "replies": len(values), "replies_lost": len(taken_back(values)),
        "timeline": [{"event": e, "ms": round((t - injected) * 1000), "detail": d} for e, t, d in timeline],
    }


def _print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(f"drill {report['drill']}: replies lost {report['replies_lost']} of {report['replies']}; "
          f"downtime seen by the client {report['downtime_ms']:.0f} ms")
    print(f"  detection {report['detection_ms'] or 0:.0f} ms, fencing {report['fencing_ms'] or 0:.0f} ms")
    for item in report["timeline"]:
        print(f"  {item['ms']:+7d} ms  {item['event']:12s} {item['detail']}")
