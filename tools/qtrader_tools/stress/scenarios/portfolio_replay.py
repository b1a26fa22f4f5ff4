"""Portfolio replay: 2,000 trades through a real portfolio worker, checked to the last digit.

What it does: 2,000 fills over three symbols (BTCUSDT, ETHUSDT, SOLUSDT), generated from a
fixed seed as a random walk of prices and of positions that open, grow, partially close, fully
close and flip through zero, with maker or taker fees, are published to the FILLS stream through
the Bus. A real ``qtrader portfolio`` process (the policy published first: it takes its capital
from it) applies them. Then one final candle per symbol sets the marks. The scenario reads the
FILLS stream back and computes the expected figures with ``qtrader_tools.exact`` (Fractions,
no code shared with the ledger), in the stream's order, which is the order the portfolio
replays.

Why the marks come last: the portfolio takes fills from an ordered replay and prices from a
core candle subscription; the two are not ordered relative to each other, so a candle published
while fills are in flight would land at a point of the fill sequence nobody can know, and the
peak and drawdown (which are path dependent) would not be determined. So no candle is published
until the portfolio's snapshot shows every fill applied; until then the ledger values each
symbol at the price of its first fill (it has no other), which the exact account does too. Then
one candle per symbol, each waited for in a snapshot before the next, so the marks also arrive
in a known order.

Criteria (each difference is the snapshot's figure minus the exact figure rounded the way a
snapshot rounds, money to 1e-8 USDT and percentages to 1e-6, half up; each must be exactly 0):
realized PnL, fees, unrealized PnL, equity, peak equity, drawdown and maximum drawdown of the
final ``PortfolioSnapshot`` read from the PORTFOLIO stream; the same figures in the snapshot
taken after the last fill and before any candle (the equity path under the first-fill marks);
positions (quantity and average entry) that differ: 0; fills applied: 2,000, both in the final
snapshot and in the worker's ``qtrader_portfolio_fills_applied_total``. A replay that never
flipped or partially closed a position would prove little, so at least 100 of each are required
(counted by the exact account from the stream, not taken from the generator).

Scale: none. The requirement fixes 2,000 trades, so the full-length run and the scaled one are
the same (some 5 s, most of it starting the worker and publishing).
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from qtrader.contracts import subjects
from qtrader.contracts.messages import Fill, PortfolioSnapshot, Side
from qtrader.instruments import paper_exchange_info
from qtrader_tools.exact import ExactPortfolio, usdt
from qtrader_tools.stress.flow_support import candle
from qtrader_tools.stress.harness import Rig, policy_document
from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions

TRADES = 2_000
SEED = 20_260_611
CAPITAL = Decimal(10_000)
FINAL_TRADES_WITHOUT_FULL_CLOSE = 30  # so the book ends with open positions to mark
MIN_FLIPS = MIN_PARTIAL_CLOSES = 100
PUBLISH_BATCH = 50
WAIT_S = 60.0
FIGURES = (
    "realized_pnl",
    "fees",
    "unrealized_pnl",
    "equity",
    "peak_equity",
    "drawdown_pct",
    "max_drawdown_pct",
)


@dataclass(frozen=True)
class _Market:
    symbol: str
    start_price: Decimal
    step_ticks: int  # the largest price move between two trades, in ticks
    max_lots: int  # the largest trade, in quantity steps


MARKETS = (
    _Market("BTCUSDT", Decimal(30_000), 600, 100),
    _Market("ETHUSDT", Decimal(2_000), 400, 1_000),
    _Market("SOLUSDT", Decimal(100), 20, 30),
)
FEE_RATES = (Decimal("0.0002"), Decimal("0.0004"))  # maker, taker
_SnapshotTest = Callable[[PortfolioSnapshot], bool]


def run(options: StressOptions, result: ScenarioResult) -> None:
    asyncio.run(_run(options, result))


async def _run(options: StressOptions, result: ScenarioResult) -> None:
    fills = generate_fills(SEED, TRADES)
    result.figures["trades_generated"] = len(fills)
    async with Rig(options.work_dir) as rig:
        symbols = [m.symbol for m in MARKETS]
        policy = policy_document(
            "stress-portfolio-replay",
            symbols=symbols,
            paper={"initialCapitalUsd": str(CAPITAL)},
        )
        await rig.publish_policy(policy)
        portfolio = rig.workload("portfolio")
        await rig.wait_healthy([portfolio])
        options.say("portfolio-replay: portfolio up; publishing the fills")
        await _publish(rig, fills)
        before_marks = await _snapshot_when(rig, lambda s: s.fills_applied >= TRADES, "all fills")
        stored = await rig.read_stream(subjects.FILLS, subjects.all_of(subjects.FILL_PREFIX), Fill)
        result.figures["fills_in_stream"] = len(stored)
        account = ExactPortfolio(capital=Fraction(CAPITAL))
        for fill in stored:
            account.apply(fill)
        _record_counts(result, account)
        premark = _differences(before_marks, account)
        options.say("portfolio-replay: fills applied; publishing the final marks")
        final = await _mark(rig, account)
        differences = _differences(final, account)
        applied_metric = await rig.metric(portfolio, "qtrader_portfolio_fills_applied_total")
        _judge(result, final, account, differences, premark, applied_metric)
        _record_figures(result, final, account, before_marks)


def generate_fills(seed: int, count: int) -> list[Fill]:
    """``count`` fills from ``seed``: prices on the tick grid, quantities on the step grid."""
    exchange = paper_exchange_info()
    rng = random.Random(seed)
    ticks = {
        m.symbol: int(m.start_price / exchange.instrument(m.symbol).tick_size) for m in MARKETS
    }
    lots = {m.symbol: 0 for m in MARKETS}  # signed position, in quantity steps
    fills = []
    for index in range(count):
        market = rng.choice(MARKETS)
        instrument = exchange.instrument(market.symbol)
        ticks[market.symbol] = max(
            1, ticks[market.symbol] + rng.randint(-market.step_ticks, market.step_ticks)
        )
        late = index >= count - FINAL_TRADES_WITHOUT_FULL_CLOSE
        signed = _next_trade(rng, lots[market.symbol], market.max_lots, allow_full_close=not late)
        lots[market.symbol] += signed
        price = (ticks[market.symbol] * instrument.tick_size).quantize(instrument.tick_size)
        quantity = (abs(signed) * instrument.step_size).quantize(instrument.step_size)
        fee = (quantity * price * rng.choice(FEE_RATES)).quantize(
            Decimal("1e-8"), rounding=ROUND_HALF_UP
        )
        fills.append(
            Fill(
                fill_id=f"replay-{index:04d}",
                client_order_id=f"replay-order-{index:04d}",
                symbol=market.symbol,
                side=Side.BUY if signed > 0 else Side.SELL,
                quantity=quantity,
                price=price,
                fee=fee,
                ts_ms=1_700_000_000_000 + index * 1_000,
            )
        )
    return fills


def _next_trade(rng: random.Random, position: int, max_lots: int, *, allow_full_close: bool) -> int:
    """The signed size (in steps) of the next trade: open, increase, reduce, close or flip."""
    size = rng.randint(1, max_lots)
    if position == 0:
        return size if rng.random() < 0.5 else -size
    direction = 1 if position > 0 else -1
    held = abs(position)
    roll = rng.random()
    if roll < 0.3 or (roll < 0.6 and held == 1):
        return direction * size  # increase
    if roll < 0.6:
        return -direction * rng.randint(1, held - 1)  # partial close
    if roll < 0.7 and allow_full_close:
        return -direction * held  # full close
    return -direction * (held + size)  # flip through zero


async def _publish(rig: Rig, fills: Sequence[Fill]) -> None:
    """Publish in concurrent batches; the stream's order, whatever it is, is what counts."""
    for start in range(0, len(fills), PUBLISH_BATCH):
        batch = fills[start : start + PUBLISH_BATCH]
        await asyncio.gather(
            *(rig.bus.publish(subjects.fill_subject(fill.symbol), fill) for fill in batch)
        )


