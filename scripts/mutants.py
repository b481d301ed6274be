"""Mutation testing of the pure core: `make mutants`.

mutmut (https://github.com/boxed/mutmut) changes the code one small edit at a
time (a `<` into `<=`, a constant into another, a call dropped) and runs the
unit tests that reach the changed function; a mutant the tests do not notice
"survived". The score of a module is killed / (killed + survived).

What is mutated, which tests run, the threshold and the mutants judged
equivalent (they cannot change behaviour, each with its reason) all live in
tests/mutants.toml. This script:

1. stages the packages under build/mutation/remus/ (mutmut names a mutant by
   its file's path, and the tests import `remus.common...`, so the staged tree
   has the import layout), with the tests and a generated pyproject.toml;
2. runs `mutmut run` there;
3. reads mutmut's verdicts, excludes the listed equivalents, prints the score
   per module as a table and saves it as JSON under bench/results/;
4. fails if a module scores under the threshold, or if an equivalent listed no
   longer exists or no longer survives (the list must not go stale).

Timeouts count as killed (the mutant made the tests hang, which they notice);
mutants in code no selected test reaches ("no tests") count as survived.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "mutants.toml"
STAGE = ROOT / "build" / "mutation"
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("common", "backup", "primary", "node")
KILLED_CODES = {1, 3, 36, 37, 24, -24, 152, 255, -11, -9}
SURVIVED_CODES = {0, 5, 33}


@dataclass
class Tally:
    killed: int = 0
    survived: list[str] = field(default_factory=list)
    equivalent: int = 0
    unchecked: int = 0

    @property
    def score(self) -> float:
        judged = self.killed + len(self.survived)
        return self.killed / judged if judged else 1.0


def load_config() -> dict:
    with CONFIG.open("rb") as f:
        return tomllib.load(f)


def stage(cfg: dict, modules: list[str], fresh: bool) -> None:
    """Copy the packages and tests into the staging tree; mutmut's own
    mutants/ directory there is its cache, dropped on --fresh."""
    if fresh and (STAGE / "mutants").exists():
        shutil.rmtree(STAGE / "mutants")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in PACKAGES:
        target = STAGE / "remus" / pkg
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / pkg, target, ignore=ignore)
    if (STAGE / "tests").exists():
        shutil.rmtree(STAGE / "tests")
    shutil.copytree(ROOT / "tests", STAGE / "tests", ignore=ignore)
    (STAGE / "pyproject.toml").write_text(staged_pyproject(cfg, modules))


def staged_pyproject(cfg: dict, modules: list[str]) -> str:
    patterns = [f"remus/{p}" for name in modules for p in cfg["modules"][name]]
    deselect = [arg for test in cfg.get("deselect", []) for arg in ("--deselect", test)]
    selection = ["-m", "not integration", *deselect, *cfg["tests"]]
    return "\n".join([
        "[tool.pytest.ini_options]",
        'markers = ["integration: runs real QEMU guests and daemons"]',
        "",
        "[tool.mutmut]",
        'source_paths = ["remus"]',
        f"only_mutate = {json.dumps(patterns)}",
        f"pytest_add_cli_args_test_selection = {json.dumps(selection)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]',
        "use_git_change_detection = false",
        "",
    ])


def forget_survivors(cfg: dict, modules: list[str]) -> None:
    """With --keep, mutmut keeps every verdict whose code is unchanged, even after
    the tests changed; the killed stay killed, the survivors are tried again."""
    for name in modules:
        for pattern in cfg["modules"][name]:
            for meta in (STAGE / "mutants" / "remus").glob(pattern + ".meta"):
                data = json.loads(meta.read_text())
                codes = data["exit_code_by_key"]
                for key, code in codes.items():
                    if code in SURVIVED_CODES:
                        codes[key] = None
                meta.write_text(json.dumps(data))


def drop_unmutated(cfg: dict, modules: list[str]) -> None:
    """With --keep, mutmut mutates a file again only when it is newer than its copy
    under mutants/; a module's file the last run copied without mutating it (it was
    not selected then: no .meta) would stay unmutated, the module scoring 0 of 0.
    Such copies are dropped, so mutmut mutates them, and with them mutmut's record
    of which tests reach which function: it has none for their functions, and would
    count every mutant of theirs as reached by no test."""
    dropped = False
    for name in modules:
        for pattern in cfg["modules"][name]:
            for copy in (STAGE / "mutants" / "remus").glob(pattern):
                if copy.suffix == ".py" and not copy.with_name(copy.name + ".meta").exists():
                    copy.unlink()
                    dropped = True
    if dropped:
        (STAGE / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)


def run_mutmut(cfg: dict, children: int) -> int:
    env = dict(os.environ, REMUS_MUTATION_EXAMPLES=str(cfg["examples"]))
    # The staged tree, not the installed checkout, is what the tests import.
    env.pop("PYTHONPATH", None)
    mutmut = Path(sys.executable).with_name("mutmut")
    cmd = [str(mutmut), "run", "--max-children", str(children)]
    log = STAGE / "mutmut.log"
    print(f"mutmut run: progress in {log.relative_to(ROOT)}", flush=True)
    with log.open("w") as out:
        return subprocess.run(cmd, cwd=STAGE, env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode


def verdicts(cfg: dict, name: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for pattern in cfg["modules"][name]:
        for meta in sorted((STAGE / "mutants" / "remus").glob(pattern + ".meta")):
            out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def tally(codes: dict[str, int | None], equivalent: dict[str, str]) -> Tally:
    t = Tally()
    for key, code in sorted(codes.items()):
        if key in equivalent:
            t.equivalent += 1
        elif code in KILLED_CODES:
            t.killed += 1
        elif code in SURVIVED_CODES:
            t.survived.append(key)
        else:
            t.unchecked += 1
    return t


def in_module(cfg: dict, name: str, key: str) -> bool:
    return any(fnmatch.fnmatch(key, "remus." + p.removesuffix(".py").replace("/", ".") + ".*")
               for p in cfg["modules"][name])


def stale_equivalents(cfg: dict, name: str, codes: dict[str, int | None]) -> list[str]:
    """Listed equivalents that are gone or now killed: the list is out of date."""
    stale = []
    for key in cfg.get("equivalent", {}):
        if not in_module(cfg, name, key):
            continue
        if key not in codes:
            stale.append(f"{key}: listed as equivalent but no such mutant")
        elif codes[key] not in SURVIVED_CODES:
            stale.append(f"{key}: listed as equivalent but killed")
    return stale


def report(cfg: dict, modules: list[str]) -> tuple[dict, list[str]]:
    equivalent = cfg.get("equivalent", {})
    rows, problems = {}, []
    for name in modules:
        codes = verdicts(cfg, name)
        t = tally(codes, equivalent)
        rows[name] = {"killed": t.killed, "survived": len(t.survived),
                      "equivalent": t.equivalent, "unchecked": t.unchecked,
                      "score": round(t.score, 4), "survivors": t.survived}
        if not codes:
            problems.append(f"{name}: no mutants (no such file, or nothing mutmut can change)")
        if t.score < cfg["threshold"]:
            problems.append(f"{name}: score {t.score:.1%} is under {cfg['threshold']:.0%}")
        if t.unchecked:
            problems.append(f"{name}: {t.unchecked} mutants were not checked")
        problems += stale_equivalents(cfg, name, codes)
    return rows, problems


def print_table(rows: dict) -> None:
    print(f"{'module':<18} {'killed':>7} {'survived':>9} {'equivalent':>11} {'score':>7}")
    for name, r in rows.items():
        print(f"{name:<18} {r['killed']:>7} {r['survived']:>9} {r['equivalent']:>11} "
              f"{r['score']:>7.1%}")
    for name, r in rows.items():
        for key in r["survivors"]:
            print(f"  survived: {key}   (mutmut show {key}, in {STAGE})")


def save(rows: dict, elapsed: float) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"mutants-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "tool": "mutmut", "host": platform.node(), "seconds": round(elapsed, 1),
        "config": str(CONFIG.relative_to(ROOT)), "modules": rows}, indent=2))
    return path


def parse_args(cfg: dict) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="*", metavar="MODULE",
                   help=f"modules to mutate: {', '.join(cfg['modules'])} (default: all)")
    p.add_argument("--keep", action="store_true",
                   help="keep the last run's kills where the code is unchanged; "
                        "survivors are tried again (for working on the tests)")
    p.add_argument("--children", type=int, default=os.cpu_count() or 2,
                   help="mutants tested at once (default: the number of CPUs)")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args()
    unknown = set(args.modules) - set(cfg["modules"])
    if unknown:
        p.error(f"unknown module(s) {', '.join(sorted(unknown))}; known: {', '.join(cfg['modules'])}")
    return args


def main() -> int:
    cfg = load_config()
    args = parse_args(cfg)
    modules = args.modules or list(cfg["modules"])
    started = time.monotonic()
    stage(cfg, modules, fresh=not args.keep)
    if args.keep:
        forget_survivors(cfg, modules)
        drop_unmutated(cfg, modules)
    rc = run_mutmut(cfg, args.children)
    if rc != 0:
        print(f"mutmut run failed (exit {rc}); see {STAGE}", file=sys.stderr)
        return 2
    rows, problems = report(cfg, modules)
    print_table(rows)
    if not args.no_save:
        print(f"saved {save(rows, time.monotonic() - started).relative_to(ROOT)}")
    for line in problems:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
