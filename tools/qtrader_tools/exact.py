"""An independent, exact account of a fill stream and its account entries, to check the
portfolio's ledger by.

Everything is a ``Fraction``: no rounding anywhere, so what comes out is the mathematically exact
figure, and the only rounding is the one a ``PortfolioSnapshot`` applies to its output (money to
1e-8 USDT, percentages to 1e-6, half away from zero), done here on integers. It shares no code
with ``qtrader.portfolio.ledger``: it is plain average-cost accounting in one-way position mode,
written from the rules, not from the ledger.

The rules it implements (the ledger's contract, not its code):

* a fill in the position's direction (or from flat) moves the average entry price to the
  quantity-weighted mean; a fill against it realizes ``closed quantity x (price - average)``
  (sign by the position's side); a fill that crosses zero closes the position and opens the
  remainder on the other side at the fill price;
* fees are summed as paid;
* account entries (funding, transfers, other income) in USDT are summed by kind, funding also
  per symbol; one in another asset is kept in that asset and counts in no USDT figure (it is
  not valued); equity is ``capital + realized - fees + funding + transfers + other income +
  unrealized``;
* a transfer is capital moving, not a gain or a loss: the peak is scaled by the equity's ratio
  after/before it when both are positive (the drawdown in percent stays what it was), else moved
  by the amount;
* a symbol is valued at its latest mark; one that has never had a mark is valued at the price of
  its first fill (the portfolio has no other price for it until a candle arrives);
* the peak, the drawdown (``(peak - equity) / peak x 100`` below the peak, else 0) and the
  maximum drawdown are updated after every fill and every mark.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from qtrader.contracts.messages import (
    SETTLEMENT_ASSET,
    AccountEntry,
    Candle,
    EntryCategory,
    Fill,
    PortfolioSnapshot,
)

USDT_STEP = Fraction(1, 10**8)  # a snapshot's money precision
PCT_STEP = Fraction(1, 10**6)  # a snapshot's percentage precision
_CENT = Fraction(1, 100)


@dataclass
class TradeCounts:
    """What kind of trades the account saw: the replay must exercise each."""

    opens: int = 0  # from flat
    increases: int = 0
    partial_closes: int = 0
    full_closes: int = 0
    flips: int = 0


@dataclass
class ExactPortfolio:
    """Positions, PnL, fees, equity and drawdown after each fill and mark, exactly."""

    capital: Fraction
    quantity: dict[str, Fraction] = field(default_factory=dict)
    average: dict[str, Fraction] = field(default_factory=dict)
    marks: dict[str, Fraction] = field(default_factory=dict)
    realized: Fraction = Fraction(0)
    fees: Fraction = Fraction(0)
    counts: TradeCounts = field(default_factory=TradeCounts)
    fills: int = 0
    # Account entries in USDT, by kind (funding also per symbol), and how many were booked.
    funding: Fraction = Fraction(0)
    funding_by_symbol: dict[str, Fraction] = field(default_factory=dict)
    transfers: Fraction = Fraction(0)
    other_income: Fraction = Fraction(0)
    entries: int = 0
    # The peak and drawdowns cost a valuation of every position after each event; a replay
    # that needs only the final figures turns them off (the peak stays the capital, the
    # drawdowns 0).
    track_drawdown: bool = True

    def __post_init__(self) -> None:
        if self.capital <= 0:
            raise ValueError(f"capital must be positive, got {self.capital}")
        self.peak = self.capital
        self.max_drawdown_pct = Fraction(0)

    # --- inputs -------------------------------------------------------------------------------

    def apply(self, fill: Fill) -> None:
        # In USDT: a fee in another asset at its stated value; one with none stays out (the
        # portfolio reports its equity incomplete then, it does not guess).
        fee = Fraction(fill.fee_value_usdt or 0)
        delta = Fraction(fill.quantity) * fill.side.sign
        self.trade(fill.symbol, delta, Fraction(fill.price), fee)

    def trade(self, symbol: str, delta: Fraction, price: Fraction, fee: Fraction) -> None:
        """A fill of signed quantity ``delta`` (positive buys) at ``price``, paying ``fee``."""
        q = self.quantity.get(symbol, Fraction(0))
        avg = self.average.get(symbol, Fraction(0))
        self.fees += fee
        self.marks.setdefault(symbol, price)
        self.fills += 1
        if q == 0 or (q > 0) == (delta > 0):
            self._count_opening(q)
            self.average[symbol] = (abs(q) * avg + abs(delta) * price) / (abs(q) + abs(delta))
            self.quantity[symbol] = q + delta
        else:
            closed = min(abs(q), abs(delta))
            self.realized += closed * (price - avg) * (1 if q > 0 else -1)
            remaining = q + delta
            self.quantity[symbol] = remaining
            self._count_closing(q, remaining)
            if remaining != 0 and (remaining > 0) != (q > 0):
                self.average[symbol] = price
        self._track()

    def apply_entry(self, entry: AccountEntry) -> None:
        self.entries += 1
        if entry.asset != SETTLEMENT_ASSET:
            return  # kept in its own asset: never valued, in no USDT figure
        amount = Fraction(entry.amount)
        if entry.category is EntryCategory.TRANSFER:
            before = self.equity
            self.transfers += amount
            after = self.equity
            scalable = before > 0 and after > 0
            self.peak = self.peak * after / before if scalable else self.peak + amount
        elif entry.category is EntryCategory.FUNDING:
            assert entry.symbol is not None
            self.funding += amount
            self.funding_by_symbol[entry.symbol] = (
                self.funding_by_symbol.get(entry.symbol, Fraction(0)) + amount
            )
        else:
            self.other_income += amount
        self._track()

    def mark(self, symbol: str, price: Decimal | Fraction) -> None:
        if price <= 0:
            raise ValueError(f"a mark must be positive: {symbol} {price}")
        self.marks[symbol] = Fraction(price)
        self._track()

    # --- figures ------------------------------------------------------------------------------

    @property
    def unrealized(self) -> Fraction:
        return sum(
            (q * (self.marks[s] - self.average[s]) for s, q in self.quantity.items() if q != 0),
            Fraction(0),
        )

    @property
    def wallet(self) -> Fraction:
        booked = self.funding + self.transfers + self.other_income
        return self.capital + self.realized - self.fees + booked

    @property
    def equity(self) -> Fraction:
        return self.wallet + self.unrealized

    @property
    def drawdown_pct(self) -> Fraction:
        return _drawdown_pct(self.peak, self.equity)

    @property
    def open_positions(self) -> dict[str, Fraction]:
        return {s: q for s, q in sorted(self.quantity.items()) if q != 0}

    def rounded(self) -> dict[str, Decimal]:
        """The figures as a ``PortfolioSnapshot`` shows them (same names as its fields)."""
        return {
            "initial_capital": usdt(self.capital),
            "realized_pnl": usdt(self.realized),
            "unrealized_pnl": usdt(self.unrealized),
            "fees": usdt(self.fees),
            "funding": usdt(self.funding),
            "transfers": usdt(self.transfers),
            "other_income": usdt(self.other_income),
            "equity": usdt(self.equity),
            "peak_equity": usdt(self.peak),
            "drawdown_pct": pct(self.drawdown_pct),
            "max_drawdown_pct": pct(self.max_drawdown_pct),
        }

    # --- internals ----------------------------------------------------------------------------

    def _track(self) -> None:
        if not self.track_drawdown:
            return
        equity = self.equity
        if equity > self.peak:
            self.peak = equity
        self.max_drawdown_pct = max(self.max_drawdown_pct, _drawdown_pct(self.peak, equity))

    def _count_opening(self, before: Fraction) -> None:
        if before == 0:
            self.counts.opens += 1
        else:
            self.counts.increases += 1

    def _count_closing(self, before: Fraction, after: Fraction) -> None:
        if after == 0:
            self.counts.full_closes += 1
        elif (after > 0) != (before > 0):
            self.counts.flips += 1
        else:
            self.counts.partial_closes += 1


def _drawdown_pct(peak: Fraction, equity: Fraction) -> Fraction:
    # A peak is not positive only once transfers took everything out: nothing left to fall.
    return (peak - equity) / peak * 100 if equity < peak and peak > 0 else Fraction(0)


def round_half_up(value: Fraction | Decimal, step: Fraction) -> Decimal:
    """``value`` to a multiple of ``step``, ties away from zero (Decimal's ROUND_HALF_UP);
    computed on integers. Never "-0": a zero result is plain 0 at the step's exponent."""
    exact = Fraction(value)
    units = abs(exact) / step
    whole = units.numerator // units.denominator
    if units - whole >= Fraction(1, 2):
        whole += 1
    return _decimal(whole if exact >= 0 else -whole, _exponent(step))


def _decimal(units: int, exponent: int) -> Decimal:
    """``units x 10^exponent`` built from its digits: exact, whatever the decimal context."""
    digits = tuple(int(d) for d in str(abs(units)))
    return Decimal((1 if units < 0 else 0, digits, exponent))


def _exponent(step: Fraction) -> int:
    """The decimal exponent of a step of the form 1/10^k."""
    if step.numerator != 1 or 10 ** (len(str(step.denominator)) - 1) != step.denominator:
        raise ValueError(f"step must be 1/10^k, got {step}")
    return -(len(str(step.denominator)) - 1)


def usdt(value: Fraction | Decimal) -> Decimal:
    """Money as a snapshot shows it: to 1e-8 USDT, half up."""
    return round_half_up(value, USDT_STEP)


def pct(value: Fraction | Decimal) -> Decimal:
    """A percentage as a snapshot shows it: to 1e-6, half up."""
    return round_half_up(value, PCT_STEP)


def cents(value: Fraction | Decimal) -> Decimal:
    """An exact value rounded to the cent, half to even (Decimal's default rounding)."""
    exact = Fraction(value)
    units = exact / _CENT
    whole = units.numerator // units.denominator  # floor
    rest = units - whole
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2 == 1):
        whole += 1
    return _decimal(whole, -2)


