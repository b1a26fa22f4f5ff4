"""Bad input files through the real CLI: each exits 2 naming the file, the line and the problem,
and nothing starts, nothing is published.

``qtrader up`` is given a data directory of its own: that it is never created proves no NATS
server, worker or log file was started. ``qtrader policy apply`` is given an unreachable server:
exit 2 (not 1, "no answer") proves the file was refused before any connection was tried.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qtrader.contracts.documents import MAX_RESOURCE_BYTES
from support.binance_sim import sim_in_thread

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QTRADER = str(Path(sys.executable).parent / "qtrader")
POLICY = (ROOT / "examples/policy.yaml").read_text()
ESS = (ROOT / "examples/emergencystop.yaml").read_text()
SAMPLE_CSV = ROOT / "examples/data/BTCUSDT-1m-sample.csv"
UNREACHABLE = "nats://127.0.0.1:9"


def _line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QTRADER, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


# Each bad policy: (file bytes, the problem the message must name, the line it must name).
def _not_utf8() -> tuple[bytes, str, int]:
    text = POLICY.replace("name: paper-demo", "name: paper-demo  # caf\udce9")
    data = text.encode("utf-8", "surrogateescape")  # a lone Latin-1 byte 0xe9
    return data, "not UTF-8 (byte 0xe9", _line_of(POLICY, "name: paper-demo")


def _duplicate_risk() -> tuple[bytes, str, int]:
    text = POLICY.replace("  signals:\n", "  risk:\n    maxOpenPositions: 1\n  signals:\n")
    return text.encode(), "duplicate key 'risk'", _line_of(text, "  risk:\n    maxOpenPositions: 1")


def _unknown_symbol() -> tuple[bytes, str, int]:
    text = POLICY.replace(
        "symbols: [BTCUSDT, ETHUSDT, SOLUSDT]", "symbols:\n  - BTCUSDT\n  - FOOUSDT"
    )
    message = "spec.symbols: FOOUSDT not listed by the paper exchange"
    return text.encode(), message, _line_of(text, "- FOOUSDT")


def _huge_decimal() -> tuple[bytes, str, int]:
    text = POLICY.replace('maxPositionUsd: "1000"', 'maxPositionUsd: "1e999"')
    return text.encode(), "spec.risk.maxPositionUsd", _line_of(text, "maxPositionUsd")


def _not_yaml() -> tuple[bytes, str, int]:
    text = POLICY.replace("  risk:\n", "  risk: [\n")
    return text.encode(), "the file is not valid YAML", _line_of(text, "    maxPositionUsd")


BAD_POLICIES: dict[str, Callable[[], tuple[bytes, str, int]]] = {
    "not UTF-8": _not_utf8,
    "duplicate risk key": _duplicate_risk,
    "unknown symbol": _unknown_symbol,
    "1e999 as a USD limit": _huge_decimal,
    "broken YAML": _not_yaml,
}


def _oversized(text: str) -> bytes:
    """``text`` padded past the cap with a YAML comment, so only its size is wrong."""
    return text.encode() + b"#" + b"x" * MAX_RESOURCE_BYTES + b"\n"


@pytest.mark.parametrize("name", sorted(BAD_POLICIES))
def test_up_when_the_policy_file_is_bad_then_names_file_line_problem_and_starts_nothing(
    name: str, tmp_path: Path
) -> None:
    data, problem, line = BAD_POLICIES[name]()
    bad = tmp_path / "policy.yaml"
    bad.write_bytes(data)
    result = _run(
        "up", "--policy", str(bad), "--data-dir", str(tmp_path / "data"), "--duration", "1"
    )
    assert result.returncode == 2, result.stderr
    assert f"{bad}:{line}: " in result.stderr
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name", sorted(BAD_POLICIES))
def test_policy_apply_when_the_file_is_bad_then_names_file_line_problem_before_connecting(
    name: str, tmp_path: Path
) -> None:
    data, problem, line = BAD_POLICIES[name]()
    bad = tmp_path / "policy.yaml"
    bad.write_bytes(data)
    result = _run("policy", "apply", str(bad), "--nats-url", UNREACHABLE, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"{bad}:{line}: {problem}" in result.stderr or (
        f"{bad}:{line}: " in result.stderr and problem in result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["up", "policy apply"])
def test_when_the_policy_file_is_over_the_cap_then_it_is_refused_before_parsing(
    command: str, tmp_path: Path
) -> None:
    bad = tmp_path / "big.yaml"
    bad.write_bytes(_oversized(POLICY))
    args = (
        ("up", "--policy", str(bad), "--data-dir", str(tmp_path / "data"))
        if command == "up"
        else ("policy", "apply", str(bad), "--nats-url", UNREACHABLE)
    )
    started = time.monotonic()
    result = _run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"{bad}: larger than {MAX_RESOURCE_BYTES} bytes" in result.stderr
    assert time.monotonic() - started < 20  # the import of the CLI, not the parse of the file
    assert not (tmp_path / "data").exists()


BAD_ESS: dict[str, tuple[bytes, str, int]] = {
    "not UTF-8": (
        ESS.replace('reason: ""', 'reason: "caf\udce9"').encode("utf-8", "surrogateescape"),
        "not UTF-8 (byte 0xe9",
        _line_of(ESS, "reason:"),
    ),
    "duplicate tripped key": (
        ESS.replace("  reason:", "  tripped: true\n  reason:").encode(),
        "duplicate key 'tripped'",
        _line_of(ESS, "  reason:"),
    ),
    "cooldown out of range": (
        ESS.replace("cooldownSeconds: 300", "cooldownSeconds: 90000").encode(),
        "spec.cooldownSeconds: Input should be less than or equal to 86400",
        _line_of(ESS, "cooldownSeconds"),
    ),
    "over the cap": (_oversized(ESS), f"larger than {MAX_RESOURCE_BYTES} bytes", 0),
}


@pytest.mark.parametrize("name", sorted(BAD_ESS))
def test_up_when_the_emergency_stop_file_is_bad_then_names_file_line_problem_and_starts_nothing(
    name: str, tmp_path: Path
) -> None:
    data, problem, line = BAD_ESS[name]
    bad = tmp_path / "ess.yaml"
    bad.write_bytes(data)
    result = _run(
        "up", "--policy", str(ROOT / "examples/policy.yaml"), "--ess", str(bad),
        "--data-dir", str(tmp_path / "data"), "--duration", "1",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert (f"{bad}:{line}: " if line else f"{bad}: ") in result.stderr
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def _csv_with_garbage_at(tmp_path: Path, line: int, garbage: str) -> Path:
    lines = SAMPLE_CSV.read_text().splitlines(keepends=True)
    lines[line - 1] = garbage + "\n"
    path = tmp_path / "BTCUSDT-1m-bad.csv"
    path.write_text("".join(lines))
    return path


def test_up_when_a_replay_row_is_bad_at_line_302_then_refuses_before_anything_starts(
    tmp_path: Path,
) -> None:
    bad = _csv_with_garbage_at(tmp_path, 302, "this,is,not,a,kline")
    result = _run(
        "up", "--policy", str(ROOT / "examples/policy.yaml"), "--replay", str(bad),
        "--data-dir", str(tmp_path / "data"), "--duration", "5",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"{bad}, line 302: expected 12 columns, got 5" in result.stderr
    assert not (tmp_path / "data").exists()


def test_up_when_a_replay_file_has_a_symbol_the_policy_does_not_trade_then_refuses(
    tmp_path: Path,
) -> None:
    other = tmp_path / "DOTUSDT-1m-sample.csv"
    other.write_bytes(SAMPLE_CSV.read_bytes())
    result = _run(
        "up", "--policy", str(ROOT / "examples/policy.yaml"), "--replay", str(other),
        "--data-dir", str(tmp_path / "data"), "--duration", "5",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "replays DOTUSDT, which the policy does not trade" in result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("garbage", "problem"),
    [
        ("1704085200000,1e999,1e999,48777.8,48906.3,1,1704085259999,1,1,1,1,0", "open"),
        ("1704085200000,49215.3,NaN,48777.8,48906.3,1,1704085259999,1,1,1,1,0", "high"),
        ("1704085200000,\udcff,1,1,1,1,1704085259999,1,1,1,1,0", "not utf-8"),
        (
            "1704085200000,49215.3,49250.2,48777.8,48906.3,1,1704085259999,1\x00,1,1,1,0",
            "quote_volume",
        ),
    ],
    ids=["1e999", "NaN", "not UTF-8", "NUL byte"],
)
def test_backtest_when_a_csv_row_is_bad_then_exit_2_naming_file_and_line(
    garbage: str, problem: str, tmp_path: Path
) -> None:
    lines = SAMPLE_CSV.read_text().splitlines(keepends=True)
    lines[301] = garbage + "\n"
    bad = tmp_path / "BTCUSDT-1m-bad.csv"
    bad.write_bytes("".join(lines).encode("utf-8", "surrogateescape"))
    result = _run("backtest", "--csv", str(bad))
    assert result.returncode == 2, result.stderr
    assert f"{bad}, line 302" in result.stderr
    assert problem in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# --- a testnet policy's symbols, against the venue it trades on --------------------------------


def _testnet_policy(symbols: str) -> str:
    text = POLICY.replace("mode: paper", "mode: testnet")
    return text.replace("symbols: [BTCUSDT, ETHUSDT, SOLUSDT]", f"symbols:\n  - {symbols}")


def test_policy_apply_checks_a_testnet_policys_symbols_against_that_venue(tmp_path: Path) -> None:
    """The venue (the local Binance server) lists what its exchangeInfo says; a symbol it does
    not list is refused with file, line and its listing, before any connection to NATS; one it
    lists passes the file check (exit 1: no stack to publish to)."""
    unlisted, listed = tmp_path / "unlisted.yaml", tmp_path / "listed.yaml"
    unlisted.write_text(_testnet_policy("FOOUSDT"))
    listed.write_text(_testnet_policy("BTCUSDT"))
    with sim_in_thread() as venue:
        refused = _run("policy", "apply", str(unlisted), "--exchange-url", venue, cwd=tmp_path)
        passed = _run(
            "policy",
            "apply",
            str(listed),
            "--exchange-url",
            venue,
            "--nats-url",
            UNREACHABLE,
            cwd=tmp_path,
        )
    assert refused.returncode == 2, refused.stderr
    assert f"{unlisted}:{_line_of(_testnet_policy('FOOUSDT'), '- FOOUSDT')}:" in refused.stderr
    assert "FOOUSDT not listed by the testnet exchange" in refused.stderr
    assert passed.returncode == 1, passed.stderr  # the file was fine; the stack is unreachable


def test_policy_apply_refuses_a_testnet_policy_when_its_venue_cannot_be_asked(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "testnet.yaml"
    policy.write_text(_testnet_policy("BTCUSDT"))
    result = _run(
        "policy", "apply", str(policy), "--exchange-url", "http://127.0.0.1:9", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "cannot check spec.symbols against the testnet exchange" in result.stderr
