"""Checkpoint cost for the 128 MiB demo guest: Remus against a naive full stop-and-copy.

Both run in the same invocation, on the same guest image, under the same load:
- remus: the real daemons (primary + backup on this machine), figures from the
  primary's --stats JSON lines;
- baseline: one QEMU, and per checkpoint `stop`, a full `migrate` to a pipe
  (RAM included), `cont`: what checkpointing costs without dirty tracking.
  Twice: with QEMU's default migration bandwidth limit (128 MiB/s, the naive
  way), and unthrottled (the best a full copy can do).

Scenarios: the guest idle, then dirtying memory at set rates (pages/s) with its
`/cgi-bin/dirty` service. Remus runs once per --pipelines value. Prints a table
(with the share of wall time the guest spent paused), where Remus's checkpoint
time goes (stop, capture and device save side by side, resume, then send and
ack), and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from remus.common.config import load
from remus.common.guest_image import build
from remus.common.localpair import Pair, wait_until
from remus.common.qemu import GuestPaths, QemuGuest
from remus.common.stats import percentile

RESULTS = Path(__file__).parent / "results"


def protect_with_stats(pair: Pair, stats: Path) -> None:
    """Both daemons up, the primary writing one JSON line per epoch to `stats`."""
    pair.start_backup()
    pair.start_primary("--stats", str(stats))
    pair.primary.wait_for(r"protecting epoch=\d+", 60)


def set_dirty_rate(port: int, pages_per_s: int) -> None:
    url = f"http://127.0.0.1:{port}/cgi-bin/dirty?pages={pages_per_s}"
    with urllib.request.urlopen(url, timeout=10) as r:
        r.read()


def epochs_under_load(port: int, stats: Path, rate: int, seconds: float) -> tuple[list[dict], float]:
    """Set the guest dirtying `rate` pages/s, then the incremental epochs of a
    `seconds` window from the primary's --stats file, and the window's length."""
    set_dirty_rate(port, rate)
    time.sleep(1.0)  # let the dirtier settle before the window opens
    t0 = time.time()
    time.sleep(seconds)
    t1 = time.time()
    rows = [json.loads(line) for line in stats.read_text().splitlines()]
    return [r for r in rows if not r["full"] and t0 <= r["taken_at"] < t1], t1 - t0


def p50(rows: list[dict], key: str) -> float | None:
    return percentile([r[key] for r in rows], 0.5) if rows and key in rows[0] else None


def summarise(name: str, scenario: str, rows: list[dict], seconds: float) -> dict:
    pauses = [r["pause_ms"] for r in rows]
    return {
        "mode": name, "scenario": scenario, "checkpoints": len(rows),
        "checkpoints_per_s": len(rows) / seconds if seconds else 0.0,
        "pause_p50_ms": percentile(pauses, 0.5), "pause_p99_ms": percentile(pauses, 0.99),
        # The share of wall time the guest spent stopped.
        "pause_share": sum(pauses) / 1000 / seconds if seconds else 0.0,
        "breakdown_p50_ms": {k: p50(rows, k + "_ms") for k in BREAKDOWN if p50(rows, k + "_ms") is not None},
        # The baseline has no dirty tracking: it copies all of RAM every time.
        "dirty_pages_p50": percentile([r["dirty_pages"] for r in rows], 0.5) if rows and "dirty_pages" in rows[0] else None,
        "wire_bytes_p50": percentile([r["wire_bytes"] for r in rows], 0.5),
        "wire_bytes_p99": percentile([r["wire_bytes"] for r in rows], 0.99),
    }


# Where a checkpoint's time goes (the primary's --stats): inside the pause, stop, then
# capture and device save side by side, then preresume + cont; after it, the send and
# the wait for the ack.
BREAKDOWN = ("stop", "capture", "device", "resume", "send", "ack")


def run_remus(image, scenarios: list[int], seconds: float, interval: int,
              pipeline: int = 1) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix="remus-bench-"))
    pair = Pair(image, workdir, interval_ms=interval, pipeline=pipeline)
    name = "remus" if pipeline == 1 else f"remus pipeline={pipeline}"
    stats = workdir / "epochs.jsonl"
    out = []
    try:
        protect_with_stats(pair, stats)
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        for rate in scenarios:
            rows, window = epochs_under_load(pair.http_port, stats, rate, seconds)
            out.append(summarise(name, scenario_name(rate), rows, window))
        set_dirty_rate(pair.http_port, 0)
    finally:
        pair.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


QEMU_DEFAULT_MAX_BANDWIDTH = 128 << 20


async def _baseline(image, scenarios: list[int], seconds: float, interval: int,
                    name: str, max_bandwidth: int) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix="remus-bench-base-"))
    # Reuse the pair's config writer for an identical guest.
    pair = Pair(image, workdir, interval_ms=interval)
    cfg = load(pair.config)
    ram = pair.ram_dir / "baseline.ram"
    guest = QemuGuest(cfg, GuestPaths(run_dir=workdir / "run", ram_file=ram))
    out = []
    try:
        await guest.launch()
        # The naive way: every checkpoint is a complete migration, RAM included.
        await guest.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": False}]})
        await guest.execute("migrate-set-parameters", {"max-bandwidth": max_bandwidth})
        await asyncio.to_thread(wait_until, lambda: pair.try_get("get"), 120, "the guest's service")
        for rate in scenarios:
            await asyncio.to_thread(set_dirty_rate, pair.http_port, rate)
            await asyncio.sleep(1.0)
            rows = []
            t0 = time.time()
            next_at = time.monotonic()
            while time.time() - t0 < seconds:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at = time.monotonic() + interval / 1000
                p0 = time.monotonic()
                await guest.stop()
                state = await guest.save_device_state()
                await guest.cont()
                rows.append({"pause_ms": (time.monotonic() - p0) * 1000, "wire_bytes": len(state)})
            out.append(summarise(name, scenario_name(rate), rows, time.time() - t0))
        await asyncio.to_thread(set_dirty_rate, pair.http_port, 0)
    finally:
        await guest.quit()
        pair.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def scenario_name(rate: int) -> str:
    return "idle" if rate == 0 else f"dirty {rate} pages/s"


def print_table(rows: list[dict]) -> None:
    cols = [("mode", "mode", "{}"), ("scenario", "scenario", "{}"), ("cp/s", "checkpoints_per_s", "{:.1f}"),
            ("pause p50 ms", "pause_p50_ms", "{:.1f}"), ("pause p99 ms", "pause_p99_ms", "{:.1f}"),
            ("paused", "pause_share", "{:.0%}"),
            ("dirty p50", "dirty_pages_p50", "{:.0f}"), ("wire p50 KiB", "wire_bytes_p50", "{:.0f}"),
            ("wire p99 KiB", "wire_bytes_p99", "{:.0f}")]
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append(["-" if r[k] is None else fmt.format(r[k] / 1024 if "wire" in k else r[k])
                      for _, k, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for n, row in enumerate(cells):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("-|-".join("-" * w for w in widths))


def print_breakdown(rows: list[dict]) -> None:
    """Where Remus's checkpoint time goes, p50 ms; `other` is the pause beyond stop,
    max(capture, device) and resume (hooks, the loop's own work)."""
    print("\nCheckpoint breakdown, p50 ms (pause = stop + max(capture, device) + resume + other)")
    print("mode                 | scenario           | " + " | ".join(f"{k:>7s}" for k in BREAKDOWN)
          + " |   other")
    for r in rows:
        b = r.get("breakdown_p50_ms") or {}
        if not b:
            continue
        other = r["pause_p50_ms"] - b["stop"] - max(b["capture"], b["device"]) - b["resume"]
        print(f"{r['mode']:20s} | {r['scenario']:18s} | "
              + " | ".join(f"{b[k]:7.1f}" for k in BREAKDOWN) + f" | {other:7.1f}")


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["mode"], r["scenario"]): r for r in rows}
    out = []
    for (mode, scenario), r in by.items():
        for base_mode in ("baseline", "baseline-unthrottled"):
            base = by.get((base_mode, scenario))
            if mode.startswith("remus") and base and r["pause_p50_ms"]:
                out.append({"scenario": scenario, "mode": mode, "against": base_mode,
                            "pause_p50_ratio": base["pause_p50_ms"] / r["pause_p50_ms"],
                            "wire_p50_ratio": base["wire_bytes_p50"] / max(r["wire_bytes_p50"], 1)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10, help="measuring window per scenario")
    ap.add_argument("--interval", type=int, default=200, help="checkpoint interval in ms")
    ap.add_argument("--rates", default="0,1000,5000", help="dirty rates in pages/s (0 = idle)")
    ap.add_argument("--pipelines", default="1,2",
                    help="[replication] pipeline values to run Remus with, side by side")
    args = ap.parse_args()
    scenarios = [int(x) for x in args.rates.split(",")]
    image = build(Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus")))
    rows = [row for pipeline in sorted({int(x) for x in args.pipelines.split(",")})
            for row in run_remus(image, scenarios, args.seconds, args.interval, pipeline)]
    rows += asyncio.run(_baseline(image, scenarios, args.seconds, args.interval,
                                  "baseline", QEMU_DEFAULT_MAX_BANDWIDTH))
    rows += asyncio.run(_baseline(image, scenarios, args.seconds, args.interval,
                                  "baseline-unthrottled", 1 << 40))
    rows.sort(key=lambda r: (scenarios.index(next(s for s in scenarios if scenario_name(s) == r["scenario"])), r["mode"]))
    print_table(rows)
    print_breakdown(rows)
    rel = ratios(rows)
    print()
    for r in rel:
        print(f"{r['scenario']}: {r['against']} pause / {r['mode']} pause = {r['pause_p50_ratio']:.1f}x, "
              f"wire = {r['wire_p50_ratio']:.0f}x")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"checkpoint-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(),
                                "interval_ms": args.interval, "seconds": args.seconds,
                                "rows": rows, "ratios": rel}, indent=2))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
