"""The account entry on the wire, and the portfolio snapshot's versions: what decodes, what is
refused and why, and that readers of the older snapshot versions still read them."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from qtrader.contracts.messages import (
    AccountEntry,
    EntryCategory,
    IncomeType,
    MessageRejected,
    PortfolioSnapshot,
    RejectReason,
    account_entry_id,
    decode,
)
from qtrader_tools.simulators.binance_futures.ledger import KNOWN_TYPES

FUNDING = {
    "kind": "account_entry",
    "schema_version": 1,
    "entry_id": "FUNDING_FEE:9689322392",
    "income_type": "FUNDING_FEE",
    "symbol": "BTCUSDT",
    "asset": "USDT",
    "amount": "-0.37500000",
    "ts_ms": 1_570_608_000_000,
}


def _decode(document: dict[str, Any]) -> AccountEntry:
    return decode(json.dumps(document).encode(), AccountEntry)


def test_decode_when_funding_entry_then_exact_amount_and_identity() -> None:
    entry = _decode(FUNDING)
    assert entry.amount == Decimal("-0.375")
    assert entry.category is EntryCategory.FUNDING
    assert entry.dedup_id == "entry:FUNDING_FEE:9689322392"
    assert decode(entry.encode(), AccountEntry) == entry


def test_decode_when_transfer_without_symbol_then_accepted() -> None:
    transfer = {**FUNDING, "income_type": "TRANSFER", "entry_id": "TRANSFER:1", "symbol": None}
    entry = _decode(transfer)
    assert entry.symbol is None
    assert entry.category is EntryCategory.TRANSFER


REFUSED = {
    "realized PnL comes with the fills": {**FUNDING, "income_type": "REALIZED_PNL"},
    "commission comes with the fills": {**FUNDING, "income_type": "COMMISSION"},
    "funding without its symbol": {**FUNDING, "symbol": None},
    "an income type nobody documents": {**FUNDING, "income_type": "LOTTERY"},
    "an amount beyond any money": {**FUNDING, "amount": "1e999"},
    "NaN": {**FUNDING, "amount": "NaN"},
    "a lower-case asset": {**FUNDING, "asset": "usdt"},
    "no entry id": {**FUNDING, "entry_id": ""},
    "a time past year 9999": {**FUNDING, "ts_ms": 10**16},
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_decode_when_entry_is_bad_then_refused_as_invalid_fields(name: str) -> None:
    with pytest.raises(MessageRejected) as rejected:
        _decode(REFUSED[name])
    assert rejected.value.reason is RejectReason.INVALID_FIELDS


def test_income_types_when_the_venue_documents_one_then_the_contract_knows_how_to_book_it() -> None:
    known = {t.value for t in IncomeType}
    assert set(KNOWN_TYPES) <= known
    carried = {t for t in IncomeType if t.carried_by_fills}
    assert carried == {IncomeType.REALIZED_PNL, IncomeType.COMMISSION}
    assert IncomeType.FUNDING_FEE.category is EntryCategory.FUNDING
    assert IncomeType.AUTO_EXCHANGE.category is EntryCategory.TRANSFER
    assert IncomeType.INSURANCE_CLEAR.category is EntryCategory.INCOME


def test_entry_id_when_made_then_names_the_type_and_the_venue_id() -> None:
    assert account_entry_id(IncomeType.TRANSFER, "42") == "TRANSFER:42"


# --- the snapshot's versions -------------------------------------------------------------------

SNAPSHOT_V1 = {
    "kind": "portfolio_snapshot",
    "schema_version": 1,
    "sequence": 4,
    "ts_ms": 1,
    "fills_applied": 2,
    "initial_capital": "10000",
    "realized_pnl": "1.5",
    "unrealized_pnl": "-0.5",
    "fees": "0.1",
    "equity": "10000.9",
    "peak_equity": "10001",
    "drawdown_pct": "0.001",
    "max_drawdown_pct": "0.002",
    "positions": [
        {
            "symbol": "BTCUSDT",
            "quantity": "0.01",
            "avg_entry_price": "30000",
            "mark_price": "29950",
            "unrealized_pnl": "-0.5",
            "realized_pnl": "1.5",
            "fees": "0.1",
        }
    ],
}
SNAPSHOT_V2 = {
    **SNAPSHOT_V1,
    "schema_version": 2,
    "fills_through": 7,
    "fees_by_asset": [{"asset": "USDT", "amount": "0.1"}],
    "unvalued_fees": [],
}


@pytest.mark.parametrize("document", [SNAPSHOT_V1, SNAPSHOT_V2], ids=["v1", "v2"])
def test_decode_when_snapshot_of_an_older_version_then_read_with_no_entries(
    document: dict[str, Any],
) -> None:
    snapshot = decode(json.dumps(document).encode(), PortfolioSnapshot)
    assert snapshot.schema_version == document["schema_version"]
    assert snapshot.equity == Decimal("10000.9")
    assert (snapshot.funding, snapshot.transfers, snapshot.other_income) == (0, 0, 0)
    assert snapshot.entries_applied == 0
    assert snapshot.positions[0].funding == 0
    assert snapshot.wallet == Decimal("10001.4")
    assert snapshot.equity_complete


def test_decode_when_snapshot_of_version_3_then_entries_read_back() -> None:
    document = {
        **SNAPSHOT_V2,
        "schema_version": 3,
        "entries_applied": 3,
        "funding": "-0.25",
        "transfers": "100",
        "other_income": "0",
        "transfers_by_asset": [{"asset": "USDT", "amount": "100"}],
        "unvalued_income": [{"asset": "BNB", "amount": "-0.001"}],
    }
    snapshot = decode(json.dumps(document).encode(), PortfolioSnapshot)
    assert snapshot.funding == Decimal("-0.25")
    assert not snapshot.equity_complete  # BNB income of unknown USDT value
    with pytest.raises(MessageRejected) as rejected:
        decode(json.dumps({**document, "schema_version": 4}).encode(), PortfolioSnapshot)
    assert rejected.value.reason is RejectReason.UNKNOWN_VERSION
