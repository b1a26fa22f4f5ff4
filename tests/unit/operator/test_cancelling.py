"""Stopping the operator's tasks never hangs on one that swallows a cancellation."""

from __future__ import annotations

import asyncio
import contextlib

from qtrader_operator.cancelling import cancel_and_wait


async def _swallows_one_cancel(started: asyncio.Event) -> None:
    """As a task inside nats-py 2.16's flush queue: the first cancellation is lost."""
    started.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    await asyncio.Event().wait()  # goes on as if nothing happened


async def test_a_task_that_swallowed_the_cancel_is_cancelled_again_and_ends() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(_swallows_one_cancel(started))
    await started.wait()
    await cancel_and_wait([task], timeout_s=5)
    assert task.cancelled()
