"""Guest disk write throughput and synced-write latency, replicated against unprotected.

Namespaces as hosts, the demo guest with a 64 MiB disk. Side by side in one run:
- replicated: primary + backup, every guest write mirrored to the primary
  daemon before it completes, carried in checkpoints;
- unprotected: the same primary daemon and guest with no backup (no session,
  so no mirror job and no checkpoints).
Both with --no-net, so held output does not inflate the HTTP round trips; the
times are measured inside the guest (/cgi-bin/diskbench). Prints a table and
writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from remus.common.guest_image import build
from remus.common.localpair import Pair, wait_until
from remus.common.netns import Lan
from remus.common.stats import percentile

RESULTS = Path(__file__).parent / "results"


def measure(pair: Pair, mib: int, syncs: int, rounds: int) -> dict:
    rows = []
    for _ in range(rounds):
        text = pair.get(f"diskbench?mib={mib}&syncs={syncs}", timeout=300)
        fields = dict(kv.split("=") for kv in text.split())
        rows.append({"write_ms": int(fields["write_ms"]), "sync_ms": int(fields["sync_ms"])})
    write_ms = percentile([r["write_ms"] for r in rows], 0.5)
    sync_ms = percentile([r["sync_ms"] for r in rows], 0.5)
    return {"mib_s": mib / (write_ms / 1000) if write_ms else 0.0,
            "sync_write_ms": sync_ms / syncs, "rounds": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--syncs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    image = build(Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus")))
    results = {}
    with Lan() as lan:
        for mode in ("replicated", "unprotected"):
            workdir = Path(tempfile.mkdtemp(prefix="remus-diskbench-"))
            pair = Pair(image, workdir, lan=lan, disk_mib=64)
            try:
                if mode == "replicated":
                    pair.start_backup()
                pair.start_primary("--no-net")
                if mode == "replicated":
                    pair.primary.wait_for(r"disk-synced", 120)
                wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
                results[mode] = measure(pair, args.mib, args.syncs, args.rounds)
            finally:
                pair.cleanup()
                shutil.rmtree(workdir, ignore_errors=True)
    r, u = results["replicated"], results["unprotected"]
    print("mode        | write MiB/s | synced 512-byte write ms")
    for mode, x in results.items():
        print(f"{mode:11s} | {x['mib_s']:11.1f} | {x['sync_write_ms']:8.2f}")
    print(f"\nreplicated / unprotected: throughput {r['mib_s'] / u['mib_s']:.2f}x, "
          f"synced-write latency {r['sync_write_ms'] / u['sync_write_ms']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"disk-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "mib": args.mib,
                                "syncs": args.syncs, "results": results}, indent=2))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
