"""The `[fencing]` table of a config, parsed into a FencingPlan.

Two kinds of device:

- `kind = "agent"`: a fence-agents program (Debian's `fence-agents`, e.g.
  `fence_ipmilan`, `fence_dummy`), called the FenceAgentAPI way: options on
  stdin, one `key=value` a line. Fencing is `action=off`, which must exit 0,
  *then* `action=status`, which must exit 2 (= off): 0 (still on),
  1 (unreachable / unknown) or a timeout is a failure, so "off" is only ever
  believed when the device itself confirms it.
- `kind = "command"`: any argv; exit 0 within the timeout = fenced.

Secrets (`secrets = { password = "/etc/remus/secret" }`) are read from files
at start (so a missing one is a start-up error) and again at each use (so a
rotated password is picked up; if the file has become unreadable the value
read at start is used, with a warning). Their values never appear in a log
line or a result detail: everything an agent or command prints is scrubbed.

    [fencing]
    timeout_s = 20                      # per device action
    takeover_window_s = 50              # optional; default: derived (common/takeover.py)
    retry_min_s = 1                     # backoff between whole-plan rounds
    retry_max_s = 60
    on_fence_failure = "stay-passive"   # or "activate": UNSAFE, see below
    notify = []                         # argv run after each failed round
    [[fencing.level]]
    [[fencing.level.device]]
    kind = "agent"
    agent = "fence_ipmilan"             # on PATH (or /usr/sbin, /sbin), or a path
    options = { ip = "10.0.0.9", username = "admin", lanplus = true }
    secrets = { password = "/etc/remus/ipmi-password" }
    [[fencing.level.device]]
    kind = "command"
    command = ["/usr/local/bin/cut-power", "primary"]

`on_fence_failure = "activate"` lets the daemon resume the VM although the
primary could not be fenced: if the primary is in fact alive (a network
partition, not a crash), two copies of the VM then run at once and the
guest's disk and its clients see both. It exists for operators who accept
that risk explicitly; the default, "stay-passive", keeps retrying instead.

No `[fencing]` table gives a plan without levels: "fencing not configured".
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from remus.common.errors import ConfigError

# Debian installs fence-agents in /usr/sbin, which is not on an ordinary user's PATH.
SBIN_PATH = "/usr/sbin:/sbin"

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_TOP_KEYS = ("timeout_s", "retry_min_s", "retry_max_s", "on_fence_failure", "notify",
             "takeover_window_s", "level")
_DEVICE_KEYS = {"agent": ("kind", "agent", "options", "secrets", "name", "target"),
                "command": ("kind", "command", "name", "target")}
# Which host a device powers off. The [backup] host needs fencing too once it runs
# the VM and re-protection has made the [primary] host its backup.
TARGETS = ("primary", "backup")
FAILURE_POLICIES = ("stay-passive", "activate")


@dataclass(frozen=True)
class Secret:
    key: str
    path: str
    value: str = field(repr=False, compare=False)  # as read at start


@dataclass(frozen=True)
class AgentDevice:
    name: str
    agent: str                             # absolute path, resolved at start
    options: tuple[tuple[str, str], ...]   # in file order
    secrets: tuple[Secret, ...]
    kind: str = "agent"
    target: str = "primary"


@dataclass(frozen=True)
class CommandDevice:
    name: str
    command: tuple[str, ...]               # argv[0] resolved at start
    kind: str = "command"
    target: str = "primary"


Device = Union[AgentDevice, CommandDevice]


@dataclass(frozen=True)
class FencingPlan:
    levels: tuple[tuple[Device, ...], ...] = ()
    timeout_s: float = 20.0
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    on_fence_failure: str = "stay-passive"
    notify: tuple[str, ...] = ()
    takeover_window_s: float | None = None  # set explicitly; else derived (common/takeover.py)

    @property
    def configured(self) -> bool:
        return bool(self.levels)

    @property
    def unsafe(self) -> bool:
        """True when the daemon may resume the VM without a confirmed fence."""
        return self.on_fence_failure == "activate"

    def for_target(self, target: str) -> "FencingPlan":
        """The levels that fence `target` ("primary" or "backup" host), each keeping
        only that host's devices; levels with none left are dropped."""
        levels = tuple(kept for level in self.levels
                       if (kept := tuple(d for d in level if d.target == target)))
        return FencingPlan(levels, self.timeout_s, self.retry_min_s, self.retry_max_s,
                           self.on_fence_failure, self.notify, self.takeover_window_s)

    def round_bound_s(self) -> float:
        """The longest one round of every level can take: an agent's off then status, a
        command's single run, each bounded by timeout_s."""
        return sum(self.timeout_s * (2 if isinstance(d, AgentDevice) else 1)
                   for level in self.levels for d in level)

    def secret_values(self) -> set[str]:
        return {s.value for level in self.levels for d in level
                if isinstance(d, AgentDevice) for s in d.secrets}



