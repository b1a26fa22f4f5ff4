"""The exposure invariant, checked from the venue's own records, never from our bookkeeping.

Safety invariant 1 (REQUIREMENTS.md): no position on the venue exceeds the policy's limits by
more than one step size, and no reduce-only order is rejected. ``check_exposure`` replays the
venue's trades in the venue's order (its trade ids: the order it booked them in; its clock may
go back, as the clock-skew test sets it), keeps each symbol's signed position,
and after every trade compares it with the limits:

* ``max_position_usd``: after every trade that *adds* exposure (opens a position, adds to it or
  flips it to the other side), the position's notional valued at that trade's price may exceed
  the limit by at most one step (``step_size x price``): sizing rounds toward zero, so one step
  is the only slack an honest sizing can need. A trade that only reduces a position is not
  judged: the requirement values a position at the order's price, and a reduction leaves less
  than the position held before it; if that is worth more than the limit at the reduction's
  price, the market moved (across a broker stall a burst of held-back candles moves it several
  steps between two sends), not our sending. Holding would be no better, and the checker sees
  no trade then. Every trade that adds is valued with the whole position at its own price, so
  adding after a rise is judged at the new price;
* ``max_open_positions``: the number of symbols with a non-zero position;
* reduce-only: every order the venue refused with -2022 ("ReduceOnly Order is rejected") is a
  violation, because it means the sender believed in a position the venue did not have.

The checker is pure: stress scenarios and integration tests feed it the records of the local
Binance-compatible server (``from_sim_records`` reads its admin API's shapes) or, in paper
mode, the paper exchange's fills (``from_paper_fills``: the FILLS stream is the only record that
venue keeps), and fail on any violation (``judge_exposure`` adds the criteria to a scenario).
The report also carries the worst ratio of position notional to the limit after a trade that
adds (the judged figure), so a test can print the figure it asserts on, and the worst after any
trade (``max_held_ratio``: what the market made of the positions, reported, not judged).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from qtrader.contracts.messages import Fill
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.instruments import paper_exchange_info
from qtrader_tools.stress.result import ScenarioResult

REDUCE_ONLY_REJECTED = -2022
_ZERO = Decimal(0)


class ViolationKind(enum.StrEnum):
    MAX_POSITION_USD = "max_position_usd"
    MAX_OPEN_POSITIONS = "max_open_positions"
    REDUCE_ONLY_REJECTED = "reduce_only_rejected"


@dataclass(frozen=True, kw_only=True)
class VenueTrade:
    """One trade as the venue recorded it; ``side`` is ``"BUY"`` or ``"SELL"``."""

    trade_id: int
    symbol: str
    side: str
    quantity: Decimal
    price: Decimal
    time_ms: int
    reduce_only: bool = False
    client_order_id: str = ""  # of the order it filled; "" when the venue did not say

    @property
    def signed_quantity(self) -> Decimal:
        return self.quantity if self.side == "BUY" else -self.quantity


@dataclass(frozen=True, kw_only=True)
class VenueRejection:
    """An order request the venue refused with a business code (e.g. -2022)."""

    time_ms: int
    code: int
    path: str = "/fapi/v1/order"


@dataclass(frozen=True, kw_only=True)
class ExposureLimits:
    """The policy's limits in force, and each symbol's step size (the allowed slack)."""

    max_position_usd: Decimal
    max_open_positions: int
    step_sizes: Mapping[str, Decimal]


@dataclass(frozen=True, kw_only=True)
class Violation:
    kind: ViolationKind
    time_ms: int
    detail: str
    symbol: str | None = None


@dataclass(frozen=True, kw_only=True)
class ExposureReport:
    violations: tuple[Violation, ...]
    # The largest |position| x trade price / max_position_usd after a trade that added exposure.
    max_position_ratio: Decimal
    # The same after any trade, reductions included: market moves show here, not judged.
    max_held_ratio: Decimal
    max_open_positions: int
    trades: int
    reduce_only_rejections: int
    final_positions: Mapping[str, Decimal] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        head = (
            f"{self.trades} trades, max position/limit {self.max_position_ratio:.4f} "
            f"(held, market moves included: {self.max_held_ratio:.4f}), "
            f"max open {self.max_open_positions}, "
            f"{self.reduce_only_rejections} reduce-only rejections"
        )
        if self.ok:
            return head
        shown = "; ".join(f"{v.kind.value} at {v.time_ms}: {v.detail}" for v in self.violations[:5])
        return f"{head}; {len(self.violations)} violations: {shown}"


def check_exposure(
    *,
    trades: Iterable[VenueTrade],
    rejections: Iterable[VenueRejection] = (),
    limits: ExposureLimits,
) -> ExposureReport:
    """Replay ``trades`` and report every breach of ``limits`` and every reduce-only refusal."""
    positions: dict[str, Decimal] = {}
    violations: list[Violation] = []
    worst_ratio, held_ratio, worst_open, count = _ZERO, _ZERO, 0, 0
    # By trade id, not time: a venue's clock can be set back (seen: the clock-skew test's 20 s
    # made two later trades sort first and showed a 0.063 BTC position the venue never held).
    for trade in sorted(trades, key=lambda t: t.trade_id):
        count += 1
        before = positions.get(trade.symbol, _ZERO)
        position = before + trade.signed_quantity
        positions[trade.symbol] = position
        notional = abs(position) * trade.price
        held_ratio = max(held_ratio, notional / limits.max_position_usd)
        if _adds_exposure(before, position):
            worst_ratio = max(worst_ratio, notional / limits.max_position_usd)
            slack = limits.step_sizes.get(trade.symbol, _ZERO) * trade.price
            if notional > limits.max_position_usd + slack:
                violations.append(_oversized(trade, position, notional, limits))
        open_now = sum(1 for qty in positions.values() if qty != 0)
        worst_open = max(worst_open, open_now)
        if open_now > limits.max_open_positions:
            violations.append(
                Violation(
                    kind=ViolationKind.MAX_OPEN_POSITIONS,
                    time_ms=trade.time_ms,
                    symbol=trade.symbol,
                    detail=f"{open_now} positions open, at most {limits.max_open_positions}",
                )
            )
    refused = [r for r in rejections if r.code == REDUCE_ONLY_REJECTED]
    violations += [
        Violation(
            kind=ViolationKind.REDUCE_ONLY_REJECTED,
            time_ms=r.time_ms,
            detail=f"{r.path} refused with {r.code}",
        )
        for r in refused
    ]
    return ExposureReport(
        violations=tuple(violations),
        max_position_ratio=worst_ratio,
        max_held_ratio=held_ratio,
        max_open_positions=worst_open,
        trades=count,
        reduce_only_rejections=len(refused),
        final_positions=positions,
    )


def _adds_exposure(before: Decimal, after: Decimal) -> bool:
    """Whether a trade taking a position from ``before`` to ``after`` opened it, added to it or
    flipped it (a flip opens a position on the other side, however small)."""
    return abs(after) > abs(before) or before * after < 0


def _oversized(
    trade: VenueTrade, position: Decimal, notional: Decimal, limits: ExposureLimits
) -> Violation:
    return Violation(
        kind=ViolationKind.MAX_POSITION_USD,
        time_ms=trade.time_ms,
        symbol=trade.symbol,
        detail=(
            f"{trade.symbol} position {position} worth {notional} at {trade.price} "
            f"> {limits.max_position_usd} (+1 step)"
        ),
    )


# --- the local Binance-compatible server's records --------------------------------------------


def from_sim_records(
    *,
    trades: Sequence[Mapping[str, Any]],
    orders: Sequence[Mapping[str, Any]],
    log: Sequence[Mapping[str, Any]] = (),
) -> tuple[list[VenueTrade], list[VenueRejection]]:
    """The trades and refusals in the shapes of ``SimAdmin.trades()/orders()/log()``."""
    reduce_only = {int(o["orderId"]): bool(o.get("reduceOnly", False)) for o in orders}
    client_order_ids = {int(o["orderId"]): str(o.get("clientOrderId", "")) for o in orders}
    venue_trades = [
        VenueTrade(
            trade_id=int(t["id"]),
            symbol=str(t["symbol"]),
            side=str(t["side"]),
            quantity=Decimal(str(t["qty"])),
            price=Decimal(str(t["price"])),
            time_ms=int(t["time"]),
            reduce_only=reduce_only.get(int(t["orderId"]), False),
            client_order_id=client_order_ids.get(int(t["orderId"]), ""),
        )
        for t in trades
    ]
    rejections = [
        VenueRejection(time_ms=int(e["t_ms"]), code=int(e["code"]), path=str(e.get("path", "")))
        for e in log
        if e.get("code") is not None
    ]
    return venue_trades, rejections


# --- the paper exchange's records ---------------------------------------------------------------


def from_paper_fills(fills: Sequence[Fill]) -> list[VenueTrade]:
    """The paper exchange's trades, in the order it published them (ties in time kept)."""
    return [
        VenueTrade(
            trade_id=index,
            symbol=fill.symbol,
            side=fill.side.value,
            quantity=fill.quantity,
            price=fill.price,
            time_ms=fill.ts_ms,
            reduce_only=fill.reduce_only,
        )
        for index, fill in enumerate(fills)
    ]


