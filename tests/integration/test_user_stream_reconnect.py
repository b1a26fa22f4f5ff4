"""The user-data stream's reconnect back-off counts failures since the last session that opened:
a venue that drops healthy sessions again and again (a flaky network, Binance's cut-offs) gets a
new socket after the first wait every time, not after ever longer ones. Against the local
Binance-compatible server's user-data stream, with its listen key over REST."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from qtrader.exchange.user_stream import RECONNECT_S, UserTrades, stream_base_of
from qtrader_tools.simulators.binance_futures import SimAdmin, SimConfig
from support.binance_sim import KEY, sim_in_thread

pytestmark = pytest.mark.integration


@pytest.fixture
def exchange() -> Iterator[SimAdmin]:
    with sim_in_thread(SimConfig.from_dict({})) as url, SimAdmin(url) as admin:
        yield admin


async def _until(condition: Callable[[], bool], *, timeout_s: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "timed out"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_sessions_dropped_after_they_opened_reconnect_after_the_first_wait_each_time(
    exchange: SimAdmin,
) -> None:
    async with httpx.AsyncClient(base_url=exchange.base_url) as http:

        async def listen_key() -> str:
            answer = await http.post("/fapi/v1/listenKey", headers={"X-MBX-APIKEY": KEY})
            return str(answer.json()["listenKey"])

        async def keep_alive(key: str) -> None:
            return None

        stream = UserTrades(
            stream_base=stream_base_of(exchange.base_url),
            listen_key=listen_key,
            keep_alive=keep_alive,
            wait_s=1.0,
        )
        task = asyncio.create_task(stream.run())
        try:
            await _until(lambda: stream.connected, timeout_s=10)
            waits = []
            for _ in range(4):
                await asyncio.to_thread(exchange.drop_websockets)
                await _until(lambda: not stream.connected, timeout_s=5)
                waits.append(await _until(lambda: stream.connected, timeout_s=20))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    # Each session had opened: the wait is the first step every time (1 s, plus the socket).
    assert max(waits) < RECONNECT_S[0] + 1.0, waits