async def _snapshot_when(rig: Rig, condition: _SnapshotTest, what: str) -> PortfolioSnapshot:
    """The newest snapshot once it satisfies ``condition``."""
    found: list[PortfolioSnapshot] = []

    async def ready() -> bool:
        snapshot = await rig.bus.last_message(
            subjects.PORTFOLIO, subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot
        )
        if isinstance(snapshot, PortfolioSnapshot) and condition(snapshot):
            found.append(snapshot)
            return True
        return False

    await rig.until(ready, timeout_s=WAIT_S, what=f"a portfolio snapshot with {what}")
    return found[-1]


async def _mark(rig: Rig, account: ExactPortfolio) -> PortfolioSnapshot:
    """One candle per symbol, each seen in a snapshot before the next; the final snapshot."""
    snapshot: PortfolioSnapshot | None = None
    exchange = paper_exchange_info()
    for index, market in enumerate(MARKETS):
        symbol = market.symbol
        price = _final_mark(account, symbol, exchange.instrument(symbol).tick_size)
        await rig.bus.publish(subjects.candle_subject(symbol), candle(symbol, price, index))
        account.mark(symbol, price)
        marked = functools.partial(_marked, symbol=symbol, price=price)
        snapshot = await _snapshot_when(rig, marked, f"{symbol} marked at {price}")
    assert snapshot is not None
    return snapshot


