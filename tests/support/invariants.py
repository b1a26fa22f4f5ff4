"""The safety invariants, checked at the end of every integration test that trades.

One checker for every test: it reads the streams back from the nats-server (and the venue's own
records when the venue is the local Binance-compatible server) and judges, with the stress
code's own rules (``qtrader_tools.stress``), never a second copy of them:

* exposure, from the venue's records: the paper exchange keeps none but the FILLS stream, the
  Binance server its admin trades and refusals; no position beyond ``maxPositionUsd`` by more
  than one step, no more open positions than allowed, no reduce-only order rejected
  (``qtrader_tools.stress.invariants.check_exposure``);
* nothing lost between the venue and FILLS: every trade the Binance server made for an order of
  ours (its client order id) is on FILLS;
* nothing duplicated or out of order: no fill id twice on FILLS, no order update or intent
  repeating its dedup id (``Nats-Msg-Id``: the streams keep 10 minutes of ids, longer than any
  test, so a stored repeat is a publish the server should have dropped), at most one final
  update per intent, every fill belongs to an order update of its client order id, and each
  worker's fills of a symbol are on FILLS in the order the venue made them (the Binance
  server's trade ids; a paper fill's time) (``qtrader_tools.stress.stream_audit``);
* the portfolio's last snapshot equals an exact (Fraction) account of the fills and account
  entries (funding, transfers) it says it applied (``qtrader_tools.exact.ledger_mismatches``),
  once it has applied every fill and entry stored (waited for, with a deadline); no entry id is
  stored twice either. Its marks are the ones it shows, each of which must be a close
  the MARKET stream stored for the symbol (or its first fill's price, before any candle): a
  stack that still trades moves its marks between two reads, so no later close is required.

``judge`` is pure (the unit tests feed it records that must fail); ``check_invariants`` reads
the records and judges them; ``assert_invariants`` fails with every problem found. Each problem
belongs to one ``Check``, so a test that breaks one on purpose (it plays the venue and
publishes fills of no order, or stores a duplicate to prove it is skipped) is exempted from
that one only.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

import httpx

from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    AccountEntry,
    Candle,
    Fill,
    MessageRejected,
    OrderIntent,
    OrderUpdate,
    PolicyRevision,
    PortfolioSnapshot,
    decode,
)
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.exchange.binance import binance_fill_id
from qtrader.execution.decisions import CLIENT_ORDER_ID_PREFIX
from qtrader.instruments import ExchangeInfo
from qtrader_tools.exact import ledger_mismatches
from qtrader_tools.simulators.binance_futures import SimAdmin
from qtrader_tools.stress.invariants import (
    ExposureLimits,
    ExposureReport,
    VenueRejection,
    VenueTrade,
    check_exposure,
    from_paper_fills,
    from_sim_records,
    paper_limits,
)
from qtrader_tools.stress.stream_audit import (
    audit_orders,
    duplicates,
    fills_out_of_venue_order,
    paper_fill_order,
)
from support.streams import kv_get_raw, kv_keys, last_stored, read_decodable

M = TypeVar("M", Fill, AccountEntry, Candle, OrderIntent, OrderUpdate)

SETTLE_S = 10.0  # how long the portfolio may take to apply the last fill stored
POLL_S = 0.1


class Check(enum.StrEnum):
    EXPOSURE = "exposure"  # positions within their limits, no reduce-only refusal
    DUPLICATES = "duplicates"  # no fill, update or intent stored twice
    ORDERS = "orders"  # one final update per intent; every fill of an updated order
    LEDGER = "ledger"  # the portfolio's snapshot against the exact account of FILLS
    # (its fills and account entries)


@dataclass(frozen=True, kw_only=True)
class Problem:
    check: Check
    text: str


@dataclass(frozen=True, kw_only=True)
class VenueRecords:
    """What the local Binance-compatible server recorded: its trades, its refusals, and the
    step size of each symbol it lists (the exposure checker's slack)."""

    base_url: str
    trades: tuple[VenueTrade, ...]
    rejections: tuple[VenueRejection, ...]
    step_sizes: Mapping[str, Decimal]


@dataclass(frozen=True, kw_only=True)
class TradingRecords:
    """Everything the invariants are judged from, as read back after a test."""

    spec: TradingPolicySpec
    fills: Sequence[Fill]
    intents: Sequence[OrderIntent]
    updates: Sequence[OrderUpdate]
    closes: Mapping[str, frozenset[Decimal]]  # every close the MARKET stream stored, by symbol
    snapshot: PortfolioSnapshot | None  # the last one stored; None when no portfolio ran
    venues: Sequence[VenueRecords] = ()  # empty in paper mode: FILLS is the venue's record
    entries: Sequence[AccountEntry] = ()  # the account entries on FILLS (testnet and live)


@dataclass(frozen=True, kw_only=True)
class InvariantReport:
    problems: tuple[Problem, ...]
    exposure: tuple[ExposureReport, ...]
    fills: int
    updates: int
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.fills} fills, {self.updates} order updates; " + "; ".join(
            r.summary() for r in self.exposure
        )
        lines = [head, *(f"note: {n}" for n in self.notes)]
        lines += [f"VIOLATION: {p.text}" for p in self.problems]
        return "\n".join(lines)


