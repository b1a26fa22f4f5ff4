"""The portfolio ledger: positions, exact PnL, fees, funding, transfers, equity and drawdown,
from fills, account entries and marks.

Everything is ``Decimal`` arithmetic in one private context (``_EXACT``: 60 significant digits,
half-even rounding, errors trapped), never the thread's global context, so the same fills give
the same figures in every process, whatever else changed ``decimal.getcontext()``.

Why a cost basis and no rounding: an average entry price is a division and often does not
terminate (three fills at 1, 1 and 2 average 4/3). Rounding it to a display precision on every
increase makes the error compound over thousands of fills. The ledger keeps each position's
signed cost basis instead, which opening, increasing and fully closing change exactly; only a
partial close divides (the closed share of the cost), and at 60 digits that error stays some 40
orders of magnitude below a cent. Only ``snapshot`` rounds, and only its output: money to 1e-8
USDT and percentages to 1e-6, half up. The internal state is never rounded.

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
or arithmetic beyond the exact context. The portfolio then stops following FILLS.

``checkpoint`` and ``Ledger.restore`` turn the exact state into a ``PortfolioCheckpoint`` and
back, unrounded, so a restored ledger that applies the rest of the fills equals, Decimal for
Decimal, one that applied them all.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
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
    SignedAssetAmount,
)
from qtrader.instruments import ExchangeInfo
from qtrader.money import EXACT as _EXACT
from qtrader.money import PCT_STEP as _PCT
from qtrader.money import USDT_STEP as _USDT
from qtrader.money import published

_ZERO = Decimal(0)
_HUNDRED = Decimal(100)

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


@dataclass
class _Position:
    """One symbol's mutable state.

    ``cost`` is the signed cost basis of the open quantity (sum of signed quantity x entry
    price), so the average entry price is ``cost / quantity``. Keeping the cost instead of the
    average keeps opening, increasing and fully closing exact; only a partial close divides.
    """

    quantity: Decimal = _ZERO
    cost: Decimal = _ZERO
    realized: Decimal = _ZERO
    fees: Decimal = _ZERO
    funding: Decimal = _ZERO  # USDT funding booked on the symbol (account entries)

    def copy(self) -> _Position:
        # Not ``dataclasses.replace``: that costs more than the booking itself.
        return _Position(self.quantity, self.cost, self.realized, self.fees, self.funding)

    @property
    def avg_entry(self) -> Decimal:
        return self.cost / self.quantity if self.quantity else _ZERO

    def unrealized(self, mark: Decimal) -> Decimal:
        # Signed quantity and cost make one formula right for both sides.
        return self.quantity * mark - self.cost


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
        self._exchange = exchange
        self._positions: dict[str, _Position] = {}
        self._marks: dict[str, Decimal] = {}
        # Every applied fill id and the digest of what it said; the latest ones in order, for
        # a checkpoint (which carries a bounded number of them).
        self._fill_ids: dict[str, str] = {}
        self._recent: deque[str] = deque(maxlen=CHECKPOINT_RECENT_FILLS)
        self._fills_applied = 0
        self._realized = _ZERO
        self._fees = _ZERO  # in USDT: every fee with a known USDT value
        self._fees_by_asset: dict[str, Decimal] = {}  # every fee, in its own asset
        self._unvalued: dict[str, Decimal] = {}  # fees with no known USDT value
        # Account entries: their ids and digests like the fills', and their USDT totals.
        self._entry_ids: dict[str, str] = {}
        self._recent_entries: deque[str] = deque(maxlen=CHECKPOINT_RECENT_FILLS)
        self._entries_applied = 0
        self._funding = _ZERO
        self._transfers = _ZERO
        self._other_income = _ZERO
        self._booked = _ZERO  # funding + transfers + other income, from those totals
        self._transfers_by_asset: dict[str, Decimal] = {}  # every transfer, in its own asset
        self._unvalued_income: dict[str, Decimal] = {}  # funding and income in other assets
        self._peak_equity = initial_capital
        self._max_drawdown_pct = _ZERO
        # The lowest equity since the peak was set whose drawdown is in the maximum (None:
        # unknown): an equity at or above it cannot make the maximum deeper (see
        # ``_update_drawdown``), which spares a division on most marks.
        self._trough: Decimal | None = initial_capital
        # Caches for a ledger read after every candle: each symbol's unrealized PnL (None when
        # flat; keyed in the order of ``_positions``, so sums add in the same order) and the
        # equity (None once a fill or a mark moved it).
        self._unrealized: dict[str, Decimal | None] = {}
        self._equity: Decimal | None = initial_capital
        # The wallet (the equity without unrealized PnL): changed by fills and entries only,
        # needed by every mark.
        self._base = self._wallet_of(realized=self._realized, fees=self._fees)

    # --- inputs -------------------------------------------------------------------------------

    def apply_fill(self, fill: Fill) -> bool:
        """Book ``fill``; False (and nothing changes) when its ``fill_id`` was booked before.

        Raises ``FillRefused`` (and nothing changes) for a fill it cannot apply.
        """
        keep = self._keep_fill_ids
        digest = _digest(fill) if keep else ""
        known = self._fill_ids.get(fill.fill_id)
        if known is not None:
            if known != digest:
                raise FillRefused(fill.fill_id, "applied before with other content")
            return False
        try:
            with localcontext(_EXACT):
                self._book_fill(fill)
        except ArithmeticError as exc:  # trapped: nothing was committed (see _book_fill)
            raise FillRefused(fill.fill_id, f"beyond exact arithmetic: {exc!r}") from exc
        if keep:
            self._fill_ids[fill.fill_id] = digest
            self._recent.append(fill.fill_id)
        self._fills_applied += 1
        return True

    def _book_fill(self, fill: Fill) -> None:
        """Compute everything on copies first, then commit: a trapped error changes nothing."""
        held = self._positions.get(fill.symbol)
        position = _Position() if held is None else held.copy()
        realized = _book(position, fill.side.sign * fill.quantity, fill.price)
        value = fill.fee_value_usdt
        fees = self._fees + value if value is not None else self._fees
        position.fees += value if value is not None else _ZERO
        by_asset = self._fees_by_asset.get(fill.fee_asset, _ZERO) + fill.fee
        unvalued = self._unvalued.get(fill.fee_asset, _ZERO) + fill.fee
        total_realized = self._realized + realized
        base = self._wallet_of(realized=total_realized, fees=fees)
        # Commit. What follows cannot raise: bounded inputs, no division by a possible zero.
        self._positions[fill.symbol] = position
        self._realized = total_realized
        self._fees = fees
        self._base = base
        self._fees_by_asset[fill.fee_asset] = by_asset
        if value is None:
            self._unvalued[fill.fee_asset] = unvalued
        self._marks.setdefault(fill.symbol, fill.price)
        self._revalue(fill.symbol, position)
        self._update_drawdown()

    def mark(self, symbol: str, price: Decimal) -> None:
        """Set the price that values ``symbol``'s open position (unrealized PnL)."""
        self._exchange.instrument(symbol)  # raises for a symbol the exchange does not list
        if not price.is_finite() or price <= 0:
            raise ValueError(f"mark price for {symbol} must be positive: {price}")
        self._marks[symbol] = price
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
            with localcontext(_EXACT):
                self._book_entry(entry)
        except ArithmeticError as exc:  # trapped: nothing was committed (see _book_entry)
            raise EntryRefused(entry.entry_id, f"beyond exact arithmetic: {exc!r}") from exc
        self._entry_ids[entry.entry_id] = digest
        self._recent_entries.append(entry.entry_id)
        self._entries_applied += 1
        return True

    def _book_entry(self, entry: AccountEntry) -> None:
        if entry.asset != SETTLEMENT_ASSET:
            self._keep_in_asset(entry)
        else:
            self._book_usdt_entry(entry)

    def _keep_in_asset(self, entry: AccountEntry) -> None:
        """An amount in another asset than USDT: kept in that asset, no USDT figure moves."""
        kept = (
            self._transfers_by_asset
            if entry.category is EntryCategory.TRANSFER
            else self._unvalued_income
        )
        kept[entry.asset] = kept.get(entry.asset, _ZERO) + entry.amount

    def _book_usdt_entry(self, entry: AccountEntry) -> None:
        """Compute everything first, then commit: a trapped error changes nothing."""
        amount, category = entry.amount, entry.category
        funding, transfers, other = self._funding, self._transfers, self._other_income
        position: _Position | None = None
        if category is EntryCategory.FUNDING:
            assert entry.symbol is not None  # AccountEntry validates this
            funding += amount
            held = self._positions.get(entry.symbol)
            position = _Position() if held is None else held.copy()
            position.funding += amount
        elif category is EntryCategory.TRANSFER:
            transfers += amount
        else:
            other += amount
        booked = _booked_of(funding, transfers, other)
        base = self._wallet_of(realized=self._realized, fees=self._fees, booked=booked)
        before, after = self.equity, _EXACT.add(base, self.unrealized_pnl)
        peak, transferred = self._peak_equity, category is EntryCategory.TRANSFER
        if transferred:
            peak = _peak_after_transfer(peak, before=before, after=after, amount=amount)
        by_asset = self._transfers_by_asset.get(SETTLEMENT_ASSET, _ZERO) + amount
        # Commit. What follows cannot raise: bounded inputs, no division by a possible zero.
        if position is not None:
            assert entry.symbol is not None
            self._positions[entry.symbol] = position
        if transferred:
            self._transfers_by_asset[SETTLEMENT_ASSET] = by_asset
        self._funding, self._transfers, self._other_income = funding, transfers, other
        self._booked, self._base = booked, base
        self._equity = after
        if peak != self._peak_equity:
            self._peak_equity, self._trough = peak, None
        self._update_drawdown()

    def _wallet_of(
        self, *, realized: Decimal, fees: Decimal, booked: Decimal | None = None
    ) -> Decimal:
        """capital + realized - fees + the entries' net (``_booked_of``), always added in this
        order from the totals, never kept as a running sum, so a ledger restored from a
        checkpoint holds the very same Decimal as the one that wrote it."""
        wallet = _EXACT.subtract(_EXACT.add(self._initial_capital, realized), fees)
        return _EXACT.add(wallet, self._booked if booked is None else booked)

    # --- exact figures ------------------------------------------------------------------------

    @property
    def initial_capital(self) -> Decimal:
        return self._initial_capital

    @property
    def realized_pnl(self) -> Decimal:
        return self._realized

    @property
    def fees(self) -> Decimal:
        """Fees in USDT: those charged in USDT plus the others at their stated USDT value."""
        return self._fees

    @property
    def fees_by_asset(self) -> Mapping[str, Decimal]:
        """Every fee in its own asset (USDT, BNB, ...), sorted by asset (a read-only copy)."""
        return MappingProxyType(dict(sorted(self._fees_by_asset.items())))

    @property
    def unvalued_fees(self) -> Mapping[str, Decimal]:
        """Fees whose USDT value is unknown, by asset: ``equity`` leaves them out."""
        return MappingProxyType(dict(sorted(self._unvalued.items())))

    @property
    def equity_complete(self) -> bool:
        """False while a fee or an income has no USDT value: ``equity`` leaves it out."""
        return not self._unvalued and not self._unvalued_income

    @property
    def funding(self) -> Decimal:
        """USDT funding booked (positive: received), every symbol."""
        return self._funding

    @property
    def transfers(self) -> Decimal:
        """Net USDT transferred in (negative: more went out)."""
        return self._transfers

    @property
    def other_income(self) -> Decimal:
        """Other USDT income the venue booked (rebates, bonuses; negative: costs)."""
        return self._other_income

    @property
    def transfers_by_asset(self) -> Mapping[str, Decimal]:
        """Every transfer's net in its own asset, sorted by asset (a read-only copy)."""
        return MappingProxyType(dict(sorted(self._transfers_by_asset.items())))

    @property
    def unvalued_income(self) -> Mapping[str, Decimal]:
        """Funding and other income in another asset than USDT: ``equity`` leaves it out."""
        return MappingProxyType(dict(sorted(self._unvalued_income.items())))

    @property
    def entries_applied(self) -> int:
        return self._entries_applied

    @property
    def wallet(self) -> Decimal:
        """initial capital + realized PnL - fees + funding + transfers + other income, exact."""
        return self._base

    @property
    def unrealized_pnl(self) -> Decimal:
        # The context's own methods: the same arithmetic as operators inside localcontext,
        # without entering one.
        total = _ZERO
        for value in self._unrealized.values():
            if value is not None:
                total = _EXACT.add(total, value)
        return total

    @property
    def equity(self) -> Decimal:
        """The wallet + unrealized PnL, exact."""
        if self._equity is None:
            self._equity = _EXACT.add(self._base, self.unrealized_pnl)
        return self._equity

    @property
    def peak_equity(self) -> Decimal:
        return self._peak_equity

    @property
    def drawdown_pct(self) -> Decimal:
        """How far equity is below its peak now, in percent of the peak (0 at a new high)."""
        with localcontext(_EXACT):
            return _drawdown_pct(self._peak_equity, self.equity)

    @property
    def max_drawdown_pct(self) -> Decimal:
        """The worst peak-to-trough fall seen after any fill or mark, in percent of its peak."""
        return self._max_drawdown_pct

    @property
    def fills_applied(self) -> int:
        return self._fills_applied

    def position(self, symbol: str) -> PositionView:
        """``symbol``'s position with exact (unrounded) figures; all zero if never traded."""
        with localcontext(_EXACT):
            return self._view(symbol, self._positions.get(symbol, _Position()), exact=True)

    def quantity(self, symbol: str) -> Decimal:
        """Signed position quantity: positive long, negative short, 0 when flat."""
        position = self._positions.get(symbol)
        return position.quantity if position else _ZERO

    @property
    def open_positions(self) -> int:
        """How many symbols have a non-zero position (as ``PortfolioSnapshot.open_positions``)."""
        return sum(1 for p in self._positions.values() if p.quantity)

    @property
    def positions(self) -> Mapping[str, Decimal]:
        """Signed quantity of every non-flat symbol, sorted by symbol (a read-only copy)."""
        return MappingProxyType(
            {s: p.quantity for s, p in sorted(self._positions.items()) if p.quantity}
        )

    @property
    def marks(self) -> Mapping[str, Decimal]:
        """The latest mark price of every symbol that has one (a read-only copy)."""
        return MappingProxyType(dict(self._marks))

    # --- output -------------------------------------------------------------------------------

    def snapshot(self, *, sequence: int, ts_ms: int, fills_through: int = 0) -> PortfolioSnapshot:
        """The portfolio rounded for display; every symbol ever traded, flat ones included.

        ``fills_through``: the FILLS stream sequence of the last fill applied, if known.
        """
        with localcontext(_EXACT):
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
                initial_capital=_money(self._initial_capital),
                realized_pnl=_money(self._realized),
                unrealized_pnl=_money(self.unrealized_pnl),
                fees=_money(self._fees),
                equity=_money(self.equity),
                peak_equity=_money(self._peak_equity),
                drawdown_pct=_pct(self.drawdown_pct),
                max_drawdown_pct=_pct(self._max_drawdown_pct),
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
            realized_pnl=self._realized,
            fees_usdt=self._fees,
            fees_by_asset=_amounts(self._fees_by_asset, exact=True),
            unvalued_fees=_amounts(self._unvalued, exact=True),
            peak_equity=self._peak_equity,
            max_drawdown_pct=self._max_drawdown_pct,
            positions=tuple(
                CheckpointPosition(
                    symbol=s,
                    quantity=p.quantity,
                    cost=p.cost,
                    realized=p.realized,
                    fees=p.fees,
                    funding=p.funding,
                )
                for s, p in self._positions.items()  # the ledger's order: sums add the same
            ),
            marks=tuple(CheckpointMark(symbol=s, price=p) for s, p in self._marks.items()),
            recent_fills=tuple(
                AppliedFill(fill_id=f, digest=self._fill_ids[f]) for f in self._recent
            ),
            skipped=skipped,
            entries_applied=self._entries_applied,
            funding_usdt=self._funding,
            transfers_usdt=self._transfers,
            other_income_usdt=self._other_income,
            transfers_by_asset=_signed_amounts(self._transfers_by_asset, exact=True),
            unvalued_income=_signed_amounts(self._unvalued_income, exact=True),
            recent_entries=tuple(
                AppliedEntry(entry_id=e, digest=self._entry_ids[e]) for e in self._recent_entries
            ),
        )

    @classmethod
    def restore(cls, checkpoint: PortfolioCheckpoint, *, exchange: ExchangeInfo) -> Ledger:
        """The ledger ``checkpoint`` describes, exactly as the one that wrote it was."""
        ledger = cls(initial_capital=checkpoint.initial_capital, exchange=exchange)
        for held in checkpoint.positions:
            ledger._positions[held.symbol] = _Position(
                quantity=held.quantity,
                cost=held.cost,
                realized=held.realized,
                fees=held.fees,
                funding=held.funding,
            )
        ledger._marks = {mark.symbol: mark.price for mark in checkpoint.marks}
        for applied in checkpoint.recent_fills:
            ledger._fill_ids[applied.fill_id] = applied.digest
            ledger._recent.append(applied.fill_id)
        ledger._fills_applied = checkpoint.fills_applied
        ledger._realized = checkpoint.realized_pnl
        ledger._fees = checkpoint.fees_usdt
        ledger._fees_by_asset = {a.asset: a.amount for a in checkpoint.fees_by_asset}
        ledger._unvalued = {a.asset: a.amount for a in checkpoint.unvalued_fees}
        ledger._restore_entries(checkpoint)
        ledger._base = ledger._wallet_of(realized=ledger._realized, fees=ledger._fees)
        ledger._peak_equity = checkpoint.peak_equity
        ledger._max_drawdown_pct = checkpoint.max_drawdown_pct
        ledger._trough = None
        for symbol, position in ledger._positions.items():
            # A symbol with funding only (never traded here) has no mark and needs none.
            if position.quantity and symbol not in ledger._marks:
                raise ValueError(f"checkpoint holds {symbol} but no mark for it")
            ledger._revalue(symbol, position)
        return ledger

    def _restore_entries(self, checkpoint: PortfolioCheckpoint) -> None:
        for applied in checkpoint.recent_entries:
            self._entry_ids[applied.entry_id] = applied.digest
            self._recent_entries.append(applied.entry_id)
        self._entries_applied = checkpoint.entries_applied
        self._funding = checkpoint.funding_usdt
        self._transfers = checkpoint.transfers_usdt
        self._other_income = checkpoint.other_income_usdt
        self._transfers_by_asset = {a.asset: a.amount for a in checkpoint.transfers_by_asset}
        self._unvalued_income = {a.asset: a.amount for a in checkpoint.unvalued_income}
        self._booked = _booked_of(self._funding, self._transfers, self._other_income)

    # --- internals ----------------------------------------------------------------------------

    def _revalue(self, symbol: str, position: _Position) -> None:
        """Its fill or mark moved ``symbol``: its unrealized PnL, and so the equity."""
        self._unrealized[symbol] = (
            _EXACT.subtract(_EXACT.multiply(position.quantity, self._marks[symbol]), position.cost)
            if position.quantity
            else None
        )
        self._equity = None

    def _update_drawdown(self) -> None:
        # Called for every mark: ``_EXACT``'s own methods, not a ``localcontext`` entered.
        equity = self.equity
        if equity > self._peak_equity:
            self._peak_equity = equity  # a drawdown of 0
            self._trough = equity
            return
        # The drawdown from a fixed peak only grows as equity falls, its rounded arithmetic
        # too (each correctly rounded step is monotonic): above the trough it is no deeper.
        trough = self._trough
        if trough is not None and equity >= trough:
            return
        drawdown = _drawdown_pct(self._peak_equity, equity)
        if drawdown > self._max_drawdown_pct:
            self._max_drawdown_pct = drawdown
        self._trough = equity

    def _view(self, symbol: str, position: _Position, *, exact: bool) -> PositionView:
        mark = self._marks.get(symbol, _ZERO)
        unrealized = position.unrealized(mark) if position.quantity else _ZERO
        show = _identity if exact else _money
        return PositionView(
            symbol=symbol,
            quantity=position.quantity,
            avg_entry_price=show(position.avg_entry),
            mark_price=mark,
            unrealized_pnl=show(unrealized),
            realized_pnl=show(position.realized),
            fees=show(position.fees),
            funding=show(position.funding),
        )


