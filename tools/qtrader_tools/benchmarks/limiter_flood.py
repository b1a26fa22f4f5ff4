"""A flood of mixed exchange requests from one process, through the real Binance venue.

``flood`` builds a ``BinanceFutures`` venue (python-binance, the rate limiter, Redis when given)
and sends requests through its public methods only, in a seeded random mix, until it has sent
``requests`` HTTP requests:

* ``place``: a MARKET order that fills, BUY and SELL alternately so the position stays small;
  a filled order also fetches its trades (``userTrades``, weight 5), so it is two requests;
* ``lookup``: an order placed earlier, by client order id (its trades too: two requests);
* ``open_orders``: one symbol's open orders (weight 1);
* ``sync_time``: the server time (weight 1);
* ``arm_dead_man``: the countdown cancel-all (weight 10).

The count of requests comes from what each call is known to send when it succeeds; a call that
fails is counted under ``errors`` by its type. The limiter's own count of admissions is reported
beside it (``limiter_acquisitions``): the two differ by retries and by what bypasses the limiter.

Run two at once (same egress id, same API key, one Redis) to flood from two OS processes:
``python -m qtrader_tools.benchmarks.limiter_flood --url URL --redis-url URL --requests N --seed S``
prints the summary as one JSON line and exits 0 when all N were sent, 1 when the flood stopped
early (a ban, or the venue refusing to start), 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from prometheus_client import REGISTRY

from qtrader.contracts.messages import OrderIntent, Side
from qtrader.exchange.binance import BinanceFutures, BinanceSettings
from qtrader.exchange.credentials import Credentials
from qtrader.exchange.errors import Banned, ExchangeError
from qtrader.exchange.limiter import LimiterMode
from qtrader.exchange.limits import LimitKind, RateLimitRule
from qtrader.execution.decisions import client_order_id_for

SIM_KEY, SIM_SECRET = "sim-key", "sim-secret"  # the simulator's default account
SYMBOL = "BTCUSDT"
PRICE = Decimal(50_000)  # the price the simulator must quote for SYMBOL (see ``sim_config``)
QUANTITY = Decimal("0.010")  # 500 USDT: above the 100 minimum notional, far below the margin
DEAD_MAN_MS = 60_000


class Op(enum.StrEnum):
    PLACE = "place"
    LOOKUP = "lookup"
    OPEN_ORDERS = "open_orders"
    SYNC_TIME = "sync_time"
    ARM_DEAD_MAN = "arm_dead_man"


# Share of each operation in the mix. About 1.7 requests and 5 weight per operation on average.
MIX: Mapping[Op, float] = {
    Op.PLACE: 0.40,
    Op.LOOKUP: 0.30,
    Op.OPEN_ORDERS: 0.15,
    Op.SYNC_TIME: 0.05,
    Op.ARM_DEAD_MAN: 0.10,
}


# Binance's limits scaled to 1 s and 10 s windows, so a flood of 10,000 requests from two
# processes meets them within seconds: weight binds (about 3 weight a request), orders come near.
SCALED_RULES = (
    RateLimitRule(LimitKind.REQUEST_WEIGHT, "SECOND", 1, 1200),
    RateLimitRule(LimitKind.ORDERS, "SECOND", 1, 150),
    RateLimitRule(LimitKind.ORDERS, "SECOND", 10, 1000),
)


def sim_config(rules: Sequence[RateLimitRule] = SCALED_RULES) -> dict[str, Any]:
    """A simulator config (JSON fields) with ``rules`` and the price the flood's orders assume."""
    return {
        "prices": {SYMBOL: str(PRICE)},
        "rate_limits": [rule.as_binance() for rule in rules],
    }


@dataclass(frozen=True, kw_only=True)
class FloodSettings:
    url: str  # the exchange's REST base URL (the local simulator)
    requests: int  # HTTP requests to send, at least
    seed: int = 1
    redis_url: str | None = None  # None: an in-process limiter (each keeps a 1/replicas share)
    egress_id: str = "bench"
    replicas: int = 2
    api_key: str = SIM_KEY
    api_secret: str = SIM_SECRET
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")


@dataclass
class _Tally:
    operations: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)  # by endpoint
    errors: Counter[str] = field(default_factory=Counter)  # by exception type
    placed: list[str] = field(default_factory=list)  # client order ids, for lookups
    banned: str | None = None

    @property
    def sent(self) -> int:
        return sum(self.requests.values())


async def flood(settings: FloodSettings) -> dict[str, Any]:
    """Send ``settings.requests`` mixed requests through one venue; the JSON-able summary."""
    venue = BinanceFutures(
        BinanceSettings(
            base_url=settings.url,
            credentials=Credentials(api_key=settings.api_key, api_secret=settings.api_secret),
            redis_url=settings.redis_url,
            egress_id=settings.egress_id,
            replicas=settings.replicas,
            timeout_s=settings.timeout_s,
            # The flood is of REST requests, each counted with its weight (a filled order's
            # trades read included): trades from the user-data stream would not be.
            user_stream=False,
        )
    )
    tally = _Tally()
    acquired_before = _acquisitions()
    acquire_before = _acquire_s()
    started = time.perf_counter()
    try:
        await venue.start([SYMBOL])
        began = time.perf_counter()
        await _run(venue, settings, tally)
        ended = time.perf_counter()
        limiter = venue.limiter
        mode = limiter.mode().value if limiter is not None else None
    finally:
        await venue.close()
    return {
        "pid": os.getpid(),
        "seed": settings.seed,
        "requests_target": settings.requests,
        "requests_sent": tally.sent,
        "requests": dict(sorted(tally.requests.items())),
        "operations": dict(sorted(tally.operations.items())),
        "errors": dict(sorted(tally.errors.items())),
        "banned": tally.banned,
        "limiter_mode": mode,
        "limiter_acquisitions": int(_acquisitions() - acquired_before),
        "limiter_acquire_s": round(_acquire_s() - acquire_before, 3),
        "startup_s": round(began - started, 3),
        "elapsed_s": round(ended - began, 3),
        "requests_per_s": round(tally.sent / max(ended - began, 1e-9), 1),
    }


