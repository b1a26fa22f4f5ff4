"""Account entries: what the venue booked to the account that is not one of our fills.

Execution owns the venue connection, so it reads the venue's income history (Binance's
``GET /fapi/v1/income``, signed, weight 30, through the same rate limiter as every request)
every ``interval_s`` and publishes each row that no fill carries (funding, transfers, other
income: ``IncomeType``) as an ``AccountEntry`` on the FILLS stream, where the portfolio books it
in stream order with the fills. REALIZED_PNL and COMMISSION rows are read and passed over: the
fills carry them. A row of a type the contract does not know, or one it refuses (a funding row
without a symbol, an amount out of bounds), is not booked: it is logged, counted and makes
``/health`` DEGRADED, since the ledger then misses an amount the account holds.

Where it reads from (``Cursor``):
- while running, from the newest row handled (published or passed over) less ``overlap_ms``:
  the venue may show a row stamped earlier than one it already showed (it books funding for
  every account at the funding time), and a row read again is known by its id and skipped;
- at start, from the newest ``AccountEntry`` stored on FILLS, less the overlap, so a restart
  loses nothing; the entries FILLS holds in that overlap are known (read back at start), so a
  restart publishes none of them again. Nothing is read from before the first fill or entry on
  FILLS (until the first trade the policy's initial capital is the account), and with neither
  stored, from this worker's start.
Pages of up to ``page`` rows (Binance: 1,000); a full page goes on from its last row's time.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import Counter
from pydantic import ValidationError

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import AccountEntry, Fill, IncomeType, account_entry_id
from qtrader.exchange.venue import IncomeReader, VenueIncome
from qtrader.health.contract import DependencyHealth, Status

log = logging.getLogger(__name__)

ENTRIES = Counter(
    "qtrader_account_entries_total",
    "Rows of the venue's income history, by outcome: published (a new entry on FILLS), "
    "duplicate (the stream held it already), from_fills (trade PnL and commissions: the fills "
    "carry them), refused (not booked: an unknown type or invalid fields).",
    ["outcome"],
)
INCOME_READS = Counter(
    "qtrader_venue_income_reads_total", "Reads of the venue's income history.", ["outcome"]
)
NAME = "account-entries"
_REFUSED_SHOWN = 5  # the latest refused rows /health names


class Outcome(enum.StrEnum):
    PUBLISHED = "published"
    DUPLICATE = "duplicate"
    FROM_FILLS = "from_fills"
    REFUSED = "refused"


@dataclass(frozen=True, kw_only=True)
class PassedOver:
    """A row that becomes no entry, and why."""

    outcome: Outcome  # FROM_FILLS or REFUSED
    detail: str = ""


def row_key(row: VenueIncome) -> str:
    """A row's identity (an entry's id): ``tranId`` is unique only within one income type."""
    return f"{row.income_type}:{row.tran_id}"


def to_entry(row: VenueIncome) -> AccountEntry | PassedOver:
    """The entry a row of the venue's income history books, or why it books none (pure)."""
    try:
        income_type = IncomeType(row.income_type)
    except ValueError:
        detail = f"{row_key(row)}: income type {row.income_type!r} is not one the ledger knows"
        return PassedOver(outcome=Outcome.REFUSED, detail=detail)
    if income_type.carried_by_fills:
        return PassedOver(outcome=Outcome.FROM_FILLS)
    try:
        return AccountEntry(
            entry_id=account_entry_id(income_type, row.tran_id),
            income_type=income_type,
            symbol=row.symbol or None,
            asset=row.asset,
            amount=row.amount,
            info=row.info[:256],
            ts_ms=row.time_ms,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "entry"
        detail = f"{row_key(row)}: {where}: {first['msg']}"[:300]
        return PassedOver(outcome=Outcome.REFUSED, detail=detail)


@dataclass(kw_only=True)
class Cursor:
    """How far the income history has been read: every row before ``through_ms`` was handled,
    and ``seen`` holds the ids (and times) of the rows handled within the overlap."""

    origin_ms: int  # nothing before this is read
    through_ms: int
    overlap_ms: int
    seen: dict[str, int] = field(default_factory=dict)

    def start_ms(self) -> int:
        return max(self.origin_ms, self.through_ms - self.overlap_ms)

    def handled(self, row: VenueIncome) -> None:
        self.seen[row_key(row)] = row.time_ms
        self.through_ms = max(self.through_ms, row.time_ms)

    def forget_old(self) -> None:
        """Rows older than the overlap are never read again: their ids can go."""
        floor = self.start_ms()
        self.seen = {key: t for key, t in self.seen.items() if t >= floor}


@dataclass(frozen=True, kw_only=True)
class IncomeSettings:
    interval_s: float  # between reads
    page: int = 1000  # rows per request (Binance's most)
    # How far before the newest row handled each read starts again (see the module's doc).
    overlap_ms: int = 600_000


class AccountEntries:
    """Reads the venue's income and publishes its entries; ``start`` before ``read_once``."""

    def __init__(self, bus: Bus, settings: IncomeSettings) -> None:
        self._bus = bus
        self._settings = settings
        self._cursor: Cursor | None = None
        self._published = 0  # new entries on FILLS since this worker started
        self._read_at_ms: int | None = None
        self._unreadable: str | None = None
        self._refused: deque[str] = deque(maxlen=_REFUSED_SHOWN)
        self._refused_total = 0
        # One read at a time: the periodic one and the one a settled wallet read asks for
        # (``qtrader.execution.venue_account``) share the cursor.
        self._reading = asyncio.Lock()

    async def start(self) -> None:
        """Where to read from, from what FILLS holds (raises ``BusUnavailable``)."""
        stored = await self._bus.read_stored(
            subjects.FILLS, subjects.ACCOUNT_ENTRY, AccountEntry, label="account-entries-start"
        )
        newest = max(stored, key=lambda entry: entry.ts_ms, default=None)
        origin = await self._origin_ms(stored)
        cursor = Cursor(
            origin_ms=origin,
            through_ms=origin if newest is None else newest.ts_ms,
            overlap_ms=self._settings.overlap_ms,
        )
        # What the overlap reads again and FILLS holds already is not published again.
        floor = cursor.start_ms()
        cursor.seen.update((e.entry_id, e.ts_ms) for e in stored if e.ts_ms >= floor)
        self._cursor = cursor
        log.info(
            "account entries: reading the venue's income from %d (newest stored entry: %s)",
            floor,
            "none" if newest is None else newest.entry_id,
        )

    async def _origin_ms(self, entries: list[AccountEntry]) -> int:
        """When the account's history begins for the ledger: the first fill or entry on FILLS,
        else now (until the first trade the policy's initial capital is the account)."""
        fills = await self._bus.stored_messages(
            subjects.FILLS, subjects.all_of(subjects.FILL_PREFIX), Fill, limit=1
        )
        firsts = [m.ts_ms for m in fills] + [m.ts_ms for m in entries]
        return min(firsts, default=_now_ms())

    async def read_once(self, venue: IncomeReader) -> None:
        """Read every row from the cursor on, page by page, and publish the new entries.

        Raises ``ExchangeError`` (the venue) or ``BusUnavailable`` (NATS): the rows handled
        until then stay handled, the rest are read next time.
        """
        async with self._reading:
            await self._read(venue)

    async def _read(self, venue: IncomeReader) -> None:
        cursor = self._cursor
        assert cursor is not None, "start() first"
        start_ms = cursor.start_ms()
        while True:
            rows = await venue.income(start_ms=start_ms, limit=self._settings.page)
            for row in rows:
                if row_key(row) not in cursor.seen:
                    await self._handle(row)
                    cursor.handled(row)
            if len(rows) < self._settings.page:
                break
            start_ms = self._next_page(rows, start_ms)
        cursor.forget_old()
        self._read_at_ms, self._unreadable = _now_ms(), None
        INCOME_READS.labels("ok").inc()

    @staticmethod
    def _next_page(rows: list[VenueIncome], start_ms: int) -> int:
        """A full page goes on from its last row's time (inclusive: rows of that millisecond
        past the page come next, those in it are skipped as seen). A full page all in the one
        millisecond it started at cannot: the rest of that millisecond is passed over."""
        last = rows[-1].time_ms
        if last > start_ms:
            return last
        log.error("a full page of income rows all at %d ms: the rest of it is not read", last)
        return last + 1

    async def _handle(self, row: VenueIncome) -> None:
        made = to_entry(row)
        if isinstance(made, PassedOver):
            ENTRIES.labels(made.outcome.value).inc()
            if made.outcome is Outcome.REFUSED:
                self._refused.append(made.detail)
                self._refused_total += 1
                log.error("account entry not booked (the ledger misses it): %s", made.detail)
            return
        ack = await self._bus.publish_acked(subjects.ACCOUNT_ENTRY, made)
        duplicate = ack is not None and ack.duplicate
        ENTRIES.labels((Outcome.DUPLICATE if duplicate else Outcome.PUBLISHED).value).inc()
        if not duplicate:
            self._published += 1
            log.info("account entry %s: %s %s", made.entry_id, made.amount, made.asset)

    def unreadable(self, why: str) -> None:
        """The last read failed (the venue, or NATS while publishing)."""
        self._unreadable = why[:300]
        INCOME_READS.labels("unreadable").inc()

    def health(self) -> DependencyHealth:
        problems = []
        if self._unreadable is not None:
            problems.append(f"last read failed: {self._unreadable}")
        if self._refused:
            problems.append(
                f"{self._refused_total} rows of the venue's income not booked (the ledger "
                f"misses them): {'; '.join(self._refused)}"
            )
        if problems:
            return DependencyHealth(name=NAME, status=Status.DEGRADED, detail="; ".join(problems))
        through = "not read yet" if self._read_at_ms is None else f"read {_iso(self._read_at_ms)}"
        detail = f"{self._published} entries published since start; the venue's income {through}"
        return DependencyHealth(name=NAME, status=Status.OK, detail=detail)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
