"""Fencing: make sure the primary is really off before the backup resumes the VM.

Pacemaker's semantics: the `[fencing]` table lists *levels*, tried in order;
a level succeeds only if every device in it succeeds, devices of a level run
one after the other and the level stops at its first failing device, and the
first level that succeeds wins. Every device action is bounded by `timeout_s`
and a timeout is a failure (the process and its process group are killed).

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

import asyncio
import inspect
import os
import re
import shutil
import signal
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO, Union

from remus.common import config as _config  # module import: config may import us too
from remus.common import log as _log

# Debian installs fence-agents in /usr/sbin, which is not on an ordinary user's PATH.
SBIN_PATH = "/usr/sbin:/sbin"
OUTPUT_LIMIT = 16 * 1024   # bytes kept per stream (the tail)
DETAIL_CHARS = 400         # output characters kept in a detail
PIPE_GRACE_S = 1.0         # wait for the pipes to close after the process exited

STATUS_ON, STATUS_UNKNOWN, STATUS_OFF = 0, 1, 2   # FenceAgentAPI exit codes of action=status
SCRUBBED = "***"

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_TOP_KEYS = ("timeout_s", "retry_min_s", "retry_max_s", "on_fence_failure", "notify", "level")
_DEVICE_KEYS = {"agent": ("kind", "agent", "options", "secrets", "name", "target"),
                "command": ("kind", "command", "name", "target")}
# Which host a device powers off. The [backup] host needs fencing too once it runs
# the VM and re-protection has made the [primary] host its backup.
TARGETS = ("primary", "backup")
FAILURE_POLICIES = ("stay-passive", "activate")


# ---------------------------------------------------------------- the plan

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
                           self.on_fence_failure, self.notify)

    def secret_values(self) -> set[str]:
        return {s.value for level in self.levels for d in level
                if isinstance(d, AgentDevice) for s in d.secrets}


# ---------------------------------------------------------------- parsing

def _err(message: str) -> "_config.ConfigError":
    return _config.ConfigError(message)


def _number(table: dict, key: str, default: float, where: str) -> float:
    if key not in table:
        return float(default)
    v = table[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(f"{where} {key}: expected a number of seconds, got {type(v).__name__} {v!r}")
    if not 0 < v <= 86400:
        raise _err(f"{where} {key}: must be more than 0 and at most 86400 (got {v!r})")
    return float(v)


def _resolve_program(prog: Any, base_dir: Path, where: str) -> str:
    if not isinstance(prog, str) or not prog:
        raise _err(f"{where}: expected a program name or path, got {prog!r}")
    if "/" in prog:
        p = Path(prog)
        if not p.is_absolute():
            p = Path(base_dir) / p
        p = Path(os.path.abspath(p))
        if not p.is_file() or not os.access(p, os.X_OK):
            raise _err(f"{where}: {str(p)!r} is not an executable file")
        return str(p)
    found = shutil.which(prog) or shutil.which(prog, path=SBIN_PATH)
    if not found:
        hint = " (fence agents come with Debian's fence-agents package)" if prog.startswith("fence_") else ""
        raise _err(f"{where}: {prog!r} not found on PATH nor in /usr/sbin, /sbin{hint}")
    return os.path.abspath(found)


def _argv(value: Any, base_dir: Path, where: str, *, allow_empty: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _err(f"{where}: expected a list of strings (an argv), got {value!r}")
    if not value:
        if allow_empty:
            return ()
        raise _err(f"{where}: must not be empty")
    if any("\0" in x for x in value):
        raise _err(f"{where}: NUL character in an argument")
    return (_resolve_program(value[0], base_dir, where),) + tuple(value[1:])


def _option_key(key: str, where: str) -> None:
    if not _KEY_RE.match(key):
        raise _err(f"{where}: key {key!r}: letters, digits, '_' and '-' only "
                   f"(no '=', spaces or newlines; sent to the agent as key=value lines)")
    if key.lower() == "action":
        raise _err(f"{where}: key 'action': Remus sets the action itself (off, status, monitor)")


def _option_value(key: str, v: Any, where: str) -> str:
    w = f"{where}.{key}"
    if isinstance(v, bool):
        if not v:
            raise _err(f"{w}: false is not sendable: fence-agents treat a flag given any value, "
                       f"even 0, as set; leave the key out instead")
        return "1"
    if isinstance(v, (int, float)):
        return str(v)
    if not isinstance(v, str):
        raise _err(f"{w}: expected a string, number or true, got {type(v).__name__} {v!r}")
    if any(c in v for c in "\n\r\0"):
        raise _err(f"{w}: newline or NUL in the value (options are sent one key=value a line)")
    if v != v.strip():
        raise _err(f"{w}: leading or trailing whitespace (fence-agents strip it)")
    # '=' in a value is fine: agents split each line at its first '='.
    return v


def _read_secret(path: str) -> str:
    return Path(path).read_text().strip()


def _parse_device(d: Any, base_dir: Path, where: str) -> Device:
    if not isinstance(d, dict):
        raise _err(f"{where}: expected a table ([[fencing.level.device]]), got {d!r}")
    kind = d.get("kind")
    if kind is None:
        raise _err(f"{where} kind: required (\"agent\" or \"command\")")
    if kind not in _DEVICE_KEYS:
        raise _err(f"{where} kind: must be \"agent\" or \"command\" (got {kind!r})")
    known = _DEVICE_KEYS[kind]
    for key in d:
        if key not in known:
            raise _err(f"{where}: unknown key {key!r} for kind = \"{kind}\" (known: {', '.join(known)})")
    name = d.get("name")
    if name is not None and (not isinstance(name, str) or not name or "\n" in name):
        raise _err(f"{where} name: expected a one-line string, got {name!r}")

    target = d.get("target", "primary")
    if target not in TARGETS:
        raise _err(f"{where} target: must be \"primary\" or \"backup\" (the host this device "
                   f"powers off; got {target!r})")
    if kind == "command":
        if "command" not in d:
            raise _err(f"{where} command: required for kind = \"command\" (argv; exit 0 = fenced)")
        argv = _argv(d["command"], base_dir, f"{where} command", allow_empty=False)
        return CommandDevice(name=name or os.path.basename(argv[0]), command=argv, target=target)

    if "agent" not in d:
        raise _err(f"{where} agent: required for kind = \"agent\" (a fence-agents program)")
    agent = _resolve_program(d["agent"], base_dir, f"{where} agent")
    options_raw = d.get("options", {})
    if not isinstance(options_raw, dict):
        raise _err(f"{where} options: expected a table of key = value, got {options_raw!r}")
    options = []
    for key, value in options_raw.items():
        _option_key(key, f"{where} options")
        options.append((key, _option_value(key, value, f"{where} options")))
    secrets_raw = d.get("secrets", {})
    if not isinstance(secrets_raw, dict):
        raise _err(f"{where} secrets: expected a table of key = \"file\", got {secrets_raw!r}")
    secrets = []
    for key, path in secrets_raw.items():
        _option_key(key, f"{where} secrets")
        w = f"{where} secrets.{key}"
        if key in options_raw:
            raise _err(f"{w}: also given in options; give it once")
        if not isinstance(path, str) or not path:
            raise _err(f"{w}: expected the path of a file holding the value, got {path!r}")
        full = os.path.abspath(Path(base_dir) / path)
        try:
            value = _read_secret(full)
        except OSError as exc:
            raise _err(f"{w}: cannot read {full}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise _err(f"{w}: {full} is not UTF-8 text") from None
        if not value:
            raise _err(f"{w}: {full} is empty")
        if any(c in value for c in "\n\r\0"):
            raise _err(f"{w}: {full} must hold one line (the value is sent as one key=value line)")
        secrets.append(Secret(key, full, value))
    return AgentDevice(name=name or os.path.basename(agent), agent=agent,
                       options=tuple(options), secrets=tuple(secrets), target=target)


def parse(table: dict | None, base_dir: Path) -> FencingPlan:
    """The `[fencing]` table (None or absent: no levels) -> FencingPlan, or ConfigError."""
    if table is None:
        return FencingPlan()
    if not isinstance(table, dict):
        raise _err("[fencing] must be a table")
    for key in table:
        if key not in _TOP_KEYS:
            raise _err(f"[fencing] unknown key {key!r} (known: {', '.join(_TOP_KEYS)})")
    where = "[fencing]"
    timeout_s = _number(table, "timeout_s", 20, where)
    retry_min_s = _number(table, "retry_min_s", 1, where)
    retry_max_s = _number(table, "retry_max_s", 60, where)
    if retry_max_s < retry_min_s:
        raise _err(f"[fencing] retry_max_s: must be at least retry_min_s ({retry_min_s:g})")
    policy = table.get("on_fence_failure", "stay-passive")
    if policy not in FAILURE_POLICIES:
        raise _err(f"[fencing] on_fence_failure: must be \"stay-passive\" or \"activate\" "
                   f"(\"activate\" is UNSAFE: see the docs) (got {policy!r})")
    notify = _argv(table.get("notify", []), base_dir, "[fencing] notify", allow_empty=True)

    levels_raw = table.get("level", [])
    if not isinstance(levels_raw, list):
        raise _err("[fencing] level: expected an array of tables ([[fencing.level]])")
    if not levels_raw:
        raise _err("[fencing] level: at least one [[fencing.level]] is needed "
                   "(leave [fencing] out entirely to run without fencing)")
    levels = []
    for i, level in enumerate(levels_raw, 1):
        lw = f"[fencing] level {i}"
        if not isinstance(level, dict):
            raise _err(f"{lw}: expected a table ([[fencing.level]]), got {level!r}")
        for key in level:
            if key != "device":
                raise _err(f"{lw}: unknown key {key!r} (known: device)")
        devices_raw = level.get("device", [])
        if not isinstance(devices_raw, list):
            raise _err(f"{lw} device: expected an array of tables ([[fencing.level.device]])")
        if not devices_raw:
            raise _err(f"{lw}: needs at least one [[fencing.level.device]]")
        levels.append(tuple(_parse_device(d, base_dir, f"{lw} device {j}")
                            for j, d in enumerate(devices_raw, 1)))
    return FencingPlan(levels=tuple(levels), timeout_s=timeout_s, retry_min_s=retry_min_s,
                       retry_max_s=retry_max_s, on_fence_failure=policy, notify=notify)


# ---------------------------------------------------------------- running processes

@dataclass
class _Run:
    rc: int | None          # None: did not start, or timed out
    timed_out: bool
    error: str              # could not start
    output: str             # scrubbed, one line, bounded
    seconds: float
    timeout_s: float
    stdout: str = ""        # scrubbed (the last OUTPUT_LIMIT bytes)

    def describe(self) -> str:
        if self.error:
            return self.error
        if self.timed_out:
            text = f"timed out after {self.timeout_s:g} s (killed)"
        elif self.rc is not None and self.rc < 0:
            text = f"killed by signal {-self.rc}"
        else:
            text = f"exit {self.rc}"
        return f"{text}: {self.output}" if self.output else text


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


async def _drain(stream: asyncio.StreamReader) -> tuple[bytes, bool]:
    buf = bytearray()
    truncated = False
    while chunk := await stream.read(65536):
        buf += chunk
        if len(buf) > OUTPUT_LIMIT:
            del buf[:len(buf) - OUTPUT_LIMIT]
            truncated = True
    return bytes(buf), truncated


class _Scrubber:
    def __init__(self, values: set[str]):
        self.values = sorted((v for v in values if v), key=len, reverse=True)

    def __call__(self, text: str, truncated_front: bool = False) -> str:
        if truncated_front and self.values:
            # the cut may have left the end of a secret at the front
            text = text[len(self.values[0]):]
        for v in self.values:
            text = text.replace(v, SCRUBBED)
        return text


def _summarise(parts: list[tuple[bytes, bool]], scrub: _Scrubber) -> str:
    lines: list[str] = []
    for data, truncated in parts:
        text = scrub(data.decode("utf-8", "replace"), truncated)
        lines += [ln.strip() for ln in text.splitlines() if ln.strip()]
    out = " | ".join(lines)
    if len(out) > DETAIL_CHARS:
        out = "..." + out[-DETAIL_CHARS:]
    return out


async def _run(argv: tuple[str, ...] | list[str], stdin: bytes | None, timeout_s: float,
               scrub: _Scrubber, env: dict | None = None) -> _Run:
    """Run argv with a deadline, in its own process group; never blocks the loop."""
    start = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, env=env)
    except OSError as exc:
        return _Run(None, False, f"cannot run {argv[0]}: {exc.strerror or exc}", "",
                    time.monotonic() - start, timeout_s)
    readers = [asyncio.create_task(_drain(proc.stdout)), asyncio.create_task(_drain(proc.stderr))]

    async def feed_and_wait() -> int:
        if stdin is not None:
            try:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # it did not read its input; its exit code will tell
            finally:
                proc.stdin.close()
        return await proc.wait()

    timed_out = False
    try:
        try:
            await asyncio.wait_for(feed_and_wait(), timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
            _kill_group(proc)
            await proc.wait()
    except BaseException:  # cancelled: leave nothing running behind
        _kill_group(proc)
        for r in readers:
            r.cancel()
        try:  # reap it (quick after SIGKILL), unless cancelled once more
            await asyncio.wait_for(proc.wait(), PIPE_GRACE_S)
        except BaseException:
            pass
        raise
    try:
        _, pending = await asyncio.wait(readers, timeout=PIPE_GRACE_S)
        if pending:  # something it started still holds the pipes
            _kill_group(proc)
            _, pending = await asyncio.wait(readers, timeout=PIPE_GRACE_S)
    finally:
        for r in readers:
            if not r.done():
                r.cancel()
    parts = [r.result() if r.done() and not r.cancelled() else (b"", False) for r in readers]
    stdout = scrub(parts[0][0].decode("utf-8", "replace"), parts[0][1])
    return _Run(None if timed_out else proc.returncode, timed_out, "", _summarise(parts, scrub),
                time.monotonic() - start, timeout_s, stdout)


# ---------------------------------------------------------------- fencing

@dataclass
class DeviceResult:
    level: int      # 1-based
    device: int     # 1-based within the level
    name: str
    ok: bool
    detail: str     # scrubbed of secrets
    seconds: float


@dataclass
class FenceResult:
    ok: bool
    level: int | None   # the level that fenced, when ok
    devices: list[DeviceResult]
    seconds: float

    def summary(self) -> str:
        if self.ok:
            return f"fenced by level {self.level}"
        if not self.devices:
            return "no fencing device was run"
        return "; ".join(f"level {d.level} device {d.device} {d.name}: {d.detail}"
                         for d in self.devices if not d.ok)


class Fencer:
    def __init__(self, plan: FencingPlan, log=None):
        self.plan = plan
        self.log = log or _log.get("remus.fencing")
        self._lock = asyncio.Lock()

    # -- helpers

    async def _secret_values(self, dev: AgentDevice) -> list[tuple[str, str]]:
        values = []
        for s in dev.secrets:
            try:
                v = await asyncio.to_thread(_read_secret, s.path)
                if not v or any(c in v for c in "\n\r\0"):
                    raise ValueError("not one non-empty line")
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                self.log.warning("fence-secret-unreadable", device=dev.name, key=s.key, file=s.path,
                                 error=getattr(exc, "strerror", None) or type(exc).__name__,
                                 using="value read at start")
                v = s.value
            values.append((s.key, v))
        return values

    def _scrubber(self, extra: list[tuple[str, str]] = ()) -> _Scrubber:
        return _Scrubber(self.plan.secret_values() | {v for _, v in extra})

    async def _agent(self, dev: AgentDevice, action: str, secrets: list[tuple[str, str]],
                     scrub: _Scrubber) -> _Run:
        # the action goes last: with FenceAgentAPI the last value of a key wins
        lines = [f"{k}={v}" for k, v in dev.options] + [f"{k}={v}" for k, v in secrets]
        lines.append(f"action={action}")
        return await _run([dev.agent], ("\n".join(lines) + "\n").encode(), self.plan.timeout_s, scrub)

    async def _fence_device(self, dev: Device) -> tuple[bool, str]:
        if isinstance(dev, CommandDevice):
            r = await _run(dev.command, None, self.plan.timeout_s, self._scrubber())
            return (r.rc == 0 and not r.timed_out), r.describe()
        secrets = await self._secret_values(dev)
        scrub = self._scrubber(secrets)
        off = await self._agent(dev, "off", secrets, scrub)
        if off.rc != 0 or off.timed_out:
            return False, f"off: {off.describe()}"
        st = await self._agent(dev, "status", secrets, scrub)
        if st.rc == STATUS_OFF and not st.timed_out:
            return True, f"off: exit 0; status: exit 2 = off{': ' + st.output if st.output else ''}"
        if st.rc == STATUS_ON:
            why = "exit 0 = still ON after off"
        elif st.rc == STATUS_UNKNOWN:
            why = "exit 1 = unreachable or unknown, power-off not confirmed"
        elif st.timed_out:
            why = f"timed out after {st.timeout_s:g} s (killed), power-off not confirmed"
        else:
            why = f"{st.describe().split(':')[0]}, not 2 (off): power-off not confirmed"
        detail = f"off: exit 0, but status: {why}"
        return False, f"{detail}: {st.output}" if st.output and not st.error else detail

    # -- API

    async def fence(self) -> FenceResult:
        """Run the levels in order; the first level whose devices all succeed wins."""
        async with self._lock:
            start = time.monotonic()
            results: list[DeviceResult] = []
            if not self.plan.configured:
                self.log.error("fence-not-configured")
                return FenceResult(False, None, results, 0.0)
            for li, level in enumerate(self.plan.levels, 1):
                level_ok = True
                for di, dev in enumerate(level, 1):
                    self.log.info("fence-attempt", level=li, device=di, name=dev.name, kind=dev.kind)
                    t0 = time.monotonic()
                    ok, detail = await self._fence_device(dev)
                    r = DeviceResult(li, di, dev.name, ok, detail, time.monotonic() - t0)
                    results.append(r)
                    (self.log.info if ok else self.log.warning)(
                        "fence-result", level=li, device=di, name=dev.name, ok=ok,
                        seconds=r.seconds, detail=detail)
                    if not ok:
                        level_ok = False
                        break  # Pacemaker: the level has failed; on to the next one
                if level_ok:
                    res = FenceResult(True, li, results, time.monotonic() - start)
                    self.log.info("fence-done", ok=True, level=li, seconds=res.seconds)
                    return res
            res = FenceResult(False, None, results, time.monotonic() - start)
            self.log.error("fence-done", ok=False, levels=len(self.plan.levels), seconds=res.seconds)
            return res

    async def check(self) -> list[DeviceResult]:
        """Ask every agent for its status (never off/on/reboot); commands are not run."""
        out: list[DeviceResult] = []
        for li, level in enumerate(self.plan.levels, 1):
            for di, dev in enumerate(level, 1):
                if isinstance(dev, CommandDevice):
                    out.append(DeviceResult(li, di, dev.name, False,
                                            "not checkable: command devices are only run to fence", 0.0))
                    continue
                out += await self._check_agent(li, di, dev)
        for r in out:
            self.log.info("fence-check", level=r.level, device=r.device, name=r.name, ok=r.ok,
                          seconds=r.seconds, detail=r.detail)
        return out

    async def _check_agent(self, li: int, di: int, dev: AgentDevice) -> list[DeviceResult]:
        secrets = await self._secret_values(dev)
        scrub = self._scrubber(secrets)
        st = await self._agent(dev, "status", secrets, scrub)
        if st.rc in (STATUS_ON, STATUS_OFF) and not st.timed_out:
            state = "on" if st.rc == STATUS_ON else "OFF (the device reports the primary powered off)"
            detail = f"status: exit {st.rc} = {state}{': ' + st.output if st.output else ''}"
            return [DeviceResult(li, di, dev.name, True, detail, st.seconds)]
        md = await self._agent(dev, "metadata", secrets, scrub)
        listed = None
        if md.rc == 0 and "<actions>" in md.stdout:  # the tail is kept: <actions> is near the end
            listed = re.search(r'<action\s+name="status"', md.stdout) is not None
        if listed is True:
            return [DeviceResult(li, di, dev.name, False, f"status: {st.describe()}", st.seconds)]
        why = "not supported (not in the agent's metadata)" if listed is False else \
              "failed and the agent's metadata could not be read"
        mon = await self._agent(dev, "monitor", secrets, scrub)
        return [
            DeviceResult(li, di, dev.name, False, f"status: {why}: {st.describe()}", st.seconds),
            DeviceResult(li, di, dev.name, mon.rc == 0 and not mon.timed_out,
                         f"monitor: {mon.describe()}", mon.seconds),
        ]

    async def run_notify(self, result: FenceResult, round_: int, next_retry_s: float) -> bool:
        """Run the `notify` argv (if any) after a failed round, bounded by timeout_s."""
        if not self.plan.notify:
            return True
        scrub = self._scrubber()
        env = dict(os.environ,
                   REMUS_EVENT="fencing-failed",
                   REMUS_FENCE_ROUND=str(round_),
                   REMUS_FENCE_NEXT_RETRY_S=f"{next_retry_s:g}",
                   REMUS_FENCE_DETAIL=scrub(result.summary())[:2000])
        r = await _run(self.plan.notify, None, self.plan.timeout_s, scrub, env=env)
        ok = r.rc == 0 and not r.timed_out
        (self.log.info if ok else self.log.warning)("fence-notify", ok=ok, detail=r.describe())
        return ok


async def _until_stopped(coro, stop: asyncio.Event):
    """Await coro unless stop is set first (then cancel it and return None)."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        stopper.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return None


