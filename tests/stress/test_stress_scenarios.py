"""Every stress scenario (``SCENARIOS``), each a test that fails on any failed criterion.

They run at ``QTRADER_STRESS_SCALE`` (default 0.1, the CI-sized suite; 1 is the full-length run,
``qtrader stress --scale 1`` does the same with a report). Each scenario starts its own servers
and processes in the test's temporary directory; a failure lists every failed criterion and the
scenario's figures.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from qtrader_tools.stress.scenario import DEFAULT_SCALE, SCENARIOS, StressOptions, run_scenario

pytestmark = [pytest.mark.stress, pytest.mark.integration]

SCALE = float(os.environ.get("QTRADER_STRESS_SCALE", DEFAULT_SCALE))
# The suite's per-test limit (pyproject) fits the default scale; a longer run gets a longer one.
TIMEOUT_S = max(900, round(3000 * SCALE))


@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str, tmp_path: Path) -> None:
    progress = io.StringIO()
    result = run_scenario(name, StressOptions(scale=SCALE, work_dir=tmp_path, progress=progress))
    detail = "\n".join(
        [
            *result.failures(),
            *result.notes,
            f"figures: {json.dumps(result.figures, default=str)}",
            progress.getvalue()[-4000:],
        ]
    )
    assert result.passed, detail
    assert result.criteria, "a scenario must check at least one criterion"
