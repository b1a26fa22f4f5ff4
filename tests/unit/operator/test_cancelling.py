"""Stopping the operator's tasks never hangs on one that swallows a cancellation."""

from __future__ import annotations

import asyncio
import contextlib

from qtrader_operator.cancelling import HandlerRuns, cancel_and_wait


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


async def test_a_handler_run_still_in_progress_at_the_stop_is_ended_before_the_clients_close() -> (
    None
):
    # kopf leaves a timer that does not return within a few loop cycles of its stop running
    # ("orphaned"); the cleanup must end it before closing what it uses.
    runs = HandlerRuns()
    started, ended = asyncio.Event(), asyncio.Event()

    async def reconcile() -> None:
        with runs.tracked():
            started.set()
            try:
                await asyncio.sleep(3600)  # waiting on the API server
            finally:
                ended.set()

    task = asyncio.create_task(reconcile())
    await started.wait()
    assert not runs.stopping
    await runs.stop_all()
    assert ended.is_set()
    assert task.cancelled()
    assert runs.stopping  # the handlers start no new run from now on


async def test_the_stop_does_not_cancel_the_run_it_is_called_from() -> None:
    runs = HandlerRuns()

    async def cleanup() -> str:
        with runs.tracked():
            await runs.stop_all()
            return "finished"

    assert await asyncio.wait_for(cleanup(), timeout=5) == "finished"
