"""``qtrader ess`` and ``qtrader policy`` arguments: bad input exits 2, no stack exits 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtrader.cli import build_parser, main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ess", "trip"], "the following arguments are required: --reason"),
        (["ess", "trip", "--reason", "  "], "a reason is required when tripping"),
        (["ess", "trip", "--reason", "x" * 1025], "at most 1024 characters"),
        (["ess", "trip", "--reason", "x", "--mode", "Paused"], "invalid choice: 'Paused'"),
        (["ess", "reset", "--wait", "0"], "--wait must be > 0"),
        (["ess", "status", "--nats-url", "http://x"], "NATS URL must start with nats://"),
        (["ess", "pause"], "invalid choice: 'pause'"),
        (["ess", "status", "--name", "Main"], "'Main' is not a resource name"),
        (["policy", "apply"], "the following arguments are required: FILE"),
        (["up", "--policy", "examples/policy.yaml", "--ess", "nope.yaml"], "no such file"),
    ],
)
def test_bad_arguments_say_what_is_wrong_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["ess", "status"], ["ess", "trip", "--reason", "x"], ["ess", "reset"], ["policy", "show"]],
)
def test_commands_when_no_stack_runs_here_then_say_so_and_exit_1(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    assert "no local stack is running here" in capsys.readouterr().err


def test_policy_apply_when_the_file_is_invalid_then_names_the_field_and_exits_2_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path(__file__).resolve().parents[3]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (root / "examples/policy.yaml")
        .read_text()
        .replace("minConfidence: 0.45", "minConfidence: 2")
    )
    # An unreachable server: the file is rejected before any connection is tried.
    assert main(["policy", "apply", str(bad), "--nats-url", "nats://127.0.0.1:9"]) == 2
    assert "spec.risk.minConfidence" in capsys.readouterr().err


def test_up_when_the_emergency_stop_file_is_invalid_then_names_the_field_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path(__file__).resolve().parents[3]
    bad = tmp_path / "ess.yaml"
    bad.write_text((root / "examples/emergencystop.yaml").read_text().replace("300", "90000"))
    policy = str(root / "examples/policy.yaml")
    assert main(["up", "--policy", policy, "--ess", str(bad), "--duration", "1"]) == 2
    assert "spec.cooldownSeconds: Input should be less than or equal to 86400" in (
        capsys.readouterr().err
    )


def test_up_when_the_policy_obeys_another_emergency_stop_then_says_so_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path(__file__).resolve().parents[3]
    other = tmp_path / "ess.yaml"
    other.write_text(
        (root / "examples/emergencystop.yaml").read_text().replace("name: main", "name: desk-2")
    )
    policy = str(root / "examples/policy.yaml")
    assert main(["up", "--policy", policy, "--ess", str(other), "--duration", "1"]) == 2
    assert "obeys EmergencyStop 'main' (spec.emergencyStopRef)" in capsys.readouterr().err
