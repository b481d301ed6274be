"""Bounded waits on a condition, with a message that says what was awaited; and a
cancellation that really ends the task."""
from __future__ import annotations

import asyncio
import time

CANCEL_RETRY_S = 0.5


def wait_until(predicate, timeout: float, what: str, interval: float = 0.01):
    """Return the first truthy value of `predicate()`; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def cancel_and_wait(task: "asyncio.Task") -> None:
    """Cancel `task` and wait for it to end. Python 3.11's wait_for can swallow a
    cancellation that arrives as its inner await completes (gh-86296), leaving a loop
    running: cancel again until the task is really done."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_RETRY_S)
    if not task.cancelled():
        task.exception()  # retrieved: an error here was already logged by its owner
