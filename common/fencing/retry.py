"""fence_with_retry: the whole plan again and again, backing off, until a host is
fenced or the caller gives up."""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable

from remus.common.fencing.fencer import FenceResult, Fencer


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
