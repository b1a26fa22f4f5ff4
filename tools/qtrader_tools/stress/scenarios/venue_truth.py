"""Venue truth: a live-mode stack against the local Binance server; the account equals the venue's.

What runs: the local Binance-compatible server as its own process (``sim_process``), 3 symbols,
its clock moved through its admin API, so a 1m kline closes at every step; the rig's
nats-server; as real processes ``qtrader marketdata --source live`` on the server's combined
kline stream (``--market-url`` for its REST backfill and warm-up), ``qtrader inference`` with
the shipped model, ``qtrader execution`` in live mode
(``--exchange-url`` to the server, the user-data stream on, positions reconciled every
``RECONCILE_INTERVAL_S`` with a grace of ``RECONCILE_GRACE_S``, income read every
``INCOME_INTERVAL_S``) and the portfolio, with an ACTIVE latch and heartbeats (no control
plane: the reconciliation alert would trip the EmergencyStop to Reducing through it; here the
alert on the RISK stream is what is judged).

The signals are the shipped model's. It needs a window of ``WINDOW`` closed candles per symbol
before its first signal, so the venue first makes ``HISTORY_MINUTES`` minutes of prices, and
marketdata, finding the MARKET stream empty, warms it up with the last ``WINDOW`` closed klines
over REST (``CandleSource.WARMUP``: they fill inference's windows and make no signal); the
model then decides from the first step's candles. Each step: the venue's clock moves one minute
(the step's klines close), the scenario waits for each closed candle on the MARKET stream (what
marketdata published, not what the scenario planted), for the model's signal of it for every
symbol, for execution to have decided every signal so far (an intent, a denial or a drop, by
its metrics), and for every intent to be final; then every symbol gets a new price. The
account then moves by itself, at fixed steps:

* funding, ``FUNDING_ROUNDS`` times: a rate per symbol (``/_sim/funding/rate``), charged at
  once (``/_sim/funding/settle``); the server's scheduled funding is centuries away. The model
  chooses the positions, so the rate's sign follows the venue's position (``positionRisk``) and
  alternates by a symbol's charges (its first one pays, its second receives, ...); a symbol
  that is flat when its round comes is charged at the next step it holds a position;
* BNB commissions: 1 BNB transferred in at the start (a TRANSFER in BNB), fee burn switched on
  for the second quarter of the steps (``/_sim/fee_burn``), so part of the trades pay in BNB;
* two injected websocket disconnects (``/_sim/ws/drop``: every socket aborted, marketdata's and
  execution's user-data stream);
* the venue's connection cut-off: ``ws_max_age_ms`` is ``WS_MAX_AGE_MS`` of the venue's clock
  (Binance: 24 h); one step jumps the clock by that much at once (klines close in a burst and
  every connection reaches its age), and connections that live long enough reach it by
  themselves too;
* a portfolio restart: SIGTERM, then the same command again through the rig;
* at the end, once trading has stopped and the last closes are the venue's prices: a manual
  trade on the venue (``/_sim/manual_trade``, an order from its web page), against our
  position in its symbol (so it realizes).

The design flags a manual trade rather than adopting it: execution's reconciliation raises a
``reconciliation`` risk alert (which trips the EmergencyStop to Reducing by default) and the
portfolio never books it. So the venue's account at the end is ours plus the manual trade, and
the rule for its effect, computed from the server's trade record of that order (side, quantity
``q`` signed, price ``P``, ``realizedPnl`` R, commission C in USDT) at the venue's mark ``M``:
position ``+q``; wallet ``R - C``; unrealized PnL ``q x (M - P) - R`` (the equity moves by
``q x (M - P) - C``). Nothing trades or is charged after it, so nothing else depends on it.

A BNB commission is paid from the venue's BNB wallet, not its USDT one; the portfolio keeps it
in BNB (``fees_by_asset``) and also counts its USDT value as a fee, so its wallet is the
venue's USDT wallet less our BNB commissions at the venue's BNB price (``BNBUSDT``, which
nothing moves here).

Criteria, from the server's own records (``/_sim/trades``, ``/_sim/income``, ``/_sim/orders``,
the signed ``/fapi/v2/balance`` and ``/fapi/v2/positionRisk``, ``GET /fapi/v1/klines``) and the
streams, never from values the scenario chose:

* the portfolio's wallet (USDT) equals the venue's (rule above) to the cent, its unrealized PnL
  and equity too; its funding in total and per symbol equals the venue's FUNDING_FEE records
  exactly; its BNB fees equal the BNB commissions of our trades exactly (and the venue's BNB
  wallet agrees: transfers in less those commissions); its positions the venue's exactly;
* on the MARKET stream, per symbol, every minute from the first candle to the last once (0
  missing, 0 duplicated), each equal to the venue's kline (open, high, low, close, volume);
* the manual trade caught by a ``reconciliation`` risk alert on the RISK stream within
  ``DETECTION_BOUND_S`` (wall time from the admin call to the alert's stamp), and no such
  alert before it (trading never looked like a difference);
* the exposure invariant (``stress.invariants``) over our trades (the manual one left out);
* our trades at the venue all on FILLS, and the portfolio equal to the exact account of FILLS
  (fills and account entries, ``stress.exact``);
* funding of both signs booked on every symbol, BNB fees > 0, disconnects == 2, cut-offs >= 1;
* no signal of a warm-up candle (their windows full, the model decides from the first step).

Figures: funding per symbol, BNB fees, connections dropped, cut-offs, detection time, -1021
answers (each clock step puts execution's timestamps a minute behind: it resyncs once).

Scale: ``FULL_STEPS`` steps at full length, ``MIN_STEPS`` at least (14 at the default 0.1).
Measured on the 2-core development machine: about 30 s at 0.1 (22 to 28 trades of the model
over 5 runs), and at full length 123 trades and 36 connections cut off at their age (one run,
under 150 s; scripted signals made 180 trades in 92 s).

What it found: with the positions and the income both read every 0.5 s (some 4,800 weight a
minute against the venue's 2,400), execution sent nothing and logged nothing for 36 s after the
second drop (its user-data stream reopened only then), which its own limiter, at 90% of the
minute's weight, explains: the reads are now 1 s and 2 s apart.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import httpx

from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    AccountEntry,
    Candle,
    CandleSource,
    Fill,
    OrderIntent,
    OrderUpdate,
    PortfolioSnapshot,
    RiskAlert,
    RiskAlertKind,
    Signal,
)
from qtrader.exchange.binance import binance_fill_id
from qtrader.exchange.credentials import KEY_VARIABLE, SECRET_VARIABLE
from qtrader.inference.features import WINDOW
from qtrader.instruments import paper_exchange_info
from qtrader_tools.exact import last_closes, ledger_mismatches
from qtrader_tools.processes import Child
from qtrader_tools.simulators.binance_futures import SimAdmin
from qtrader_tools.simulators.binance_futures.process import sim_process
from qtrader_tools.stress.harness import Rig, ScenarioFailure, policy_document
from qtrader_tools.stress.invariants import (
    ExposureLimits,
    check_exposure,
    from_sim_records,
    judge_exposure,
)
from qtrader_tools.stress.probes import family_total
from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
START_PRICES = {"BTCUSDT": Decimal(30_000), "ETHUSDT": Decimal(2_000), "SOLUSDT": Decimal(150)}
CAPITAL = Decimal(10_000)
MAX_POSITION_USD = Decimal(1000)
MAX_OPEN_POSITIONS = 3
KEY, SECRET = "venue-key", "venue-secret"
MINUTE_MS = 60_000
WS_MAX_AGE_MS = 4 * MINUTE_MS  # Binance's 24 h, in the venue's clock
FULL_STEPS = 60
MIN_STEPS = 14
FUNDING_ROUNDS = 4
FUNDING_RATE = Decimal("0.0005")
BNB_DEPOSIT = Decimal(1)
MANUAL_SYMBOL, MANUAL_QTY = "ETHUSDT", Decimal("0.05")
HISTORY_MINUTES = WINDOW + 2  # klines the venue closes before the stack starts: a full warm-up
# Each signal ends as one of these in execution's metrics: an intent (published or not), a
# denial, a drop by the bounded intake.
DECIDED_METRICS = (
    "qtrader_order_intents_total",
    "qtrader_order_intents_unpublished_total",
    "qtrader_signals_denied_total",
    "qtrader_signals_dropped_total",
)
# Weight per minute: positions and wallet every second (10 a read), income every 2 s (30 a read):
# about 1,500 of the venue's 2,400 a minute, shared with marketdata's backfills on one IP. At
# 0.5 s for both (about 4,800 a minute) execution went quiet for 36 s at a time.
RECONCILE_INTERVAL_S = 1.0
RECONCILE_GRACE_S = 2.0
INCOME_INTERVAL_S = 2.0
DETECTION_BOUND_S = 10.0
STEP_TIMEOUT_S = 45.0
NUDGE_AFTER_S = 3.0  # no closed kline on MARKET by then: one more minute closes
MAX_NUDGES = 6
SETTLE_TIMEOUT_S = 30.0
CENT = Decimal("0.01")
TRADE_TYPES = ("REALIZED_PNL", "COMMISSION")  # the fills carry these


def run(options: StressOptions, result: ScenarioResult) -> None:
    config = {
        "api_keys": {KEY: SECRET},
        "prices": {s: str(p) for s, p in START_PRICES.items()},
        "balance": str(CAPITAL),
        "kline_push_ms": 20,
        "ws_max_age_ms": WS_MAX_AGE_MS,
        # Listen keys and funding only by the scenario's doing: the clock jumps minutes a step.
        "listen_key_validity_ms": 10**12,
        "funding_interval_ms": 10**13,
    }
    with sim_process(config, options.work_dir / "sim") as url, SimAdmin(url) as admin:
        asyncio.run(_run(options, result, url, admin))


@dataclass
class _Plan:
    steps: int
    funding: dict[int, int]  # step -> funding round
    burn_on: int
    burn_off: int
    drops: tuple[int, int]
    cut_off: int
    restart: int

    @classmethod
    def of(cls, steps: int) -> _Plan:
        funding = {steps * (k + 1) // (FUNDING_ROUNDS + 1): k for k in range(FUNDING_ROUNDS)}
        return cls(
            steps=steps,
            funding=funding,
            burn_on=steps // 4,
            burn_off=steps // 2,
            drops=(steps // 3, 2 * steps // 3),
            cut_off=steps // 2 + 1,
            restart=3 * steps // 4,
        )


@dataclass
class _Watch:
    """What the scenario did to the venue and what the venue's connection list showed."""

    dropped: list[int] = field(default_factory=list)  # connections aborted per drop
    cut_offs: int = 0  # connections gone having reached the venue's maximum age
    known: dict[tuple[Any, ...], int] = field(default_factory=dict)  # connection -> opened_ms
    user_stream_back_s: list[float] = field(default_factory=list)
    nudges: int = 0  # extra minutes for a feed that reconnected by itself to backfill
    funding_charges: Counter[str] = field(default_factory=Counter)  # per symbol


