"""``qtrader bench pnl``: the exact ledger replaying N fills, beside the same in floats.

The fills come from a seeded tape (``FillTape``): five symbols of the paper exchange with their
real tick and step sizes, prices on a random walk, and per symbol a mix of opens, increases,
partial closes (any share), full closes and flips through zero; every fill pays a fee of 2 or
4 bps of its notional, exactly. Each fill exists first as its wire fields, the strings
``json.loads`` leaves of a ``Fill`` message, so both sides start where the live portfolio starts.

* **Figure.** The live path: ``Fill.model_validate`` of those fields (the validated ``Fill``
  message the portfolio's ``decode`` builds once the JSON is parsed; the JSON parse itself is not
  timed) and ``Ledger.apply_fill`` (``portfolio/ledger.py``: exact integers in fixed units,
  ``Decimal`` at its edges), timed apart and together. The figures keep their ``decimal_`` names
  from when the ledger computed in 60-digit ``Decimal``, so runs before and after compare.
* **Baseline.** ``FloatLedger``, written here for this comparison only: the very same accounting
  (signed cost basis, one-way positions, partial closes, flips, fees, marks, peak equity and
  drawdown after every fill, duplicate fill ids ignored) in binary floats, from ``float()`` of
  the same strings (parsing timed). It cannot check a price or a quantity against the grid
  exactly, so it does not; the ledger does.
* **The float's error.** At the end both are marked at each symbol's last fill price; realized
  PnL, fees, equity and the worst drawdown of each, with the float's absolute and relative
  difference from the ledger's figure (computed exactly: ``Decimal(float)`` is exact).
* **The ledger's own error.** A fresh ``Ledger`` fed the first ``check`` fills, against an
  independent exact account in ``fractions.Fraction`` (average cost, not cost basis), whose
  speed is shown too. Whether they are exactly equal (a partial close of a third divides, and
  the ledger rounds its share of the cost to 1e-80), the largest difference, and whether they
  agree at the precision the ledger publishes (1e-8 USDT, as ``Ledger.snapshot`` rounds).

Timed in chunks of ``CHUNK`` fills, the two sides one after the other on the same chunk, so a
busy machine slows both alike. Exit 0 when the ledger agrees with the Fraction account
(at 1e-8, and within ``EXACT_BOUND`` unrounded: the ledger's claim that its one division stays
far below a cent) and booked every fill once; 1 otherwise; 130 when interrupted. The last line
of the output is one JSON object with every figure.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from qtrader.contracts.messages import Fill
from qtrader.instruments import paper_exchange_info
from qtrader.portfolio.ledger import Ledger
from qtrader_tools.benchmarks.harness import report, sigterm_as_interrupt
from qtrader_tools.exact import ExactPortfolio

SEED = 7
CAPITAL = 1_000_000  # USDT
CHUNK = 10_000  # fills generated, then timed on both sides, at a time
CHECK = 20_000  # fills checked against the Fraction account
EXACT_BOUND = Decimal("1e-30")  # USDT: the ledger's largest tolerated unrounded error
START_MS = 1_700_000_000_000
FEE_BPS = (2, 4)  # maker, taker
_WIDE = Context(prec=200)  # for exact differences of a float and a Decimal
_PUBLISHED = Decimal("1e-8")  # what Ledger.snapshot rounds money to


# --- the tape -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Market:
    """One symbol of the paper exchange: grid exponents (tick 10^-price_exp), start, lot size."""

    symbol: str
    price_exp: int
    qty_exp: int
    start_ticks: int
    lot_units: int  # a typical order, in steps


MARKETS = (
    Market("BTCUSDT", 1, 3, 300_000, 20),  # 30,000.0; lots of 0.020
    Market("ETHUSDT", 2, 3, 200_000, 300),  # 2,000.00; 0.300
    Market("SOLUSDT", 2, 0, 10_000, 10),  # 100.00; 10
    Market("XRPUSDT", 4, 1, 5_000, 20_000),  # 0.5000; 2,000.0
    Market("DOGEUSDT", 5, 0, 8_000, 20_000),  # 0.08000; 20,000
)
ACTIONS = ("open", "increase", "partial_close", "close", "flip")


class RawFill(NamedTuple):
    """A fill as integers: quantity in steps, price in ticks, fee in 10^-(qty+price+4) USDT."""

    number: int  # position in the tape, from 0
    market: Market
    sign: int  # +1 buy, -1 sell
    qty_units: int
    price_ticks: int
    fee_units: int


def decimal_text(units: int, exponent: int) -> str:
    """``units`` x 10^-exponent as a plain decimal string (what a Fill carries on the wire)."""
    if exponent == 0:
        return str(units)
    whole, fraction = divmod(units, 10**exponent)
    return f"{whole}.{fraction:0{exponent}d}"


def wire_fields(raw: RawFill) -> dict[str, Any]:
    """The fields of the Fill message as ``json.loads`` returns them: amounts as strings."""
    market = raw.market
    return {
        "fill_id": f"f{raw.number}",
        "client_order_id": f"c{raw.number // 2}",  # some orders fill in two parts
        "symbol": market.symbol,
        "side": "BUY" if raw.sign > 0 else "SELL",
        "quantity": decimal_text(raw.qty_units, market.qty_exp),
        "price": decimal_text(raw.price_ticks, market.price_exp),
        "fee": decimal_text(raw.fee_units, market.qty_exp + market.price_exp + 4),
        "ts_ms": START_MS + raw.number,
    }


class FillTape:
    """Deterministic fills from a seed; the same seed gives the same tape, chunk by chunk."""

    def __init__(self, seed: int = SEED) -> None:
        self._rng = random.Random(seed)
        self._prices = [m.start_ticks for m in MARKETS]
        self._positions = [0] * len(MARKETS)  # signed, in steps
        self._next = 0
        self.actions: dict[str, int] = dict.fromkeys(ACTIONS, 0)

    def take(self, count: int) -> list[RawFill]:
        return [self._fill() for _ in range(count)]

    def _fill(self) -> RawFill:
        rng = self._rng
        which = rng.randrange(len(MARKETS))
        market = MARKETS[which]
        price = self._prices[which]
        price = max(1, price + round(rng.gauss(0, price * 0.001)))
        self._prices[which] = price
        current = self._positions[which]
        action, signed = self._order(current, market.lot_units)
        self.actions[action] += 1
        self._positions[which] = current + signed
        quantity = abs(signed)
        fee = quantity * price * rng.choice(FEE_BPS)
        raw = RawFill(self._next, market, 1 if signed > 0 else -1, quantity, price, fee)
        self._next += 1
        return raw

    def _order(self, current: int, lot: int) -> tuple[str, int]:
        """The action and the signed quantity (in steps) of the next fill of a symbol."""
        rng = self._rng
        if current == 0:
            return "open", rng.choice((1, -1)) * rng.randint(1, 4 * lot)
        side = 1 if current > 0 else -1
        size = abs(current)
        draw = rng.random()
        if draw < 0.30:
            return "increase", side * rng.randint(1, 2 * lot)
        if draw < 0.60 and size > 1:
            return "partial_close", -side * rng.randint(1, size - 1)
        if draw < 0.80:
            return "close", -current
        return "flip", -side * (size + rng.randint(1, 2 * lot))


def chunks(tape: FillTape, count: int, *, boundary: int) -> Iterator[list[RawFill]]:
    """``count`` fills in chunks of at most ``CHUNK``, one of them ending at ``boundary``."""
    done = 0
    while done < count:
        size = min(CHUNK, count - done)
        if done < boundary < done + size:
            size = boundary - done
        yield tape.take(size)
        done += size


# --- the baseline: the same accounting in floats -----------------------------------------------


@dataclass
class _FloatPosition:
    quantity: float = 0.0
    cost: float = 0.0
    realized: float = 0.0
    fees: float = 0.0


class FloatRow(NamedTuple):
    fill_id: str
    symbol: str
    signed_qty: float
    price: float
    fee: float


def float_row(fields: dict[str, Any]) -> FloatRow:
    """What the float ledger reads of a fill: its wire strings through ``float()``."""
    sign = 1.0 if fields["side"] == "BUY" else -1.0
    return FloatRow(
        fields["fill_id"],
        fields["symbol"],
        sign * float(fields["quantity"]),
        float(fields["price"]),
        float(fields["fee"]),
    )


@dataclass
class FloatLedger:
    """The baseline: ``portfolio.ledger.Ledger``'s accounting, step by step, in binary floats.

    Written for this benchmark only, to show what floats would cost and gain; never used for
    money. Same formulas in the same order as the ledger (``_book``, ``_update_drawdown``).
    """

    initial_capital: float
    realized: float = 0.0
    fees: float = 0.0
    peak_equity: float = 0.0
    max_drawdown_pct: float = 0.0
    _positions: dict[str, _FloatPosition] = field(default_factory=dict)
    _marks: dict[str, float] = field(default_factory=dict)
    _fill_ids: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.peak_equity = self.initial_capital

    def apply(self, row: FloatRow) -> bool:
        if row.fill_id in self._fill_ids:
            return False
        position = self._positions.setdefault(row.symbol, _FloatPosition())
        realized = _book_float(position, row.signed_qty, row.price)
        position.fees += row.fee
        self.realized += realized
        self.fees += row.fee
        self._marks.setdefault(row.symbol, row.price)
        self._fill_ids.add(row.fill_id)
        self._update_drawdown()
        return True

    def mark(self, symbol: str, price: float) -> None:
        self._marks[symbol] = price
        self._update_drawdown()

    def quantity(self, symbol: str) -> float:
        position = self._positions.get(symbol)
        return position.quantity if position else 0.0

    @property
    def unrealized(self) -> float:
        return sum(
            p.quantity * self._marks[s] - p.cost for s, p in self._positions.items() if p.quantity
        )

    @property
    def equity(self) -> float:
        return self.initial_capital + self.realized - self.fees + self.unrealized

    @property
    def fills_applied(self) -> int:
        return len(self._fill_ids)

    def _update_drawdown(self) -> None:
        equity = self.equity
        if equity > self.peak_equity:
            self.peak_equity = equity
        if equity < self.peak_equity:
            drawdown = (self.peak_equity - equity) / self.peak_equity * 100.0
            if drawdown > self.max_drawdown_pct:
                self.max_drawdown_pct = drawdown


def _book_float(position: _FloatPosition, signed_qty: float, price: float) -> float:
    """``ledger._book`` in floats: a float position may miss zero by a rounding residue."""
    current = position.quantity
    if current == 0 or (current > 0) == (signed_qty > 0):
        position.quantity = current + signed_qty
        position.cost += signed_qty * price
        return 0.0
    closed = min(abs(signed_qty), abs(current))
    closed_cost = position.cost if closed == abs(current) else position.cost * closed / abs(current)
    direction = 1.0 if current > 0 else -1.0
    realized = direction * closed * price - closed_cost
    position.realized += realized
    position.quantity = current + signed_qty
    position.cost -= closed_cost
    if position.quantity != 0 and (position.quantity > 0) != (current > 0):
        position.cost = position.quantity * price
    return realized


# --- the exact reference: Fractions, average cost ----------------------------------------------


@dataclass(frozen=True)
class ExactFigures:
    realized: Fraction
    fees: Fraction
    unrealized: Fraction
    equity: Fraction


def fraction_account(fills: Sequence[dict[str, Any]], capital: Fraction) -> ExactFigures:
    """The exact account (``qtrader_tools.exact``) of ``fills``, marked at each symbol's last
    fill price.

    Independent of the ledger's formulation (it keeps a cost basis, the account an average
    price); in exact arithmetic the two agree, so any difference is the ledger's rounding.
    """
    account = ExactPortfolio(capital=capital, track_drawdown=False)
    last: dict[str, Fraction] = {}
    for fill in fills:
        price = Fraction(fill["price"])
        delta = Fraction(fill["quantity"]) * (1 if fill["side"] == "BUY" else -1)
        account.trade(fill["symbol"], delta, price, Fraction(fill["fee"]))
        last[fill["symbol"]] = price
    for symbol, price in last.items():
        account.mark(symbol, price)
    return ExactFigures(account.realized, account.fees, account.unrealized, account.equity)


def round_published(value: Fraction | Decimal) -> Decimal:
    """``value`` to 1e-8, half away from zero, as ``Ledger.snapshot`` rounds money."""
    exact = Fraction(value)
    scaled = abs(exact) * 10**8
    units = math.floor(scaled + Fraction(1, 2))
    return _WIDE.multiply(Decimal(units if exact >= 0 else -units), _PUBLISHED)


@dataclass(frozen=True)
class ExactCheck:
    fills: int
    exactly_equal: bool
    max_abs_diff: Decimal
    equal_published: bool
    fraction_s: float  # the Fraction account's time for the same fills


def check_ledger(fills: Sequence[dict[str, Any]]) -> ExactCheck:
    """A fresh ``Ledger`` fed ``fills``, against the Fraction account of the same fills."""
    ledger = _ledger()
    last: dict[str, Decimal] = {}
    for fields in fills:
        fill = Fill.model_validate(fields)
        ledger.apply_fill(fill)
        last[fill.symbol] = fill.price
    for symbol, price in last.items():
        ledger.mark(symbol, price)
    began = time.perf_counter()
    exact = fraction_account(fills, Fraction(CAPITAL))
    fraction_s = time.perf_counter() - began
    pairs = [
        (ledger.realized_pnl, exact.realized),
        (ledger.fees, exact.fees),
        (ledger.unrealized_pnl, exact.unrealized),
        (ledger.equity, exact.equity),
    ]
    diffs = [abs(Fraction(d) - f) for d, f in pairs]
    worst = max(diffs)
    return ExactCheck(
        fills=len(fills),
        exactly_equal=not any(diffs),
        max_abs_diff=Decimal(worst.numerator) / Decimal(worst.denominator),
        equal_published=all(round_published(d) == round_published(f) for d, f in pairs),
        fraction_s=fraction_s,
    )


@dataclass(frozen=True)
class Residues:
    """Fills after which a position was exactly flat, and how often the float one was not."""

    flat: int
    missed: int
    largest: float


def float_residues(fills: Sequence[dict[str, Any]]) -> Residues:
    """Replay ``fills`` in floats, comparing each position with the exact one after each fill."""
    floats = FloatLedger(float(CAPITAL))
    exact: dict[str, Fraction] = {}
    flat = missed = 0
    largest = 0.0
    for fields in fills:
        row = float_row(fields)
        floats.apply(row)
        sign = 1 if fields["side"] == "BUY" else -1
        exact[row.symbol] = exact.get(row.symbol, Fraction(0)) + sign * Fraction(fields["quantity"])
        if exact[row.symbol] == 0:
            flat += 1
            residue = abs(floats.quantity(row.symbol))
            missed += residue != 0
            largest = max(largest, residue)
    return Residues(flat, missed, largest)


# --- the run ------------------------------------------------------------------------------------


def _ledger() -> Ledger:
    return Ledger(initial_capital=Decimal(CAPITAL), exchange=paper_exchange_info())


@dataclass
class Timings:
    build_s: float = 0.0  # wire fields -> validated Fill
    apply_s: float = 0.0  # Ledger.apply_fill
    float_parse_s: float = 0.0  # wire fields -> float row
    float_apply_s: float = 0.0  # FloatLedger.apply


@dataclass(frozen=True, kw_only=True)
class Figures:
    fills: int
    timings: Timings
    ledger: Ledger
    floats: FloatLedger
    actions: dict[str, int]
    check: ExactCheck
    residues: Residues


def replay(count: int, *, seed: int, check: int, progress: Progress) -> Figures:
    """Both ledgers through the same ``count`` fills, chunk by chunk; the prefix is kept."""
    tape = FillTape(seed)
    ledger, floats = _ledger(), FloatLedger(float(CAPITAL))
    timings = Timings()
    prefix: list[dict[str, Any]] = []
    last: dict[str, str] = {}  # each symbol's last fill price: the final marks
    done = 0
    for chunk in chunks(tape, count, boundary=check):
        fields = [wire_fields(raw) for raw in chunk]  # the wire, before any timing
        if done < check:
            prefix += fields
        _time_chunk(fields, ledger, floats, timings)
        last.update((f["symbol"], f["price"]) for f in fields)
        done += len(chunk)
        progress.chunk(done, count)
    for symbol, price in last.items():
        ledger.mark(symbol, Decimal(price))
        floats.mark(symbol, float(price))
    progress(f"replayed {count:,} fills; checking the first {len(prefix):,} with Fractions")
    return Figures(
        fills=count,
        timings=timings,
        ledger=ledger,
        floats=floats,
        actions=dict(tape.actions),
        check=check_ledger(prefix),
        residues=float_residues(prefix),
    )


def _time_chunk(
    fields: list[dict[str, Any]], ledger: Ledger, floats: FloatLedger, timings: Timings
) -> None:
    began = time.perf_counter()
    fills = [Fill.model_validate(f) for f in fields]
    built = time.perf_counter()
    for fill in fills:
        ledger.apply_fill(fill)
    applied = time.perf_counter()
    rows = [float_row(f) for f in fields]
    parsed = time.perf_counter()
    for row in rows:
        floats.apply(row)
    ended = time.perf_counter()
    timings.build_s += built - began
    timings.apply_s += applied - built
    timings.float_parse_s += parsed - applied
    timings.float_apply_s += ended - parsed


class Progress:
    """Lines on stderr: what is happening, and the replay every 10% or so."""

    def __init__(self) -> None:
        self._began = time.monotonic()
        self._reported = 0

    def __call__(self, text: str) -> None:
        elapsed = time.monotonic() - self._began
        print(f"qtrader bench pnl: [{elapsed:5.1f}s] {text}", file=sys.stderr, flush=True)

    def chunk(self, done: int, count: int) -> None:
        if done == count or done - self._reported >= max(CHUNK, count // 10):
            self._reported = done
            self(f"{done:,} of {count:,} fills")


# --- the report ---------------------------------------------------------------------------------


def _per_s(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def error(decimal_value: Decimal, float_value: float) -> dict[str, Any]:
    """The float's difference from the exact figure: both values, absolute and relative."""
    diff = abs(_WIDE.subtract(Decimal(float_value), decimal_value))
    relative = float(_WIDE.divide(diff, abs(decimal_value))) if decimal_value else None
    return {
        "decimal": str(decimal_value),
        "float": float_value,
        "abs": float(diff),
        "rel": relative,
    }


