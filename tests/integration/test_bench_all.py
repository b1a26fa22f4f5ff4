"""``qtrader bench all``'s aggregation: every benchmark in turn, one JSON object of all figures.

The whole suite at quick sizes takes about two minutes on a shared 2-core machine, too long for
a test; so the suite function runs here on two small real benchmarks (``pnl`` and ``outbox``,
the latter with its own nats-server), and with a benchmark that cannot be imported and one that
fails without figures, placed first so the test shows the suite going on after them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qtrader_tools.benchmarks import outbox, pnl
from qtrader_tools.benchmarks.suite import Bench, benches, run_suite

pytestmark = pytest.mark.integration


def small_pnl(path: Path) -> int:
    return pnl.run(fills=2000, check=2000, json_path=path, out=io.StringIO())


def small_outbox(path: Path) -> int:
    # Its own test's size: with much fewer events the outage can miss the stream entirely.
    return outbox.run(events=2000, outage_s=0.5, json_path=path, out=io.StringIO())


def missing(path: Path) -> int:
    from qtrader_tools.benchmarks import no_such_bench  # type: ignore[attr-defined]

    code: int = no_such_bench.run(json_path=path)
    return code


def failing(path: Path) -> int:
    return 1  # as a benchmark whose run failed: no figures written


def test_run_suite_when_two_benches_pass_then_one_json_with_both_and_exit_0(
    tmp_path: Path,
) -> None:
    output = tmp_path / "all.json"
    out = io.StringIO()

    code = run_suite(
        [Bench("pnl", small_pnl), Bench("outbox", small_outbox)], json_path=output, out=out
    )

    assert code == 0
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    assert json.loads(output.read_text()) == result
    assert set(result) == {"pnl", "outbox", "summary"}
    assert result["pnl"]["benchmark"] == "pnl"
    assert result["pnl"]["fills"] == 2000
    assert result["outbox"]["benchmark"] == "outbox"
    assert (result["outbox"]["lost"], result["outbox"]["duplicated"]) == (0, 0)
    for name in ("pnl", "outbox"):
        summary = result["summary"][name]
        assert (summary["exit"], summary["error"]) == (0, None)
        assert summary["seconds"] > 0
    assert "all: 2 benchmarks" in out.getvalue()  # the summary table precedes the JSON


def test_run_suite_when_a_bench_is_missing_or_fails_then_reported_and_the_rest_runs(
    tmp_path: Path,
) -> None:
    output = tmp_path / "all.json"
    out = io.StringIO()

    code = run_suite(
        [Bench("missing", missing), Bench("failing", failing), Bench("pnl", small_pnl)],
        json_path=output,
        out=out,
    )

    assert code == 1
    result = json.loads(output.read_text())
    assert result["missing"] is None
    assert result["failing"] is None
    assert result["summary"]["missing"]["exit"] == 1
    assert "no_such_bench" in result["summary"]["missing"]["error"]
    assert result["summary"]["failing"] == {
        "exit": 1,
        "seconds": result["summary"]["failing"]["seconds"],
        "error": "exited 1",
    }
    assert result["summary"]["pnl"]["exit"] == 0
    assert result["pnl"]["fills"] == 2000
    assert "no_such_bench" in out.getvalue()  # the reason is in the summary table


def test_benches_when_listed_then_every_benchmark_in_order() -> None:
    names = [bench.name for bench in benches(quick=True)]
    assert names == ["halt", "limiter", "outbox", "pipeline", "pnl", "inference", "backtest"]
