"""The daemons' task shutdown survives a cancellation swallowed by Python 3.11's wait_for."""
import asyncio

from remus.common.waiting import cancel_and_wait


def test_a_task_that_swallows_a_cancellation_is_still_stopped():
    swallowed = []

    async def loop_like_the_replicator():
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if not swallowed:  # what wait_for can do when its inner await completes
                    swallowed.append(True)
                    continue
                raise

    async def main():
        task = asyncio.create_task(loop_like_the_replicator())
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait(task), 5)
        return task

    task = asyncio.run(main())
    assert swallowed and task.cancelled()


def test_a_task_that_failed_is_reaped_without_raising():
    async def main():
        async def fails():
            raise RuntimeError("boom")
        task = asyncio.create_task(fails())
        await asyncio.sleep(0)
        await cancel_and_wait(task)
        return task

    assert isinstance(asyncio.run(main()).exception(), RuntimeError)
