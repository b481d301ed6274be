"""What output commit costs the guest's network, measured from a client host.

Namespaces as hosts (client, primary, backup), the demo guest bridged. Side by
side in one run:
- latency: sequential `GET /cgi-bin/inc` round trips with the output buffer
  (held until the backup acknowledges) against the same primary with --no-net
  (frames relayed at once), at several checkpoint intervals; expected added
  latency is about half the interval plus the ack round trip;
- throughput: a bulk download from the guest (`/cgi-bin/blob`) through the
  buffer, through the relay without holding, and through a direct TAP (the
  guest after activation on the backup, where no daemon relays frames).
Prints a table and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from remus.common.guest_image import build
from remus.common.localpair import Pair, wait_until
from remus.common.netns import Lan
from remus.common.stats import percentile

RESULTS = Path(__file__).parent / "results"

LATENCY_CLIENT = """
import sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    t0 = time.perf_counter()
    urllib.request.urlopen(url, timeout=10).read()
    print((time.perf_counter() - t0) * 1000)
"""


def latencies(pair: Pair, n: int) -> list[float]:
    r = subprocess.run([*pair.lan.exec("client"), "python3", "-c", LATENCY_CLIENT, pair.url("inc"), str(n)],
                       capture_output=True, text=True, timeout=600, check=True)
    return [float(x) for x in r.stdout.split()]


def rx_packets(lan: Lan) -> int:
    r = subprocess.run([*lan.exec("client"), "cat", "/sys/class/net/eth0/statistics/rx_packets"],
                       capture_output=True, text=True, check=True)
    return int(r.stdout)


def download(pair: Pair, mib: int) -> dict:
    p0 = rx_packets(pair.lan)
    t0 = time.perf_counter()
    r = subprocess.run([*pair.lan.exec("client"), "curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}",
                        f"http://{pair.lan.addr['guest']}/cgi-bin/blob?mib={mib}"],
                       capture_output=True, text=True, timeout=600, check=True)
    seconds = time.perf_counter() - t0
    frames = rx_packets(pair.lan) - p0
    size = int(r.stdout)
    return {"bytes": size, "seconds": seconds, "mbit_s": size * 8 / seconds / 1e6,
            "frames_s": frames / seconds}


def protected(image, lan: Lan, interval: int, *primary_args: str) -> tuple[Pair, Path]:
    workdir = Path(tempfile.mkdtemp(prefix="remus-netbench-"))
    pair = Pair(image, workdir, lan=lan, interval_ms=interval)
    pair.start_backup()
    pair.start_primary(*primary_args)
    pair.primary.wait_for(r"protecting epoch=\d+", 60)
    wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
    return pair, workdir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--intervals", default="25,50,100,200")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--mib", type=int, default=16, help="download size for throughput")
    args = ap.parse_args()
    image = build(Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus")))
    rows, through = [], []
    with Lan() as lan:
        for interval in [int(x) for x in args.intervals.split(",")]:
            for mode, extra in (("buffered", ()), ("no-net", ("--no-net",))):
                pair, workdir = protected(image, lan, interval, *extra)
                try:
                    lat = latencies(pair, args.requests)
                    row = {"interval_ms": interval, "mode": mode, "p50_ms": percentile(lat, .5),
                           "p90_ms": percentile(lat, .9), "requests": len(lat)}
                    if interval == 200:
                        through.append({"path": f"{mode} (userspace relay)", **download(pair, args.mib)})
                    if interval == 200 and mode == "buffered":
                        pair.primary.kill9()  # the activated guest: a direct TAP, no relay
                        pair.backup.wait_for(r"activated epoch=", 60)
                        wait_until(lambda: pair.try_get("get"), 60, "the activated guest")
                        through.append({"path": "direct TAP (activated, unprotected)",
                                        **download(pair, args.mib)})
                finally:
                    pair.cleanup()
                    shutil.rmtree(workdir, ignore_errors=True)
                rows.append(row)
    print("Request latency (client -> guest /cgi-bin/inc -> client)")
    print("interval ms | buffered p50 | no-net p50 | added p50 | buffered p90 | no-net p90")
    by = {(r["interval_ms"], r["mode"]): r for r in rows}
    added = []
    for interval in sorted({r["interval_ms"] for r in rows}):
        b, n = by[(interval, "buffered")], by[(interval, "no-net")]
        added.append({"interval_ms": interval, "added_p50_ms": b["p50_ms"] - n["p50_ms"]})
        print(f"{interval:11d} | {b['p50_ms']:12.1f} | {n['p50_ms']:10.1f} | {b['p50_ms'] - n['p50_ms']:9.1f} | "
              f"{b['p90_ms']:12.1f} | {n['p90_ms']:10.1f}")
    print("\nGuest output throughput (bulk download to the client)")
    print("path                                 | Mbit/s | frames/s")
    for t in through:
        print(f"{t['path']:36s} | {t['mbit_s']:6.1f} | {t['frames_s']:8.0f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"net-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "latency": rows,
                                "added": added, "throughput": through}, indent=2))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