def _number(table: dict, key: str, default: float, where: str) -> float:
    return _seconds(table[key], key, where) if key in table else float(default)


def _seconds(v: Any, key: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where} {key}: expected a number of seconds, got {type(v).__name__} {v!r}")
    if not 0 < v <= 86400:
        raise ConfigError(f"{where} {key}: must be more than 0 and at most 86400 (got {v!r})")
    return float(v)


def _resolve_program(prog: Any, base_dir: Path, where: str) -> str:
    if not isinstance(prog, str) or not prog:
        raise ConfigError(f"{where}: expected a program name or path, got {prog!r}")
    if "/" in prog:
        p = Path(prog)
        if not p.is_absolute():
            p = Path(base_dir) / p
        p = Path(os.path.abspath(p))
        if not p.is_file() or not os.access(p, os.X_OK):
            raise ConfigError(f"{where}: {str(p)!r} is not an executable file")
        return str(p)
    found = shutil.which(prog) or shutil.which(prog, path=SBIN_PATH)
    if not found:
        hint = " (fence agents come with Debian's fence-agents package)" if prog.startswith("fence_") else ""
        raise ConfigError(f"{where}: {prog!r} not found on PATH nor in /usr/sbin, /sbin{hint}")
    return os.path.abspath(found)


def _argv(value: Any, base_dir: Path, where: str, *, allow_empty: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{where}: expected a list of strings (an argv), got {value!r}")
    if not value:
        if allow_empty:
            return ()
        raise ConfigError(f"{where}: must not be empty")
    if any("\0" in x for x in value):
        raise ConfigError(f"{where}: NUL character in an argument")
    return (_resolve_program(value[0], base_dir, where),) + tuple(value[1:])


def _option_key(key: str, where: str) -> None:
    if not _KEY_RE.match(key):
        raise ConfigError(f"{where}: key {key!r}: letters, digits, '_' and '-' only "
                          f"(no '=', spaces or newlines; sent to the agent as key=value lines)")
    if key.lower() == "action":
        raise ConfigError(f"{where}: key 'action': Remus sets the action itself (off, status, monitor)")


def _option_value(key: str, v: Any, where: str) -> str:
    w = f"{where}.{key}"
    if isinstance(v, bool):
        if not v:
            raise ConfigError(f"{w}: false is not sendable: fence-agents treat a flag given any value, "
                              f"even 0, as set; leave the key out instead")
        return "1"
    if isinstance(v, (int, float)):
        return str(v)
    if not isinstance(v, str):
        raise ConfigError(f"{w}: expected a string, number or true, got {type(v).__name__} {v!r}")
    if any(c in v for c in "\n\r\0"):
        raise ConfigError(f"{w}: newline or NUL in the value (options are sent one key=value a line)")
    if v != v.strip():
        raise ConfigError(f"{w}: leading or trailing whitespace (fence-agents strip it)")
    # '=' in a value is fine: agents split each line at its first '='.
    return v


def read_secret(path: str) -> str:
    return Path(path).read_text().strip()


def _parse_device(d: Any, base_dir: Path, where: str) -> Device:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table ([[fencing.level.device]]), got {d!r}")
    kind = d.get("kind")
    if kind is None:
        raise ConfigError(f"{where} kind: required (\"agent\" or \"command\")")
    if kind not in _DEVICE_KEYS:
        raise ConfigError(f"{where} kind: must be \"agent\" or \"command\" (got {kind!r})")
    known = _DEVICE_KEYS[kind]
    for key in d:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} for kind = \"{kind}\" "
                              f"(known: {', '.join(known)})")
    name = d.get("name")
    if name is not None and (not isinstance(name, str) or not name or "\n" in name):
        raise ConfigError(f"{where} name: expected a one-line string, got {name!r}")

    target = d.get("target", "primary")
    if target not in TARGETS:
        raise ConfigError(f"{where} target: must be \"primary\" or \"backup\" (the host this device "
                          f"powers off; got {target!r})")
    if kind == "command":
        if "command" not in d:
            raise ConfigError(f"{where} command: required for kind = \"command\" "
                              f"(argv; exit 0 = fenced)")
        argv = _argv(d["command"], base_dir, f"{where} command", allow_empty=False)
        return CommandDevice(name=name or os.path.basename(argv[0]), command=argv, target=target)
    return _agent_device(d, base_dir, where, name, target)


