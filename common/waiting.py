"""Bounded waits on a condition, with a message that says what was awaited."""
from __future__ import annotations

import time


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