def replay(
    fills: Iterable[Fill | AccountEntry],
    *,
    capital: Fraction | Decimal,
    marks: Mapping[str, Decimal] | None = None,
) -> ExactPortfolio:
    """The account after ``fills`` (and account entries among them) in order, then ``marks``
    in their order."""
    account = ExactPortfolio(capital=Fraction(capital))
    for event in fills:
        if isinstance(event, Fill):
            account.apply(event)
        else:
            account.apply_entry(event)
    for symbol, price in (marks or {}).items():
        account.mark(symbol, price)
    return account


def independent_portfolio(
    fills: list[Fill], marks: Mapping[str, Decimal]
) -> tuple[Fraction, Fraction, Fraction, dict[str, Fraction]]:
    """Realized PnL, fees, unrealized PnL (at ``marks``) and positions, by average cost."""
    account = replay(fills, capital=Fraction(1))
    for symbol, q in account.quantity.items():
        if q != 0:
            account.marks[symbol] = Fraction(marks[symbol])
    return account.realized, account.fees, account.unrealized, dict(account.quantity)


# --- a portfolio snapshot against the exact account ------------------------------------------


def last_closes(candles: Iterable[Candle]) -> dict[str, Decimal]:
    """Each symbol's close at its latest open time."""
    latest: dict[str, Candle] = {}
    for candle in candles:
        if candle.symbol not in latest or candle.open_time_ms > latest[candle.symbol].open_time_ms:
            latest[candle.symbol] = candle
    return {symbol: candle.close for symbol, candle in latest.items()}


