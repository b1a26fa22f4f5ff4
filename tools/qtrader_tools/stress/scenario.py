"""The scenarios' shared frame: options, scaling, and running one with its errors caught.

``scale`` stretches a scenario's durations and counts toward the requirements' full length:
1.0 is the full run (a 60 s broker outage, a 60 s signal flood, ...), the default 0.1 is the
suite that fits in CI. What the requirements fix as a number (a 15-20% drop within 60 s of
market time, 2,000 trades, 500 viewer events in 10 s) does not scale.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from qtrader_tools.stress.result import ScenarioResult

DEFAULT_SCALE = 0.1


@dataclass(frozen=True, kw_only=True)
class StressOptions:
    scale: float = DEFAULT_SCALE
    work_dir: Path
    progress: TextIO = field(default=sys.stderr)

    def scaled(self, full: float, *, minimum: float) -> float:
        """``full`` (the requirement's figure) times the scale, never below ``minimum``."""
        return max(minimum, full * self.scale)

    def say(self, message: str) -> None:
        self.progress.write(f"[stress] {message}\n")
        self.progress.flush()


ScenarioRun = Callable[[StressOptions, ScenarioResult], None]


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    title: str
    module: str  # under qtrader_tools.stress.scenarios; imported only when the scenario runs

    def load(self) -> ScenarioRun:
        module = importlib.import_module(f"qtrader_tools.stress.scenarios.{self.module}")
        run: ScenarioRun = module.run
        return run


SCENARIOS: dict[str, ScenarioSpec] = {
    spec.name: spec
    for spec in (
        ScenarioSpec("flash-crash", "a 15-20% drop within 60 s trips the ESS", "flash_crash"),
        ScenarioSpec("broker-outage", "NATS down while trading loses nothing", "broker_outage"),
        ScenarioSpec(
            "broker-kill", "NATS killed (SIGKILL) while trading loses nothing", "broker_kill"
        ),
        ScenarioSpec(
            "broker-hang",
            "NATS frozen (SIGSTOP) 5/20/60 s: back within 10 s, nothing lost",
            "broker_hang",
        ),
        ScenarioSpec(
            "disk-full",
            "outboxes on a disk that fills during an outage: no death, nothing lost",
            "disk_full",
        ),
        ScenarioSpec(
            "worker-kill",
            "each workload SIGKILLed in turn, restarted by the supervisor: nothing lost",
            "worker_kill",
        ),
        ScenarioSpec(
            "poison",
            "bad messages on every subject, bad values in every KV key: counted, fail closed",
            "poison",
        ),
        ScenarioSpec(
            "exchange-instability",
            "bursts of 429/-1003/-1015/5xx/timeouts: backoff, no ban, no duplicate",
            "exchange_instability",
        ),
        ScenarioSpec(
            "signal-flood", "50 signals/s: bounded queue, lowest confidence dropped", "signal_flood"
        ),
        ScenarioSpec(
            "ess-lifecycle", "trip, cooldown, reset, re-trip, with the order flow", "ess_lifecycle"
        ),
        ScenarioSpec(
            "portfolio-replay", "2,000 trades: exact PnL, equity and drawdown", "portfolio_replay"
        ),
        ScenarioSpec(
            "viewer-load", "500 events in 10 s to WebSocket viewers, one slow", "viewer_load"
        ),
        ScenarioSpec(
            "venue-truth",
            "live stack on the local Binance server: the account equals the venue's",
            "venue_truth",
        ),
    )
}


def run_scenario(name: str, options: StressOptions) -> ScenarioResult:
    """Run one scenario in its own work directory; an exception becomes the result's error."""
    spec = SCENARIOS[name]
    result = ScenarioResult(name=spec.name, title=spec.title, scale=options.scale)
    work_dir = options.work_dir / spec.name
    work_dir.mkdir(parents=True, exist_ok=True)
    scoped = StressOptions(scale=options.scale, work_dir=work_dir, progress=options.progress)
    options.say(f"{name}: started (scale {options.scale:g})")
    started = time.monotonic()
    try:
        spec.load()(scoped, result)
    except Exception as exc:  # a scenario's crash is its failure, reported with the rest
        result.error = f"{type(exc).__name__}: {exc}"
        options.say(f"{name}: error\n{traceback.format_exc()}")
    result.duration_s = time.monotonic() - started
    verdict = "passed" if result.passed else "FAILED"
    options.say(f"{name}: {verdict} in {result.duration_s:.1f} s")
    return result