async def fence_with_retry(fencer: Fencer, stop: asyncio.Event,
                           on_failure: Callable[[FenceResult], Any] | None = None) -> FenceResult:
    """Retry the whole plan, backing off from retry_min_s to retry_max_s, until it fences
    or `stop` is set (a round under way is then cancelled and its processes killed).

    After each failed round: on_failure(result) (a function or coroutine function;
    its exceptions are logged, not raised), then the notify argv. Returns the
    successful result, or the last failed one (ok=False) when stopped.
    """
    plan = fencer.plan
    last = FenceResult(False, None, [], 0.0)
    round_ = 0
    while not stop.is_set():
        round_ += 1
        result = await _until_stopped(fencer.fence(), stop)
        if result is None:
            break
        if result.ok:
            if round_ > 1:
                fencer.log.info("fence-retry-succeeded", rounds=round_)
            return result
        last = result
        delay = min(plan.retry_max_s, plan.retry_min_s * 2 ** min(round_ - 1, 60))
        fencer.log.error("fencing-failed", round=round_, next_retry_s=delay,
                         detail=result.summary())
        if on_failure is not None:
            try:
                ret = on_failure(result)
                if inspect.isawaitable(ret):
                    await ret
            except Exception as exc:  # the retry loop must go on
                fencer.log.error("fence-on-failure-error", error=repr(exc))
        await _until_stopped(fencer.run_notify(result, round_, delay), stop)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass
    fencer.log.warning("fence-retry-stopped", rounds=round_)
    return last


# ---------------------------------------------------------------- remusctl fence-test

def load_plan(path: str | os.PathLike) -> FencingPlan:
    """The fencing plan of a config file, through the config loader where it knows [fencing]."""
    p = Path(path)
    try:
        cfg = _config.load(p)
    except _config.ConfigError:
        try:
            data = tomllib.loads(p.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            data = {}
        if "fencing" not in data:
            raise
        # the loader rejected the file: for another section's reason (raised here),
        # or because it does not know [fencing] yet, or for our own reason (raised by parse)
        _config.parse({k: v for k, v in data.items() if k != "fencing"}, p)
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
    except _config.ConfigError as exc:
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
