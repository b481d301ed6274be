"""What TLS costs on the checkpoint stream: the same pair over TLS and over plain TCP.

Both run in the same invocation, one after the other, on the same guest image
(128 MiB), with the real daemons on this machine and figures from the primary's
--stats JSON lines. Page compression is off so the stream carries every byte of
the pages (with zstd the mostly empty RAM of the demo guest shrinks to almost
nothing and the channel would not be measured):
- the initial full sync: guest RAM bytes / (send + ack time), and wire bytes/s;
- per scenario (idle, then the guest dirtying memory): checkpoint pause p50/p99,
  checkpoints per second, wire bytes/s, send and ack time p50.
Prints a table and writes JSON to bench/results/tls.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from checkpoint_bench import (epochs_under_load, protect_with_stats, scenario_name,  # same folder
                              set_dirty_rate)

from remus.common.guest_image import build
from remus.common.localpair import Pair, wait_until
from remus.common.stats import percentile

RESULTS = Path(__file__).parent / "results"
MIB = 1 << 20


def run_mode(image, insecure: bool, rates: list[int], seconds: float, interval: int) -> list[dict]:
    mode = "insecure" if insecure else "tls"
    workdir = Path(tempfile.mkdtemp(prefix=f"remus-bench-{mode}-"))
    # Without pre-copy the initial sync is one checkpoint: a clean measure of the channel.
    pair = Pair(image, workdir, insecure=insecure, interval_ms=interval, compression="none",
                precopy_rounds=0)
    stats = workdir / "epochs.jsonl"
    out = []
    try:
        protect_with_stats(pair, stats)
        assert f"stream={mode}" in pair.primary.log(), pair.primary.tail()
        rows = [json.loads(line) for line in stats.read_text().splitlines()]
        full = next(r for r in rows if r["full"])
        sync_s = (full["send_ms"] + full["ack_ms"]) / 1000
        out.append({"mode": mode, "scenario": "full sync", "sync_s": sync_s,
                    "ram_mib_per_s": (128 * MIB / sync_s) / MIB,
                    "wire_mib_per_s": full["wire_bytes"] / sync_s / MIB,
                    "wire_mib": full["wire_bytes"] / MIB})
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        for rate in rates:
            rows, window = epochs_under_load(pair.http_port, stats, rate, seconds)
            pauses = [r["pause_ms"] for r in rows]
            out.append({"mode": mode, "scenario": scenario_name(rate), "checkpoints": len(rows),
                        "checkpoints_per_s": len(rows) / window,
                        "pause_p50_ms": percentile(pauses, 0.5),
                        "pause_p99_ms": percentile(pauses, 0.99),
                        "wire_mib_per_s": sum(r["wire_bytes"] for r in rows) / window / MIB,
                        "send_p50_ms": percentile([r["send_ms"] for r in rows], 0.5),
                        "ack_p50_ms": percentile([r["ack_ms"] for r in rows], 0.5)})
        set_dirty_rate(pair.http_port, 0)
    finally:
        pair.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def print_table(rows: list[dict]) -> None:
    cols = [("scenario", "scenario", "{}"), ("mode", "mode", "{}"),
            ("cp/s", "checkpoints_per_s", "{:.1f}"),
            ("pause p50 ms", "pause_p50_ms", "{:.1f}"), ("pause p99 ms", "pause_p99_ms", "{:.1f}"),
            ("send p50 ms", "send_p50_ms", "{:.1f}"), ("ack p50 ms", "ack_p50_ms", "{:.1f}"),
            ("wire MiB/s", "wire_mib_per_s", "{:.1f}"), ("sync s", "sync_s", "{:.2f}"),
            ("sync RAM MiB/s", "ram_mib_per_s", "{:.0f}")]
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for n, row in enumerate(cells):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("-|-".join("-" * w for w in widths))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8, help="measuring window per scenario")
    ap.add_argument("--interval", type=int, default=100, help="checkpoint interval in ms")
    ap.add_argument("--rates", default="0,2000,8000",
                    help="dirty rates in pages/s (0 = idle; the guest allows up to about 1/8 of its RAM)")
    args = ap.parse_args()
    rates = [int(x) for x in args.rates.split(",")]
    image = build(Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus")))
    rows = run_mode(image, False, rates, args.seconds, args.interval)
    rows += run_mode(image, True, rates, args.seconds, args.interval)
    order = ["full sync"] + [scenario_name(r) for r in rates]
    rows.sort(key=lambda r: (order.index(r["scenario"]), r["mode"] != "tls"))
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "tls.json"
    path.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(),
                                "interval_ms": args.interval, "seconds": args.seconds,
                                "compression": "none", "rows": rows}, indent=2))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
