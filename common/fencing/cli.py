"""`remusctl fence-test`: ask every fence agent of a config for its status."""
from __future__ import annotations

import asyncio
import os
import sys
import tomllib
from pathlib import Path
from typing import TextIO

from remus.common import config
from remus.common.fencing.fencer import DeviceResult, Fencer
from remus.common.fencing.plan import FencingPlan, parse


def load_plan(path: str | os.PathLike) -> FencingPlan:
    """The fencing plan of a config file, through the config loader where it knows [fencing]."""
    p = Path(path)
    try:
        cfg = config.load(p)
    except config.ConfigError:
        try:
            data = tomllib.loads(p.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            data = {}
        if "fencing" not in data:
            raise
        # the loader rejected the file: for another section's reason (raised here),
        # or because it does not know [fencing] yet, or for our own reason (raised by parse)
        config.parse({k: v for k, v in data.items() if k != "fencing"}, p)
        return parse(data["fencing"], p.parent)
    plan = getattr(cfg, "fencing", None)
    if isinstance(plan, FencingPlan):
        return plan
    return parse(cfg.raw.get("fencing"), p.parent)


def print_check(plan: FencingPlan, results: list[DeviceResult], out: TextIO) -> int:
    kinds = {(li, di): d.kind for li, level in enumerate(plan.levels, 1)
             for di, d in enumerate(level, 1)}
    rows = [("LEVEL", "DEVICE", "NAME", "CHECK", "SECONDS", "DETAIL")]
    for r in results:
        if kinds[(r.level, r.device)] == "command":
            check, secs = "not run", "-"
        else:
            check, secs = ("ok" if r.ok else "FAILED"), f"{r.seconds:.2f}"
        rows.append((str(r.level), str(r.device), r.name, check, secs, r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5], file=out)
    agents = {k for k, kind in kinds.items() if kind == "agent"}
    bad = {(r.level, r.device) for r in results if (r.level, r.device) in agents and not r.ok}
    if not agents:
        print("no agent devices: nothing could be checked (command devices are only run to fence)",
              file=out)
    elif bad:
        print(f"{len(bad)} of {len(agents)} agent device(s) did not answer status", file=out)
    else:
        print(f"all {len(agents)} agent device(s) answered status", file=out)
    return 1 if bad else 0


def run_fence_test(args) -> int:
    try:
        plan = load_plan(args.config)
    except config.ConfigError as exc:
        print(f"remusctl fence-test: {exc}", file=sys.stderr)
        return 2
    if not plan.configured:
        print(f"remusctl fence-test: {args.config}: no [fencing] table: fencing is not configured",
              file=sys.stderr)
        return 1
    if plan.unsafe:
        print("warning: on_fence_failure = \"activate\": the VM may be resumed without a "
              "confirmed fence (UNSAFE)", file=sys.stderr)
    results = asyncio.run(Fencer(plan).check())
    return print_check(plan, results, sys.stdout)


def add_fence_test_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fence-test", help="check the [fencing] devices (agent status only; nothing is powered off)",
        description="Ask every fence agent of the config's [fencing] levels for the primary's "
                    "power status (action=status; action=monitor too where status is not "
                    "supported). Never powers anything off; command devices are not run. "
                    "Exit 0 if every agent answered status, 1 otherwise, 2 for a bad config.")
    p.add_argument("--config", required=True, metavar="FILE", help="the protected VM's config file")
    p.set_defaults(func=run_fence_test)
