"""``qtrader bench all``: every benchmark in turn, a summary, and one JSON object of all figures.

Each benchmark runs in this process through its own ``run`` (imported only when its turn comes),
prints its own table and JSON line as ``qtrader bench NAME`` does, and writes its figures to a
file of its own, read back here. One that cannot run (its module missing, a crash) is reported
as failed with the reason, and the suite goes on with the next; Ctrl-C stops the suite after the
benchmark it interrupted has stopped what it started.

The output ends with a summary table (benchmark, exit status, seconds) and, as the last line, one
JSON object: ``{"halt": {...figures...}, "limiter": {...}, ..., "summary": {"halt": {"exit": 0,
"seconds": 31.2, "error": null}, ...}}``; a benchmark that produced no figures has ``null``. With
``json_path`` the same object is written to that file. Exit 0 only when every benchmark exited
0; 130 when interrupted; 1 otherwise.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from qtrader_tools.benchmarks.harness import publish

INTERRUPTED = 130


@dataclass(frozen=True)
class Bench:
    """A benchmark as the suite runs it: given the file for its figures, returns its exit code."""

    name: str
    run: Callable[[Path], int]


@dataclass(frozen=True)
class Outcome:
    name: str
    exit_code: int
    seconds: float
    figures: dict[str, Any] | None
    error: str | None

    def status(self) -> dict[str, Any]:
        return {"exit": self.exit_code, "seconds": round(self.seconds, 1), "error": self.error}


# --- the benchmarks, full size and quick ------------------------------------------------------


def _halt(quick: bool) -> Callable[[Path], int]:
    def run(path: Path) -> int:
        from qtrader_tools.benchmarks import halt

        trips, workers = (20, 2) if quick else (200, 4)
        return halt.run(trips=trips, workers=workers, json_path=path)

    return run


def _limiter(quick: bool) -> Callable[[Path], int]:
    def run(path: Path) -> int:
        from qtrader_tools.benchmarks import limiter

        requests, duration_s = (500, 1.0) if quick else (5000, 3.0)
        return limiter.run(requests=requests, duration_s=duration_s, json_path=path)

    return run


def _outbox(quick: bool) -> Callable[[Path], int]:
    def run(path: Path) -> int:
        from qtrader_tools.benchmarks import outbox

        events, outage_s = (2000, 0.5) if quick else (20_000, 2.0)
        return outbox.run(events=events, outage_s=outage_s, json_path=path)

    return run


def _pipeline(quick: bool) -> Callable[[Path], int]:
    def run(path: Path) -> int:
        from qtrader_tools.benchmarks import pipeline

        candles, symbols = (100, 2) if quick else (1000, 4)
        return pipeline.run(candles=candles, symbols=symbols, json_path=path)

    return run


def _pnl(quick: bool) -> Callable[[Path], int]:
    def run(path: Path) -> int:
        from qtrader_tools.benchmarks import pnl

        return pnl.run(fills=20_000 if quick else 1_000_000, json_path=path)

    return run


def _inference(quick: bool) -> Callable[[Path], int]:
    def run(path: Path) -> int:
        from qtrader_tools.benchmarks import inference  # type: ignore[attr-defined,unused-ignore]

        code: int = inference.run(samples=200 if quick else 2000, batch=64, json_path=path)
        return code

    return run


def _backtest(quick: bool) -> Callable[[Path], int]:
    def run(path: Path) -> int:
        from qtrader_tools.benchmarks import backtest

        if quick:
            return backtest.run(candles=5_000, repeats=1, growth=False, json_path=path)
        return backtest.run(json_path=path)

    return run


def benches(*, quick: bool) -> list[Bench]:
    """Every benchmark, at the CLI's default sizes or (``quick``) small ones."""
    makers = (
        ("halt", _halt),
        ("limiter", _limiter),
        ("outbox", _outbox),
        ("pipeline", _pipeline),
        ("pnl", _pnl),
        ("inference", _inference),
        ("backtest", _backtest),
    )
    return [Bench(name, make(quick)) for name, make in makers]


# --- the run --------------------------------------------------------------------------------


def run_one(bench: Bench, work_dir: Path) -> Outcome:
    """One benchmark; whatever it raises is its failure, not the suite's (KeyboardInterrupt
    aside: that stops the suite)."""
    path = work_dir / f"{bench.name}.json"
    began = time.monotonic()
    error: str | None = None
    try:
        code = bench.run(path)
    except KeyboardInterrupt:
        code, error = INTERRUPTED, "interrupted"
    except Exception as exc:  # a missing module, a crash: reported, and the suite goes on
        code, error = 1, f"{type(exc).__name__}: {exc}"
        print(f"qtrader bench all: {bench.name} failed: {error}", file=sys.stderr)
    seconds = time.monotonic() - began
    if code != 0 and error is None:
        error = f"exited {code}"
    return Outcome(bench.name, code, seconds, _figures(path), error)


def _figures(path: Path) -> dict[str, Any] | None:
    try:
        figures: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return figures


def combined(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """``{name: figures or None, ..., "summary": {name: {exit, seconds, error}}}``."""
    result: dict[str, Any] = {o.name: o.figures for o in outcomes}
    result["summary"] = {o.name: o.status() for o in outcomes}
    return result


def render(outcomes: Sequence[Outcome], *, quick: bool) -> str:
    sizes = "quick sizes" if quick else "default sizes"
    width = max([len("bench"), *(len(o.name) for o in outcomes)])
    lines = [
        f"all: {len(outcomes)} benchmarks ({sizes})",
        f"  {'bench':<{width}}  {'exit':>4}  {'seconds':>7}  result",
    ]
    for o in outcomes:
        result = "ok" if o.exit_code == 0 else (o.error or "failed")
        lines.append(f"  {o.name:<{width}}  {o.exit_code:>4}  {o.seconds:>7.1f}  {result}")
    return "\n".join(lines)


def run_suite(
    suite: Sequence[Bench],
    *,
    json_path: Path | None = None,
    quick: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Run ``suite`` in turn; print the summary and the JSON line; the exit code."""
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="qtrader-bench-all-") as tmp:
        for number, bench in enumerate(suite, start=1):
            print(
                f"qtrader bench all: [{number}/{len(suite)}] {bench.name}",
                file=sys.stderr,
                flush=True,
            )
            outcome = run_one(bench, Path(tmp))
            outcomes.append(outcome)
            if outcome.exit_code == INTERRUPTED:
                break
    result = combined(outcomes)
    publish(render(outcomes, quick=quick), result, json_path=json_path, out=out)
    if outcomes and outcomes[-1].exit_code == INTERRUPTED:
        print("qtrader bench all: interrupted", file=sys.stderr)
        return INTERRUPTED
    failed = [o.name for o in outcomes if o.exit_code != 0]
    if failed:
        print(f"qtrader bench all: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run(*, json_path: Path | None = None, quick: bool = False, out: TextIO = sys.stdout) -> int:
    """``qtrader bench all``: every benchmark, default or (``quick``) small sizes."""
    return run_suite(benches(quick=quick), json_path=json_path, quick=quick, out=out)
