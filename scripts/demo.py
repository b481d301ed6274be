"""The whole story on one machine: protect the demo guest, kill its primary, watch the backup
resume it from the last committed checkpoint."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from remus.common.guest_image import build
from remus.common.localpair import Pair, wait_until
from remus.common.stats import percentile


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--interval", type=int, default=200, help="checkpoint interval in ms")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    cache = Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus"))
    image = build(cache)
    workdir = Path(tempfile.mkdtemp(prefix="remus-demo-"))
    pair = Pair(image, workdir, interval_ms=args.interval)
    try:
        say(f"Starting remus-backup and remus-primary (checkpoint every {args.interval} ms)")
        print(f"   config: {pair.config}\n   logs:   {workdir}")
        stats = workdir / "epochs.jsonl"
        pair.start_backup()
        pair.start_primary("--stats", str(stats))
        pair.primary.wait_for(r"protecting epoch=1", 60)
        print("   initial full sync committed; the guest is booting under protection")
        wait_until(lambda: pair.try_get("get"), 120, "the guest's counter service")

        say("A client increments the guest's RAM-only counter")
        values = [int(pair.get("inc")) for _ in range(5)]
        print(f"   replies: {values}")
        t = time.time()
        wait_until(lambda: pair.replica_record().get("taken_at", 0) > t, 30,
                   "a checkpoint after the last reply")
        time.sleep(2)  # let a couple of seconds of checkpoints flow for the figures

        epochs = [json.loads(line) for line in stats.read_text().splitlines()]
        incr = [e for e in epochs if not e["full"]]
        pauses = [e["pause_ms"] for e in incr]
        wire = [e["wire_bytes"] for e in incr]
        say("Checkpoints flowing")
        print(f"   {len(epochs)} checkpoints committed; pause p50 {percentile(pauses, .5):.1f} ms, "
              f"p99 {percentile(pauses, .99):.1f} ms; wire p50 {percentile(wire, .5) / 1024:.0f} KiB")
        record = pair.replica_record()
        print(f"   backup replica: {record['state']} at epoch {record['epoch']}")

        say("kill -9 the primary daemon and its QEMU (host loss)")
        killed_at = time.monotonic()
        pair.primary.kill9()
        m = pair.backup.wait_for(r"activated epoch=(\d+).*detect_to_resume_ms=([\d.]+)", 60)
        print(f"   backup activated epoch {m.group(1)} ({float(m.group(2)):.0f} ms from detection "
              f"to running guest)")
        after = int(wait_until(lambda: pair.try_get("inc"), 60, "the activated guest"))
        print(f"   first reply from the activated guest: {after} after "
              f"{(time.monotonic() - killed_at) * 1000:.0f} ms of downtime")

        say("What happened")
        ok = after == values[-1] + 1
        print(f"   last reply before the failure: {values[-1]}; first after: {after}: "
              + ("the counter continued exactly where the committed checkpoint left it."
                 if ok else "UNEXPECTED: the state did not continue from the last checkpoint."))
        return 0 if ok else 1
    finally:
        for d in pair.daemons:
            if d.proc.poll() is None:
                d.signal(signal.SIGTERM)
        pair.cleanup()
        if args.keep:
            print(f"   logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
