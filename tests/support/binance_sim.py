"""The Binance futures simulator for tests: in a background thread, or as a separate process.

In a thread it has its own event loop, so a test may call the synchronous admin client (httpx)
or python-binance from its own loop without blocking the server. As a process (the simulator's
CLI, ``qtrader_tools.simulators.binance_futures.process.sim_process``) it serves several worker or
flood processes at once.

Each simulator started here is remembered for the test's invariant check (``venues_seen``):
its records are read when it stops (and on demand while it runs, for a simulator that outlives
the test), since the check runs after the test, when the simulator may be gone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from qtrader.instruments import ExchangeInfo
from qtrader_tools.simulators.binance_futures import BinanceFuturesSim, SimAdmin, SimConfig
from qtrader_tools.simulators.binance_futures import process as sim_cli
from qtrader_tools.simulators.binance_futures.admin import SimAdminError
from support.invariants import VenueRecords, read_venue

__all__ = [
    "KEY",
    "SECRET",
    "forget_venues",
    "sim_in_thread",
    "sim_process",
    "unreadable_venues",
    "venues_seen",
]

KEY, SECRET = "sim-key", "sim-secret"

# Base URL -> the records read when it stopped; None while it runs.
_VENUES: dict[str, VenueRecords | None] = {}
_UNREADABLE: list[str] = []  # simulators whose records could not be read when they stopped


def venues_seen() -> list[VenueRecords]:
    """The records of every simulator started since ``forget_venues``."""
    return [records or read_venue(url) for url, records in _VENUES.items()]


def unreadable_venues() -> list[str]:
    return list(_UNREADABLE)


def forget_venues() -> None:
    """Start a new test: stopped simulators are forgotten, running ones (module fixtures) kept."""
    _UNREADABLE.clear()
    for url in [url for url, records in _VENUES.items() if records is not None]:
        del _VENUES[url]


@contextmanager
def _remembered(url: str) -> Iterator[str]:
    _VENUES[url] = None
    try:
        yield url
    finally:
        # Read before it stops. One that no longer answers (the test killed it, or failed) has
        # nothing left to judge by; the check then says so instead of judging nothing.
        try:
            _VENUES[url] = read_venue(url)
        except (httpx.HTTPError, SimAdminError):
            del _VENUES[url]
            _UNREADABLE.append(url)


@contextmanager
def sim_process(config: Mapping[str, Any], work_dir: Path) -> Iterator[str]:
    """The simulator's CLI in its own process (``sim_cli.sim_process``); yields its URL."""
    with sim_cli.sim_process(config, work_dir) as url, _remembered(url):
        yield url


@contextmanager
def sim_in_thread(config: SimConfig | None = None) -> Iterator[str]:
    """A running simulator on a free loopback port; yields its base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = BinanceFuturesSim(config or SimConfig())
    try:
        url = asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
        with _remembered(url):
            yield url
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def stream_base(url: str) -> str:
    """The simulator's websocket base, as python-binance's ``FSTREAM_URL`` expects it."""
    return "ws" + url.removeprefix("http") + "/"


async def sim_async_client(url: str, key: str = KEY, secret: str = SECRET) -> Any:
    """python-binance's ``AsyncClient`` on the simulator: REST (including the Spot ping that
    ``create()`` makes) goes to ``url``. Returns the client; close it with
    ``close_connection()``."""
    from binance import AsyncClient  # imported late: see sim_socket_manager

    class SimAsyncClient(AsyncClient):  # type: ignore[misc]
        API_URL = f"{url}/api"
        FUTURES_URL = f"{url}/fapi"

    return await SimAsyncClient.create(key, secret)


def sim_socket_manager(client: Any, url: str, **kwargs: Any) -> Any:
    """python-binance's ``BinanceSocketManager`` with its USD-M stream base on the simulator.

    ``futures_multiplex_socket`` then opens ``<base>market/stream?streams=...``,
    ``kline_futures_socket`` ``<base>market/ws/<pair>_perpetual@continuousKline_<i>`` and
    ``futures_user_socket`` ``<base>private/ws?listenKey=...``.
    """
    from binance import BinanceSocketManager

    manager = BinanceSocketManager(client, **kwargs)
    manager.FSTREAM_URL = stream_base(url)  # __init__ formats the class attribute; override after
    return manager


def sim_listing(admin: SimAdmin) -> ExchangeInfo:
    """The simulator's own exchange info (tick and step sizes), as the workers read it."""
    document = httpx.get(f"{admin.base_url}/fapi/v1/exchangeInfo", timeout=10).json()
    return ExchangeInfo.from_binance(document)
