"""Helpers of the order-flow scenarios (signal flood, exchange instability, portfolio replay):
the candles a scenario feeds as the market, a worker's overall health, the wall clock."""

from __future__ import annotations

import time
from collections.abc import Mapping
from decimal import Decimal

from qtrader.contracts.messages import Candle
from qtrader_tools.candles import flat_candle

CANDLE_EPOCH_MS = 1_700_000_000_000


def overall_status(health: Mapping[str, object]) -> str:
    """The ``status`` of a ``/health`` body (OK, DEGRADED or CRITICAL)."""
    return str(health.get("status", "UNKNOWN"))


def candle(symbol: str, price: Decimal, index: int) -> Candle:
    """The ``index``-th closed 1m candle of a flat bar at ``price``."""
    return flat_candle(symbol, price, open_time_ms=CANDLE_EPOCH_MS + index * 60_000)


def now_ms() -> int:
    return int(time.time() * 1000)