def _book(position: _Position, signed_qty: Decimal, price: Decimal) -> Decimal:
    """Move ``position`` by ``signed_qty`` at ``price``; returns the PnL realized by the move.

    Must run inside the ``_EXACT`` context.
    """
    current = position.quantity
    if current == 0 or (current > 0) == (signed_qty > 0):
        position.quantity = current + signed_qty
        position.cost += signed_qty * price
        return _ZERO
    closed = min(abs(signed_qty), abs(current))
    # The share of the cost basis that leaves with the closed quantity (all of it when the
    # position closes, so a round trip is exact).
    closed_cost = position.cost if closed == abs(current) else position.cost * closed / abs(current)
    direction = 1 if current > 0 else -1
    realized = direction * closed * price - closed_cost
    position.realized += realized
    position.quantity = current + signed_qty
    position.cost -= closed_cost
    if position.quantity != 0 and (position.quantity > 0) != (current > 0):
        position.cost = position.quantity * price  # flipped: the remainder opened at the price
    return realized


def _booked_of(funding: Decimal, transfers: Decimal, other_income: Decimal) -> Decimal:
    """The account entries' net in USDT, added in one order wherever it is computed."""
    return _EXACT.add(_EXACT.add(funding, transfers), other_income)


def _peak_after_transfer(
    peak: Decimal, *, before: Decimal, after: Decimal, amount: Decimal
) -> Decimal:
    """The peak once capital moved: scaled by the equity's ratio after/before, so the drawdown
    in percent is what it was (a withdrawal is no loss); moved by the amount when the equity
    before or after is not positive (no ratio to scale by). Inside ``_EXACT``."""
    if before > 0 and after > 0:
        return peak * after / before
    return peak + amount


