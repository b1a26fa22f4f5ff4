"""A strict, deterministic Binance USD-M futures REST simulator for tests, benchmarks, stress runs.

Point python-binance at it with ``Client(key, secret, ping=False)`` and
``client.FUTURES_URL = f"{base_url}/fapi"``, ``client.API_URL = f"{base_url}/api"``. Run it
in-process with ``BinanceFuturesSim`` (``await sim.start()`` / ``await sim.stop()``) or as a
process with ``python -m qtrader.simulators.binance_futures``; drive it with ``SimAdmin``.

Modules: ``server`` (routes and the request pipeline), ``accounting`` (rate limits, bans, audit),
``matching`` (orders, fills, trades, positions, countdowns), ``faults``, ``config``, ``admin``.
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
