"""Failover time with the default heartbeat (100 ms, 5 missed beats) and real fencing.

Namespaces as hosts, two heartbeat wires, fence_dummy behind a test power
switch. Each run: protect the demo guest, run the client probe, kill -9 the
primary host (daemon and QEMU), and time from the kill to the first reply of
the activated guest, split into detection (kill -> the backup's verdict),
fencing (fence_dummy off + status) and activation (device state into QEMU,
cont). Also the primary's heartbeat send jitter while it checkpoints. With
--baseline, runs without the standby guest (QEMU launched during fencing, as
before it existed) alternate with the default ones, for a side-by-side ratio.
Prints a table and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

from remus.common.guest_image import build
from remus.common.localpair import Pair, PowerSwitch, ha_config, wait_until
from remus.common.netns import Lan
from remus.common.probe import read_replies
from remus.common.stats import percentile

RESULTS = Path(__file__).parent / "results"
STAMP = r"^(\S+) backup \w+ "


def stamp(log: str, event: str) -> float:
    m = re.search(STAMP + re.escape(event) + " ", log, re.M)
    if not m:
        raise AssertionError(f"no {event} in the backup log")
    return datetime.datetime.fromisoformat(m.group(1)).timestamp()


def one_run(image, lan: Lan, workdir: Path, standby: bool = True) -> dict:
    extra, status = ha_config(lan, workdir)
    pair = Pair(image, workdir, lan=lan, extra_config=extra)
    if not standby:
        backup_dir = f'state_dir = "{workdir / "backup"}"'
        pair.config.write_text(pair.config.read_text().replace(
            backup_dir, backup_dir + "\nstandby_guest = false", 1))
    switch = PowerSwitch(status, pair)
    try:
        pair.start_backup()
        pair.start_primary()
        pair.primary.wait_for(r"protecting epoch=\d+", 60)
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        probe = pair.start_probe()
        wait_until(lambda: len(replies(probe)) >= 3, 30, "the client's first replies")
        time.sleep(12)  # let the primary report heartbeat jitter under checkpoint load
        jitter = re.findall(r"heartbeat-jitter beats=\d+ p50_ms=([\d.]+) p99_ms=([\d.]+) max_ms=([\d.]+)",
                            pair.primary.log())
        killed = time.time()
        pair.primary.kill9()
        switch.start()
        pair.backup.wait_for(r"failover-complete", 60)
        wait_until(lambda: sum(t > killed for t, _ in replies(probe)) >= 2, 60,
                   "the activated guest's replies")
        first_reply = min(t for t, _ in replies(probe) if t > killed)
        probe.stop()
        log = pair.backup.log()
        decided, fenced, activated = (stamp(log, e) for e in ("primary-lost", "fenced", "activated"))
        later = sorted(t for t, _ in replies(probe) if t > killed)
        replayed = re.search(r"activated .*input_replayed=(\d+)", log)
        return {"standby": standby, "input_replayed": int(replayed.group(1)) if replayed else 0,
                "detect_ms": (decided - killed) * 1000, "fence_ms": (fenced - decided) * 1000,
                "activate_ms": (activated - fenced) * 1000,
                "first_reply_ms": (first_reply - killed) * 1000,
                # The resumed QEMU starts with a cold translation cache under TCG:
                # time to its first reply, and the gap to the next one.
                "resume_to_reply_ms": (first_reply - activated) * 1000,
                "next_reply_gap_ms": (later[1] - later[0]) * 1000 if len(later) > 1 else 0.0,
                "jitter": [tuple(map(float, j)) for j in jitter]}
    finally:
        switch.done.set()
        pair.cleanup()


def replies(probe) -> list[tuple[float, int]]:
    return read_replies(probe.log())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="runs per mode")
    ap.add_argument("--baseline", action="store_true",
                    help="also as many runs without the standby guest, alternating")
    args = ap.parse_args()
    if not (shutil.which("fence_dummy") or os.path.exists("/usr/sbin/fence_dummy")):
        raise SystemExit("fence_dummy is missing: install Debian's fence-agents (make deps)")
    image = build(Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus")))
    modes = (True, False) if args.baseline else (True,)
    runs = []
    with Lan(second_link=True) as lan:
        for i in range(args.runs):
            for standby in modes:
                workdir = Path(tempfile.mkdtemp(prefix="remus-failbench-"))
                try:
                    runs.append(one_run(image, lan, workdir, standby))
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                print(f"run {i + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in runs[-1].items()
                                                    if k != "jitter"), flush=True)
    keys = ("detect_ms", "fence_ms", "activate_ms", "first_reply_ms", "resume_to_reply_ms",
            "next_reply_gap_ms")
    print("\nFailover, kill -9 of the primary host -> first reply of the activated guest")
    medians = {}
    for standby in modes:
        mine = [r for r in runs if r["standby"] == standby]
        print(f"\n{'standby guest (default)' if standby else 'no standby guest (baseline)'}, "
              f"{len(mine)} runs")
        print("phase              | median ms | max ms")
        for k in keys:
            vals = [r[k] for r in mine]
            print(f"{k[:-3]:18s} | {percentile(vals, .5):9.0f} | {max(vals):6.0f}")
        medians[standby] = {k: percentile([r[k] for r in mine], .5) for k in keys}
    if args.baseline:
        print("\nstandby / baseline, ratio of medians: " + ", ".join(
            f"{k[:-3]} {medians[True][k] / medians[False][k]:.2f}" for k in
            ("fence_ms", "activate_ms", "first_reply_ms")))
    jit = [j for r in runs for j in r["jitter"]]
    if jit:
        print(f"\nheartbeat send jitter under checkpoint load (per 10 s window): p50 "
              f"{percentile([j[0] for j in jit], .5):.2f} ms, p99 up to {max(j[1] for j in jit):.2f} ms, "
              f"max {max(j[2] for j in jit):.2f} ms over {len(jit)} windows")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"failover-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "runs": runs}, indent=2))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