# --- the verdict (pure) ------------------------------------------------------------------------


def judge(records: TradingRecords, *, skip: frozenset[Check] = frozenset()) -> InvariantReport:
    """Every invariant over ``records`` but those in ``skip`` (each noted as not judged); the
    report lists each violation with its figures."""
    exposure = _exposure(records)
    ledger, notes = _ledger_problems(records)
    found = [Problem(check=Check.EXPOSURE, text=f"exposure: {r.summary()}") for r in exposure]
    found = [p for p, r in zip(found, exposure, strict=True) if not r.ok]
    found += _stream_problems(records) + ledger
    notes.append(_venue_note(records))
    notes += [f"{check.value} not judged (exempt)" for check in sorted(skip)]
    return InvariantReport(
        problems=tuple(p for p in found if p.check not in skip),
        exposure=tuple(exposure),
        fills=len(records.fills),
        updates=len(records.updates),
        notes=tuple(notes),
    )


def _exposure(records: TradingRecords) -> list[ExposureReport]:
    if not records.venues:  # paper: the FILLS stream is all the venue records
        limits = paper_limits(records.spec)
        return [check_exposure(trades=from_paper_fills(records.fills), limits=limits)]
    return [
        check_exposure(
            trades=venue.trades,
            rejections=venue.rejections,
            limits=ExposureLimits(
                max_position_usd=records.spec.risk.max_position_usd,
                max_open_positions=records.spec.risk.max_open_positions,
                step_sizes=venue.step_sizes,
            ),
        )
        for venue in records.venues
    ]


def _venue_note(records: TradingRecords) -> str:
    if not records.venues:
        return "exposure from the FILLS stream (the paper exchange's only record)"
    return "exposure from the records of the Binance server(s) at " + ", ".join(
        v.base_url for v in records.venues
    )


def _stream_problems(records: TradingRecords) -> list[Problem]:
    audit = audit_orders(records.intents, records.updates, records.fills)
    counts = {
        (Check.DUPLICATES, "fills repeating a fill id on FILLS"): duplicates(
            f.fill_id for f in records.fills
        ),
        (Check.DUPLICATES, "account entries repeating an entry id on FILLS"): duplicates(
            e.entry_id for e in records.entries
        ),
        (Check.DUPLICATES, "order updates repeating a dedup id"): duplicates(
            u.dedup_id for u in records.updates
        ),
        (Check.DUPLICATES, "intents repeating an intent id"): duplicates(
            i.intent_id for i in records.intents
        ),
        (Check.ORDERS, "final updates beyond an intent's first"): audit.extra_finals,
        (Check.ORDERS, "fills without an order update of their client order id"): (
            audit.fills_without_update
        ),
        (Check.ORDERS, "fills on FILLS after a later fill of their worker at the venue"): (
            fills_out_of_venue_order(records.fills, records.updates, _venue_order(records))
        ),
        (Check.ORDERS, "trades of our orders at the venue missing from FILLS"): len(
            _trades_not_on_fills(records)
        ),
    }
    return [
        Problem(check=check, text=f"{what}: {count}")
        for (check, what), count in counts.items()
        if count
    ]


