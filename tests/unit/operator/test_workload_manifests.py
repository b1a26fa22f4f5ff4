"""What the operator puts in the execution Deployment for trading on Binance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from qtrader.contracts.messages import TradingState
from qtrader.contracts.policy import parse_policy
from qtrader_operator import handlers, policy_core

ROOT = Path(__file__).resolve().parents[3]


def deployments(settings: policy_core.WorkloadSettings) -> dict[str, dict[str, Any]]:
    policy = parse_policy(yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text()))
    owner = policy_core.Owner(name="demo", namespace="trading", uid="uid-1")
    made = policy_core.desired_deployments(owner=owner, spec=policy.spec, settings=settings)
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in made}


def env(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_execution_gets_redis_and_the_binance_keys_as_files_others_do_not() -> None:
    made = deployments(
        policy_core.WorkloadSettings(
            image="img:1",
            nats_url="nats://nats:4222",
            redis_url="redis://redis:6379/0",
            binance_secret="binance-keys",
        )
    )
    execution = made["execution"]
    assert env(execution)["QTRADER_REDIS_URL"] == "redis://redis:6379/0"
    assert env(execution)["QTRADER_BINANCE_SECRET_DIR"] == policy_core.BINANCE_SECRET_DIR
    pod = execution["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "binance-keys", "mountPath": "/var/run/secrets/binance", "readOnly": True} in (
        container["volumeMounts"]
    )
    secret = next(v for v in pod["volumes"] if v["name"] == "binance-keys")["secret"]
    assert secret == {"secretName": "binance-keys", "defaultMode": 0o400}
    for role in ("marketdata", "inference", "portfolio"):
        assert "QTRADER_REDIS_URL" not in env(made[role])
        assert "QTRADER_BINANCE_SECRET_DIR" not in env(made[role])
    for deployment in made.values():
        assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_paper_only_settings_add_nothing_to_execution() -> None:
    made = deployments(policy_core.WorkloadSettings(image="img:1", nats_url="nats://nats:4222"))
    assert set(env(made["execution"])) == {
        "QTRADER_NATS_URL",
        "QTRADER_STACK",
        "QTRADER_HEALTH_PORT",
        "QTRADER_WORKER_ID",
    }


def test_every_workload_speaks_its_policys_stack() -> None:
    made = deployments(policy_core.WorkloadSettings(image="img:1", nats_url="nats://nats:4222"))
    assert set(made) == set(policy_core.ROLES)
    for deployment in made.values():
        assert env(deployment)["QTRADER_STACK"] == "trading.demo"


@pytest.mark.parametrize(
    ("state", "flatten", "stopped"),
    [
        (TradingState.ACTIVE, False, set()),
        (TradingState.HALTED, False, {"inference", "execution"}),
        (TradingState.HALTED, True, {"inference"}),  # execution stays to close the positions
        (TradingState.REDUCING, False, {"inference"}),
        (TradingState.REDUCING, True, {"inference"}),
    ],
)
def test_a_stop_scales_down_what_its_state_stops_and_keeps_execution_to_flatten(
    state: TradingState, flatten: bool, stopped: set[str]
) -> None:
    assert handlers._stopped_roles(state, flatten=flatten) == stopped


@pytest.mark.parametrize("name", ["demo.v2", "x" * 64])
def test_a_name_that_cannot_name_a_stack_is_a_reason(name: str) -> None:
    owner = policy_core.Owner(name=name, namespace="trading", uid="uid-1")
    problem = policy_core.stack_problem(owner)
    assert problem is not None
    assert "NATS stack" in problem
    assert (
        policy_core.stack_problem(policy_core.Owner(name="demo", namespace="trading", uid="u"))
        is None
    )
