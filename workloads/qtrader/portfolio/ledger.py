"""The portfolio ledger: positions, exact PnL, fees, funding, transfers, equity and drawdown,
from fills, account entries and marks.

The arithmetic is on Python integers, in fixed units: a quantity or a price in 1e-12 (the finest
a quoted value may carry, ``QUOTED_PLACES``), money and percentages in 1e-80 (the finest a
computed value may carry, ``COMPUTED_PLACES``). Every value a valid message can carry is a whole
number of those units, so it is booked exactly, whatever the instrument's grid says, and every
sum, difference and product is exact: no context, no precision, nothing the thread's global
``decimal`` context can change. ``Decimal`` is only at the edges: the inputs are converted
exactly (a value finer than the units is refused, never rounded), and the figures read back,
snapshots and checkpoints are converted from the integers.

Why a cost basis and no rounding: an average entry price is a division and often does not
terminate (three fills at 1, 1 and 2 average 4/3). Rounding it to a display precision on every
increase makes the error compound over thousands of fills. The ledger keeps each position's
signed cost basis instead, which opening, increasing and fully closing change exactly. Three
results are quotients, rounded half-even to 1e-80: the share of the cost basis a partial close
takes (the cost leaves the position exactly, so a later full close cancels the rounding and the
wallet never holds it), a drawdown in percent, and the peak scaled by a transfer. Only
``snapshot`` rounds what it publishes: money to 1e-8 USDT and percentages to 1e-6, half up.

Position mode is Binance's one-way mode: one signed quantity per symbol, a fill that crosses
zero closes the position and opens the remainder on the other side at the fill price.

The venue is the truth about what happened: a fill is booked as it is, whatever the paper
listing's grid says (the grid is checked where orders are placed, not where fills are booked),
for any symbol. A fee is kept in its own asset (``fees_by_asset``); it counts in the USDT
figures at its ``Fill.fee_value_usdt``, and a fee whose USDT value is unknown is kept apart
(``unvalued_fees``) so that the equity is reported incomplete instead of resting on a guessed
price.

Account entries (``AccountEntry``: what the venue booked that is not one of our fills) are
booked by their category. In USDT: funding per symbol and in total, transfers and other income
in total, each in the wallet (``initial capital + realized - fees + funding + transfers + other
income``) and so in the equity (``wallet + unrealized``). An entry in another asset is kept in
that asset and never valued: a transfer in ``transfers_by_asset`` (as a USDT one is too),
funding or other income in ``unvalued_income``, which makes the equity incomplete as an unvalued
fee does. A transfer is no gain or loss: it scales the equity's peak by the equity's ratio
after/before it (the drawdown in percent is the same just after it as just before), or, when the
equity before or after is not positive, moves the peak by the amount.

A repeated ``fill_id`` or ``entry_id`` with the same content is normal (at-least-once delivery,
a venue's income read again) and is ignored: ``apply_fill``/``apply_entry`` return False. What
the ledger cannot apply raises ``FillRefused``/``EntryRefused`` (both ``BookingRefused``) and
changes nothing: the same id with different content (two venues' truths, a person must choose),
or an amount finer than the ledger's units. The portfolio then stops following FILLS.

``checkpoint`` and ``Ledger.restore`` turn the exact state into a ``PortfolioCheckpoint`` and
back, unrounded, so a restored ledger that applies the rest of the fills equals, Decimal for
Decimal, one that applied them all. A checkpoint written before the ledger counted in integers
(60-digit ``Decimal``) restores exactly too: each of its values is a valid ``Money``, at most 80
decimal places.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow
from types import MappingProxyType

from qtrader.contracts.messages import (
    CHECKPOINT_RECENT_FILLS,
    SETTLEMENT_ASSET,
    AccountEntry,
    AppliedEntry,
    AppliedFill,
    AssetAmount,
    CheckpointMark,
    CheckpointPosition,
    EntryCategory,
    Fill,
    PortfolioCheckpoint,
    PortfolioSnapshot,
    PositionView,
    Side,
    SignedAssetAmount,
)
from qtrader.contracts.numbers import COMPUTED_PLACES, QUOTED_PLACES
from qtrader.instruments import ExchangeInfo
from qtrader.money import EXACT as _EXACT
from qtrader.money import PCT_STEP as _PCT
from qtrader.money import USDT_STEP as _USDT
from qtrader.money import published

_QUOTED: int = 10**QUOTED_PLACES  # units of a quantity or a price per whole one
_FINE: int = 10**COMPUTED_PLACES  # units of money (USDT or another asset) or of a percent per one
# A quantity times a price is in 1e-24 USDT: this many money units each.
_PRODUCT = _FINE // (_QUOTED * _QUOTED)
# Divisions for the figures read back (an average price): qtrader.money's EXACT, 60 digits.
# Integers to Decimal: wide enough for any valid amount (1e15 in 1e-80 is 96 digits); one past
# that raises (Inexact is trapped) rather than come back rounded.
_WIDE = Context(prec=120, traps=[Inexact, InvalidOperation, Overflow])
_ROUNDING = Context(prec=120, traps=[InvalidOperation, Overflow])  # for the display's rounding
_ZERO = Decimal(0)

__all__ = ["SETTLEMENT_ASSET", "BookingRefused", "EntryRefused", "FillRefused", "Ledger"]


class BookingRefused(Exception):
    """A fill or an account entry the ledger cannot apply; nothing of it was booked.
    ``what`` names it (``fill <id>``, ``account entry <id>``)."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