async def _run(options: StressOptions, result: ScenarioResult, url: str, admin: SimAdmin) -> None:
    steps = int(options.scaled(FULL_STEPS, minimum=MIN_STEPS))
    plan = _Plan.of(steps)
    result.figures["steps"] = steps
    watch = _Watch()
    await asyncio.to_thread(_align_clock, admin, url)
    await asyncio.to_thread(_history, admin, url)
    async with Rig(options.work_dir) as rig:
        execution, portfolio = await _start(rig, url)
        await asyncio.to_thread(admin.transfer, KEY, "BNB", BNB_DEPOSIT)
        opened = await _connections(admin)
        if not any(c["streams"] for c in opened):
            raise ScenarioFailure("marketdata opened no kline stream")
        options.say(f"venue-truth: stack up; {steps} steps")
        for step in range(steps):
            portfolio = await _step(
                rig, admin, url, plan, step, watch, options, execution, portfolio
            )
        # New prices, away from the last fills' (an unrealized PnL to compare), then the last
        # closes are the venue's prices from here on: the marks agree.
        await _last_prices(admin, url)
        await _advance(rig, admin, url, MINUTE_MS, watch)
        fills_done = await _settled_portfolio(rig, admin)
        options.say("venue-truth: trading over; a manual trade on the venue")
        side = "SELL" if (await _venue_positions(url)).get(MANUAL_SYMBOL, 0) > 0 else "BUY"
        manual, detection_s, early = await _manual_trade(rig, admin, side)
        evidence = await _evidence(rig, admin, url, fills_done)
        result.figures["execution health at the end"] = (await rig.health(execution)).get("status")
        decided = {name: await family_total(rig, execution, name) for name in DECIDED_METRICS}
        result.figures["signals decided (execution)"] = decided
    _judge(result, evidence, manual, detection_s=detection_s, early=early, watch=watch)