def _final_mark(account: ExactPortfolio, symbol: str, tick: Decimal) -> Decimal:
    """20% against the open position from its latest mark: a last move that deepens the
    drawdown, so the maximum drawdown also depends on the marks."""
    mark = account.marks.get(symbol, Fraction(1))
    position = account.quantity.get(symbol, Fraction(0))
    factor = Fraction(80, 100) if position > 0 else Fraction(120, 100)
    price = Decimal((mark * factor).numerator) / Decimal((mark * factor).denominator)
    return max(tick, (price / tick).to_integral_value() * tick).quantize(tick)


def _marked(snapshot: PortfolioSnapshot, *, symbol: str, price: Decimal) -> bool:
    return snapshot.fills_applied >= TRADES and any(
        p.symbol == symbol and p.mark_price == price for p in snapshot.positions
    )


def _differences(snapshot: PortfolioSnapshot, account: ExactPortfolio) -> dict[str, Decimal]:
    expected = account.rounded()
    return {name: getattr(snapshot, name) - expected[name] for name in FIGURES}


def _position_mismatches(snapshot: PortfolioSnapshot, account: ExactPortfolio) -> int:
    shown = {p.symbol: p for p in snapshot.positions}
    mismatches = len(set(shown) - set(account.quantity))
    for symbol, quantity in account.quantity.items():
        view = shown.get(symbol)
        entry = usdt(account.average[symbol]) if quantity != 0 else Decimal(0)
        if view is None or (Fraction(view.quantity), view.avg_entry_price) != (quantity, entry):
            mismatches += 1
    return mismatches


def _judge(
    result: ScenarioResult,
    final: PortfolioSnapshot,
    account: ExactPortfolio,
    differences: dict[str, Decimal],
    premark: dict[str, Decimal],
    applied_metric: float,
) -> None:
    for name, difference in differences.items():
        result.check(f"{name} difference (final snapshot - exact)", float(abs(difference)), "==", 0)
    wrong_before = sum(1 for d in premark.values() if d != 0)
    result.check("figures differing after the last fill, before any mark", wrong_before, "==", 0)
    result.check("positions differing", _position_mismatches(final, account), "==", 0)
    result.check("fills applied (final snapshot)", final.fills_applied, "==", TRADES)
    result.check("fills applied (worker metric)", int(applied_metric), "==", TRADES)
    result.check("position flips replayed", account.counts.flips, ">=", MIN_FLIPS)
    result.check("partial closes replayed", account.counts.partial_closes, ">=", MIN_PARTIAL_CLOSES)


def _record_counts(result: ScenarioResult, account: ExactPortfolio) -> None:
    counts = account.counts
    result.figures.update(
        {
            "opens": counts.opens,
            "increases": counts.increases,
            "partial_closes": counts.partial_closes,
            "full_closes": counts.full_closes,
            "flips": counts.flips,
        }
    )


def _record_figures(
    result: ScenarioResult,
    final: PortfolioSnapshot,
    account: ExactPortfolio,
    before_marks: PortfolioSnapshot,
) -> None:
    expected = account.rounded()
    for name in FIGURES:
        result.figures[f"snapshot_{name}"] = str(getattr(final, name))
        result.figures[f"exact_{name}"] = str(expected[name])
    result.figures["equity_before_marks"] = str(before_marks.equity)
    result.figures["max_drawdown_pct_before_marks"] = str(before_marks.max_drawdown_pct)
    result.figures["open_positions_at_end"] = {
        symbol: str(Decimal(q.numerator) / Decimal(q.denominator))
        for symbol, q in account.open_positions.items()
    }
    result.figures["final_snapshot_sequence"] = final.sequence
