"""What the operator puts in the execution Deployment for trading on Binance."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtrader.cli import build_parser
from qtrader.contracts.messages import TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.exchange.credentials import (
    KEY_FILE,
    SECRET_DIR_VARIABLE,
    SECRET_FILE,
    load_credentials,
)
from qtrader.exchange.listing import VenueListings
from qtrader_operator import handlers, policy_core
from support.kubelet import mount_secret, run_as_pod_user

ROOT = Path(__file__).resolve().parents[3]


def deployments(settings: policy_core.WorkloadSettings) -> dict[str, dict[str, Any]]:
    policy = parse_policy(yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text()))
    owner = policy_core.Owner(name="demo", namespace="trading", uid="uid-1")
    made = policy_core.desired_workloads(owner=owner, spec=policy.spec, settings=settings)
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
    assert secret == {"secretName": "binance-keys", "defaultMode": 0o440}
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


# --- issue 15: live and testnet in a cluster, least privilege ---------------------------------


def _policy_in(mode: str) -> Any:
    raw = yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())
    raw["spec"]["mode"] = mode
    return parse_policy(raw)


def _deployments_in(mode: str, settings: policy_core.WorkloadSettings) -> dict[str, dict[str, Any]]:
    owner = policy_core.Owner(name="demo", namespace="trading", uid="uid-1")
    made = policy_core.desired_workloads(owner=owner, spec=_policy_in(mode).spec, settings=settings)
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in made}


SETTINGS = policy_core.WorkloadSettings(image="img:1", nats_url="nats://nats:4222")


@pytest.mark.parametrize(
    ("mode", "source"),
    [
        ("paper", ["--source", "synthetic"]),
        ("testnet", ["--source", "live", "--testnet"]),
        ("live", ["--source", "live"]),
    ],
)
def test_market_data_follows_the_mode_and_the_parser_accepts_it(
    mode: str, source: list[str]
) -> None:
    (container,) = _deployments_in(mode, SETTINGS)["marketdata"]["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["args"] == ["marketdata", *source]
    parsed = build_parser().parse_args(container["args"])
    assert parsed.source == ("synthetic" if mode == "paper" else "live")
    assert parsed.testnet is (mode == "testnet")


def test_a_change_of_mode_changes_every_pod_template() -> None:
    paper, live = _deployments_in("paper", SETTINGS), _deployments_in("live", SETTINGS)
    for role in policy_core.ROLES:
        before = paper[role]["spec"]["template"]["metadata"]["annotations"]
        after = live[role]["spec"]["template"]["metadata"]["annotations"]
        assert before != after, role  # a new template: the Deployment rolls its pods


@pytest.fixture
def kubelet_root() -> Iterator[Path]:
    """A folder any user may traverse, as the kubelet's pod volumes are (pytest's are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="kubelet-"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def test_the_pod_user_reads_the_mounted_binance_keys(kubelet_root: Path) -> None:
    """As a kubelet mounts the Secret (mode, fsGroup) and runs the pod (runAsUser): the user
    the image runs as must be able to load the keys (0400 root-owned files could not)."""
    settings = policy_core.WorkloadSettings(
        image="img:1", nats_url="nats://nats:4222", binance_secret="binance-keys"
    )
    pod = _deployments_in("testnet", settings)["execution"]["spec"]["template"]["spec"]
    keys = {KEY_FILE: "k" * 64, SECRET_FILE: "s" * 64}
    directory = mount_secret(pod, "binance-keys", keys, kubelet_root)

    def load() -> str:
        return repr(load_credentials({SECRET_DIR_VARIABLE: str(directory)}))

    assert pod["securityContext"]["runAsUser"] != 0
    assert run_as_pod_user(pod, load).startswith("Credentials(account=")
    others = dict(pod, securityContext={"runAsUser": 4242, "runAsGroup": 4242})
    assert "Permission denied" in run_as_pod_user(others, load)  # not world-readable


def test_a_redis_url_from_a_secret_stays_a_secret_reference() -> None:
    settings = policy_core.WorkloadSettings(
        image="img:1",
        nats_url="nats://nats:4222",
        redis_secret=policy_core.SecretKey(name="redis-auth", key="url"),
    )
    execution = _deployments_in("live", settings)["execution"]
    (container,) = execution["spec"]["template"]["spec"]["containers"]
    (redis,) = [e for e in container["env"] if e["name"] == "QTRADER_REDIS_URL"]
    assert redis == {
        "name": "QTRADER_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "url"}},
    }


def test_a_policy_naming_an_image_outside_the_allowlist_is_invalid() -> None:
    raw = yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())
    raw["spec"].setdefault("workloads", {}).setdefault("execution", {})["image"] = "evil:latest"
    reason = policy_core.validate(raw["spec"], VenueListings())
    assert isinstance(reason, str)
    assert "execution evil:latest" in reason
    allowed = policy_core.validate(
        raw["spec"], VenueListings(), allowed_images=frozenset({"evil:latest"})
    )
    assert not isinstance(allowed, str)
    made = policy_core.desired_workloads(
        owner=policy_core.Owner(name="demo", namespace="trading", uid="u"),
        spec=allowed,
        settings=SETTINGS,
    )
    images = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in made}
    (container,) = images["execution"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "evil:latest"


def test_a_changed_secret_changes_the_execution_pod_template_only() -> None:
    settings = policy_core.WorkloadSettings(
        image="img:1",
        nats_url="nats://nats:4222",
        binance_secret="binance-keys",
        redis_secret=policy_core.SecretKey(name="redis-auth", key="url"),
    )
    before = _deployments_in("testnet", replace(settings, secret_versions={"binance-keys": "7"}))
    after = _deployments_in("testnet", replace(settings, secret_versions={"binance-keys": "8"}))
    for role in policy_core.ROLES:
        old = before[role]["spec"]["template"]["metadata"]["annotations"]
        new = after[role]["spec"]["template"]["metadata"]["annotations"]
        assert (old != new) is (role == "execution"), role
    annotations = after["execution"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations[policy_core.SECRETS_ANNOTATION] == "binance-keys=8,redis-auth=unknown"
