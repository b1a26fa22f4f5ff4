"""Cancelling the operator's tasks without ever hanging on one.

nats-py 2.16 swallows a cancellation in places (its flush queue among them), so a task
cancelled once while inside such a call goes on: a plain ``cancel`` then ``gather`` waits for
it forever, and the operator never stops. ``cancel_and_wait`` cancels again until each task
ends, and names and leaves behind one that still runs after its timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 5.0
_RECANCEL_EVERY_S = 0.2


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[None]], *, timeout_s: float = CANCEL_TIMEOUT_S
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
