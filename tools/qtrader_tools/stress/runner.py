"""``qtrader stress``: run the scenarios, print each criterion, write PATH.md and PATH.json.

Exit 0 when every scenario run passed every criterion, 1 otherwise, 130 when interrupted (the
scenarios stop what they started on the way out). Scenario work directories (worker logs, NATS
stores) go to a temporary directory that is removed afterwards, or to ``--work-dir``, kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from qtrader_tools.stress.result import ScenarioResult, report_paths, write_report
from qtrader_tools.stress.scenario import DEFAULT_SCALE, SCENARIOS, StressOptions, run_scenario

MAX_SCALE = 10.0


def scale_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale must be a number, got {text!r}") from None
    if not 0 < value <= MAX_SCALE:
        raise argparse.ArgumentTypeError(
            f"--scale must be above 0 and at most {MAX_SCALE:g} (1 is the full-length run), "
            f"got {text}"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--scale",
        type=scale_argument,
        default=DEFAULT_SCALE,
        help=f"durations and counts relative to the full-length run (default {DEFAULT_SCALE})",
    )
    parser.add_argument("--report", type=Path, help="write the report to PATH.md and PATH.json")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep the scenarios' logs and stores here (default: a temp dir)",
    )


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    names: Sequence[str] = args.scenario or list(SCENARIOS)
    try:
        results = _run_all(names, scale=args.scale, work_dir=args.work_dir)
    except KeyboardInterrupt:
        out.write("qtrader stress: interrupted\n")
        return 130
    _print_summary(results, out)
    if args.report is not None:
        write_report(results, args.report, context=_context(args.scale))
        markdown, json_path = report_paths(args.report)
        out.write(f"report: {markdown} and {json_path}\n")
    return 0 if all(r.passed for r in results) else 1


def _run_all(names: Sequence[str], *, scale: float, work_dir: Path | None) -> list[ScenarioResult]:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        return _run_in(names, scale=scale, work_dir=work_dir)
    with tempfile.TemporaryDirectory(prefix="qtrader-stress-") as scratch:
        return _run_in(names, scale=scale, work_dir=Path(scratch))


def _run_in(names: Sequence[str], *, scale: float, work_dir: Path) -> list[ScenarioResult]:
    """The scenarios' own log lines (the in-process control plane's, the rig's) go to
    ``stress.log`` in the work directory; the terminal keeps the progress lines."""
    handler = logging.FileHandler(work_dir / "stress.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        options = StressOptions(scale=scale, work_dir=work_dir)
        return [run_scenario(name, options) for name in names]
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


def _print_summary(results: Sequence[ScenarioResult], out: TextIO) -> None:
    for result in results:
        verdict = "PASS" if result.passed else "FAIL"
        out.write(f"\n{verdict} {result.name} ({result.duration_s:.1f} s): {result.title}\n")
        if result.error is not None:
            out.write(f"  error: {result.error}\n")
        for criterion in result.criteria:
            out.write(f"  {criterion.describe()}\n")
    passed = sum(r.passed for r in results)
    out.write(f"\n{passed} of {len(results)} scenarios passed\n")


def _context(scale: float) -> dict[str, Any]:
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "scale": scale,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "clock": time.get_clock_info("monotonic").implementation,
    }
