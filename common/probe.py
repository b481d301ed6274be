"""A client probe: increments the demo guest's counter as fast as it can and records
every reply, one JSON line each, so a failover can be judged from the client's side.

    python -m remus.common.probe URL [--seconds S]

Lines: {"t": <unix time reply seen>, "v": <counter>} or {"t": ..., "err": "..."}.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.error
import urllib.request


def read_replies(text: str) -> list[tuple[float, int]]:
    """(time seen, counter value) for every reply in a probe's output."""
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [(r["t"], r["v"]) for r in rows if "v" in r]


def taken_back(values: list[int]) -> list[int]:
    """Replies not above every earlier one: state a failover took back from the client."""
    out, highest = [], None
    for v in values:
        if highest is not None and v <= highest:
            out.append(v)
        highest = v if highest is None else max(highest, v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--seconds", type=float, default=3600)
    ap.add_argument("--timeout", type=float, default=2.0, help="per request")
    args = ap.parse_args()
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_term)
    end = time.monotonic() + args.seconds
    while not stop and time.monotonic() < end:
        try:
            with urllib.request.urlopen(args.url, timeout=args.timeout) as r:
                body = r.read().decode().strip()
            line = {"t": time.time(), "v": int(body)}
        except (OSError, urllib.error.URLError, ValueError) as exc:
            line = {"t": time.time(), "err": type(exc).__name__}
            time.sleep(0.02)
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