def summary(figures: Figures, *, seed: int, wall_s: float) -> dict[str, Any]:
    """The figures as one flat JSON object (the last line of the output)."""
    n, t = figures.fills, figures.timings
    ledger, floats, check = figures.ledger, figures.floats, figures.check
    decimal_per_s = _per_s(n, t.build_s + t.apply_s)
    float_per_s = _per_s(n, t.float_parse_s + t.float_apply_s)
    result: dict[str, Any] = {
        "benchmark": "pnl",
        "fills": n,
        "seed": seed,
        "symbols": len(MARKETS),
        **{f"tape_{action}": count for action, count in figures.actions.items()},
        "decimal_per_s": decimal_per_s,
        "decimal_build_per_s": _per_s(n, t.build_s),
        "decimal_apply_per_s": _per_s(n, t.apply_s),
        "float_per_s": float_per_s,
        "float_apply_per_s": _per_s(n, t.float_apply_s),
        "decimal_vs_float": round(decimal_per_s / float_per_s, 4) if float_per_s else 0.0,
        "decimal_fills_applied": ledger.fills_applied,
        "float_fills_applied": floats.fills_applied,
        "error_realized": error(ledger.realized_pnl, floats.realized),
        "error_fees": error(ledger.fees, floats.fees),
        "error_equity": error(ledger.equity, floats.equity),
        "error_max_drawdown_pct": error(ledger.max_drawdown_pct, floats.max_drawdown_pct),
        "fraction_fills": check.fills,
        "fraction_exactly_equal": check.exactly_equal,
        "fraction_max_abs_diff": float(check.max_abs_diff),
        "fraction_equal_at_1e-8": check.equal_published,
        "fraction_per_s": _per_s(check.fills, check.fraction_s),
        "float_flat_expected": figures.residues.flat,
        "float_flat_missed": figures.residues.missed,
        "float_flat_largest_residue": figures.residues.largest,
        "wall_s": round(wall_s, 1),
    }
    return result