class FillRefused(BookingRefused):
    def __init__(self, fill_id: str, reason: str) -> None:
        super().__init__(f"fill {fill_id}", reason)
        self.fill_id = fill_id


class EntryRefused(BookingRefused):
    def __init__(self, entry_id: str, reason: str) -> None:
        super().__init__(f"account entry {entry_id}", reason)
        self.entry_id = entry_id


@dataclass(slots=True)
class _Position:
    """One symbol's mutable state: ``quantity`` in 1e-12 units, the rest in 1e-80 USDT.

    ``cost`` is the signed cost basis of the open quantity (sum of signed quantity x entry
    price), so the average entry price is ``cost / quantity``. Keeping the cost instead of the
    average keeps opening, increasing and fully closing exact; only a partial close divides.
    """

    quantity: int = 0
    cost: int = 0
    realized: int = 0
    fees: int = 0
    funding: int = 0  # USDT funding booked on the symbol (account entries)

    def unrealized(self, mark: int) -> int:
        # Signed quantity and cost make one formula right for both sides.
        return self.quantity * mark * _PRODUCT - self.cost if self.quantity else 0


# What the ledger remembers of an applied fill id: the hash of the fill's facts when it was
# applied in this process, or the digest a checkpoint listed for it (see ``_facts``).
_Seen = int | str