def _agent_device(d: dict, base_dir: Path, where: str, name: str | None,
                  target: str) -> AgentDevice:
    """A `kind = "agent"` device whose kind, keys, name and target are checked already."""
    if "agent" not in d:
        raise ConfigError(f"{where} agent: required for kind = \"agent\" (a fence-agents program)")
    agent = _resolve_program(d["agent"], base_dir, f"{where} agent")
    options_raw = d.get("options", {})
    if not isinstance(options_raw, dict):
        raise ConfigError(f"{where} options: expected a table of key = value, got {options_raw!r}")
    options = []
    for key, value in options_raw.items():
        _option_key(key, f"{where} options")
        options.append((key, _option_value(key, value, f"{where} options")))
    secrets_raw = d.get("secrets", {})
    if not isinstance(secrets_raw, dict):
        raise ConfigError(f"{where} secrets: expected a table of key = \"file\", got {secrets_raw!r}")
    secrets = []
    for key, path in secrets_raw.items():
        _option_key(key, f"{where} secrets")
        if key in options_raw:
            raise ConfigError(f"{where} secrets.{key}: also given in options; give it once")
        secrets.append(_secret(key, path, base_dir, f"{where} secrets.{key}"))
    return AgentDevice(name=name or os.path.basename(agent), agent=agent,
                       options=tuple(options), secrets=tuple(secrets), target=target)


def _secret(key: str, path: Any, base_dir: Path, w: str) -> Secret:
    """The secret `key` from the file `path`, read now so that a bad one stops the start."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{w}: expected the path of a file holding the value, got {path!r}")
    full = os.path.abspath(Path(base_dir) / path)
    try:
        value = read_secret(full)
    except OSError as exc:
        raise ConfigError(f"{w}: cannot read {full}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{w}: {full} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{w}: {full} is empty")
    if any(c in value for c in "\n\r\0"):
        raise ConfigError(f"{w}: {full} must hold one line (the value is sent as one key=value line)")
    return Secret(key, full, value)


def parse(table: dict | None, base_dir: Path) -> FencingPlan:
    """The `[fencing]` table (None or absent: no levels) -> FencingPlan, or ConfigError."""
    if table is None:
        return FencingPlan()
    if not isinstance(table, dict):
        raise ConfigError("[fencing] must be a table")
    for key in table:
        if key not in _TOP_KEYS:
            raise ConfigError(f"[fencing] unknown key {key!r} (known: {', '.join(_TOP_KEYS)})")
    where = "[fencing]"
    timeout_s = _number(table, "timeout_s", 20, where)
    retry_min_s = _number(table, "retry_min_s", 1, where)
    retry_max_s = _number(table, "retry_max_s", 60, where)
    if retry_max_s < retry_min_s:
        raise ConfigError(f"[fencing] retry_max_s: must be at least retry_min_s ({retry_min_s:g})")
    policy = table.get("on_fence_failure", "stay-passive")
    if policy not in FAILURE_POLICIES:
        raise ConfigError(f"[fencing] on_fence_failure: must be \"stay-passive\" or \"activate\" "
                          f"(\"activate\" is UNSAFE: see the docs) (got {policy!r})")
    notify = _argv(table.get("notify", []), base_dir, "[fencing] notify", allow_empty=True)
    window = (_seconds(table["takeover_window_s"], "takeover_window_s", where)
              if "takeover_window_s" in table else None)

    levels_raw = table.get("level", [])
    if not isinstance(levels_raw, list):
        raise ConfigError("[fencing] level: expected an array of tables ([[fencing.level]])")
    if not levels_raw:
        raise ConfigError("[fencing] level: at least one [[fencing.level]] is needed "
                          "(leave [fencing] out entirely to run without fencing)")
    levels = []
    for i, level in enumerate(levels_raw, 1):
        lw = f"[fencing] level {i}"
        if not isinstance(level, dict):
            raise ConfigError(f"{lw}: expected a table ([[fencing.level]]), got {level!r}")
        for key in level:
            if key != "device":
                raise ConfigError(f"{lw}: unknown key {key!r} (known: device)")
        devices_raw = level.get("device", [])
        if not isinstance(devices_raw, list):
            raise ConfigError(f"{lw} device: expected an array of tables ([[fencing.level.device]])")
        if not devices_raw:
            raise ConfigError(f"{lw}: needs at least one [[fencing.level.device]]")
        levels.append(tuple(_parse_device(d, base_dir, f"{lw} device {j}")
                            for j, d in enumerate(devices_raw, 1)))
    return FencingPlan(levels=tuple(levels), timeout_s=timeout_s, retry_min_s=retry_min_s,
                       retry_max_s=retry_max_s, on_fence_failure=policy, notify=notify,
                       takeover_window_s=window)