def _align_clock(admin: SimAdmin, url: str) -> None:
    """One second into a venue minute, so the first step closes a whole kline."""
    now = _venue_now(url)
    admin.clock(advance_ms=MINUTE_MS - now % MINUTE_MS + 1000)


def _history(admin: SimAdmin, url: str) -> None:
    """``HISTORY_MINUTES`` klines close on the venue, each at a price of its own, before the
    stack starts: what marketdata's warm-up fetches for the model's windows."""
    for _ in range(HISTORY_MINUTES):
        minute = _venue_now(url) // MINUTE_MS
        for symbol in SYMBOLS:
            admin.price(symbol, _price(symbol, minute))
        admin.clock(advance_ms=MINUTE_MS)


def _venue_now(url: str) -> int:
    return int(httpx.get(f"{url}/fapi/v1/time", timeout=5).json()["serverTime"])


async def _start(rig: Rig, url: str) -> tuple[Child, Child]:
    policy = policy_document(
        "stress-venue-truth",
        mode="live",
        symbols=list(SYMBOLS),
        risk={
            "minConfidence": 0.0,
            "maxPositionUsd": str(MAX_POSITION_USD),
            "maxSlippageBps": 100,
        },
        paper={"initialCapitalUsd": str(CAPITAL)},
    )
    await rig.publish_policy(policy)
    await rig.arm_without_control_plane()
    env = {KEY_VARIABLE: KEY, SECRET_VARIABLE: SECRET}
    # The wallet's grace as short as the positions': a false wallet difference would show.
    portfolio = rig.workload("portfolio", None, "--wallet-grace", str(RECONCILE_GRACE_S))
    execution = rig.workload(
        "execution",
        "execution",
        *("--worker-id", "stress-venue", "--exchange-url", url),
        *("--reconcile-interval", str(RECONCILE_INTERVAL_S)),
        *("--reconcile-grace", str(RECONCILE_GRACE_S)),
        *("--income-interval", str(INCOME_INTERVAL_S)),
        env=env,
    )
    inference = rig.workload("inference")
    marketdata = rig.workload(
        "marketdata",
        None,
        *("--source", "live", "--market-url", url, "--interval", "1m"),
        *("--warmup-candles", str(WINDOW)),
    )
    await rig.wait_healthy([portfolio, execution, inference, marketdata])
    # Every signal must become an intent: one decided before execution's first heartbeat would
    # be denied as halted, and the step would wait for an intent that never comes.
    await rig.wait_trading([execution])

    async def streaming() -> bool:
        connections = await _connections_of(url)
        return any(c["streams"] for c in connections) and any(c["listen_keys"] for c in connections)

    await rig.until(streaming, timeout_s=30, what="the kline and user-data sockets")
    await asyncio.sleep(0.5)  # subscribed: a socket gets the klines after its first push
    return execution, portfolio