def _trades_not_on_fills(records: TradingRecords) -> list[VenueTrade]:
    """The Binance server's trades of orders this system sent (its client order ids) whose
    fill is not on FILLS: a fill the venue made and the portfolio never had. (A trade of an
    order placed by hand is not a fill of ours.)"""
    on_fills = {f.fill_id for f in records.fills}
    return [
        t
        for venue in records.venues
        for t in venue.trades
        if t.client_order_id.startswith(CLIENT_ORDER_ID_PREFIX)
        and binance_fill_id(t.symbol, t.trade_id) not in on_fills
    ]


def _venue_order(records: TradingRecords) -> dict[str, int]:
    """Each fill id's place in the order its venue made it: the Binance server's trade id, or
    in paper mode the fill's time (the paper exchange stamps it with the worker's clock when it
    fills). None with two Binance servers, whose trade ids may coincide."""
    if not records.venues:
        return paper_fill_order(records.fills)
    if len(records.venues) != 1:
        return {}
    return {binance_fill_id(t.symbol, t.trade_id): t.trade_id for t in records.venues[0].trades}


def _ledger_problems(records: TradingRecords) -> tuple[list[Problem], list[str]]:
    snapshot = records.snapshot
    if snapshot is None:
        return [], ["no portfolio snapshot stored: the ledger was not checked"]
    applied = _first_of_each(records.fills)
    entries = _first_entries(records.entries)
    behind = [
        f"portfolio: the last snapshot applied {done} {what}, FILLS holds {stored} distinct ones"
        for what, done, stored in (
            ("fills", snapshot.fills_applied, len(applied)),
            ("account entries", snapshot.entries_applied, len(entries)),
        )
        if done != stored
    ]
    if behind:
        return [Problem(check=Check.LEDGER, text=text) for text in behind], []
    marks = {p.symbol: p.mark_price for p in snapshot.positions if p.quantity != 0}
    wrong = _mark_problems(marks, records.closes, applied)
    wrong += ledger_mismatches(
        snapshot,
        applied,
        marks=marks,
        capital=records.spec.paper.initial_capital_usd,
        entries=entries,
    )
    return [
        Problem(check=Check.LEDGER, text=f"portfolio vs exact account of FILLS: {w}") for w in wrong
    ], []


def _first_of_each(fills: Iterable[Fill]) -> list[Fill]:
    """The fills in stream order, each fill id once: what the portfolio's ledger applies."""
    seen: set[str] = set()
    kept = []
    for fill in fills:
        if fill.fill_id not in seen:
            seen.add(fill.fill_id)
            kept.append(fill)
    return kept


def _first_entries(entries: Iterable[AccountEntry]) -> list[AccountEntry]:
    """The entries in stream order, each entry id once: what the ledger applies."""
    seen: set[str] = set()
    kept = []
    for entry in entries:
        if entry.entry_id not in seen:
            seen.add(entry.entry_id)
            kept.append(entry)
    return kept


def _mark_problems(
    marks: Mapping[str, Decimal], closes: Mapping[str, frozenset[Decimal]], fills: Sequence[Fill]
) -> list[str]:
    """A mark must be a stored close of its symbol, or its first fill's price (the only price
    the portfolio has for a symbol before a candle of it)."""
    first_price: dict[str, Decimal] = {}
    for fill in fills:
        first_price.setdefault(fill.symbol, fill.price)
    return [
        f"{symbol} marked at {mark}, neither a stored close nor its first fill's price"
        for symbol, mark in sorted(marks.items())
        if mark not in closes.get(symbol, frozenset()) and mark != first_price.get(symbol)
    ]


