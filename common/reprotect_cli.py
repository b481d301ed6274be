"""`remusctl reprotect`: after a failover, make the host that runs the guest its primary
and the other host its backup, without stopping the guest."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from remus.common.config import load
from remus.common.control import SOCKET_NAME, query, request
from remus.common.status import RoleName


def add_parser(sub) -> None:
    p = sub.add_parser(
        "reprotect", help="protect a taken-over guest again, the other host as its backup",
        description="Run on the host that took the guest over. The other host must be up "
                    "and standing by (its remus-primary or remus-backup service started: it "
                    "sees that this host holds the guest and waits as its backup). This host "
                    "then copies the guest's memory and disk to it while the guest keeps "
                    "running (pre-copy), takes the first checkpoint, and protects the guest "
                    "as usual; the next failover goes the other way.")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the guest's config")
    p.add_argument("--no-wait", action="store_true",
                   help="return once the request is accepted, not when the guest is protected")
    p.add_argument("--timeout", type=float, default=900, metavar="S",
                   help="give up waiting for protection after S seconds (default 900)")
    p.set_defaults(func=run)


def _active_daemon(cfg) -> Path | None:
    for name in ("primary", "backup"):
        state_dir = Path(getattr(cfg, name).state_dir)
        if not (state_dir / SOCKET_NAME).exists():
            continue
        try:
            if query(state_dir).get("role") == RoleName.ACTIVE.value:
                return state_dir
        except (OSError, ValueError, RuntimeError):
            continue
    return None


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    state_dir = _active_daemon(cfg)
    if state_dir is None:
        print("remusctl reprotect: no daemon on this host runs the guest after a failover "
              "(`remusctl status` shows what runs here)", file=sys.stderr)
        return 1
    try:
        reply = request(state_dir, "reprotect")
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"remusctl reprotect: refused: {exc}", file=sys.stderr)
        return 1
    print(f"re-protecting: this host becomes the primary, {reply['backup']} its backup")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    shown = ""
    while time.monotonic() < deadline:
        try:
            s = query(state_dir)
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"remusctl reprotect: the daemon stopped answering: {exc}", file=sys.stderr)
            return 1
        state = f"{s.get('role')} {s.get('state')}"
        if state != shown:
            print(f"  {state}", flush=True)
            shown = state
        if s.get("role") == RoleName.PRIMARY.value and s.get("state") == "protecting":
            print(f"protected again at generation {s['generation']}")
            return 0
        time.sleep(0.5)
    print(f"remusctl reprotect: not protected after {args.timeout:g} s; see the daemon's log",
          file=sys.stderr)
    return 1