async def _reconnected(rig: Rig, url: str, since_ms: int) -> None:
    """Until a kline socket opened at ``since_ms`` or later (execution's user-data stream is
    not waited for: REST brings the trades meanwhile; how long it took is a figure)."""

    async def opened() -> bool:
        fresh = [c for c in await _connections_of(url) if int(c["opened_ms"]) >= since_ms]
        return any(c["streams"] for c in fresh)

    await rig.until(opened, timeout_s=STEP_TIMEOUT_S, what="the kline socket again", interval_s=0.2)
    await asyncio.sleep(0.3)  # subscribed


async def _user_stream_back(url: str, since_ms: int, watch: _Watch) -> None:
    """Seconds (wall) until execution's user-data socket is open again after a drop."""
    started = time.monotonic()
    while time.monotonic() - started < 120:
        fresh = [c for c in await _connections_of(url) if int(c["opened_ms"]) >= since_ms]
        if any(c["listen_keys"] for c in fresh):
            watch.user_stream_back_s.append(round(time.monotonic() - started, 2))
            return
        await asyncio.sleep(0.2)


async def _connections(admin: SimAdmin) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = (await asyncio.to_thread(admin.websockets))["connections"]
    return listed


async def _connections_of(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5) as http:
        listed: list[dict[str, Any]] = (await http.get(f"{url}/_sim/ws")).json()["connections"]
    return listed


def _conn_key(c: Mapping[str, Any]) -> tuple[Any, ...]:
    return (c["opened_ms"], tuple(c["streams"]), tuple(c["listen_keys"]))


async def _last_prices(admin: SimAdmin, url: str) -> None:
    minute = await asyncio.to_thread(_venue_now, url) // MINUTE_MS
    for symbol in SYMBOLS:
        await asyncio.to_thread(admin.price, symbol, _price(symbol, minute + 5))


def _price(symbol: str, minute: int) -> Decimal:
    """A small deterministic wander, on the symbol's tick, well inside the slippage bound."""
    start = START_PRICES[symbol]
    tick = paper_exchange_info().instrument(symbol).tick_size
    return start + tick * 10 * ((minute * 7 + SYMBOLS.index(symbol) * 3) % 11 - 5)


async def _step(
    rig: Rig,
    admin: SimAdmin,
    url: str,
    plan: _Plan,
    step: int,
    watch: _Watch,
    options: StressOptions,
    execution: Child,
    portfolio: Child,
) -> Child:
    rig.check()
    if step in plan.drops:
        since = await asyncio.to_thread(_venue_now, url)
        dropped = await asyncio.to_thread(admin.drop_websockets)
        watch.dropped.append(dropped)
        options.say(f"venue-truth: step {step}: {dropped} websockets dropped")
        await _reconnected(rig, url, since)
        rig.spawn_task(_user_stream_back(url, since, watch), f"user-stream-back-{step}")
    if step == plan.burn_on:
        await asyncio.to_thread(admin.fee_burn, KEY, True)
    if step == plan.burn_off:
        await asyncio.to_thread(admin.fee_burn, KEY, False)
    if step == plan.restart:
        options.say(f"venue-truth: step {step}: portfolio SIGTERM and start again")
        rig.children.stop([portfolio.name])
        portfolio = rig.children.respawn(portfolio.name)
        await rig.wait_healthy([portfolio])
    jump = WS_MAX_AGE_MS if step == plan.cut_off else MINUTE_MS
    closed_open = await _advance(rig, admin, url, jump, watch)
    signals = await _signalled(rig, closed_open)
    await _decided(rig, execution, signals)
    await _intents_final(rig)
    # The next kline's prices once this one's trades are done: each fills at its candle's close.
    minute = closed_open // MINUTE_MS + 1  # the forming kline's
    for symbol in SYMBOLS:
        await asyncio.to_thread(admin.price, symbol, _price(symbol, minute))
    due = sum(1 for at in plan.funding if at <= step)
    await _funding(admin, url, due, watch)
    return portfolio


async def _advance(rig: Rig, admin: SimAdmin, url: str, jump_ms: int, watch: _Watch) -> int:
    """Move the venue's clock; wait for the last kline it closed on MARKET for every symbol.
    Returns that kline's open time. Counts the connections that reached their maximum age."""
    before = await _connections(admin)
    for c in before:
        watch.known.setdefault(_conn_key(c), int(c["opened_ms"]))
    closed_open = 0

    async def stored() -> bool:
        for symbol in SYMBOLS:
            last = await rig.bus.last_message(
                subjects.MARKET, subjects.candle_subject(symbol), Candle
            )
            if not isinstance(last, Candle) or last.open_time_ms < closed_open:
                return False
        return True

    for nudge in range(MAX_NUDGES + 1):
        advance = jump_ms if nudge == 0 else MINUTE_MS
        await asyncio.to_thread(functools.partial(admin.clock, advance_ms=advance))
        now = await asyncio.to_thread(_venue_now, url)
        closed_open = now // MINUTE_MS * MINUTE_MS - MINUTE_MS
        try:
            await rig.until(stored, timeout_s=NUDGE_AFTER_S, what="the closed klines on MARKET")
            break
        except ScenarioFailure:
            if nudge == MAX_NUDGES:
                raise
            # A kline that closed while the socket was down (or as python-binance reconnected
            # by itself) comes by REST backfill before the next closed kline: one more minute.
            watch.nudges += 1
    after = {_conn_key(c) for c in await _connections(admin)}
    for c in before:
        key = _conn_key(c)
        if key not in after and now - int(c["opened_ms"]) >= WS_MAX_AGE_MS:
            watch.cut_offs += 1
    return closed_open