_ERROR_ROWS = (
    ("realized PnL", "error_realized"),
    ("fees", "error_fees"),
    ("equity", "error_equity"),
    ("max drawdown %", "error_max_drawdown_pct"),
)


def _rate_rows(result: dict[str, Any]) -> list[str]:
    rows = (
        ("exact: Fill + apply_fill", "decimal_per_s", "float: parse + apply", "float_per_s"),
        ("  apply_fill alone", "decimal_apply_per_s", "  apply alone", "float_apply_per_s"),
        ("  Fill.model_validate alone", "decimal_build_per_s", "", ""),
    )
    lines = [f"{'':<28}  {'fills/s':>10}  {'baseline':<22}  {'fills/s':>10}  ratio"]
    for label, key, base_label, base_key in rows:
        base = f"{result[base_key]:>10,.0f}" if base_key else f"{'':>10}"
        ratio = ""
        if base_key and result[base_key]:
            ratio = f"{result[key] / result[base_key]:.3f}"
        lines.append(f"{label:<28}  {result[key]:>10,.0f}  {base_label:<22}  {base}  {ratio}")
    return lines


def _error_rows(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{'float vs exact':<16}  {'ledger (exact)':>26}  {'float':>24}  {'abs error':>9}  "
        f"{'rel error':>9}"
    ]
    for label, key in _ERROR_ROWS:
        row = result[key]
        relative = "n/a" if row["rel"] is None else f"{row['rel']:.2e}"
        lines.append(
            f"{label:<16}  {_short(row['decimal']):>26}  {row['float']!r:>24}  "
            f"{row['abs']:9.2e}  {relative:>9}"
        )
    return lines


