"""`remusctl status` and `remusctl watch`: what each daemon on this host says of itself."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from remus.common.config import load
from remus.common.control import SOCKET_NAME, query
from remus.common.status import RoleName


def add_parsers(sub) -> None:
    for name, helptext in (("status", "show the state of the daemons of a guest on this host"),
                           ("watch", "the same view, refreshed every second")):
        p = sub.add_parser(name, help=helptext, description=helptext + ". Reads each daemon's "
                           "control socket (in its state directory; root only).")
        p.add_argument("--config", "-c", required=True, metavar="FILE", help="the guest's config")
        p.add_argument("--role", choices=("primary", "backup"),
                       help="only this daemon (default: every one running on this host)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            p.add_argument("--interval", type=float, default=1.0, metavar="S")
        p.set_defaults(func=run_status if name == "status" else run_watch)


def collect(cfg, role: str | None) -> dict:
    out = {}
    for name in (role,) if role else ("primary", "backup"):
        state_dir = Path(getattr(cfg, name).state_dir)
        if role is None and not (state_dir / SOCKET_NAME).exists():
            continue
        try:
            out[name] = query(state_dir)
        except (OSError, ValueError, RuntimeError) as exc:
            out[name] = {"role": name, "error": f"no answer on {state_dir / SOCKET_NAME}: {exc}"}
    return out


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def sync_line(sync: dict, running: bool) -> str:
    """The session's initial sync: running (what has gone, how fast, how long to go) or done."""
    if not running:
        return (f"  initial sync: done in {sync['seconds']:.1f} s, {sync['rounds']} pre-copy "
                f"round(s), {_mib(sync['wire_bytes'])} on the wire")
    parts = [f"  initial sync: {sync['rounds']} round(s), RAM {_mib(sync['ram_bytes_sent'])} sent "
             f"of {_mib(sync['ram_total'])}"]
    if sync.get("disk_to_copy"):
        parts.append(f"disk copy {_mib(sync['disk_copied'])} of {_mib(sync['disk_to_copy'])}")
    parts.append(f"{_mib(sync['wire_bytes'])} on the wire at {sync['wire_rate_mib_s']:.1f} MiB/s")
    if sync.get("eta_s") is not None:
        parts.append(f"ETA {sync['eta_s']:.0f} s")
    return ", ".join(parts)


def render(statuses: dict) -> str:
    if not statuses:
        return "no Remus daemon for this guest runs on this host"
    lines = []
    for name, s in statuses.items():
        if "error" in s:
            lines.append(f"{name}: {s['error']}")
            continue
        role = s.get("role", name)
        title = name if role == name else f"{name} host, now {role}"
        lines.append(f"{title} {s['guest']}: {s['state'].upper()}  generation {s['generation']}  "
                     f"last committed epoch {s['last_committed_epoch']}")
        if role == RoleName.ACTIVE.value:
            lines.append("  runs the guest UNPROTECTED since a failover: `remusctl reprotect` "
                         "once the other host is back")
        elif role == RoleName.PRIMARY.value:
            lines += primary_lines(s)
        elif "fencing" in s:
            lines += backup_lines(s)
        hb = s.get("heartbeat")
        if hb:
            lines += [render_link(link) for link in hb["links"]]
        else:
            lines.append("  heartbeat: not configured")
    return "\n".join(lines)


def primary_lines(s: dict) -> list[str]:
    lines = [f"  checkpoints {s['checkpoints_per_s']:.1f}/s  pause p50 {s['pause_p50_ms']:.1f} ms "
             f"p99 {s['pause_p99_ms']:.1f} ms  {s['bytes_per_s'] / 1024:.0f} KiB/s  "
             f"ack p50 {s['ack_p50_ms']:.1f} ms"]
    if s.get("trigger") == "output":
        lines.append(f"  trigger: output waiting (or every {s['interval_ms']} ms); "
                     f"{s.get('output_triggered') or 0} of the recent checkpoints "
                     "taken for output")
    if s.get("pipeline", 1) > 1:
        lines.append(f"  pipeline: {s.get('in_flight') or 0} checkpoint(s) in flight "
                     f"(unacknowledged), up to {s['pipeline']}")
    sync = s.get("sync")
    if sync:
        lines.append(sync_line(sync, s["state"] == "syncing"))
    if s.get("output_hold_s_left") is not None:
        lines.append(f"  BACKUP LOST: output held {s['output_hold_s_left']:.1f} s more "
                     "(the takeover window: the backup may be taking over)")
    held = s.get("held_output")
    if held:
        lines.append(f"  held output {held['held_frames']} frames, {held['held_bytes']} bytes; "
                     f"dropped {held['dropped_frames']}")
    return lines


def backup_lines(s: dict) -> list[str]:
    lines = []
    if s.get("stale_reason"):
        lines.append(f"  REPLICA STALE: {s['stale_reason']}")
    f = s["fencing"]
    lines.append(f"  replica {s['replica']['state']}  fencing "
                 f"{'%d level(s)' % f['levels'] if f['configured'] else 'NOT CONFIGURED'}"
                 + (f"  LAST FAILURE: {f['last_failure']}" if f.get("last_failure") else ""))
    sg = s.get("standby_guest")
    if sg and sg["state"] != "none":
        lines.append("  standby guest: " + {
            "ready": f"ready (QEMU pid {sg.get('qemu_pid')})",
            "launching": "launching",
            "off": "off ([backup] standby_guest = false)",
            "gone": "QEMU EXITED; relaunching",
            "failed": f"LAUNCH FAILED: {sg.get('error')}; a failover would launch "
                      "QEMU itself"}.get(sg["state"], sg["state"]))
    if s.get("last_failover"):
        lf = s["last_failover"]
        lines.append(f"  last failover: epoch {lf['epoch']}, detection {lf['detect_ms']:.0f} ms, "
                     f"fencing {lf['fence_ms']:.0f} ms ({lf['reason']})")
    return lines


def render_link(link: dict) -> str:
    age = link.get("last_beat_age_ms")
    rtt = link.get("rtt_ms")
    # One beat counted missed between two beats is the normal rhythm of an up link:
    # name misses only when they mean something.
    missed = link["missed"]
    return (f"  link {link['link']}: {'up' if link['up'] else 'DOWN'}  last beat "
            f"{'never' if age is None else f'{age:.0f} ms ago'}"
            + (f"  missed {missed}" if missed >= 2 or not link["up"] else "")
            + ("" if rtt is None else f"  rtt {rtt:.1f} ms"))


def run_status(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    statuses = collect(cfg, args.role)
    print(json.dumps(statuses, indent=2, default=str) if args.json else render(statuses))
    return 0 if statuses and not any("error" in s for s in statuses.values()) else 1


def run_watch(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    try:
        while True:
            text = render(collect(cfg, args.role))
            sys.stdout.write("\033[H\033[2J" + time.strftime("%H:%M:%S  ") + "remusctl watch\n\n" + text + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