async def _funding(admin: SimAdmin, url: str, due: int, watch: _Watch) -> None:
    """Charge each symbol that holds a position and has had fewer than ``due`` charges. The
    model chooses the positions, so the rate's sign follows the venue's position and
    alternates by the symbol's charges: its first pays, its second receives, and so on."""
    behind = [s for s in SYMBOLS if watch.funding_charges[s] < due]
    if not behind:
        return
    positions = await _venue_positions(url)
    for symbol in behind:
        position = positions.get(symbol, Decimal(0))
        if position == 0:
            continue  # nothing to charge: the next step it holds one
        pays = watch.funding_charges[symbol] % 2 == 0
        sign = (1 if position > 0 else -1) * (1 if pays else -1)
        rate = FUNDING_RATE * (SYMBOLS.index(symbol) + 1) * sign
        await asyncio.to_thread(admin.funding_rate, symbol, rate)
        await asyncio.to_thread(admin.settle_funding, symbol)
        watch.funding_charges[symbol] += 1


async def _venue_positions(url: str) -> dict[str, Decimal]:
    """The venue's position per symbol (signed), from ``positionRisk``."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        rows = await _signed(http, "/fapi/v2/positionRisk")
    return {str(r["symbol"]): Decimal(str(r["positionAmt"])) for r in rows}


async def _signalled(rig: Rig, closed_open: int) -> list[Signal]:
    """Until the model's signal of the kline opening at ``closed_open`` is on SIGNALS for every
    symbol; returns every signal so far."""
    found: list[Signal] = []

    async def made() -> bool:
        found[:] = await rig.read_stream(
            subjects.SIGNALS, subjects.all_of(subjects.SIGNAL_PREFIX), Signal
        )
        done = {s.symbol for s in found if s.candle_open_time_ms == closed_open}
        return done == set(SYMBOLS)

    await rig.until(made, timeout_s=STEP_TIMEOUT_S, what="the model's signals", interval_s=0.1)
    return found


async def _decided(rig: Rig, execution: Child, signals: Sequence[Signal]) -> None:
    """Until execution has decided as many signals as there are (each ends in one of
    ``DECIDED_METRICS``): then every intent it will make of them is on ORDERS."""

    async def decided() -> bool:
        totals = [await family_total(rig, execution, name) for name in DECIDED_METRICS]
        return sum(totals) >= len(signals)

    await rig.until(decided, timeout_s=STEP_TIMEOUT_S, what="the signals decided", interval_s=0.1)


async def _orders(rig: Rig) -> tuple[list[OrderIntent], list[OrderUpdate]]:
    intents = await rig.read_stream(
        subjects.ORDERS, subjects.all_of(subjects.ORDER_INTENT_PREFIX), OrderIntent
    )
    updates = await rig.read_stream(
        subjects.ORDERS, subjects.all_of(subjects.ORDER_UPDATE_PREFIX), OrderUpdate
    )
    return intents, updates


async def _intents_final(rig: Rig) -> None:
    """Until every intent made so far has a final update."""

    async def final() -> bool:
        intents, updates = await _orders(rig)
        done = {u.intent_id for u in updates if u.status.is_final}
        return all(i.intent_id in done for i in intents)

    await rig.until(final, timeout_s=STEP_TIMEOUT_S, what="every intent final", interval_s=0.1)


def _ours(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in entries if e["apiKey"] == KEY and e["incomeType"] not in TRADE_TYPES]


async def _settled_portfolio(rig: Rig, admin: SimAdmin) -> int:
    """Until the portfolio has applied every trade and entry the venue booked and marks at the
    last closes; returns the fills applied."""
    found: list[int] = []

    async def settled() -> bool:
        trades = await asyncio.to_thread(admin.trades)
        entries = _ours(await asyncio.to_thread(admin.income))
        candles = await rig.read_stream(
            subjects.MARKET, subjects.all_of(subjects.CANDLE_PREFIX), Candle
        )
        closes = last_closes(candles)
        snapshot = await rig.bus.last_message(
            subjects.PORTFOLIO, subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot
        )
        if not isinstance(snapshot, PortfolioSnapshot):
            return False
        found[:] = [snapshot.fills_applied]
        marks = {p.symbol: p.mark_price for p in snapshot.positions if p.quantity != 0}
        return (
            snapshot.fills_applied == len(trades)
            and snapshot.entries_applied == len(entries)
            and all(closes.get(s) == m for s, m in marks.items())
        )

    try:
        await rig.until(settled, timeout_s=SETTLE_TIMEOUT_S, what="the portfolio settled")
    except ScenarioFailure:
        if not found:
            raise
    return found[0]


async def _risk_alerts(rig: Rig) -> list[RiskAlert]:
    alerts = await rig.read_stream(
        subjects.RISK, subjects.all_of(subjects.RISK_ALERT_PREFIX), RiskAlert
    )
    kinds = (RiskAlertKind.RECONCILIATION, RiskAlertKind.WALLET_RECONCILIATION)
    return [a for a in alerts if a.alert_kind in kinds]


async def _manual_trade(
    rig: Rig, admin: SimAdmin, side: str
) -> tuple[dict[str, Any], float | None, list[RiskAlert]]:
    """The manual trade; the wall-clock seconds until its reconciliation alert (None: none in
    time); and the reconciliation alerts there were before it."""
    early = await _risk_alerts(rig)
    sent = time.time()
    order = await asyncio.to_thread(admin.manual_trade, KEY, MANUAL_SYMBOL, side, MANUAL_QTY)
    found: list[RiskAlert] = []

    async def alerted() -> bool:
        found[:] = [
            a
            for a in await _risk_alerts(rig)
            if a.symbol == MANUAL_SYMBOL and a.ts_ms >= int(sent * 1000) - 1
        ]
        return bool(found)

    try:
        await rig.until(
            alerted,
            timeout_s=3 * DETECTION_BOUND_S,
            what="the reconciliation alert",
            interval_s=0.1,
        )
    except ScenarioFailure:
        return order, None, early
    return order, found[0].ts_ms / 1000 - sent, early


@dataclass(frozen=True)
class _Evidence:
    snapshot: PortfolioSnapshot | None
    fills: list[Fill]
    entries: list[AccountEntry]
    candles: list[Candle]
    signals: list[Signal]
    trades: list[dict[str, Any]]
    orders: list[dict[str, Any]]
    log: list[dict[str, Any]]
    income: list[dict[str, Any]]
    balances: list[dict[str, Any]]
    positions: list[dict[str, Any]]
    klines: dict[str, dict[int, list[Any]]]
    bnb_price: Decimal


async def _evidence(rig: Rig, admin: SimAdmin, url: str, fills_done: int) -> _Evidence:
    every = subjects.all_of
    candles = await rig.read_stream(subjects.MARKET, every(subjects.CANDLE_PREFIX), Candle)
    snapshot = await rig.bus.last_message(
        subjects.PORTFOLIO, subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot
    )
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        klines: dict[str, dict[int, list[Any]]] = {}
        for symbol in SYMBOLS:
            mine = [c.open_time_ms for c in candles if c.symbol == symbol]
            klines[symbol] = {}
            if mine:
                params: dict[str, str | int] = {"symbol": symbol, "interval": "1m"}
                params.update(startTime=min(mine), limit=1500)
                rows = (await http.get("/fapi/v1/klines", params=params)).json()
                klines[symbol] = {int(r[0]): r for r in rows if int(r[0]) <= max(mine)}
        bnb = (await http.get("/fapi/v1/ticker/price", params={"symbol": "BNBUSDT"})).json()
        balances = await _signed(http, "/fapi/v2/balance")
        positions = await _signed(http, "/fapi/v2/positionRisk")
    return _Evidence(
        snapshot=snapshot if isinstance(snapshot, PortfolioSnapshot) else None,
        fills=await rig.read_stream(subjects.FILLS, every(subjects.FILL_PREFIX), Fill),
        entries=await rig.read_stream(subjects.FILLS, subjects.ACCOUNT_ENTRY, AccountEntry),
        candles=candles,
        signals=await rig.read_stream(subjects.SIGNALS, every(subjects.SIGNAL_PREFIX), Signal),
        trades=await asyncio.to_thread(admin.trades),
        orders=await asyncio.to_thread(admin.orders),
        log=await asyncio.to_thread(admin.log),
        income=await asyncio.to_thread(admin.income),
        balances=balances,
        positions=positions,
        klines=klines,
        bnb_price=Decimal(str(bnb["price"])),
    )


async def _signed(http: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    """A signed GET at the venue's own time (its clock is minutes ahead of ours)."""
    server = int((await http.get("/fapi/v1/time")).json()["serverTime"])
    query = urlencode({"timestamp": server, "recvWindow": 5000})
    signature = hmac.new(SECRET.encode(), query.encode(), hashlib.sha256).hexdigest()
    response = await http.get(
        f"{path}?{query}&signature={signature}", headers={"X-MBX-APIKEY": KEY}
    )
    response.raise_for_status()
    body: list[dict[str, Any]] = response.json()
    return body