# --- reading the records back ------------------------------------------------------------------


async def check_invariants(
    url: str,
    *,
    stack: str | None = None,
    spec: TradingPolicySpec | None = None,
    venues: Sequence[VenueRecords] = (),
    settle_s: float = SETTLE_S,
    skip: frozenset[Check] = frozenset(),
) -> InvariantReport | None:
    """Read the streams of ``stack`` on ``url`` back and judge them; None when nothing traded
    there (no order intent, update or fill) or no policy was ever published (no limits).
    ``spec`` defaults to the policy revision in force (the POLICY bucket's)."""
    spec = spec or await policy_in_force(url, stack=stack)
    if spec is None:
        return None
    # An exempt ledger check waits for no snapshot (a test playing the portfolio leaves one
    # that will never catch up).
    settle_s = 0.0 if Check.LEDGER in skip else settle_s
    records = await read_records(url, spec=spec, stack=stack, venues=venues, settle_s=settle_s)
    if not (records.fills or records.updates or records.intents):
        return None
    return judge(records, skip=skip)


async def assert_invariants(
    url: str,
    *,
    stack: str | None = None,
    spec: TradingPolicySpec | None = None,
    venues: Sequence[VenueRecords] = (),
    settle_s: float = SETTLE_S,
    skip: frozenset[Check] = frozenset(),
) -> InvariantReport | None:
    """``check_invariants``, failing with every violation and the figures."""
    report = await check_invariants(
        url, stack=stack, spec=spec, venues=venues, settle_s=settle_s, skip=skip
    )
    if report is not None and not report.ok:
        raise AssertionError("safety invariants violated:\n" + report.summary())
    return report


async def stacks_with_a_policy(url: str) -> list[str | None]:
    """Every stack a policy was published to on ``url`` (None: local mode's unscoped names),
    so a test whose operator serves several policies is checked stack by stack."""
    found: list[str | None] = []
    for key in await kv_keys(url, subjects.POLICY_BUCKET):
        if key == subjects.POLICY_KEY:
            found.append(None)
        elif key.endswith(f".{subjects.POLICY_KEY}"):
            found.append(key.removesuffix(f".{subjects.POLICY_KEY}"))
    return sorted(found, key=lambda stack: stack or "")


async def policy_in_force(url: str, *, stack: str | None = None) -> TradingPolicySpec | None:
    """The spec of the policy revision the workloads run (None when none was published)."""
    key = subjects.scoped_key(stack, subjects.POLICY_KEY)
    value = await kv_get_raw(url, subjects.POLICY_BUCKET, key)
    return None if value is None else decode(value, PolicyRevision).spec


async def read_records(
    url: str,
    *,
    spec: TradingPolicySpec,
    stack: str | None = None,
    venues: Sequence[VenueRecords] = (),
    settle_s: float = SETTLE_S,
) -> TradingRecords:
    fills = await _read(url, stack, subjects.FILLS, subjects.FILL_PREFIX, Fill)
    entries = await _read_entries(url, stack)
    snapshot = await _settled_snapshot(
        url, stack, (len(_first_of_each(fills)), len(_first_entries(entries))), settle_s
    )
    if snapshot is not None and snapshot.fills_applied > len(fills):
        # Still trading: the snapshot saw fills stored after the first read.
        fills = await _read(url, stack, subjects.FILLS, subjects.FILL_PREFIX, Fill)
        fills = _first_of_each(fills)[: snapshot.fills_applied]
    if snapshot is not None and snapshot.entries_applied > len(entries):
        entries = await _read_entries(url, stack)  # booked at the venue after the first read
        entries = _first_entries(entries)[: snapshot.entries_applied]
    candles = await _read(url, stack, subjects.MARKET, subjects.CANDLE_PREFIX, Candle)
    closes: dict[str, set[Decimal]] = defaultdict(set)
    for candle in candles:
        closes[candle.symbol].add(candle.close)
    return TradingRecords(
        spec=spec,
        fills=fills,
        intents=await _read(url, stack, subjects.ORDERS, subjects.ORDER_INTENT_PREFIX, OrderIntent),
        updates=await _read(url, stack, subjects.ORDERS, subjects.ORDER_UPDATE_PREFIX, OrderUpdate),
        closes={symbol: frozenset(c) for symbol, c in closes.items()},
        snapshot=snapshot,
        venues=venues,
        entries=entries,
    )