def ledger_mismatches(
    snapshot: PortfolioSnapshot | None,
    fills: Sequence[Fill],
    *,
    marks: Mapping[str, Decimal],
    capital: Decimal,
    entries: Sequence[AccountEntry] = (),
) -> list[str]:
    """What of the snapshot differs from the exact account of ``fills`` and ``entries`` marked
    at ``marks``, to the cent (quantities exactly). Shared by the stress scenarios and the
    integration tests' invariant checker, so the rule is written once. The figures compared are
    sums, so the entries may come after the fills here whatever their order on the stream."""
    if snapshot is None:
        return ["no portfolio snapshot"]
    account = replay([*fills, *entries], capital=capital, marks=marks)
    wrong = []
    if snapshot.fills_applied != len(fills):
        wrong.append(f"fills applied {snapshot.fills_applied} != {len(fills)} on FILLS")
    if snapshot.entries_applied != len(entries):
        wrong.append(f"entries applied {snapshot.entries_applied} != {len(entries)} on FILLS")
    for name, theirs, ours in (
        ("realized", snapshot.realized_pnl, account.realized),
        ("fees", snapshot.fees, account.fees),
        ("funding", snapshot.funding, account.funding),
        ("transfers", snapshot.transfers, account.transfers),
        ("other income", snapshot.other_income, account.other_income),
        ("unrealized", snapshot.unrealized_pnl, account.unrealized),
        ("equity", snapshot.equity, account.equity),
    ):
        if cents(theirs) != cents(ours):
            wrong.append(f"{name} {cents(theirs)} != {cents(ours)}")
    return wrong + _position_mismatches(snapshot, account)


def _position_mismatches(snapshot: PortfolioSnapshot, account: ExactPortfolio) -> list[str]:
    """Each symbol's quantity exactly, and its funding to the cent."""
    wrong = []
    held = {p.symbol: p for p in snapshot.positions}
    for symbol in sorted(set(held) | set(account.quantity) | set(account.funding_by_symbol)):
        view = held.get(symbol)
        position = Fraction(view.quantity) if view else Fraction(0)
        expected = account.quantity.get(symbol, Fraction(0))
        if position != expected:
            wrong.append(f"{symbol} position {position} != {expected}")
        funding = view.funding if view else Decimal(0)
        expected_funding = account.funding_by_symbol.get(symbol, Fraction(0))
        if cents(funding) != cents(expected_funding):
            wrong.append(f"{symbol} funding {cents(funding)} != {cents(expected_funding)}")
    return wrong