async def _run(venue: BinanceFutures, settings: FloodSettings, tally: _Tally) -> None:
    rng = random.Random(settings.seed)
    ops, weights = list(MIX), list(MIX.values())
    # Unique per process and run: two floods on one account never share a client order id.
    stem = f"flood-{settings.seed}-{os.getpid()}-{time.time_ns()}"
    while tally.sent < settings.requests and tally.banned is None:
        op = rng.choices(ops, weights)[0]
        if op is Op.LOOKUP and not tally.placed:
            op = Op.PLACE  # nothing to look up yet
        tally.operations[op.value] += 1
        try:
            await _one(venue, op, rng, stem, tally)
        except Banned as exc:
            tally.errors[type(exc).__name__] += 1
            tally.banned = str(exc)  # nothing more leaves this process: stop
        except ExchangeError as exc:
            tally.errors[type(exc).__name__] += 1


async def _one(venue: BinanceFutures, op: Op, rng: random.Random, stem: str, tally: _Tally) -> None:
    """One operation; on success, the requests it sent are added to the tally."""
    if op is Op.PLACE:
        side = Side.BUY if tally.operations[Op.PLACE.value] % 2 else Side.SELL
        intent_id = f"{stem}-{len(tally.placed)}"
        placed = await venue.place(_intent(intent_id, side))
        tally.placed.append(placed.client_order_id)
        tally.requests["POST /fapi/v1/order"] += 1
        if placed.executed_qty > 0:
            tally.requests["GET /fapi/v1/userTrades"] += 1
    elif op is Op.LOOKUP:
        found = await venue.lookup(SYMBOL, rng.choice(tally.placed))
        tally.requests["GET /fapi/v1/order"] += 1
        if found is not None and found.executed_qty > 0:
            tally.requests["GET /fapi/v1/userTrades"] += 1
    elif op is Op.OPEN_ORDERS:
        await venue.open_orders([SYMBOL])
        tally.requests["GET /fapi/v1/openOrders"] += 1
    elif op is Op.SYNC_TIME:
        await venue.sync_time()
        tally.requests["GET /fapi/v1/time"] += 1
    else:
        await venue.arm_dead_man([SYMBOL], DEAD_MAN_MS)
        tally.requests["POST /fapi/v1/countdownCancelAll"] += 1


def _intent(intent_id: str, side: Side) -> OrderIntent:
    return OrderIntent(
        intent_id=intent_id,
        client_order_id=client_order_id_for(intent_id),
        symbol=SYMBOL,
        side=side,
        quantity=QUANTITY,
        reference_price=PRICE,
        policy_revision=0,
        created_at_ms=int(time.time() * 1000),
    )


def _acquisitions() -> float:
    """Admissions by this process's rate limiters so far, in every mode (its own metric)."""
    return sum(
        REGISTRY.get_sample_value("qtrader_ratelimit_acquisitions_total", {"mode": m.value}) or 0.0
        for m in LimiterMode
    )


def _acquire_s() -> float:
    """Seconds this process's acquire() calls have spent waiting for room so far."""
    return REGISTRY.get_sample_value("qtrader_ratelimit_wait_seconds_sum") or 0.0


# --- the command --------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _url(pattern: str, what: str) -> Any:
    def parse(text: str) -> str:
        if not re.fullmatch(pattern, text):
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what} URL")
        return text.rstrip("/")

    return parse


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qtrader_tools.benchmarks.limiter_flood",
        description="Flood a Binance-compatible server with mixed requests through the venue "
        "and its rate limiter; print a JSON summary.",
    )
    parser.add_argument(
        "--url", required=True, type=_url(r"https?://[^\s/]+(/\S*)?", "http(s)"),
        help="REST base URL of the exchange (the local simulator)",
    )  # fmt: skip
    parser.add_argument(
        "--redis-url", type=_url(r"rediss?://\S+", "redis://"),
        help="Redis shared with the other flood processes (default: an in-process limiter)",
    )  # fmt: skip
    parser.add_argument("--requests", required=True, type=_positive, help="HTTP requests to send")
    parser.add_argument("--seed", type=_whole, default=1, help="seed of the mix (default 1)")
    parser.add_argument(
        "--replicas", type=_positive, default=2,
        help="processes sharing the budget: each keeps 1/replicas of it without Redis (default 2)",
    )  # fmt: skip
    parser.add_argument("--egress-id", default="bench", help="the shared weight budget's name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = FloodSettings(
        url=args.url,
        redis_url=args.redis_url,
        requests=args.requests,
        seed=args.seed,
        replicas=args.replicas,
        egress_id=args.egress_id,
    )
    try:
        summary = asyncio.run(flood(settings))
    except ExchangeError as exc:  # start() failed: the exchange refused or did not answer
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(summary), flush=True)
    return 0 if summary["requests_sent"] >= settings.requests and not summary["banned"] else 1


if __name__ == "__main__":
    sys.exit(main())
