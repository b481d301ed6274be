"""Runs a fence agent or command: with a deadline, in its own process group, its
output kept bounded and scrubbed of secrets."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass

OUTPUT_LIMIT = 16 * 1024   # bytes kept per stream (the tail)
DETAIL_CHARS = 400         # output characters kept in a detail
PIPE_GRACE_S = 1.0         # wait for the pipes to close after the process exited
SCRUBBED = "***"


@dataclass
class Run:
    """How one run of a process went."""
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


class Scrubber:
    def __init__(self, values: set[str]):
        self.values = sorted((v for v in values if v), key=len, reverse=True)

    def __call__(self, text: str, truncated_front: bool = False) -> str:
        if truncated_front and self.values:
            # the cut may have left the end of a secret at the front
            text = text[len(self.values[0]):]
        for v in self.values:
            text = text.replace(v, SCRUBBED)
        return text


def _summarise(parts: list[tuple[bytes, bool]], scrub: Scrubber) -> str:
    lines: list[str] = []
    for data, truncated in parts:
        text = scrub(data.decode("utf-8", "replace"), truncated)
        lines += [ln.strip() for ln in text.splitlines() if ln.strip()]
    out = " | ".join(lines)
    if len(out) > DETAIL_CHARS:
        out = "..." + out[-DETAIL_CHARS:]
    return out


async def run_bounded(argv: tuple[str, ...] | list[str], stdin: bytes | None, timeout_s: float,
               scrub: Scrubber, env: dict | None = None) -> Run:
    """Run argv with a deadline, in its own process group; never blocks the loop."""
    start = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, env=env)
    except OSError as exc:
        return Run(None, False, f"cannot run {argv[0]}: {exc.strerror or exc}", "",
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
    return Run(None if timed_out else proc.returncode, timed_out, "", _summarise(parts, scrub),
                time.monotonic() - start, timeout_s, stdout)
