"""``qtrader bench pipeline`` runs end to end at a tiny scale and every candle is accounted for.

Run as the installed console script, as a user runs it: it starts its own nats-server and the
portfolio, inference and execution processes, plays marketdata itself, and must stop them all.
Checked: the exit code; each candle published after the warm-up made exactly one signal; each
signal was decided or dropped with a reason, each decision is an intent or a denial; the intents
the execution counted are the ones in the ORDERS stream and the portfolio applied every fill;
every latency candle has its signal timed; the rates are there; the same object in the
``--json`` file. Speed is measured by the benchmark, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qtrader_tools.benchmarks.pipeline import WARMUP_EXTRA

pytestmark = pytest.mark.integration

QTRADER = Path(sys.executable).parent / "qtrader"
SYMBOLS = 2
STEPS = 40
LATENCY_STEPS = 20  # the benchmark's least: a fifth of the steps, at least 20


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(QTRADER), "bench", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def last_json(completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def test_bench_pipeline_when_run_small_then_every_candle_accounted_for(tmp_path: Path) -> None:
    output = tmp_path / "figures.json"

    completed = bench(
        "pipeline", "--candles", str(STEPS), "--symbols", str(SYMBOLS), "--json", str(output)
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    result = last_json(completed)
    assert json.loads(output.read_text()) == result
    assert result["benchmark"] == "pipeline"
    candles = STEPS * SYMBOLS
    assert (result["symbols"], result["candles"], result["candles_total"]) == (
        SYMBOLS,
        STEPS,
        candles,
    )
    # Throughput run: one signal per candle, each decided (intent or denial) or dropped.
    assert result["signals"] == candles
    assert result["decisions"] + sum(result["dropped"].values()) == result["signals"]
    assert result["intents"] + sum(result["denied"].values()) == result["decisions"]
    assert 0 <= result["decisions"] <= result["signals"] <= result["candles_total"]
    # Latency run: one signal per candle, each timed; every intent made from one of them timed.
    assert result["latency_candles"] == LATENCY_STEPS * SYMBOLS
    assert result["latency_signals"] == result["signal_samples"] == result["latency_candles"]
    assert result["intent_samples"] == result["latency_intents"]
    assert result["signal_p50_ms"] > 0
    # The whole run: warm-up (the windows full after WINDOW - 1 candles), latency, throughput.
    warmup_signals = (WARMUP_EXTRA + 1) * SYMBOLS
    assert result["signals_stored"] == warmup_signals + result["latency_candles"] + candles
    assert result["decisions_total"] + result["dropped_total"] == result["signals_stored"]
    assert (result["queued"], result["inference_backlog"], result["execution_backlog"]) == (0, 0, 0)
    assert result["intents_counted"] == result["intents_stored"]
    assert result["fills_applied"] == result["fills_stored"]
    for key in ("signals_per_s", "decisions_per_s", "raw_publish_per_s", "raw_consume_per_s"):
        assert result[key] > 0, key
    # Where the cores went over the throughput run, read from /proc for each process.
    cpu = result["cpu_s"]
    assert set(cpu) == {"inference", "execution", "portfolio", "nats-server", "benchmark"}
    assert all(isinstance(used, float) and used >= 0 for used in cpu.values()), cpu
    assert result["cpu_us_per_signal"]["total"] > 0
    # Messages per process, from nats-server's own counts: inference was delivered every
    # candle and published every signal; execution was delivered every signal.
    messages = result["messages"]
    assert set(messages) == {"inference", "execution", "portfolio", "benchmark"}
    assert messages["inference"]["received"] >= result["signals"]
    assert messages["inference"]["sent"] >= result["signals"]
    assert messages["execution"]["received"] >= result["signals"]
    per_signal = result["messages_per_signal"]
    assert per_signal["total"] == round(
        sum(m["sent"] + m["received"] for m in messages.values()) / result["signals"], 2
    )
    assert "raw pull-consume + ack" in completed.stdout  # the table precedes the JSON


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pipeline", "--candles", "5"], "--candles: must be 10-100000, got 5"),
        (["pipeline", "--symbols", "21"], "--symbols: must be 1-20, got 21"),
        (["pipeline", "--symbols", "two"], "--symbols: 'two' is not a whole number"),
        (["pipeline", "--json", "/no/such/dir/f.json"], "--json: no such directory: /no/such/dir"),
        (["pnl", "--fills", "10"], "--fills: must be 1000-10000000, got 10"),
        (["pnl", "--seed", "-1"], "--seed: must be >= 0, got -1"),
        (["inference", "--batch", "0"], "--batch: must be 1-4096, got 0"),
        (["all", "--json", "/no/such/dir/f.json"], "--json: no such directory: /no/such/dir"),
        (["all", "--quick", "--fast"], "unrecognized arguments: --fast"),
    ],
)
def test_bench_when_bad_argument_then_exit_2_saying_what(args: list[str], message: str) -> None:
    completed = bench(*args)
    assert completed.returncode == 2
    assert message in completed.stderr
