"""Every NATS name the system uses: subjects, streams, durable consumers and KV buckets.

This is the only place a subject string is spelled. Producers and consumers on both sides of the
wire (workloads, operator, local mode, tests) import these names, so a rename is one edit and a
typo is an ImportError instead of a silently empty subscription.

Subject layout: ``qtrader.<domain>.<kind>[.<symbol>]``. The symbol is the last token so that a
consumer can filter one symbol (``qtrader.market.candle.BTCUSDT``) or all (``...candle.*``).

Stacks. Each TradingPolicy in a cluster is its own stack: its workloads, and the operator on its
behalf, use names of their own, so two policies in one namespace, or two installs sharing one
NATS server, never read each other's messages, consumers or KV keys. The names below are the
*logical* ones every module spells; the bus (the only door to NATS) turns them into the stack's
with the ``scoped_*`` functions at the end of this module, so no call site knows about stacks:

    subject   qtrader.market.candle.BTCUSDT -> qtrader.<namespace>.<policy>.market.candle.BTCUSDT
    stream    QT_MARKET                     -> QT_MARKET_<namespace>_<policy>
    durable   inference-candles             -> <namespace>_<policy>_inference-candles
    KV key    latch (bucket qtrader-halt)   -> <namespace>.<policy>.latch (same bucket)

The stack id is ``<namespace>.<policy>`` (both DNS labels, so neither holds ``.`` or ``_``, and
the mapping cannot make two stacks' names meet). Local mode runs one policy and no stack id: its
names are the logical ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

ROOT = "qtrader"

# --- subjects -------------------------------------------------------------------------------

CANDLE_PREFIX = f"{ROOT}.market.candle"
# A step's candles of every symbol in one ``Pack`` (market data replaying or simulating steps).
# Its last token is lowercase, so no symbol ever names it, and every reader of ``candle.*``
# (each consumer and replay of the MARKET stream) reads the packs with the single candles.
CANDLE_STEP = f"{CANDLE_PREFIX}.step"
SIGNAL_PREFIX = f"{ROOT}.signal"
# The signals made from one candle pack, in one ``Pack`` (read with the others by ``signal.*``).
SIGNAL_STEP = f"{SIGNAL_PREFIX}.step"
ORDER_INTENT_PREFIX = f"{ROOT}.order.intent"
ORDER_UPDATE_PREFIX = f"{ROOT}.order.update"
FILL_PREFIX = f"{ROOT}.fill"
# Amounts the venue booked that are not our fills (funding, transfers): one subject, stored in
# the FILLS stream, so the portfolio reads fills and entries in one order and one checkpoint
# sequence covers both. Not under FILL_PREFIX: every reader of ``fill.*`` expects a Fill.
ACCOUNT_ENTRY = f"{ROOT}.account.entry"
PORTFOLIO_SNAPSHOT = f"{ROOT}.portfolio.snapshot"
PORTFOLIO_CHECKPOINT = f"{ROOT}.portfolio.checkpoint"
RISK_ALERT_PREFIX = f"{ROOT}.risk.alert"

# Core NATS (not JetStream): the fast halt broadcast and the workers' acknowledgements. The
# durable truth is the latch in the HALT bucket; these only make the halt arrive quickly.
CONTROL_HALT = f"{ROOT}.control.halt"
CONTROL_HALT_ACK = f"{ROOT}.control.halt.ack"
CONTROL_HEARTBEAT = f"{ROOT}.control.heartbeat"
# Core NATS, for the live viewers only (nothing trades or halts on them): each EmergencyStop's
# view after every reconcile round, and every worker's health report at every refresh.
CONTROL_ESS_STATUS = f"{ROOT}.control.ess.status"
# Core NATS: execution's settled reads of the venue's account (``VenueAccount``), which the
# portfolio compares with its ledger; a lost one only skips one comparison.
VENUE_ACCOUNT = f"{ROOT}.account.venue"
HEALTH_REPORT_PREFIX = f"{ROOT}.health.report"


def candle_subject(symbol: str) -> str:
    return f"{CANDLE_PREFIX}.{symbol}"


def signal_subject(symbol: str) -> str:
    return f"{SIGNAL_PREFIX}.{symbol}"


def order_intent_subject(symbol: str) -> str:
    return f"{ORDER_INTENT_PREFIX}.{symbol}"


def order_update_subject(symbol: str) -> str:
    return f"{ORDER_UPDATE_PREFIX}.{symbol}"


def fill_subject(symbol: str) -> str:
    return f"{FILL_PREFIX}.{symbol}"


def risk_alert_subject(kind: str) -> str:
    return f"{RISK_ALERT_PREFIX}.{kind}"


def health_report_subject(service: str) -> str:
    return f"{HEALTH_REPORT_PREFIX}.{service}"


def all_of(prefix: str) -> str:
    """The wildcard that matches every symbol (or kind) under a prefix."""
    return f"{prefix}.*"


# --- streams ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """A JetStream stream as the system declares it (created idempotently at start)."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float
    # Publishes carry Nats-Msg-Id; the server drops a repeat seen within this window.
    duplicate_window_s: float = 600.0  # covers an outage the outbox rides out: see README
    max_msgs_per_subject: int = -1


DAY_S = 86_400.0

