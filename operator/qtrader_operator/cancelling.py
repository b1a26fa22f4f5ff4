"""Cancelling the operator's tasks without ever hanging on one.

nats-py 2.16 swallows a cancellation in places (its flush queue among them), so a task
cancelled once while inside such a call goes on: a plain ``cancel`` then ``gather`` waits for
it forever, and the operator never stops. ``cancel_and_wait`` cancels again until each task
ends, and names and leaves behind one that still runs after its timeout.

``HandlerRuns`` is for kopf's handlers: at a stop, kopf gives a timer a few loop cycles to
return and then leaves it running, "orphaned", still using the clients the cleanup is about to
close (a reconcile waiting on the API server or NATS under load). Each handler run is tracked
while it runs, and the cleanup cancels and waits for those still running before it closes
anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 5.0
_RECANCEL_EVERY_S = 0.2


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], *, timeout_s: float = CANCEL_TIMEOUT_S
) -> None:
    pending = {task for task in tasks if not task.done()}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while pending and asyncio.get_running_loop().time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RECANCEL_EVERY_S)
    for task in pending:
        where = "; ".join(f"{f.f_code.co_filename}:{f.f_lineno}" for f in task.get_stack())
        log.error("task %s did not end when cancelled (at %s)", task.get_name(), where)


class HandlerRuns:
    """The handler runs in progress (their tasks), for ``stop_all`` to end at a stop."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()
        # Set by ``stop_all``: kopf may start a timer again while its cleanup runs, and a run
        # then has only closed clients to work with, so it does nothing.
        self.stopping = False

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Around one run of a handler, in the task kopf runs it in."""
        task = asyncio.current_task()
        assert task is not None, "a handler runs in a task"
        self._running.add(task)
        try:
            yield
        finally:
            self._running.discard(task)

    async def stop_all(self) -> None:
        """Cancel every run in progress but the caller's own, and wait until each has ended."""
        self.stopping = True
        others = [task for task in self._running if task is not asyncio.current_task()]
        await cancel_and_wait(others)
