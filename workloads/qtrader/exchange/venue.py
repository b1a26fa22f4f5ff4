"""The one interface execution trades through: the paper exchange and Binance both implement it.

A venue takes one order (an ``OrderIntent`` for one attempt: its own client order id, quantity
and limit price) and answers with the order's state and its fills, or raises one of
``qtrader.exchange.errors``. Everything above it (the order driver, the halt gate, the intake)
is the same code in paper, testnet and live mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple, Protocol, runtime_checkable

from qtrader.contracts.messages import Fill, OrderIntent, OrderStatus
from qtrader.health.contract import DependencyHealth
from qtrader.instruments import ExchangeInfo


class VenueOrder(NamedTuple):
    """One order as the venue reports it, with the fills it has had so far (exact fees). A
    named tuple: one is made for every attempt (a backtest makes tens of thousands)."""

    client_order_id: str
    order_id: str
    symbol: str
    status: OrderStatus
    executed_qty: Decimal
    avg_price: Decimal
    fills: tuple[Fill, ...] = ()


@dataclass(frozen=True, kw_only=True)
class VenuePosition:
    """One position as the venue reports it (Binance's ``positionRisk``)."""

    symbol: str
    quantity: Decimal  # positive long, negative short (``positionAmt``)
    entry_price: Decimal
    mark_price: Decimal
    unrealized_pnl: Decimal  # at ``mark_price``


@dataclass(frozen=True, kw_only=True)
class VenueIncome:
    """One entry of the venue's income history (Binance's ``GET /fapi/v1/income``) as it
    states it: every amount booked to the account, our trades' PnL and commissions included
    (``qtrader.contracts.messages.IncomeType`` says how each type is booked)."""

    tran_id: str  # unique within one income type (Binance: "tranId")
    income_type: str
    amount: Decimal  # signed: positive flows in
    asset: str
    symbol: str  # "" when the entry has none (a transfer)
    time_ms: int
    info: str = ""


@runtime_checkable
class IncomeReader(Protocol):
    """A venue that keeps an income history (Binance; the paper exchange books no funding, no
    transfers, nothing but its fills)."""

    async def income(self, *, start_ms: int, limit: int) -> list[VenueIncome]:
        """The first ``limit`` entries booked at ``start_ms`` or later, oldest first."""
        ...


@runtime_checkable
class AccountReader(Protocol):
    """A venue that can say what the account holds (Binance; the paper exchange's only record
    is the FILLS stream, so it has nothing to compare with)."""

    async def account(self) -> tuple[list[VenuePosition], Decimal]:
        """Every non-zero position, and the USDT wallet balance."""
        ...


class Venue(Protocol):
    name: str

    @property
    def exchange_info(self) -> ExchangeInfo: ...

    async def start(self, symbols: Sequence[str]) -> list[VenueOrder]:
        """Connect, load the instruments, and return the orders still open there (ours)."""
        ...

    async def place(self, order: OrderIntent, *, not_after_ms: int | None = None) -> VenueOrder:
        """Send one order and return its state once the venue answers (final for IOC).

        If the wall clock passes ``not_after_ms`` (epoch ms) before the order goes out (it
        waits for the rate limiter, a back-off), it is not sent: ``NotSent``."""
        ...

    async def lookup(self, symbol: str, client_order_id: str) -> VenueOrder | None:
        """The order with this client id, or None when the venue does not know it."""
        ...

    async def cancel_all(self, symbols: Sequence[str]) -> int:
        """Cancel every open order on ``symbols``; returns how many were cancelled."""
        ...

    async def arm_dead_man(self, symbols: Sequence[str], countdown_ms: int) -> None:
        """(Re)start the venue-side countdown that cancels open orders if we go silent."""
        ...

    async def refresh(self) -> None:
        """Reload what can change at the venue (instruments, filters, limits)."""
        ...

    def health(self) -> DependencyHealth: ...

    def limiter_health(self) -> DependencyHealth:
        """The rate limiter's state: shared, in-process, or fallen back."""
        ...

    async def close(self) -> None: ...
