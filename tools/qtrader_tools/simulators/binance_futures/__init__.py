"""A strict, deterministic Binance USD-M futures simulator (REST and websockets) for tests.

Point python-binance at it with ``Client(key, secret, ping=False)`` and
``client.FUTURES_URL = f"{base_url}/fapi"``, ``client.API_URL = f"{base_url}/api"``. Run it
in-process with ``BinanceFuturesSim`` (``await sim.start()`` / ``await sim.stop()``) or as a
process with ``python -m qtrader_tools.simulators.binance_futures``; drive it with ``SimAdmin``.

The same port serves Binance's websocket streams (``streams``): kline streams at ``/ws/<name>``
and ``/stream?streams=a/b`` (also under ``/market``, ``/public``, ``/private``) and user data on
a listen key. Point python-binance's ``BinanceSocketManager`` at it by setting its instance
attribute ``FSTREAM_URL = "ws://HOST:PORT/"`` after construction; an ``AsyncClient`` needs its
class attributes ``API_URL``/``FUTURES_URL`` set before ``create()`` (it pings at once), e.g. in
a subclass (``tests/support/binance_sim.py`` has both).

Modules: ``server`` (routes and the request pipeline), ``accounting`` (rate limits, bans, audit),
``matching`` (orders, fills, trades, positions, countdowns, funding, commissions), ``ledger``
(income and wallet balances), ``account`` (account REST views), ``klines`` (klines from the
price history), ``events`` (user-data events), ``listen_keys``, ``streams`` (websockets),
``faults``, ``config``, ``admin``.
"""

from __future__ import annotations

from .admin import SimAdmin, SimAdminError
from .config import ConfigError, SimConfig, WindowMode
from .faults import FaultKind
from .server import BinanceFuturesSim

__all__ = [
    "BinanceFuturesSim",
    "ConfigError",
    "FaultKind",
    "SimAdmin",
    "SimAdminError",
    "SimConfig",
    "WindowMode",
]
