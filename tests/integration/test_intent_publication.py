"""An intent that cannot be published is dropped whole: never sent, never held, counted.

A real execution and portfolio worker on a real nats-server, in paper mode. Signals wait in the
execution worker's intake (one decided a second) when the broker hangs (SIGSTOP: alive and
silent). The intents decided during the hang go to the worker's disk outbox, which holds two;
the ones after it are refused. Those must be dropped as a unit: not on the ORDERS stream, no
order or fill of theirs anywhere, and nothing of theirs left in flight in the exposure book
(which would otherwise hold their size against the limits until their time to live ran out).
The two the outbox kept are replayed once the broker resumes and trade once each, and trading
goes on. The shared invariants are checked at the end (``conftest``).
"""

from __future__ import annotations

import re
import time
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Direction,
    Fill,
    OrderIntent,
    OrderUpdate,
    Signal,
)
from qtrader.contracts.policy import parse_policy
from qtrader.execution.decisions import client_order_id_for
from qtrader.local.nats_server import EmbeddedNats
from support.flow import control_plane
from support.hang import hang, resume
from support.streams import read_all
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

PRICE = Decimal(30_000)
SIGNALS = 10
OUTBOX_CAPACITY = 2
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "intent-publication-test"},
        "spec": {
            "symbols": ["BTCUSDT"],
            "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000"},
            # One decision a second, and intents that outlive the test: a dropped intent still
            # held by the book would stay in flight to the end.
            "signals": {
                "queueSize": 50,
                "maxPerCycle": 1,
                "ttlSeconds": 600,
                "intentTtlSeconds": 600,
            },
        },
    }
)
_DROPPED = re.compile(r"intent (\S+) not published, dropped")


def _signal(index: int) -> Signal:
    now_ms = int(time.time() * 1000)
    return Signal(
        signal_id=f"publication:{index}",
        symbol="BTCUSDT",
        direction=Direction.LONG if index % 2 == 0 else Direction.SHORT,  # each one trades
        confidence=0.9,
        model_version="test",
        candle_open_time_ms=now_ms,
        price=PRICE,
        created_at_ms=now_ms,
    )


async def test_an_intent_the_outbox_cannot_take_is_dropped_whole_and_trading_goes_on(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    async with control_plane(url, POLICY, price=PRICE, name="test-intent-publication") as bus:
        portfolio = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
        execution = start_worker(
            "execution",
            nats_url=url,
            log_dir=tmp_path,
            # The control plane's heartbeat stops with the broker too: a halt for a silent
            # control plane is not what this test is about.
            args=(
                "--cycle", "1", "--heartbeat-timeout", "600",
                "--outbox-capacity", str(OUTBOX_CAPACITY),
            ),
        )  # fmt: skip
        workers: list[Worker] = [execution, portfolio]
        try:
            for index in range(SIGNALS):
                await bus.publish(subjects.signal_subject("BTCUSDT"), _signal(index))
            await eventually(
                lambda: execution.metric("qtrader_fills_total", symbol="BTCUSDT") >= 1,
                timeout_s=30,
                what="a first fill",
                worker=execution,
            )
            assert nats_server.pid is not None
            hang(nats_server.pid)
            try:
                await eventually(
                    lambda: execution.metric("qtrader_order_intents_unpublished_total") >= 1,
                    timeout_s=60,
                    what="an intent the full outbox refused",
                    worker=execution,
                )
                held = execution.metric("qtrader_outbox_depth")
            finally:
                resume(nats_server.pid)
            await eventually(
                lambda: _settled(execution),
                timeout_s=60,
                what="every signal decided and every intent final",
                worker=execution,
            )
            dropped = set(_DROPPED.findall(execution.log()))
            unpublished = execution.metric("qtrader_order_intents_unpublished_total")
        finally:
            await stop_pipeline(workers, nats_url=url)

    assert held == OUTBOX_CAPACITY, "the outbox held what it could during the hang"
    print(f"held {held}, dropped {len(dropped)}, unpublished {unpublished}")
    assert dropped, "the full outbox refused an intent"
    assert len(dropped) == unpublished, (dropped, unpublished)
    intents = await read_all(
        url, stream="QT_ORDERS", subject="qtrader.order.intent.*", message_type=OrderIntent
    )
    updates = await read_all(
        url, stream="QT_ORDERS", subject="qtrader.order.update.*", message_type=OrderUpdate
    )
    fills = await read_all(url, stream="QT_FILLS", subject="qtrader.fill.*", message_type=Fill)
    stored = {intent.intent_id for intent in intents}
    # Nothing of a dropped intent anywhere: not stored, no order update, no fill.
    assert not dropped & stored
    dropped_stems = {client_order_id_for(intent_id)[:32] for intent_id in dropped}
    assert not dropped_stems & {u.client_order_id[:32] for u in updates}
    assert not dropped_stems & {f.client_order_id[:32] for f in fills}
    # Every intent stored (those the outbox replayed among them) ended, once, and trading went on
    # after the hang: more intents were stored than before it and while it lasted.
    finals = [u for u in updates if u.status.is_final]
    assert sorted(u.intent_id for u in finals) == sorted(stored)
    assert len(stored) + len(dropped) <= SIGNALS
    assert len(stored) > 1 + OUTBOX_CAPACITY


def _settled(execution: Worker) -> bool:
    """Every signal decided, none queued, and no intent of this worker in flight or waiting in
    the outbox: a dropped intent the book still held would keep the backlog above zero."""
    decided = execution.metric("qtrader_signal_decision_latency_seconds_count")
    return (
        decided >= SIGNALS
        and execution.metric("qtrader_signal_queue_depth") == 0
        and execution.metric("qtrader_intent_backlog") == 0
        and execution.metric("qtrader_outbox_depth") == 0
    )
