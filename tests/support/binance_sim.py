"""The Binance futures simulator for tests: in a background thread, or as a separate process.

In a thread it has its own event loop, so a test may call the synchronous admin client (httpx)
or python-binance from its own loop without blocking the server. As a process (the simulator's
CLI) it serves several worker or flood processes at once.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qtrader.simulators.binance_futures import BinanceFuturesSim, SimConfig

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


@contextmanager
def sim_process(config: dict[str, Any], work_dir: Path) -> Iterator[str]:
    """The simulator's CLI in its own process; yields its base URL."""
    config_path = work_dir / "sim-config.json"
    config_path.write_text(json.dumps(config))
    log = (work_dir / "sim.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qtrader.simulators.binance_futures",
            "--port",
            "0",
            "--config",
            str(config_path),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"simulator did not start: {line!r}; see {work_dir / 'sim.log'}")
        yield line.removeprefix("listening on ")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        log.close()
