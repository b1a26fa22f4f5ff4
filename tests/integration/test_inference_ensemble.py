"""The inference workload serving the ensemble, as a real process on a real nats-server: candles
of several symbols go through the model in batches, the signals are what the model says for each
symbol's window, and the metrics and health say what is being served."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle, Signal, TradingState
from qtrader.contracts.policy import TradingPolicy, parse_policy
from qtrader.inference.onnx_model import SignalModel, default_model_path
from qtrader.inference.signals import SignalMaker
from qtrader.instruments import paper_exchange_info
from qtrader.local.control import publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader.marketdata.synthetic import Regime, SyntheticConfig, SyntheticMarket
from support.streams import read_all
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
STEPS = 40
WINDOW = 32


def _policy() -> TradingPolicy:
    return parse_policy(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "TradingPolicy",
            "metadata": {"name": "ensemble-test"},
            "spec": {"symbols": list(SYMBOLS)},
        }
    )


def _candles() -> list[Candle]:
    config = SyntheticConfig(symbols=SYMBOLS, seed=17, regime=Regime.MIXED)
    market = SyntheticMarket(config, paper_exchange_info())
    return list(itertools.islice(market.candles(), STEPS * len(SYMBOLS)))


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    """The topology, a policy, and every candle already in the stream, in market order."""
    bus = Bus(url=nats_server.url, client_name="test-ensemble")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, _policy())
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    for candle in _candles():
        await bus.publish(subjects.candle_subject(candle.symbol), candle)
    try:
        yield bus
    finally:
        await bus.close()


async def _signals(url: str) -> list[Signal]:
    return await read_all(url, stream="QT_SIGNALS", subject="qtrader.signal.*", message_type=Signal)


async def _wait_for_signals(url: str, count: int, worker: Worker) -> list[Signal]:
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        signals = await _signals(url)
        if len(signals) >= count:
            return signals
        assert worker.process.poll() is None, worker.log()
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {count} signals:\n{worker.log()[-3000:]}")


def _copy_default(directory: Path, *, cut_member: str) -> Path:
    """A copy of the default model with the last byte of one member's file cut off."""
    source = default_model_path()
    for path in source.parent.glob(f"{source.stem}.*"):
        shutil.copyfile(path, directory / path.name)
    member = directory / f"{source.stem}.{cut_member}.onnx"
    member.write_bytes(member.read_bytes()[:-1])
    return directory / source.name


async def test_inference_when_symbols_deliver_together_then_batched_signals_equal_single_ones(
    nats_server: EmbeddedNats, bus: Bus, tmp_path: Path
) -> None:
    worker = start_worker("inference", nats_url=nats_server.url, log_dir=tmp_path)
    try:
        expected_count = len(SYMBOLS) * (STEPS - (WINDOW - 1))
        signals = await _wait_for_signals(nats_server.url, expected_count, worker)
        assert len(signals) == expected_count
        # The same candles one at a time through the same code and model, in this process.
        model = SignalModel.load(default_model_path())
        maker = SignalMaker()
        alone = {}
        for candle in _candles():
            if maker.accept(candle):
                (signal,) = maker.make([candle], model, now_ms=0).signals
                alone[signal.signal_id] = signal
        assert {s.signal_id for s in signals} == set(alone)
        for signal in signals:
            assert signal.direction is alone[signal.signal_id].direction
            assert signal.confidence == pytest.approx(alone[signal.signal_id].confidence, abs=1e-6)

        metric = worker.metric
        rows = metric("qtrader_inference_batch_size_sum")
        batches = metric("qtrader_inference_batch_size_count")
        assert rows == expected_count
        # Batched across symbols: fewer model calls than rows, some with all three symbols.
        assert batches < rows
        assert metric("qtrader_inference_batch_size_bucket", le="2.0") < batches
        for member in ("mlp", "tcn"):
            assert metric("qtrader_model_inference_seconds_count", model=member) == batches
            assert metric("qtrader_model_inference_seconds_sum", model=member) > 0
        unanimous = metric("qtrader_model_predictions_total", agreement="unanimous")
        split = metric("qtrader_model_predictions_total", agreement="split")
        assert unanimous + split == expected_count
        ratio = metric("qtrader_model_agreement_ratio", version=model.version)
        assert ratio == pytest.approx(unanimous / expected_count)
        assert metric("qtrader_signal_confidence_count") == expected_count
        assert metric("qtrader_model_info", version=model.version) == 1
        assert metric("qtrader_model_age_seconds", version=model.version) > 0
        health = {d["name"]: d for d in worker.health()["dependencies"]}  # type: ignore[attr-defined]
        assert health["model"]["status"] == "OK"
        assert model.version in health["model"]["detail"]
    finally:
        worker.stop()


async def test_inference_when_a_member_file_is_tampered_then_critical_and_nothing_consumed(
    nats_server: EmbeddedNats, bus: Bus, tmp_path: Path
) -> None:
    card = _copy_default(tmp_path, cut_member="mlp")
    worker = start_worker(
        "inference", nats_url=nats_server.url, log_dir=tmp_path, args=("--model", str(card))
    )
    try:
        await eventually(
            lambda: worker.health()["status"] == "CRITICAL",
            timeout_s=20,
            what="CRITICAL health",
            worker=worker,
        )
        detail = {d["name"]: d for d in worker.health()["dependencies"]}["model"]["detail"]  # type: ignore[attr-defined]
        assert "member 'mlp'" in detail
        assert "has sha256" in detail
        await asyncio.sleep(1.0)
        assert await _signals(nats_server.url) == []
        assert "qtrader_model_age_seconds{" not in worker.get("/metrics").text
    finally:
        worker.stop()


async def test_inference_when_card_is_version_1_then_degraded_but_serving(
    nats_server: EmbeddedNats, bus: Bus, tmp_path: Path
) -> None:
    card = json.loads(default_model_path().read_text())
    mlp = next(m for m in card["members"] if m["name"] == "mlp")
    onnx_file = tmp_path / "old.onnx"
    shutil.copyfile(default_model_path().parent / mlp["file"], onnx_file)
    legacy = {
        "card_version": 1,
        "model_version": "mlp-legacy",
        "created_at": "2026-01-01T00:00:00Z",
        "onnx_sha256": mlp["sha256"],
        "opset": 20,
        "features": card["features"],
        "window": card["window"],
        "classes": card["classes"],
        "training_data": {
            "source": "synthetic",
            "regime": "mixed",
            "symbols": ["BTCUSDT"],
            "interval": "1m",
            "start_ms": 0,
            "end_ms": 1,
            "candles_per_symbol": 100,
            "held_out_from_ms": 1,
            "label_horizon_candles": 5,
            "round_trip_fee_bps": 8.0,
        },
        "held_out_metrics": {"accuracy": 0.5},
        "seed": 7,
    }
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    worker = start_worker(
        "inference", nats_url=nats_server.url, log_dir=tmp_path, args=("--model", str(onnx_file))
    )
    try:
        signals = await _wait_for_signals(nats_server.url, len(SYMBOLS) * (STEPS - 31), worker)
        assert {s.model_version for s in signals} == {"mlp-legacy"}
        health = worker.health()
        assert health["status"] == "DEGRADED"
        detail = {d["name"]: d for d in health["dependencies"]}["model"]["detail"]  # type: ignore[attr-defined]
        assert "version 1 card" in detail
    finally:
        worker.stop()
