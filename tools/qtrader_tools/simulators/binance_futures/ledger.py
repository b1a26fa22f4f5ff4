"""The account ledger: every booked amount (income) and the balances that are their sums.

Binance's income history (``GET /fapi/v1/income``) is the ledger itself: each realized PnL,
commission, funding fee and transfer is one entry with a ``tranId``. A wallet balance is never
kept as a running float: it is the start-up balance of the asset plus the exact ``Decimal`` sum
of that asset's entries, so ``wallet = deposits + realized PnL - commissions + funding`` holds to
the last digit by construction. Amounts are booked to 8 decimal places (``decimals.to_step``).

Query rules (USD-M "Get Income History"): ``symbol`` and ``incomeType`` filter; ``startTime``
and ``endTime`` are inclusive; with neither, the last 7 days; the answer is in time order and
holds the first ``limit`` entries of the window (default 100, at most 1000).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from . import errors
from .decimals import plain

_SEVEN_DAYS_MS = 7 * 86_400_000
# Binance's documented income types; the simulator books the first four.
KNOWN_TYPES = (
    "TRANSFER",
    "REALIZED_PNL",
    "COMMISSION",
    "FUNDING_FEE",
    "WELCOME_BONUS",
    "INSURANCE_CLEAR",
    "REFERRAL_KICKBACK",
    "COMMISSION_REBATE",
    "API_REBATE",
    "CONTEST_REWARD",
    "CROSS_COLLATERAL_TRANSFER",
    "OPTIONS_PREMIUM_FEE",
    "OPTIONS_SETTLE_PROFIT",
    "INTERNAL_TRANSFER",
    "AUTO_EXCHANGE",
    "DELIVERED_SETTELMENT",
    "COIN_SWAP_DEPOSIT",
    "COIN_SWAP_WITHDRAW",
    "POSITION_LIMIT_INCREASE_FEE",
    "STRATEGY_UMFUTURES_TRANSFER",
    "FEE_RETURN",
    "BFUSD_REWARD",
)


class IncomeType(enum.StrEnum):
    TRANSFER = "TRANSFER"
    REALIZED_PNL = "REALIZED_PNL"
    COMMISSION = "COMMISSION"
    FUNDING_FEE = "FUNDING_FEE"


@dataclass(frozen=True)
class Income:
    tran_id: int
    api_key: str
    income_type: IncomeType
    amount: Decimal  # positive flows in, negative flows out
    asset: str
    time_ms: int
    symbol: str = ""
    trade_id: str = ""
    info: str = ""
    # Before this time GET /fapi/v1/income does not show the entry, though the balance holds it
    # (a venue whose history lags its balance; far in the future: money no row explains).
    listed_from_ms: int = 0

    def as_binance(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "incomeType": self.income_type.value,
            "income": plain(self.amount),
            "asset": self.asset,
            "info": self.info or self.income_type.value,
            "time": self.time_ms,
            "tranId": self.tran_id,
            "tradeId": self.trade_id,
        }


@dataclass
class Ledger:
    entries: list[Income] = field(default_factory=list)
    _sums: dict[tuple[str, str], Decimal] = field(default_factory=dict)  # (api key, asset)
    _realized: dict[tuple[str, str], Decimal] = field(default_factory=dict)  # (api key, symbol)

    def book(
        self,
        *,
        api_key: str,
        income_type: IncomeType,
        amount: Decimal,
        asset: str,
        time_ms: int,
        symbol: str = "",
        trade_id: str = "",
        info: str = "",
        listed_from_ms: int = 0,
    ) -> Income:
        entry = Income(
            len(self.entries) + 1,
            api_key,
            income_type,
            amount,
            asset,
            time_ms,
            symbol,
            trade_id,
            info,
            listed_from_ms,
        )
        self.entries.append(entry)
        key = (api_key, asset)
        self._sums[key] = self._sums.get(key, Decimal(0)) + amount
        if income_type is IncomeType.REALIZED_PNL:
            pair = (api_key, symbol)
            self._realized[pair] = self._realized.get(pair, Decimal(0)) + amount
        return entry

    def total(self, api_key: str, asset: str) -> Decimal:
        """The sum of every amount booked to ``asset`` for ``api_key``."""
        return self._sums.get((api_key, asset), Decimal(0))

    def realized(self, api_key: str, symbol: str) -> Decimal:
        """Accumulated realized PnL of one symbol (ACCOUNT_UPDATE's ``cr``)."""
        return self._realized.get((api_key, symbol), Decimal(0))

    def query(self, api_key: str, params: Mapping[str, str], now_ms: int) -> list[Income]:
        symbol = params.get("symbol") or None
        kind = params.get("incomeType") or None
        if kind is not None and kind not in KNOWN_TYPES:
            raise errors.invalid_value("incomeType")
        start, end = _time(params, "startTime"), _time(params, "endTime")
        limit = _time(params, "limit") or 100
        if not 1 <= limit <= 1000:
            raise errors.invalid_value("limit")
        if start is None and end is None:
            start, end = now_ms - _SEVEN_DAYS_MS, now_ms
        found = [
            e
            for e in self.entries
            if e.api_key == api_key
            and e.listed_from_ms <= now_ms
            and (symbol is None or e.symbol == symbol)
            and (kind is None or e.income_type.value == kind)
            and (start is None or e.time_ms >= start)
            and (end is None or e.time_ms <= end)
        ]
        return found[:limit]


def _time(params: Mapping[str, str], name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise errors.invalid_value(name)
    return int(value)