def _short(text: str) -> str:
    """A long exact value cut for the table (the JSON has all of it)."""
    return text if len(text) <= 26 else text[:25] + "~"


def render(result: dict[str, Any]) -> str:
    """The human-readable table: each rate beside the float baseline, then the errors."""
    yes_no = {True: "yes", False: "no"}
    tape = ", ".join(f"{result[f'tape_{a}']:,} {a.replace('_', ' ')}" for a in ACTIONS)
    exact = (
        f"ledger vs Fraction, first {result['fraction_fills']:,} fills: exactly equal "
        f"{yes_no[result['fraction_exactly_equal']]} (largest difference "
        f"{result['fraction_max_abs_diff']:.1e} USDT), equal at 1e-8 "
        f"{yes_no[result['fraction_equal_at_1e-8']]}; the Fraction account "
        f"{result['fraction_per_s']:,.0f} fills/s"
    )
    residues = (
        f"positions exactly flat after a fill of the first {result['fraction_fills']:,}: "
        f"{result['float_flat_expected']:,}; the float position was not zero after "
        f"{result['float_flat_missed']:,} of them (largest residue "
        f"{result['float_flat_largest_residue']:.1e})"
    )
    title = (
        f"pnl: {result['fills']:,} fills ({result['symbols']} symbols, seed {result['seed']}) "
        "through the exact ledger, beside the same accounting in floats"
    )
    return "\n".join(
        [
            title,
            *(f"  {line}" for line in _rate_rows(result)),
            f"  tape: {tape}",
            *(f"  {line}" for line in _error_rows(result)),
            f"  {exact}",
            f"  {residues}",
            f"  wall time {result['wall_s']:.1f} s",
        ]
    )


