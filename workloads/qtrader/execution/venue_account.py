"""Settled reads of the venue's account: what the portfolio compares its ledger's wallet with.

The ledger owns the wallet (every fill and account entry on FILLS); execution owns the venue
connection, the orders in flight and the income reader. So execution says *when* the venue's
account can be compared and what it held, as a ``VenueAccount`` message, and the portfolio
compares it with its ledger as of the FILLS sequence the message names
(``qtrader.portfolio.wallet_check``).

A read is settled, and published, only when every amount the venue's wallet holds is on FILLS
at or before ``fills_through``:
1. nothing in flight before the first read of the account (no intent in the exposure book, no
   order being sent or looked up, no outcome unknown, nothing waiting in the outbox): every
   fill the venue made is on FILLS;
2. the venue's income is read after that first read, so every funding fee, transfer and other
   income the wallet held then is on FILLS (``AccountEntries.read_once``: the income loop's
   own read, which the settled read is taken around, once per income interval);
3. FILLS' last sequence is read after that: ``fills_through``;
4. the account is read again, and must equal the first read (wallet and positions) with still
   nothing in flight: no money moved while 2 and 3 ran, so the income read cannot hold an
   amount the wallet did not (a transfer landing between the reads), nor miss one it did.
Anything else is an unsettled read: counted, not published, tried again next round.

A venue whose income history lags its balance (an income row shown a while after the money
moved) makes a settled read differ for a while; the portfolio's rule (the difference must
persist over reads and time) is what tells that from money no row explains.

A stack never quiet at its income rounds is never compared, and that must not pass as "agrees":
``SettledReads`` keeps when the last settled read was, and the worker's ``/health``
(``venue-account``) is DEGRADED once none has been for ``UNSETTLED_ROUNDS`` rounds and at least
``UNSETTLED_S``, naming the last reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import VenueAccount, VenueAccountPosition
from qtrader.exchange.errors import ExchangeError
from qtrader.exchange.venue import AccountReader, VenuePosition
from qtrader.health.contract import DependencyHealth, Status

Account = tuple[list[VenuePosition], Decimal]  # what ``AccountReader.account`` answers
NAME = "venue-account"
# No settled read for this many income rounds, and for at least this long: the wallet has gone
# uncompared (a few busy rounds in a row are normal for a trading stack).
UNSETTLED_ROUNDS = 10
UNSETTLED_S = 600.0


@dataclass(frozen=True, kw_only=True)
class Unsettled:
    """Why no settled read came of this round."""

    why: str


@dataclass(frozen=True, kw_only=True)
class SettledReader:
    """Turns a read of the account taken while nothing was in flight into a settled one."""

    bus: Bus
    quiet: Callable[[], str | None]  # None when nothing is in flight, else what is
    source: str
    now_ms: Callable[[], int]

    async def settle(self, venue: AccountReader, first: Account) -> VenueAccount | Unsettled:
        """Steps 3 and 4 of the module's doc: ``first`` was read while ``quiet()`` said None,
        and the caller has read the income since (step 2, the income loop's own read).

        Raises ``ExchangeError`` (the venue) or ``BusUnavailable`` (NATS).
        """
        through = await self.bus.last_sequence(subjects.FILLS)
        second = await venue.account()
        busy = self.quiet()
        if busy is not None:
            return Unsettled(why=f"{busy} during the read")
        if _facts(first) != _facts(second):
            return Unsettled(why="the account moved during the read")
        positions, wallet = second
        return VenueAccount(
            source=self.source,
            ts_ms=self.now_ms(),
            fills_through=through,
            wallet=wallet,
            positions=tuple(
                VenueAccountPosition(
                    symbol=p.symbol,
                    quantity=p.quantity,
                    mark_price=p.mark_price,
                    unrealized_pnl=p.unrealized_pnl,
                )
                for p in sorted(positions, key=lambda p: p.symbol)
            ),
        )

    async def publish(self, venue: AccountReader, first: Account) -> VenueAccount | Unsettled:
        """``settle``, and the settled read on its subject; a failure is an unsettled read."""
        try:
            read = await self.settle(venue, first)
            if isinstance(read, VenueAccount):
                await self.bus.announce(subjects.VENUE_ACCOUNT, read)
        except (ExchangeError, BusUnavailable) as exc:
            return Unsettled(why=f"not readable: {exc}"[:300])
        return read


def _facts(account: Account) -> tuple[Decimal, tuple[tuple[str, Decimal], ...]]:
    """What must not move between the two reads: the wallet and every position's quantity
    (the unrealized PnL moves with the mark, and is compared at the mark the venue states)."""
    positions, wallet = account
    return wallet, tuple(sorted((p.symbol, p.quantity) for p in positions))


class SettledReads:
    """When the last settled read was and why the rounds since were not: ``/health``."""

    def __init__(self, *, now_s: Callable[[], float] = time.monotonic) -> None:
        self._now_s = now_s
        self._since_s = now_s()  # the last settled read, else the start
        self._settled = 0
        self._unsettled_rounds = 0  # since the last settled read
        self._why = ""

    def settled(self) -> None:
        self._since_s, self._settled, self._unsettled_rounds = self._now_s(), self._settled + 1, 0

    def unsettled(self, why: str) -> None:
        self._unsettled_rounds += 1
        self._why = why

    def health(self) -> DependencyHealth:
        ago_s = self._now_s() - self._since_s
        last = f"{self._settled} settled reads, the last {ago_s:.0f} s ago"
        if not self._settled:
            last = f"no settled read in {ago_s:.0f} s since the start"
        if not self._unsettled_rounds:
            return DependencyHealth(name=NAME, status=Status.OK, detail=last)
        detail = f"{last}; {self._unsettled_rounds} rounds unsettled since, the last: {self._why}"
        stale = self._unsettled_rounds >= UNSETTLED_ROUNDS and ago_s >= UNSETTLED_S
        if stale:
            detail = f"the wallet is not being compared with the ledger: {detail}"
        status = Status.DEGRADED if stale else Status.OK
        return DependencyHealth(name=NAME, status=status, detail=detail[:512])
