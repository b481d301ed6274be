"""The whole story on one machine: network namespaces as hosts (a client, a primary and
a backup on one switch, plus a second heartbeat wire), the demo guest protected with
output commit, heartbeat and fencing (fence_dummy behind a test power switch), a client
load, a failover drill, re-protection with the first host as the new backup, and the
report."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from remus.common.guest_image import build
from remus.common.localpair import Pair, PowerSwitch, ha_config, wait_until
from remus.common.netns import Lan

REMUSCTL = str(Path(sys.executable).parent / "remusctl")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def remusctl(*args: str) -> int:
    return subprocess.run([REMUSCTL, *args]).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--interval", type=int, default=200, help="checkpoint interval in ms")
    ap.add_argument("--phase", default="c", help="drill phase: s s2 r r2 c c2 (default c: "
                    "the backup has the checkpoint, the primary dies before releasing output)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    cache = Path(os.environ.get("REMUS_CACHE", Path.home() / ".cache" / "remus"))
    image = build(cache)
    workdir = Path(tempfile.mkdtemp(prefix="remus-demo-"))
    with Lan(second_link=True) as lan:
        extra, power = ha_config(lan, workdir)
        pair = Pair(image, workdir, lan=lan, extra_config=extra, interval_ms=args.interval)
        switch = PowerSwitch(power, pair)
        try:
            say("Hosts: network namespaces " + ", ".join(lan.ns[r] for r in ("client", "primary", "backup")))
            print(f"   guest {lan.addr['guest']} (bridged, output held until the backup has the checkpoint)")
            print(f"   checkpoint stream over TLS (mutual certificates), heartbeat on two wires, "
                  f"fencing with fence_dummy; config {pair.config}")
            pair.start_backup()
            pair.start_primary()
            pair.primary.wait_for(r"protecting epoch=\d+", 60)
            print("   initial full sync committed; the guest is booting under protection")
            wait_until(lambda: pair.try_get("get"), 120, "the guest's counter service")
            switch.start()

            say("A client increments the guest's RAM-only counter")
            print(f"   replies: {[int(pair.get('inc')) for _ in range(5)]}")

            say("remusctl status")
            remusctl("status", "--config", str(pair.config))

            say(f"remusctl drill --die-at {args.phase}: the primary host dies mid-checkpoint")
            rc = remusctl("drill", "--config", str(pair.config), "--die-at", args.phase, "--yes",
                          "--probe-url", pair.url("inc"), "--probe-netns", lan.ns["client"])
            print(f"   the test power switch {'cut' if switch.cut_at else 'did not cut'} the primary host; "
                  f"fence_dummy says {power.read_text()!r}")

            say("remusctl status, after the failover")
            remusctl("status", "--config", str(pair.config), "--role", "backup")

            say("The first host comes back and stands by; remusctl reprotect on the second")
            power.write_text("on")
            pair.start_primary()
            pair.primary.wait_for(r"backup-start", 30)
            print("   host A's daemon found host B running the guest: it waits as its backup")
            reprotected = subprocess.run([*lan.exec("backup"), REMUSCTL, "reprotect", "--config",
                                          str(pair.config)]).returncode
            print(f"   replies: {[int(pair.get('inc')) for _ in range(3)]}")
            remusctl("status", "--config", str(pair.config))

            say("What happened")
            print("   no reply the client saw was taken back" if rc == 0 else
                  "   UNEXPECTED: the drill reports replies taken back")
            print("   the guest is protected again, host B primary, host A its backup"
                  if reprotected == 0 else "   UNEXPECTED: re-protection failed")
            return rc or reprotected
        finally:
            switch.done.set()
            pair.cleanup()
            if args.keep:
                print(f"   logs kept in {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