class Ledger:
    """Applies fills and marks; reads back exact figures or a rounded ``PortfolioSnapshot``."""

    def __init__(
        self, *, initial_capital: Decimal, exchange: ExchangeInfo, keep_fill_ids: bool = True
    ) -> None:
        """``keep_fill_ids`` False: for a caller whose fills each come once (a backtest), no
        fill id is remembered, so memory does not grow with the fills; a repeat would then be
        booked twice, and there is no checkpoint."""
        if not initial_capital.is_finite() or initial_capital <= 0:
            raise ValueError(f"initial_capital must be a positive amount: {initial_capital}")
        self._keep_fill_ids = keep_fill_ids
        self._initial_capital = initial_capital
        self._capital = _fine_units(initial_capital, "initial_capital")
        self._exchange = exchange
        self._positions: dict[str, _Position] = {}
        self._marks: dict[str, int] = {}
        self._mark_prices: dict[str, Decimal] = {}  # the same marks as given, for reading back
        # Every applied fill id and what it said; the latest ones in order, each with its fill
        # (or the digest a checkpoint gave), for a checkpoint, which carries a bounded number.
        self._fill_ids: dict[str, _Seen] = {}
        self._recent: deque[tuple[str, Fill | str]] = deque(maxlen=CHECKPOINT_RECENT_FILLS)
        self._fills_applied = 0
        self._realized = 0
        self._fees = 0  # in USDT: every fee with a known USDT value
        self._fees_by_asset: dict[str, int] = {}  # every fee, in its own asset
        self._unvalued: dict[str, int] = {}  # fees with no known USDT value
        # Account entries: their ids and digests like the fills', and their USDT totals.
        self._entry_ids: dict[str, str] = {}
        self._recent_entries: deque[str] = deque(maxlen=CHECKPOINT_RECENT_FILLS)
        self._entries_applied = 0
        self._funding = 0
        self._transfers = 0
        self._other_income = 0
        self._transfers_by_asset: dict[str, int] = {}  # every transfer, in its own asset
        self._unvalued_income: dict[str, int] = {}  # funding and income in other assets
        # The wallet (capital + realized - fees + entries) and the open positions' unrealized
        # PnL, each symbol's and their total: running sums, exact, so their order is no matter.
        self._wallet = self._capital
        self._unrealized: dict[str, int] = {}
        self._unrealized_total = 0
        self._peak_equity = self._capital
        self._max_drawdown = 0  # percent, in 1e-80
        # The lowest equity since the peak was set whose drawdown is in the maximum (None:
        # unknown): an equity at or above it cannot make the maximum deeper (see
        # ``_update_drawdown``), which spares a division on most marks.
        self._trough: int | None = self._capital
        # The figures read after every candle or fill, and their Decimal.
        self._shown_equity = (self._capital, initial_capital)
        self._shown_realized = (0, _ZERO)
        self._shown_max_drawdown = (0, _ZERO)  # a backtest reads it after every step

    # --- inputs -------------------------------------------------------------------------------

    def apply_fill(self, fill: Fill) -> bool:
        """Book ``fill``; False (and nothing changes) when its ``fill_id`` was booked before.

        Raises ``FillRefused`` (and nothing changes) for a fill it cannot apply.
        """
        try:
            quantity = _units(fill.quantity, _QUOTED)
            price = _units(fill.price, _QUOTED)
            fee = _units(fill.fee, _FINE)
            value = _fee_value(fill, fee)
        except _OffScale as exc:
            raise FillRefused(fill.fill_id, str(exc)) from exc
        if fill.side is Side.SELL:
            quantity = -quantity
        if self._keep_fill_ids:
            known = self._fill_ids.get(fill.fill_id)
            facts = hash((fill.symbol, quantity, price, fee, fill.fee_asset, fill.client_order_id))
            if known is not None:
                if known != (facts if isinstance(known, int) else _digest(fill)):
                    raise FillRefused(fill.fill_id, "applied before with other content")
                return False
            self._fill_ids[fill.fill_id] = facts
            self._recent.append((fill.fill_id, fill))
        self._book_fill(fill, quantity, price, fee, value)
        self._fills_applied += 1
        return True

    def _book_fill(
        self, fill: Fill, quantity: int, price: int, fee: int, value: int | None
    ) -> None:
        """Integer arithmetic only: nothing here can fail half way."""
        symbol, asset = fill.symbol, fill.fee_asset
        position = self._positions.get(symbol)
        if position is None:
            position = self._positions[symbol] = _Position()
        realized = _book(position, quantity, price)
        self._realized += realized
        self._wallet += realized
        if value is None:
            self._unvalued[asset] = self._unvalued.get(asset, 0) + fee
        else:
            position.fees += value
            self._fees += value
            self._wallet -= value
        self._fees_by_asset[asset] = self._fees_by_asset.get(asset, 0) + fee
        if symbol not in self._marks:
            self._marks[symbol], self._mark_prices[symbol] = price, fill.price
        self._revalue(symbol, position)
        self._update_drawdown()

    def mark(self, symbol: str, price: Decimal) -> None:
        """Set the price that values ``symbol``'s open position (unrealized PnL)."""
        self._exchange.instrument(symbol)  # raises for a symbol the exchange does not list
        if not price.is_finite() or price <= 0:
            raise ValueError(f"mark price for {symbol} must be positive: {price}")
        try:
            units = _units(price, _QUOTED)
        except _OffScale as exc:
            raise ValueError(f"mark price for {symbol}: {exc}") from exc
        self._marks[symbol], self._mark_prices[symbol] = units, price
        position = self._positions.get(symbol)
        if position is None or not position.quantity:
            return  # values no open position: equity, peak and drawdown stay as they are
        self._revalue(symbol, position)
        self._update_drawdown()

    def apply_entry(self, entry: AccountEntry) -> bool:
        """Book ``entry``; False (and nothing changes) when its ``entry_id`` was booked before.

        Raises ``EntryRefused`` (and nothing changes) for an entry it cannot apply.
        """
        digest = _entry_digest(entry)
        known = self._entry_ids.get(entry.entry_id)
        if known is not None:
            if known != digest:
                raise EntryRefused(entry.entry_id, "applied before with other content")
            return False
        try:
            amount = _units(entry.amount, _FINE)
        except _OffScale as exc:
            raise EntryRefused(entry.entry_id, str(exc)) from exc
        if entry.asset != SETTLEMENT_ASSET:
            self._keep_in_asset(entry, amount)
        else:
            self._book_usdt_entry(entry, amount)
        self._entry_ids[entry.entry_id] = digest
        self._recent_entries.append(entry.entry_id)
        self._entries_applied += 1
        return True

    def _keep_in_asset(self, entry: AccountEntry, amount: int) -> None:
        """An amount in another asset than USDT: kept in that asset, no USDT figure moves."""
        kept = (
            self._transfers_by_asset
            if entry.category is EntryCategory.TRANSFER
            else self._unvalued_income
        )
        kept[entry.asset] = kept.get(entry.asset, 0) + amount

    def _book_usdt_entry(self, entry: AccountEntry, amount: int) -> None:
        category = entry.category
        if category is EntryCategory.FUNDING:
            assert entry.symbol is not None  # AccountEntry validates this
            self._funding += amount
            position = self._positions.get(entry.symbol)
            if position is None:
                position = self._positions[entry.symbol] = _Position()
            position.funding += amount
        elif category is EntryCategory.TRANSFER:
            self._transfers += amount
            by_asset = self._transfers_by_asset
            by_asset[SETTLEMENT_ASSET] = by_asset.get(SETTLEMENT_ASSET, 0) + amount
        else:
            self._other_income += amount
        before = self._equity_units
        self._wallet += amount
        if category is EntryCategory.TRANSFER:
            peak = _peak_after_transfer(
                self._peak_equity, before=before, after=self._equity_units, amount=amount
            )
            if peak != self._peak_equity:
                self._peak_equity, self._trough = peak, None
        self._update_drawdown()

    # --- exact figures ------------------------------------------------------------------------

    @property
    def initial_capital(self) -> Decimal:
        return self._initial_capital

    @property
    def realized_pnl(self) -> Decimal:
        if self._realized != self._shown_realized[0]:  # read around every fill by a backtest
            self._shown_realized = (self._realized, _fine_decimal(self._realized))
        return self._shown_realized[1]

    @property
    def fees(self) -> Decimal:
        """Fees in USDT: those charged in USDT plus the others at their stated USDT value."""
        return _fine_decimal(self._fees)

    @property
    def fees_by_asset(self) -> Mapping[str, Decimal]:
        """Every fee in its own asset (USDT, BNB, ...), sorted by asset (a read-only copy)."""
        return _decimals(self._fees_by_asset)

    @property
    def unvalued_fees(self) -> Mapping[str, Decimal]:
        """Fees whose USDT value is unknown, by asset: ``equity`` leaves them out."""
        return _decimals(self._unvalued)

    @property
    def equity_complete(self) -> bool:
        """False while a fee or an income has no USDT value: ``equity`` leaves it out."""
        return not self._unvalued and not self._unvalued_income

    @property
    def funding(self) -> Decimal:
        """USDT funding booked (positive: received), every symbol."""
        return _fine_decimal(self._funding)

    @property
    def transfers(self) -> Decimal:
        """Net USDT transferred in (negative: more went out)."""
        return _fine_decimal(self._transfers)

    @property
    def other_income(self) -> Decimal:
        """Other USDT income the venue booked (rebates, bonuses; negative: costs)."""
        return _fine_decimal(self._other_income)

    @property
    def transfers_by_asset(self) -> Mapping[str, Decimal]:
        """Every transfer's net in its own asset, sorted by asset (a read-only copy)."""
        return _decimals(self._transfers_by_asset)

    @property
    def unvalued_income(self) -> Mapping[str, Decimal]:
        """Funding and other income in another asset than USDT: ``equity`` leaves it out."""
        return _decimals(self._unvalued_income)

    @property
    def entries_applied(self) -> int:
        return self._entries_applied

    @property
    def wallet(self) -> Decimal:
        """initial capital + realized PnL - fees + funding + transfers + other income, exact."""
        return _fine_decimal(self._wallet)

    @property
    def usdt_wallet(self) -> Decimal:
        """What the venue's USDT wallet holds by the ledger: ``wallet`` with only the fees paid
        in USDT taken off (a fee paid in BNB leaves the BNB wallet, not this one), exact."""
        usdt_fees = self._fees_by_asset.get(SETTLEMENT_ASSET, 0)
        return _fine_decimal(self._wallet + self._fees - usdt_fees)

    def unrealized_at(self, marks: Mapping[str, Decimal]) -> Decimal:
        """The unrealized PnL of the open positions at ``marks`` (another's, e.g. the venue's),
        exact; a position without a mark there raises ``KeyError``, a mark finer than the
        ledger's units ``ValueError``."""
        total = 0
        for symbol, position in self._positions.items():
            if position.quantity:
                total += position.unrealized(_units(marks[symbol], _QUOTED))
        return _fine_decimal(total)

    @property
    def unrealized_pnl(self) -> Decimal:
        return _fine_decimal(self._unrealized_total)

    @property
    def equity(self) -> Decimal:
        """The wallet + unrealized PnL, exact."""
        units = self._wallet + self._unrealized_total
        if units != self._shown_equity[0]:  # read after every candle: converted once a change
            self._shown_equity = (units, _fine_decimal(units))
        return self._shown_equity[1]

    @property
    def equity_float(self) -> float:
        """``float(equity)`` without making the Decimal: the same float, since both round the
        same exact value to the nearest (an int quotient is correctly rounded, as is
        ``float`` of a ``Decimal``). A backtest reads it after every step."""
        return (self._wallet + self._unrealized_total) / _FINE

    @property
    def peak_equity(self) -> Decimal:
        return _fine_decimal(self._peak_equity)

    @property
    def drawdown_pct(self) -> Decimal:
        """How far equity is below its peak now, in percent of the peak (0 at a new high)."""
        return _fine_decimal(_drawdown(self._peak_equity, self._equity_units))

    @property
    def max_drawdown_pct(self) -> Decimal:
        """The worst peak-to-trough fall seen after any fill or mark, in percent of its peak."""
        units = self._max_drawdown
        if units != self._shown_max_drawdown[0]:  # converted once a change, as ``equity``
            self._shown_max_drawdown = (units, _fine_decimal(units))
        return self._shown_max_drawdown[1]

    @property
    def fills_applied(self) -> int:
        return self._fills_applied

    def position(self, symbol: str) -> PositionView:
        """``symbol``'s position with exact (unrounded) figures; all zero if never traded."""
        return self._view(symbol, self._positions.get(symbol, _Position()), exact=True)

    def quantity(self, symbol: str) -> Decimal:
        """Signed position quantity: positive long, negative short, 0 when flat."""
        position = self._positions.get(symbol)
        return _quoted_decimal(position.quantity) if position else _ZERO

    def holds(self, symbol: str) -> bool:
        """Whether ``symbol``'s position is open (``quantity`` is not 0), without the Decimal."""
        position = self._positions.get(symbol)
        return position is not None and position.quantity != 0

    @property
    def open_positions(self) -> int:
        """How many symbols have a non-zero position (as ``PortfolioSnapshot.open_positions``)."""
        return sum(1 for p in self._positions.values() if p.quantity)

    @property
    def positions(self) -> Mapping[str, Decimal]:
        """Signed quantity of every non-flat symbol, sorted by symbol (a read-only copy)."""
        return MappingProxyType(
            {
                s: _quoted_decimal(p.quantity)
                for s, p in sorted(self._positions.items())
                if p.quantity
            }
        )

    @property
    def marks(self) -> Mapping[str, Decimal]:
        """The latest mark price of every symbol that has one (a read-only copy)."""
        return MappingProxyType(dict(self._mark_prices))

    # --- output -------------------------------------------------------------------------------

    def snapshot(self, *, sequence: int, ts_ms: int, fills_through: int = 0) -> PortfolioSnapshot:
        """The portfolio rounded for display; every symbol ever traded, flat ones included.

        ``fills_through``: the FILLS stream sequence of the last fill applied, if known.
        """
        return PortfolioSnapshot(
            sequence=sequence,
            ts_ms=ts_ms,
            fills_through=fills_through,
            fees_by_asset=_amounts(self._fees_by_asset),
            unvalued_fees=_amounts(self._unvalued),
            fills_applied=self.fills_applied,
            entries_applied=self._entries_applied,
            funding=_money(self._funding),
            transfers=_money(self._transfers),
            other_income=_money(self._other_income),
            transfers_by_asset=_signed_amounts(self._transfers_by_asset),
            unvalued_income=_signed_amounts(self._unvalued_income),
            initial_capital=_money(self._capital),
            realized_pnl=_money(self._realized),
            unrealized_pnl=_money(self._unrealized_total),
            fees=_money(self._fees),
            equity=_money(self._equity_units),
            peak_equity=_money(self._peak_equity),
            drawdown_pct=_pct(_drawdown(self._peak_equity, self._equity_units)),
            max_drawdown_pct=_pct(self._max_drawdown),
            positions=tuple(
                self._view(s, p, exact=False) for s, p in sorted(self._positions.items())
            ),
        )

    def checkpoint(
        self, *, fills_through: int, ts_ms: int, source: str, skipped: tuple[int, ...] = ()
    ) -> PortfolioCheckpoint:
        """The exact state after every message of FILLS through ``fills_through``, unrounded."""
        if not self._keep_fill_ids:
            raise ValueError("a ledger that keeps no fill ids cannot say which fills it holds")
        return PortfolioCheckpoint(
            source=source,
            ts_ms=ts_ms,
            fills_through=fills_through,
            fills_applied=self._fills_applied,
            initial_capital=self._initial_capital,
            realized_pnl=_fine_decimal(self._realized),
            fees_usdt=_fine_decimal(self._fees),
            fees_by_asset=_amounts(self._fees_by_asset, exact=True),
            unvalued_fees=_amounts(self._unvalued, exact=True),
            peak_equity=_fine_decimal(self._peak_equity),
            max_drawdown_pct=_fine_decimal(self._max_drawdown),
            positions=tuple(
                CheckpointPosition(
                    symbol=s,
                    quantity=_quoted_decimal(p.quantity),
                    cost=_fine_decimal(p.cost),
                    realized=_fine_decimal(p.realized),
                    fees=_fine_decimal(p.fees),
                    funding=_fine_decimal(p.funding),
                )
                for s, p in self._positions.items()
            ),
            marks=tuple(CheckpointMark(symbol=s, price=p) for s, p in self._mark_prices.items()),
            recent_fills=tuple(
                AppliedFill(fill_id=f, digest=_digest(said) if isinstance(said, Fill) else said)
                for f, said in self._recent
            ),
            skipped=skipped,
            entries_applied=self._entries_applied,
            funding_usdt=_fine_decimal(self._funding),
            transfers_usdt=_fine_decimal(self._transfers),
            other_income_usdt=_fine_decimal(self._other_income),
            transfers_by_asset=_signed_amounts(self._transfers_by_asset, exact=True),
            unvalued_income=_signed_amounts(self._unvalued_income, exact=True),
            recent_entries=tuple(
                AppliedEntry(entry_id=e, digest=self._entry_ids[e]) for e in self._recent_entries
            ),
        )

    @classmethod
    def restore(cls, checkpoint: PortfolioCheckpoint, *, exchange: ExchangeInfo) -> Ledger:
        """The ledger ``checkpoint`` describes, exactly as the one that wrote it was.

        Raises ``ValueError`` for a checkpoint it cannot hold exactly."""
        ledger = cls(initial_capital=checkpoint.initial_capital, exchange=exchange)
        try:
            ledger._restore_fills(checkpoint)
            ledger._restore_entries(checkpoint)
        except _OffScale as exc:
            raise ValueError(f"checkpoint: {exc}") from exc
        ledger._wallet = ledger._capital + ledger._realized - ledger._fees + ledger._booked
        ledger._trough = None
        for symbol, position in ledger._positions.items():
            # A symbol with funding only (never traded here) has no mark and needs none.
            if position.quantity and symbol not in ledger._marks:
                raise ValueError(f"checkpoint holds {symbol} but no mark for it")
            ledger._revalue(symbol, position)
        return ledger

    def _restore_fills(self, checkpoint: PortfolioCheckpoint) -> None:
        for held in checkpoint.positions:
            self._positions[held.symbol] = _Position(
                quantity=_units(held.quantity, _QUOTED),
                cost=_units(held.cost, _FINE),
                realized=_units(held.realized, _FINE),
                fees=_units(held.fees, _FINE),
                funding=_units(held.funding, _FINE),
            )
        for mark in checkpoint.marks:
            self._marks[mark.symbol] = _units(mark.price, _QUOTED)
            self._mark_prices[mark.symbol] = mark.price
        for applied in checkpoint.recent_fills:
            self._fill_ids[applied.fill_id] = applied.digest
            self._recent.append((applied.fill_id, applied.digest))
        self._fills_applied = checkpoint.fills_applied
        self._realized = _units(checkpoint.realized_pnl, _FINE)
        self._fees = _units(checkpoint.fees_usdt, _FINE)
        self._fees_by_asset = _all_units(checkpoint.fees_by_asset)
        self._unvalued = _all_units(checkpoint.unvalued_fees)
        self._peak_equity = _units(checkpoint.peak_equity, _FINE)
        self._max_drawdown = _units(checkpoint.max_drawdown_pct, _FINE)

    def _restore_entries(self, checkpoint: PortfolioCheckpoint) -> None:
        for applied in checkpoint.recent_entries:
            self._entry_ids[applied.entry_id] = applied.digest
            self._recent_entries.append(applied.entry_id)
        self._entries_applied = checkpoint.entries_applied
        self._funding = _units(checkpoint.funding_usdt, _FINE)
        self._transfers = _units(checkpoint.transfers_usdt, _FINE)
        self._other_income = _units(checkpoint.other_income_usdt, _FINE)
        self._transfers_by_asset = _all_units(checkpoint.transfers_by_asset)
        self._unvalued_income = _all_units(checkpoint.unvalued_income)

    # --- internals ----------------------------------------------------------------------------

    @property
    def _booked(self) -> int:
        """The account entries' net in USDT."""
        return self._funding + self._transfers + self._other_income

    @property
    def _equity_units(self) -> int:
        return self._wallet + self._unrealized_total

    def _revalue(self, symbol: str, position: _Position) -> None:
        """Its fill or mark moved ``symbol``: its unrealized PnL, and so their total."""
        # A symbol with funding only has no mark, and no quantity to value.
        unrealized = position.unrealized(self._marks[symbol]) if position.quantity else 0
        self._unrealized_total += unrealized - self._unrealized.get(symbol, 0)
        self._unrealized[symbol] = unrealized

    def _update_drawdown(self) -> None:
        equity = self._wallet + self._unrealized_total
        if equity > self._peak_equity:
            self._peak_equity = equity  # a drawdown of 0
            self._trough = equity
            return
        # The drawdown from a fixed peak only grows as equity falls, its rounded quotient too
        # (rounding is monotonic): above the trough it is no deeper.
        trough = self._trough
        if trough is not None and equity >= trough:
            return
        drawdown = _drawdown(self._peak_equity, equity)
        if drawdown > self._max_drawdown:
            self._max_drawdown = drawdown
        self._trough = equity

    def _view(self, symbol: str, position: _Position, *, exact: bool) -> PositionView:
        mark = self._marks.get(symbol, 0)
        quantity = _quoted_decimal(position.quantity)
        average = (
            _EXACT.divide(_fine_decimal(position.cost), quantity) if position.quantity else _ZERO
        )
        show = _fine_decimal if exact else _money
        return PositionView(
            symbol=symbol,
            quantity=quantity,
            avg_entry_price=average if exact else _quantize(average, _USDT),
            mark_price=self._mark_prices.get(symbol, _ZERO),
            unrealized_pnl=show(position.unrealized(mark)),
            realized_pnl=show(position.realized),
            fees=show(position.fees),
            funding=show(position.funding),
        )