def paper_limits(spec: TradingPolicySpec) -> ExposureLimits:
    """A policy's limits, with the paper listing's step sizes for its symbols."""
    listing = paper_exchange_info()
    return ExposureLimits(
        max_position_usd=spec.risk.max_position_usd,
        max_open_positions=spec.risk.max_open_positions,
        step_sizes={s: listing.instrument(s).step_size for s in spec.symbols},
    )


def judge_exposure(result: ScenarioResult, report: ExposureReport) -> None:
    """Safety invariant 1 as a scenario's criteria, with the worst figures (the position held
    after any trade, market moves included, as a figure: see ``check_exposure``)."""
    result.figures["max_position_over_limit"] = float(report.max_position_ratio)
    result.figures["max_held_over_limit (market moves included, not judged)"] = float(
        report.max_held_ratio
    )
    result.figures["exposure_violations"] = [
        f"{v.kind.value} at {v.time_ms}: {v.detail}" for v in report.violations[:10]
    ]
    beyond = len([v for v in report.violations if v.kind is not ViolationKind.REDUCE_ONLY_REJECTED])
    result.check("positions beyond their limit (+1 step) or open beyond the count", beyond, "==", 0)
    result.check("reduce-only orders rejected (-2022)", report.reduce_only_rejections, "==", 0)
