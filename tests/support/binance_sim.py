"""The Binance futures simulator for tests: in a background thread, or as a separate process.

In a thread it has its own event loop, so a test may call the synchronous admin client (httpx)
or python-binance from its own loop without blocking the server. As a process (the simulator's
CLI, ``qtrader.simulators.binance_futures.process.sim_process``) it serves several worker or
flood processes at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from qtrader.simulators.binance_futures import BinanceFuturesSim, SimConfig
from qtrader.simulators.binance_futures.process import sim_process

__all__ = ["KEY", "SECRET", "sim_in_thread", "sim_process"]

KEY, SECRET = "sim-key", "sim-secret"


@contextmanager
def sim_in_thread(config: SimConfig | None = None) -> Iterator[str]:
    """A running simulator on a free loopback port; yields its base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = BinanceFuturesSim(config or SimConfig())
    try:
        yield asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