MARKET = StreamSpec(name="QT_MARKET", subjects=(all_of(CANDLE_PREFIX),), max_age_s=DAY_S)
SIGNALS = StreamSpec(name="QT_SIGNALS", subjects=(all_of(SIGNAL_PREFIX),), max_age_s=DAY_S)
ORDERS = StreamSpec(
    name="QT_ORDERS",
    subjects=(all_of(ORDER_INTENT_PREFIX), all_of(ORDER_UPDATE_PREFIX)),
    max_age_s=30 * DAY_S,
)
# Fills and account entries are the portfolio's source of truth (it rebuilds from them), so
# they are kept longest.
FILLS = StreamSpec(
    name="QT_FILLS", subjects=(all_of(FILL_PREFIX), ACCOUNT_ENTRY), max_age_s=365 * DAY_S
)
PORTFOLIO = StreamSpec(
    name="QT_PORTFOLIO", subjects=(PORTFOLIO_SNAPSHOT,), max_age_s=DAY_S, max_msgs_per_subject=1000
)
# The portfolio's checkpoints: its exact ledger and the FILLS sequence it covers. No age limit
# (a quiet week must not age the only checkpoint out), only the last few, kept so that a
# checkpoint that does not decode falls back to the one before it.
CHECKPOINTS = StreamSpec(
    name="QT_CHECKPOINTS",
    subjects=(PORTFOLIO_CHECKPOINT,),
    max_age_s=0.0,
    max_msgs_per_subject=8,
)
RISK = StreamSpec(name="QT_RISK", subjects=(all_of(RISK_ALERT_PREFIX),), max_age_s=30 * DAY_S)

ALL_STREAMS: tuple[StreamSpec, ...] = (
    MARKET,
    SIGNALS,
    ORDERS,
    FILLS,
    PORTFOLIO,
    CHECKPOINTS,
    RISK,
)

# --- durable consumers ------------------------------------------------------------------------
# The portfolio has none on purpose: the FILLS stream is its durable state. At every start it
# restores its latest checkpoint and replays FILLS (fills and account entries) after the
# sequence that covers (an ordered consumer from there), so a restart cannot lose or
# double-count a fill or an entry.


@dataclass(frozen=True, kw_only=True)
class ConsumerSpec:
    """A durable pull consumer: replicas of one role share it, so each message goes to one."""

    durable: str
    stream: StreamSpec
    filter_subject: str
    ack_wait_s: float = 30.0
    max_ack_pending: int = 1000


INFERENCE_CANDLES = ConsumerSpec(
    durable="inference-candles", stream=MARKET, filter_subject=all_of(CANDLE_PREFIX)
)
EXECUTION_SIGNALS = ConsumerSpec(
    durable="execution-signals", stream=SIGNALS, filter_subject=all_of(SIGNAL_PREFIX)
)
EXECUTION_INTENTS = ConsumerSpec(
    durable="execution-intents", stream=ORDERS, filter_subject=all_of(ORDER_INTENT_PREFIX)
)
OPERATOR_RISK_ALERTS = ConsumerSpec(
    durable="operator-risk-alerts", stream=RISK, filter_subject=all_of(RISK_ALERT_PREFIX)
)

ALL_CONSUMERS: tuple[ConsumerSpec, ...] = (
    INFERENCE_CANDLES,
    EXECUTION_SIGNALS,
    EXECUTION_INTENTS,
    OPERATOR_RISK_ALERTS,
)

# --- KV buckets -------------------------------------------------------------------------------

POLICY_BUCKET = "qtrader-policy"
POLICY_KEY = "active"
HALT_BUCKET = "qtrader-halt"
HALT_KEY = "latch"
# Local mode's EmergencyStop resources, one key per name (e.g. "main"): spec and status, as the
# custom resource holds them in a cluster. Written by ``qtrader up``'s control plane and by
# ``qtrader ess``; the workloads never read it (they obey the HALT latch).
ESS_BUCKET = "qtrader-ess"

ALL_BUCKETS: tuple[str, ...] = (POLICY_BUCKET, HALT_BUCKET, ESS_BUCKET)


# --- stacks -----------------------------------------------------------------------------------

_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_STACK_ID = re.compile(rf"^{_LABEL}\.{_LABEL}$")


class InvalidStack(ValueError):
    """A stack id that is not ``<namespace>.<policy>`` (two DNS labels)."""


def stack_id(namespace: str, policy: str) -> str:
    """The stack of one TradingPolicy: ``<namespace>.<policy>``."""
    return check_stack(f"{namespace}.{policy}")


def check_stack(stack: str) -> str:
    if not _STACK_ID.match(stack):
        raise InvalidStack(
            f"stack {stack!r} is not <namespace>.<policy> (two DNS labels joined by '.')"
        )
    return stack


def scoped_subject(stack: str | None, subject: str) -> str:
    """``subject`` (or a wildcard) in ``stack``: the stack's tokens follow the root."""
    if stack is None:
        return subject
    root = f"{ROOT}."
    if not subject.startswith(root):
        raise ValueError(f"{subject!r} is not one of the system's subjects")
    return f"{root}{stack}.{subject[len(root) :]}"


def unscoped_subject(stack: str | None, subject: str) -> str:
    """The logical subject of a stack's subject (for metric labels and logs)."""
    prefix = f"{ROOT}.{stack}."
    if stack is None or not subject.startswith(prefix):
        return subject
    return f"{ROOT}.{subject[len(prefix) :]}"


def scoped_stream(stack: str | None, stream: StreamSpec) -> StreamSpec:
    if stack is None:
        return stream
    return replace(
        stream,
        name=f"{stream.name}_{stack.replace('.', '_')}",
        subjects=tuple(scoped_subject(stack, s) for s in stream.subjects),
    )


def scoped_consumer(stack: str | None, consumer: ConsumerSpec) -> ConsumerSpec:
    if stack is None:
        return consumer
    return replace(
        consumer,
        durable=f"{stack.replace('.', '_')}_{consumer.durable}",
        stream=scoped_stream(stack, consumer.stream),
        filter_subject=scoped_subject(stack, consumer.filter_subject),
    )


def scoped_key(stack: str | None, key: str) -> str:
    """A stack's key in a shared bucket."""
    return key if stack is None else f"{stack}.{key}"