def verdict(result: dict[str, Any]) -> str | None:
    """Why the run fails, or None."""
    if not result["fraction_equal_at_1e-8"]:
        return "the ledger disagrees with the exact Fraction account at 1e-8 USDT"
    if Decimal(repr(result["fraction_max_abs_diff"])) > EXACT_BOUND:
        return (
            f"the ledger is {result['fraction_max_abs_diff']:.1e} USDT off the exact "
            f"Fraction account (more than {EXACT_BOUND})"
        )
    if result["decimal_fills_applied"] != result["fills"]:
        return f"the ledger booked {result['decimal_fills_applied']} of {result['fills']} fills"
    return None


def run(
    *,
    fills: int = 1_000_000,
    json_path: Path | None = None,
    seed: int = SEED,
    check: int = CHECK,
    out: TextIO = sys.stdout,
) -> int:
    """Run the benchmark, print the table and the JSON line; the exit code of ``qtrader bench``."""
    if fills < 1 or check < 1:
        raise ValueError(f"fills and check must be >= 1, got {fills} and {check}")
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)  # SIGTERM stops it like Ctrl-C
    try:
        figures = replay(fills, seed=seed, check=min(check, fills), progress=Progress())
    except KeyboardInterrupt:
        print("qtrader bench pnl: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = summary(figures, seed=seed, wall_s=time.monotonic() - started)
    return report("pnl", result, render=render, verdict=verdict, json_path=json_path, out=out)
