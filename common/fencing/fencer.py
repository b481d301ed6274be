"""Fencer: runs the plan's levels to power a host off, or checks its agents.

Pacemaker's semantics: the `[fencing]` table lists *levels*, tried in order;
a level succeeds only if every device in it succeeds, devices of a level run
one after the other and the level stops at its first failing device, and the
first level that succeeds wins. Every device action is bounded by `timeout_s`
and a timeout is a failure (the process and its process group are killed).
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass

from remus.common import log as _log
from remus.common.fencing.plan import AgentDevice, CommandDevice, Device, FencingPlan, read_secret
from remus.common.fencing.runner import Run, Scrubber, run_bounded

STATUS_ON, STATUS_UNKNOWN, STATUS_OFF = 0, 1, 2   # FenceAgentAPI exit codes of action=status


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
                v = await asyncio.to_thread(read_secret, s.path)
                if not v or any(c in v for c in "\n\r\0"):
                    raise ValueError("not one non-empty line")
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                self.log.warning("fence-secret-unreadable", device=dev.name, key=s.key, file=s.path,
                                 error=getattr(exc, "strerror", None) or type(exc).__name__,
                                 using="value read at start")
                v = s.value
            values.append((s.key, v))
        return values

    def _scrubber(self, extra: list[tuple[str, str]] = ()) -> Scrubber:
        return Scrubber(self.plan.secret_values() | {v for _, v in extra})

    async def _agent(self, dev: AgentDevice, action: str, secrets: list[tuple[str, str]],
                     scrub: Scrubber) -> Run:
        # the action goes last: with FenceAgentAPI the last value of a key wins
        lines = [f"{k}={v}" for k, v in dev.options] + [f"{k}={v}" for k, v in secrets]
        lines.append(f"action={action}")
        return await run_bounded([dev.agent], ("\n".join(lines) + "\n").encode(), self.plan.timeout_s, scrub)

    async def _fence_device(self, dev: Device) -> tuple[bool, str]:
        if isinstance(dev, CommandDevice):
            r = await run_bounded(dev.command, None, self.plan.timeout_s, self._scrubber())
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
        r = await run_bounded(self.plan.notify, None, self.plan.timeout_s, scrub, env=env)
        ok = r.rc == 0 and not r.timed_out
        (self.log.info if ok else self.log.warning)("fence-notify", ok=ok, detail=r.describe())
        return ok