async def _read_entries(url: str, stack: str | None) -> list[AccountEntry]:
    messages, _ = await read_decodable(
        url,
        stream=subjects.scoped_stream(stack, subjects.FILLS).name,
        subject=subjects.scoped_subject(stack, subjects.ACCOUNT_ENTRY),
        message_type=AccountEntry,
    )
    return messages


async def _read(
    url: str, stack: str | None, stream: subjects.StreamSpec, prefix: str, message_type: type[M]
) -> list[M]:
    messages, _ = await read_decodable(
        url,
        stream=subjects.scoped_stream(stack, stream).name,
        subject=subjects.scoped_subject(stack, subjects.all_of(prefix)),
        message_type=message_type,
    )
    return messages


async def _settled_snapshot(
    url: str, stack: str | None, applied: tuple[int, int], settle_s: float
) -> PortfolioSnapshot | None:
    """The last snapshot, once it has applied ``applied`` (fills, account entries), or the last
    there is when the deadline passes: the verdict then says how far behind it is."""
    stream = subjects.scoped_stream(stack, subjects.PORTFOLIO).name
    subject = subjects.scoped_subject(stack, subjects.PORTFOLIO_SNAPSHOT)
    deadline = time.monotonic() + settle_s
    while True:
        snapshot = await _last_snapshot(url, stream, subject)
        if snapshot is None or time.monotonic() > deadline:
            return snapshot
        if (snapshot.fills_applied, snapshot.entries_applied) >= applied:
            return snapshot
        await asyncio.sleep(POLL_S)


async def _last_snapshot(url: str, stream: str, subject: str) -> PortfolioSnapshot | None:
    """The newest snapshot that decodes: a poison test may have stored junk after it."""
    try:
        return await last_stored(
            url, stream=stream, subject=subject, message_type=PortfolioSnapshot
        )
    except MessageRejected:
        stored, _ = await read_decodable(
            url, stream=stream, subject=subject, message_type=PortfolioSnapshot
        )
        return stored[-1] if stored else None


async def settle_portfolio(
    url: str, *, stack: str | None = None, timeout_s: float = SETTLE_S
) -> None:
    """Wait (at most ``timeout_s``) for the portfolio to apply every fill and account entry
    stored: for a test about to stop its workers, so the check after it finds the portfolio
    caught up."""
    fills = await _read(url, stack, subjects.FILLS, subjects.FILL_PREFIX, Fill)
    entries = await _read_entries(url, stack)
    applied = (len(_first_of_each(fills)), len(_first_entries(entries)))
    await _settled_snapshot(url, stack, applied, timeout_s)


def read_venue(base_url: str) -> VenueRecords:
    """The records of the local Binance-compatible server at ``base_url``, through its admin API
    (its trades and orders, and the refusals its request log holds) and its exchangeInfo."""
    with SimAdmin(base_url) as admin:
        trades, rejections = from_sim_records(
            trades=admin.trades(), orders=admin.orders(), log=admin.log()
        )
    document = httpx.get(f"{base_url}/fapi/v1/exchangeInfo", timeout=10).json()
    listing = ExchangeInfo.from_binance(document)
    return VenueRecords(
        base_url=base_url,
        trades=tuple(trades),
        rejections=tuple(rejections),
        step_sizes={s: i.step_size for s, i in listing.instruments.items()},
    )
