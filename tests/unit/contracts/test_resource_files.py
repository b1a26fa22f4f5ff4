"""Reading resource files: size before parsing, strict UTF-8, no duplicate keys, and the line of
every problem (``contracts.documents``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qtrader.contracts.documents import MAX_RESOURCE_BYTES, read_resource_file
from qtrader.contracts.policy import PolicyError, TradingMode, load_policy_file
from qtrader.instruments import paper_exchange_info

ROOT = Path(__file__).resolve().parents[3]
POLICY = (ROOT / "examples/policy.yaml").read_text()


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "resource.yaml"
    path.write_bytes(data)
    return path


def test_read_when_a_nested_mapping_repeats_a_key_then_names_the_key_and_its_line(
    tmp_path: Path,
) -> None:
    text = POLICY.replace('    maxLeverage: "3"\n', '    maxLeverage: "3"\n    maxLeverage: "9"\n')
    path = _write(tmp_path, text.encode())
    line = text[: text.index('maxLeverage: "9"')].count("\n") + 1
    with pytest.raises(
        PolicyError, match=rf"^{re.escape(str(path))}:{line}: .*duplicate key 'maxLeverage'"
    ):
        read_resource_file(path, kind="TradingPolicy", error=PolicyError)


def test_read_when_the_file_is_exactly_the_cap_then_it_is_parsed(tmp_path: Path) -> None:
    padding = MAX_RESOURCE_BYTES - len(POLICY.encode()) - 2
    path = _write(tmp_path, POLICY.encode() + b"#" + b"x" * padding + b"\n")
    assert path.stat().st_size == MAX_RESOURCE_BYTES
    assert read_resource_file(path, kind="TradingPolicy", error=PolicyError).document["spec"]


def test_read_when_the_file_is_one_byte_over_the_cap_then_refuses_without_parsing(
    tmp_path: Path,
) -> None:
    # Not YAML at all: a parse would say so; the refusal must be about the size.
    path = _write(tmp_path, b"[" * (MAX_RESOURCE_BYTES + 1))
    with pytest.raises(PolicyError, match=f"larger than {MAX_RESOURCE_BYTES} bytes"):
        read_resource_file(path, kind="TradingPolicy", error=PolicyError)


def test_read_when_bytes_are_not_utf8_then_names_their_line(tmp_path: Path) -> None:
    path = _write(tmp_path, b"apiVersion: v1\nkind: TradingPolicy\nmetadata: {name: \xe9}\n")
    with pytest.raises(PolicyError, match=rf"^{re.escape(str(path))}:3: not UTF-8 \(byte 0xe9"):
        read_resource_file(path, kind="TradingPolicy", error=PolicyError)


def test_load_when_a_field_breaks_a_rule_then_names_the_line_of_that_field(
    tmp_path: Path,
) -> None:
    text = POLICY.replace("maxSlippageBps: 20", "maxSlippageBps: 5000")
    path = _write(tmp_path, text.encode())
    line = text[: text.index("maxSlippageBps")].count("\n") + 1
    with pytest.raises(
        PolicyError, match=rf"^{re.escape(str(path))}:{line}: invalid TradingPolicy: spec.risk"
    ):
        load_policy_file(path)


def test_load_when_a_paper_symbol_is_unlisted_then_refuses_only_with_the_listing(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, POLICY.replace("SOLUSDT", "FOOUSDT").encode())
    assert load_policy_file(path).spec.symbols[-1] == "FOOUSDT"  # no listing: form only
    with pytest.raises(PolicyError, match="FOOUSDT not listed by the paper exchange"):
        load_policy_file(path, listings={TradingMode.PAPER: paper_exchange_info()})


def test_load_when_the_mode_has_no_listing_at_hand_then_symbols_are_not_checked(
    tmp_path: Path,
) -> None:
    text = POLICY.replace("mode: paper", "mode: testnet").replace("SOLUSDT", "FOOUSDT")
    path = _write(tmp_path, text.encode())
    policy = load_policy_file(path, listings={TradingMode.PAPER: paper_exchange_info()})
    assert "FOOUSDT" in policy.spec.symbols