def _digest(fill: Fill) -> str:
    """What a fill says, in 16 hex digits: a repeat of its id must say the same."""
    facts = (fill.symbol, fill.side.value, fill.quantity, fill.price, fill.fee, fill.fee_asset)
    text = "|".join(str(part) for part in (*facts, fill.client_order_id))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _entry_digest(entry: AccountEntry) -> str:
    """What an entry says about money, in 16 hex digits: a repeat of its id must say the same
    (its time and note may be rendered differently by a second read without harm)."""
    facts = (entry.income_type.value, entry.symbol or "", entry.asset, entry.amount)
    return hashlib.sha256("|".join(str(part) for part in facts).encode()).hexdigest()[:16]


def _amounts(by_asset: Mapping[str, Decimal], *, exact: bool = False) -> tuple[AssetAmount, ...]:
    show = _identity if exact else _money
    return tuple(AssetAmount(asset=a, amount=show(v)) for a, v in sorted(by_asset.items()))


def _signed_amounts(
    by_asset: Mapping[str, Decimal], *, exact: bool = False
) -> tuple[SignedAssetAmount, ...]:
    show = _identity if exact else _money
    return tuple(SignedAssetAmount(asset=a, amount=show(v)) for a, v in sorted(by_asset.items()))


def _drawdown_pct(peak: Decimal, equity: Decimal) -> Decimal:
    # ``_EXACT``'s methods are the operators inside ``localcontext(_EXACT)``, without entering
    # one. A peak is positive unless transfers took every unit out (then nothing can fall).
    if equity >= peak or peak <= 0:
        return _ZERO
    return _EXACT.multiply(_EXACT.divide(_EXACT.subtract(peak, equity), peak), _HUNDRED)


def _identity(value: Decimal) -> Decimal:
    return value


def _money(value: Decimal) -> Decimal:
    return published(value, _USDT)


def _pct(value: Decimal) -> Decimal:
    return published(value, _PCT)
