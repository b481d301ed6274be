"""The initial sync at the sizes operators run: does it finish in one session, how
long does it take, and how much memory do the daemons use meanwhile?

Namespace hosts, TLS, the demo guest. Each run starts a fresh pair and times the
primary from its start to `protecting` (the first consistent checkpoint
committed), counts its sessions (1 = the sync never restarted), and samples the
anonymous memory of each host's daemon processes (QEMU aside) throughout.

Two tables, each run side by side in one invocation:
- RAM: guests of --ram MiB with a --disk-mib sparse disk, --runs times each;
- disk: one guest with 20 GiB and 2 GiB sparse disks holding --allocated MiB of
  data: sync time should follow the allocated data, not the disk's size.
Prints the tables and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

from remus.common.guest_image import build
from remus.common.localpair import MemoryWatch, Pair
from remus.common.netns import Lan

RESULTS = Path(__file__).parent / "results"
MiB = 1 << 20


def fill(path: Path, allocated_mib: int, seed: int) -> None:
    """`allocated_mib` of random data in 8 MiB pieces spread over the disk."""
    rng = random.Random(seed)
    size = path.stat().st_size
    pieces = max(1, allocated_mib // 8)
    with open(path, "r+b") as f:
        for k in range(pieces):
            f.seek((k * (size // pieces) + MiB) // MiB * MiB)
            f.write(rng.randbytes(8 * MiB))


def one_run(image, lan: Lan, ram_mib: int, disk_mib: int, allocated_mib: int, seed: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="remus-sync-"))
    pair = Pair(image, workdir, lan=lan, disk_mib=disk_mib, memory_mib=ram_mib)
    watch = None
    try:
        fill(pair.disk, allocated_mib, seed)
        pair.start_backup()
        t0 = time.monotonic()
        pair.start_primary()
        watch = MemoryWatch({"primary": pair.primary, "backup": pair.backup})
        watch.start()
        pair.primary.wait_for(r"protecting epoch=\d+", 900)
        seconds = time.monotonic() - t0
        peaks = watch.stop()
        log = pair.primary.log()
        return {"ram_mib": ram_mib, "disk_mib": disk_mib, "allocated_mib": allocated_mib,
                "protecting_s": round(seconds, 2), "sessions": log.count("session-start"),
                "primary_anon_mib": max((v for k, v in peaks.items() if k.startswith("primary")),
                                        default=0) >> 20,
                "backup_anon_mib": max((v for k, v in peaks.items() if k.startswith("backup")),
                                       default=0) >> 20}
    finally:
        if watch is not None:
            watch.stop()
        pair.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def table(title: str, rows: list[dict], keys: list[str]) -> str:
    lines = [title, " | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(str(r[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per RAM size")
    ap.add_argument("--ram", type=int, nargs="+", default=[2048, 4096], help="guest RAM sizes, MiB")
    ap.add_argument("--disk-mib", type=int, default=1024, help="disk size for the RAM table")
    ap.add_argument("--allocated", type=int, nargs="+", default=[128, 512],
                    help="MiB of data on the disks of the disk table")
    args = ap.parse_args()
    image = build(Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus")))
    ram_rows, disk_rows = [], []
    with Lan() as lan:
        for i in range(args.runs):
            for ram in args.ram:  # alternate, so that drift hits every size alike
                ram_rows.append(one_run(image, lan, ram, args.disk_mib, 64, i))
                print("ram run:", ram_rows[-1], flush=True)
        for allocated in args.allocated:
            for disk in (2048, 20480):
                disk_rows.append(one_run(image, lan, 128, disk, allocated, 7))
                print("disk run:", disk_rows[-1], flush=True)
    keys = ["ram_mib", "disk_mib", "allocated_mib", "protecting_s", "sessions",
            "primary_anon_mib", "backup_anon_mib"]
    print()
    print(table("Initial sync by guest RAM (one row per run)", ram_rows, keys))
    print()
    print(table("Initial sync by disk size and allocated data", disk_rows, keys))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"sync-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(),
                               "ram_runs": ram_rows, "disk_runs": disk_rows}, indent=1))
    print(f"\nresults: {out}")
    return 0 if all(r["sessions"] == 1 for r in ram_rows + disk_rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