# --- the verdict ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManualEffect:
    """What the manual trade did to the venue's account (the rule in the module docstring)."""

    symbol: str
    position: Decimal
    wallet: Decimal
    unrealized: Decimal
    bnb: Decimal


def _order_key(record: Mapping[str, Any]) -> tuple[str, int]:
    """An order's identity: Binance numbers orders per symbol, so the id alone is ambiguous."""
    return str(record["symbol"]), int(record["orderId"])


def manual_effect(
    trades: Sequence[Mapping[str, Any]], order: tuple[str, int], marks: Mapping[str, Decimal]
) -> ManualEffect | None:
    """From the server's trade records of the manual order, at the venue's marks."""
    mine = [t for t in trades if _order_key(t) == order]
    if not mine:
        return None
    symbol = order[0]
    position = wallet = unrealized = bnb = Decimal(0)
    for trade in mine:
        q = Decimal(str(trade["qty"])) * (1 if trade["side"] == "BUY" else -1)
        realized = Decimal(str(trade["realizedPnl"]))
        fee = Decimal(str(trade["commission"]))
        usdt_fee = fee if trade["commissionAsset"] == "USDT" else Decimal(0)
        bnb += fee if trade["commissionAsset"] == "BNB" else Decimal(0)
        position += q
        wallet += realized - usdt_fee
        unrealized += q * (marks[symbol] - Decimal(str(trade["price"]))) - realized
    return ManualEffect(symbol, position, wallet, unrealized, bnb)


