"""Re-protection of the 128 MiB demo guest after a failover, with and without pre-copy.

Namespace hosts, heartbeat and fence_dummy as in the tests. Each run: protect the
guest, make it dirty memory at a set rate, kill host A, let B fence it and take the
guest over, start host A's daemon again (it stands by as B's backup) and time
`remusctl reprotect` on B until B reports the guest protected. From B's log:
the first consistent checkpoint's pause (guest stopped) and its output hold
(pause to ack: how long the guest's network output waited), and the sync time.
Both modes run side by side in the same invocation, alternating. Prints a table
and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from remus.common.guest_image import build
from remus.common.localpair import BIN, Pair, PowerSwitch, ha_config, wait_until
from remus.common.netns import Lan
from remus.common.stats import percentile

RESULTS = Path(__file__).parent / "results"
PROTECTED = re.compile(r"protecting epoch=(\d+) .*first_pause_ms=([\d.]+) first_hold_ms=([\d.]+) "
                       r"sync_s=([\d.]+)")


def one_run(image, lan: Lan, workdir: Path, rounds: int, dirty_rate: int) -> dict:
    extra, power_a = ha_config(lan, workdir)
    pair = Pair(image, workdir, lan=lan, extra_config=extra, precopy_rounds=rounds)
    switch = PowerSwitch(power_a, pair)
    try:
        pair.protect()
        pair.get(f"dirty?pages={dirty_rate}")
        pair.primary.kill9()
        switch.start()
        pair.backup.wait_for(r"failover-complete", 60)
        wait_until(lambda: pair.try_get("get"), 60, "the guest on host B")
        power_a.write_text("on")
        pair.start_primary()
        pair.primary.wait_for(r"backup-start", 30)
        mark = len(pair.backup.log())
        t0 = time.monotonic()
        r = subprocess.run([*lan.exec("backup"), str(BIN / "remusctl"), "reprotect",
                            "-c", str(pair.config)], capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - t0
        if r.returncode != 0:
            raise AssertionError(f"reprotect failed: {r.stdout}{r.stderr}")
        m = pair.backup.wait_for(PROTECTED.pattern, 30, start=mark)
        return {"precopy_rounds": rounds, "reprotect_s": seconds, "first_epoch": int(m.group(1)),
                "first_pause_ms": float(m.group(2)), "first_hold_ms": float(m.group(3)),
                "sync_s": float(m.group(4))}
    finally:
        switch.done.set()
        pair.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per mode")
    ap.add_argument("--dirty", type=int, default=2000, help="pages/s the guest dirties")
    args = ap.parse_args()
    image = build(Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus")))
    runs = []
    with Lan(second_link=True) as lan:
        for i in range(args.runs):
            for rounds in (0, 5):  # alternate, so that drift hits both modes alike
                workdir = Path(tempfile.mkdtemp(prefix="remus-reprotect-"))
                try:
                    runs.append(one_run(image, lan, workdir, rounds, args.dirty))
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                print(f"run {i + 1}: " + ", ".join(f"{k} {v:g}" for k, v in runs[-1].items()),
                      flush=True)
    print(f"\nRe-protecting a 128 MiB guest dirtying {args.dirty} pages/s "
          f"(median of {args.runs} runs each)")
    print("mode                 | reprotect s | sync s | first pause ms | first output hold ms")
    table = {}
    for rounds, name in ((0, "full copy in pause"), (5, "pre-copy (5 rounds)")):
        rows = [r for r in runs if r["precopy_rounds"] == rounds]
        med = {k: percentile([r[k] for r in rows], 0.5)
               for k in ("reprotect_s", "sync_s", "first_pause_ms", "first_hold_ms")}
        table[name] = med
        print(f"{name:20s} | {med['reprotect_s']:11.2f} | {med['sync_s']:6.2f} | "
              f"{med['first_pause_ms']:14.1f} | {med['first_hold_ms']:20.1f}")
    base, pre = table["full copy in pause"], table["pre-copy (5 rounds)"]
    print(f"\npre-copy / full copy: first pause {pre['first_pause_ms'] / base['first_pause_ms']:.2f}x, "
          f"first output hold {pre['first_hold_ms'] / base['first_hold_ms']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"reprotect-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(),
                                "dirty_pages_per_s": args.dirty, "runs": runs, "median": table},
                               indent=2))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
