"""How long the backup's Replica takes to commit one checkpoint, by dirty pages.

Unit level, no VM: a Replica in a scratch directory (on a real file system,
not tmpfs: --dir) with a RAM file of --ram-mib and one disk of --disk-mib.
After a first full checkpoint and a sync(), each round commits a checkpoint of
K scattered dirty pages (plus --disk-kib of disk data staged with it) and a
device state of 300 KB, the way the receiver does (Replica.commit with the
staged data). Prints the median and p90 commit time per K and writes JSON
to bench/results/ (--no-save: print only).

Run it against another tree (e.g. an older commit unpacked with `git archive`)
with PYTHONPATH pointing at that tree's package links to compare.
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

import numpy as np

from remus.backup.replica import Replica
from remus.backup.staging import StagedData
from remus.common.capture import PAGE_SIZE
from remus.common.protocol import DISK_EXTENT

RESULTS = Path(__file__).parent / "results"
FP = "b" * 32


def setup(directory: Path, ram: int, disk: int) -> tuple[Replica, float, float]:
    """The replica after its first full checkpoint (streamed in 1 MiB frames, as the
    receiver does while syncing): it, the ms to apply the pages, the ms to commit."""
    r = Replica(directory)
    r.begin_session("bench", FP, ram, PAGE_SIZE, [disk])
    npages = ram // PAGE_SIZE
    chunk = 256
    frame = np.full((chunk, PAGE_SIZE), 1, np.uint8)  # non-zero, so the file is allocated
    t0 = time.perf_counter()
    for start in range(0, npages, chunk):
        idx = np.arange(start, min(start + chunk, npages), dtype=np.uint32)
        r.apply_pages(idx, frame[:len(idx)])
    t1 = time.perf_counter()
    r.commit_streamed(1, True, time.time(), os.urandom(300_000), True)
    t2 = time.perf_counter()
    os.sync()
    return r, (t1 - t0) * 1000, (t2 - t1) * 1000


def one_commit(r: Replica, epoch: int, dirty: int, disk_bytes: int, rng) -> float:
    npages = r.pages.shape[0]
    indices = np.sort(rng.choice(npages, size=dirty, replace=False)).astype(np.uint32)
    pages = np.full((dirty, PAGE_SIZE), epoch & 0xFF, np.uint8)
    staged = StagedData(r.dir)
    if disk_bytes:
        offset = int(rng.integers(0, r.state.disk_sizes[0] - disk_bytes)) & ~4095
        staged.add_disk(0, np.array([(offset, disk_bytes)], DISK_EXTENT), os.urandom(disk_bytes))
    device = os.urandom(300_000)
    t0 = time.perf_counter()
    r.commit(epoch, False, time.time(), indices, pages, device, staged=staged)
    elapsed = time.perf_counter() - t0
    staged.discard()
    return elapsed * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                    help="where the scratch replica goes (a real file system)")
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--disk-kib", type=int, default=64, help="disk data per checkpoint")
    ap.add_argument("--dirty", default="1,100,1000,10000", help="dirty pages per checkpoint")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--label", default="")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="remus-commitbench-", dir=args.dir))
    rng = np.random.default_rng(1)
    out = {}
    try:
        r, apply_ms, commit_ms = setup(work / "replica", args.ram_mib << 20, args.disk_mib << 20)
        out["full"] = {"apply_ms": apply_ms, "commit_ms": commit_ms}
        print(f"{args.label:>8} first full checkpoint of {args.ram_mib} MiB: pages applied in "
              f"{apply_ms:.0f} ms, committed in {commit_ms:.0f} ms")
        epoch = 1
        for dirty in (int(k) for k in args.dirty.split(",")):
            times = []
            for _ in range(args.rounds):
                epoch += 1
                times.append(one_commit(r, epoch, dirty, args.disk_kib << 10, rng))
            times.sort()
            out[dirty] = {"p50_ms": times[len(times) // 2],
                          "p90_ms": times[int(len(times) * 0.9)], "rounds": len(times)}
            print(f"{args.label:>8} dirty={dirty:>6} pages  commit p50 {out[dirty]['p50_ms']:7.2f} ms"
                  f"  p90 {out[dirty]['p90_ms']:7.2f} ms")
        r.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / time.strftime("replica-commit-%Y%m%d-%H%M%S.json")
        path.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(),
                                    "label": args.label, "ram_mib": args.ram_mib,
                                    "disk_mib": args.disk_mib, "disk_kib": args.disk_kib,
                                    "results": out}, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