def _judge(
    result: ScenarioResult,
    evidence: _Evidence,
    manual: Mapping[str, Any],
    *,
    detection_s: float | None,
    early: list[RiskAlert],
    watch: _Watch,
) -> None:
    figures = result.figures
    manual_id = _order_key(manual)
    ours = [t for t in evidence.trades if _order_key(t) != manual_id]
    marks = {str(p["symbol"]): Decimal(str(p["markPrice"])) for p in evidence.positions}
    effect = manual_effect(evidence.trades, manual_id, marks)
    figures["manual trade effect"] = (
        None
        if effect is None
        else {
            "symbol": effect.symbol,
            "position": str(effect.position),
            "wallet": str(effect.wallet),
            "unrealized": str(effect.unrealized),
        }
    )
    _judge_account(result, evidence, ours, effect)
    _judge_candles(result, evidence)
    # Positions or wallet: through funding, BNB fees, disconnects and a restart, none.
    figures["reconciliation alerts before the manual trade"] = [a.detail for a in early]
    result.check("reconciliation alerts before the manual trade", len(early), "==", 0)
    figures["manual trade detected after s"] = (
        None if detection_s is None else round(detection_s, 2)
    )
    result.check(
        "manual trade caught by a reconciliation alert (s)", detection_s, "<=", DETECTION_BOUND_S
    )
    fill_ids = {f.fill_id for f in evidence.fills}
    missing = [t for t in ours if binance_fill_id(t["symbol"], t["id"]) not in fill_ids]
    figures["trades"] = len(ours)
    figures["fills on FILLS"] = len(evidence.fills)
    result.check("our venue trades missing from FILLS", len(missing), "==", 0)
    mismatches = ledger_mismatches(
        evidence.snapshot,
        evidence.fills,
        marks=last_closes(evidence.candles),
        capital=CAPITAL,
        entries=evidence.entries,
    )
    figures["portfolio vs exact account of FILLS"] = mismatches
    result.check("portfolio vs exact account of FILLS", len(mismatches), "==", 0)
    minus_1021 = sum(1 for e in evidence.log if e.get("code") == -1021)
    figures["-1021 answers (a clock step each)"] = minus_1021
    figures["websockets dropped per disconnect"] = watch.dropped
    figures["connections cut off at their maximum age"] = watch.cut_offs
    figures["extra minutes for a backfill"] = watch.nudges
    figures["user-data socket open again after a drop (s)"] = watch.user_stream_back_s
    figures["answers by status"] = dict(Counter(str(e.get("status")) for e in evidence.log))
    result.check("injected websocket disconnects", len(watch.dropped), "==", 2)
    result.check("connections cut off by the venue", watch.cut_offs, ">=", 1)
    trades, rejections = from_sim_records(trades=ours, orders=evidence.orders, log=evidence.log)
    info = paper_exchange_info()
    limits = ExposureLimits(
        max_position_usd=MAX_POSITION_USD,
        max_open_positions=MAX_OPEN_POSITIONS,
        step_sizes={s: info.instrument(s).step_size for s in SYMBOLS},
    )
    judge_exposure(result, check_exposure(trades=trades, rejections=rejections, limits=limits))