def _book(position: _Position, quantity: int, price: int) -> int:
    """Move ``position`` by the signed ``quantity`` at ``price`` (both in 1e-12); returns the
    PnL realized by the move, in 1e-80 USDT."""
    current = position.quantity
    if current == 0 or (current > 0) == (quantity > 0):
        position.quantity = current + quantity
        position.cost += quantity * price * _PRODUCT
        return 0
    held = abs(current)
    closed = min(abs(quantity), held)
    # The share of the cost basis that leaves with the closed quantity (all of it when the
    # position closes, so a round trip is exact).
    closed_cost = position.cost if closed == held else _divide(position.cost * closed, held)
    proceeds = closed * price * _PRODUCT
    realized = (proceeds if current > 0 else -proceeds) - closed_cost
    position.realized += realized
    position.quantity = current + quantity
    position.cost -= closed_cost
    if position.quantity != 0 and (position.quantity > 0) != (current > 0):
        position.cost = position.quantity * price * _PRODUCT  # flipped: opened at the price
    return realized


def _divide(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half-even (``denominator`` > 0)."""
    quotient, remainder = divmod(numerator, denominator)  # floor: 0 <= remainder < denominator
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2):
        quotient += 1
    return quotient


def _drawdown(peak: int, equity: int) -> int:
    """How far ``equity`` is below ``peak``, in percent of it, in 1e-80. A peak is positive
    unless transfers took every unit out (then nothing can fall)."""
    if equity >= peak or peak <= 0:
        return 0
    return _divide((peak - equity) * 100 * _FINE, peak)


def _peak_after_transfer(peak: int, *, before: int, after: int, amount: int) -> int:
    """The peak once capital moved: scaled by the equity's ratio after/before, so the drawdown
    in percent is what it was (a withdrawal is no loss); moved by the amount when the equity
    before or after is not positive (no ratio to scale by)."""
    if before > 0 and after > 0:
        return _divide(peak * after, before)
    return peak + amount


class _OffScale(ValueError):
    """A value finer than the ledger's units: refused, never rounded."""


def _units(value: Decimal, per_one: int) -> int:
    """``value`` in units of ``1 / per_one``, exactly; ``_OffScale`` if it is no whole number
    of them. ``as_integer_ratio`` is exact and ignores every ``decimal`` context."""
    numerator, denominator = value.as_integer_ratio()
    scale, remainder = divmod(per_one, denominator)
    if remainder:
        raise _OffScale(f"{value} is finer than 1/{per_one}")
    return numerator * scale


def _fine_units(value: Decimal, name: str) -> int:
    try:
        return _units(value, _FINE)
    except _OffScale as exc:
        raise ValueError(f"{name}: {exc}") from exc


def _fee_value(fill: Fill, fee: int) -> int | None:
    """The fee in 1e-80 USDT: the fee itself in USDT, else its stated value (None: unknown)."""
    if fill.fee_asset == SETTLEMENT_ASSET:
        return fee
    return None if fill.fee_usdt is None else _units(fill.fee_usdt, _FINE)


def _all_units(amounts: tuple[AssetAmount, ...] | tuple[SignedAssetAmount, ...]) -> dict[str, int]:
    return {a.asset: _units(a.amount, _FINE) for a in amounts}


def _decimal(units: int, per_one: int, places: int) -> Decimal:
    """``units / per_one`` (``per_one`` is 10**``places``) as a Decimal, exactly, in its
    shortest form: no trailing zeros after the point, and no exponent for a whole number."""
    whole, fraction = divmod(units, per_one)
    if not fraction:
        return Decimal(whole)
    return _WIDE.scaleb(Decimal(units), -places).normalize(_WIDE)


def _fine_decimal(units: int) -> Decimal:
    return _decimal(units, _FINE, COMPUTED_PLACES)


def _quoted_decimal(units: int) -> Decimal:
    return _decimal(units, _QUOTED, QUOTED_PLACES)


def _digest(fill: Fill) -> str:
    """What a fill says, in 16 hex digits: a repeat of its id must say the same. A checkpoint
    carries it for the latest fills; within one process the ledger compares a cheaper hash of
    the same facts (``apply_fill``), the digest is computed when a checkpoint needs it."""
    facts = (fill.symbol, fill.side.value, fill.quantity, fill.price, fill.fee, fill.fee_asset)
    text = "|".join(str(part) for part in (*facts, fill.client_order_id))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _entry_digest(entry: AccountEntry) -> str:
    """What an entry says about money, in 16 hex digits: a repeat of its id must say the same
    (its time and note may be rendered differently by a second read without harm)."""
    facts = (entry.income_type.value, entry.symbol or "", entry.asset, entry.amount)
    return hashlib.sha256("|".join(str(part) for part in facts).encode()).hexdigest()[:16]


def _amounts(by_asset: Mapping[str, int], *, exact: bool = False) -> tuple[AssetAmount, ...]:
    show = _fine_decimal if exact else _money
    return tuple(AssetAmount(asset=a, amount=show(v)) for a, v in sorted(by_asset.items()))


def _signed_amounts(
    by_asset: Mapping[str, int], *, exact: bool = False
) -> tuple[SignedAssetAmount, ...]:
    show = _fine_decimal if exact else _money
    return tuple(SignedAssetAmount(asset=a, amount=show(v)) for a, v in sorted(by_asset.items()))


def _decimals(by_asset: Mapping[str, int]) -> Mapping[str, Decimal]:
    return MappingProxyType({a: _fine_decimal(v) for a, v in sorted(by_asset.items())})


def _money(units: int) -> Decimal:
    """Money for display: to 1e-8 USDT, half up."""
    return _quantize(_fine_decimal(units), _USDT)


def _pct(units: int) -> Decimal:
    """A percentage for display: to 1e-6, half up."""
    return _quantize(_fine_decimal(units), _PCT)


def _quantize(value: Decimal, step: Decimal) -> Decimal:
    # In 120 digits: an amount this ledger holds may be wider than money's 60.
    return published(value, step, context=_ROUNDING)
