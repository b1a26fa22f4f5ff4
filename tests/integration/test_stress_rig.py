"""The stress rig's readiness waits, against a real nats-server and a real execution worker.

A worker's ``/healthz`` answers as soon as its process serves HTTP, but an execution worker
trades only once it has the latch in force and has heard a control-plane heartbeat; until then
it denies every signal as halted (fail closed). The heartbeat comes once a second, so a
scenario that publishes signals right after ``/healthz`` answers sometimes has them all denied
and then waits for intents that never come (the venue-truth scenario did, at its first step).
``Rig.wait_trading`` waits for what trading needs: the worker's own ``halt-latch`` check OK.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qtrader.contracts.messages import TradingState
from qtrader.local.control import write_latch
from qtrader_tools.stress.harness import Rig, ScenarioFailure, policy_document

pytestmark = pytest.mark.integration


async def test_wait_trading_waits_for_the_heartbeat_that_healthz_does_not(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        await rig.publish_policy(policy_document("rig-ready", symbols=["BTCUSDT"]))
        await write_latch(rig.bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
        execution = rig.workload("execution")
        await rig.wait_healthy([execution])

        # Up and answering, the latch ACTIVE, but no heartbeat: not trading, and it says why.
        with pytest.raises(ScenarioFailure, match="trading"):
            await rig.wait_trading([execution], timeout_s=3)
        status, detail = (await rig.checks(execution))["halt-latch"]
        assert status == "DEGRADED"
        assert "no control-plane heartbeat heard yet" in detail

        await rig.arm_without_control_plane()
        await rig.wait_trading([execution], timeout_s=30)
        status, detail = (await rig.checks(execution))["halt-latch"]
        assert (status, detail.endswith("ACTIVE")) == ("OK", True)