def _judge_account(
    result: ScenarioResult,
    evidence: _Evidence,
    ours: Sequence[Mapping[str, Any]],
    effect: ManualEffect | None,
) -> None:
    figures = result.figures
    snapshot = evidence.snapshot
    if snapshot is None or effect is None:
        result.check("portfolio snapshot and manual trade record", 0, "==", 1)
        return
    income = _ours(evidence.income)
    funding: dict[str, Decimal] = dict.fromkeys(SYMBOLS, Decimal(0))
    signs: dict[str, set[int]] = {s: set() for s in SYMBOLS}
    gross: dict[str, list[str]] = {s: [] for s in SYMBOLS}
    for entry in income:
        if entry["incomeType"] == "FUNDING_FEE":
            amount = Decimal(str(entry["income"]))
            symbol = str(entry["symbol"])
            funding[symbol] = funding.get(symbol, Decimal(0)) + amount
            signs.setdefault(symbol, set()).add(1 if amount > 0 else -1)
            gross.setdefault(symbol, []).append(str(amount))
    figures["funding charges per symbol (venue, in order)"] = gross
    by_symbol = {p.symbol: p for p in snapshot.positions}
    funding_wrong = [
        f"{s}: {by_symbol[s].funding if s in by_symbol else 0} != venue {funding[s]}"
        for s in SYMBOLS
        if (by_symbol[s].funding if s in by_symbol else Decimal(0)) != funding[s]
    ]
    figures["funding booked per symbol (venue)"] = {s: str(funding[s]) for s in SYMBOLS}
    figures["funding total (portfolio, venue)"] = [
        str(snapshot.funding),
        str(sum(funding.values())),
    ]
    result.check("funding per symbol differing from the venue's", len(funding_wrong), "==", 0)
    result.check(
        "funding total minus the venue's",
        float(snapshot.funding - sum(funding.values())),
        "==",
        0,
    )
    result.check(
        "symbols with funding of both signs", sum(len(v) == 2 for v in signs.values()), "==", 3
    )
    bnb_fees = sum(
        (Decimal(str(t["commission"])) for t in ours if t["commissionAsset"] == "BNB"),
        Decimal(0),
    )
    ours_bnb = {a.asset: a.amount for a in snapshot.fees_by_asset}.get("BNB", Decimal(0))
    bnb_in = sum(
        (
            Decimal(str(e["income"]))
            for e in income
            if e["incomeType"] == "TRANSFER" and e["asset"] == "BNB"
        ),
        Decimal(0),
    )
    wallets = {str(b["asset"]): Decimal(str(b["balance"])) for b in evidence.balances}
    figures["BNB fees (portfolio, venue trades, venue wallet)"] = [
        str(ours_bnb),
        str(bnb_fees),
        str(bnb_in - effect.bnb - wallets.get("BNB", Decimal(0))),
    ]
    figures["trades paying in BNB"] = sum(1 for t in ours if t["commissionAsset"] == "BNB")
    result.check("BNB fees paid (venue)", float(bnb_fees), ">", 0)
    result.check("BNB fees minus the venue's", float(ours_bnb - bnb_fees), "==", 0)
    result.check(
        "venue BNB wallet minus (transfers - our BNB fees)",
        float(wallets.get("BNB", Decimal(0)) - (bnb_in - bnb_fees - effect.bnb)),
        "==",
        0,
    )
    venue_wallet = wallets["USDT"] - effect.wallet - bnb_fees * evidence.bnb_price
    figures["wallet (portfolio, venue less the manual trade and BNB fees)"] = [
        str(snapshot.wallet),
        str(venue_wallet),
    ]
    result.check(
        "wallet minus the venue's (USDT)",
        float(abs(snapshot.wallet - venue_wallet)),
        "<",
        float(CENT),
    )
    venue_unrealized = (
        sum((Decimal(str(p["unRealizedProfit"])) for p in evidence.positions), Decimal(0))
        - effect.unrealized
    )
    figures["unrealized (portfolio, venue less the manual trade)"] = [
        str(snapshot.unrealized_pnl),
        str(venue_unrealized),
    ]
    result.check(
        "unrealized PnL minus the venue's",
        float(abs(snapshot.unrealized_pnl - venue_unrealized)),
        "<",
        float(CENT),
    )
    result.check(
        "equity minus the venue's",
        float(abs(snapshot.equity - (venue_wallet + venue_unrealized))),
        "<",
        float(CENT),
    )
    venue_positions = {str(p["symbol"]): Decimal(str(p["positionAmt"])) for p in evidence.positions}
    venue_positions[effect.symbol] = (
        venue_positions.get(effect.symbol, Decimal(0)) - effect.position
    )
    wrong = [
        f"{s}: {by_symbol[s].quantity if s in by_symbol else 0} != venue {venue_positions.get(s)}"
        for s in SYMBOLS
        if (by_symbol[s].quantity if s in by_symbol else Decimal(0))
        != venue_positions.get(s, Decimal(0))
    ]
    figures["positions (venue less the manual trade)"] = {
        s: str(venue_positions.get(s, 0)) for s in SYMBOLS
    }
    figures["positions differing"] = wrong
    result.check("positions differing from the venue's", len(wrong), "==", 0)


def _judge_candles(result: ScenarioResult, evidence: _Evidence) -> None:
    missing = duplicated = unequal = 0
    stored: dict[str, int] = {}
    for symbol in SYMBOLS:
        opens = [c.open_time_ms for c in evidence.candles if c.symbol == symbol]
        stored[symbol] = len(opens)
        if not opens:
            missing += 1
            continue
        duplicated += len(opens) - len(set(opens))
        expected = set(range(min(opens), max(opens) + MINUTE_MS, MINUTE_MS))
        missing += len(expected - set(opens))
        venue = evidence.klines[symbol]
        missing += len(set(venue) - set(opens))
        for candle in evidence.candles:
            if candle.symbol != symbol:
                continue
            row = venue.get(candle.open_time_ms)
            theirs = tuple(Decimal(str(v)) for v in row[1:6]) if row else None
            ours = (candle.open, candle.high, candle.low, candle.close, candle.volume)
            unequal += theirs != ours
    result.figures["candles stored per symbol"] = stored
    warm = {(c.symbol, c.open_time_ms) for c in evidence.candles if c.source is CandleSource.WARMUP}
    result.figures["warm-up candles (per symbol)"] = len(warm) // len(SYMBOLS)
    result.figures["signals of the model"] = len(evidence.signals)
    of_warm = [s for s in evidence.signals if (s.symbol, s.candle_open_time_ms) in warm]
    result.check("warm-up candles stored", len(warm), "==", WINDOW * len(SYMBOLS))
    result.check("signals of a warm-up candle", len(of_warm), "==", 0)
    result.check("candles missing on MARKET (vs the venue's klines)", missing, "==", 0)
    result.check("candles duplicated on MARKET", duplicated, "==", 0)
    result.check("candles unequal to the venue's klines", unequal, "==", 0)
