"""REST views of an account: ``/fapi/v2/account``, ``/fapi/v2|v3/balance``,
``/fapi/v2|v3/positionRisk``.

All of them read the same numbers: the wallet (start-up balance plus the ledger, see
``ledger``), the positions' exact cost basis and the market price as mark price. The account is
single-asset, cross-margined, one-way: USDT is the margin asset; BNB is listed (its wallet pays
commissions for a BNB-burn account) but is not margin.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from .decimals import plain
from .matching import Venue

_ZERO = Decimal(0)


def account_info(venue: Venue, api_key: str, now_ms: int) -> dict[str, Any]:
    wallet = venue.wallet_balance(api_key)
    unrealized = venue.unrealized(api_key)
    margin = venue.used_margin(api_key)
    available = venue.available_balance(api_key)
    money = {
        "walletBalance": plain(wallet),
        "unrealizedProfit": plain(unrealized),
        "marginBalance": plain(wallet + unrealized),
        "initialMargin": plain(margin),
        "maintMargin": "0",
        "positionInitialMargin": plain(margin),
        "openOrderInitialMargin": "0",
        "crossWalletBalance": plain(wallet),
        "crossUnPnl": plain(unrealized),
        "availableBalance": plain(available),
        "maxWithdrawAmount": plain(max(available, _ZERO)),
    }
    return {
        "feeTier": 0,
        "canTrade": True,
        "canDeposit": True,
        "canWithdraw": True,
        "feeBurn": api_key in venue.fee_burn,
        "updateTime": now_ms,
        "multiAssetsMargin": False,
        "totalInitialMargin": money["initialMargin"],
        "totalMaintMargin": "0",
        "totalWalletBalance": money["walletBalance"],
        "totalUnrealizedProfit": money["unrealizedProfit"],
        "totalMarginBalance": money["marginBalance"],
        "totalPositionInitialMargin": money["positionInitialMargin"],
        "totalOpenOrderInitialMargin": "0",
        "totalCrossWalletBalance": money["crossWalletBalance"],
        "totalCrossUnPnl": money["crossUnPnl"],
        "availableBalance": money["availableBalance"],
        "maxWithdrawAmount": money["maxWithdrawAmount"],
        "assets": [
            {"asset": "USDT", **money, "marginAvailable": True, "updateTime": now_ms},
            _bnb_asset(venue, api_key, now_ms),
        ],
        "positions": position_risk(venue, api_key),
    }


def _bnb_asset(venue: Venue, api_key: str, now_ms: int) -> dict[str, Any]:
    wallet = plain(venue.wallet(api_key, "BNB"))
    zero = ("unrealizedProfit", "initialMargin", "maintMargin", "positionInitialMargin")
    return {
        "asset": "BNB",
        "walletBalance": wallet,
        "marginBalance": wallet,
        **dict.fromkeys(zero, "0"),
        "openOrderInitialMargin": "0",
        "crossWalletBalance": wallet,
        "crossUnPnl": "0",
        "availableBalance": wallet,
        "maxWithdrawAmount": wallet,
        "marginAvailable": False,
        "updateTime": now_ms,
    }


def balances(venue: Venue, api_key: str, now_ms: int) -> list[dict[str, Any]]:
    """``GET /fapi/v2/balance`` (and v3, the same shape)."""
    usdt_wallet = venue.wallet_balance(api_key)
    available = venue.available_balance(api_key)
    usdt = {
        "asset": "USDT",
        "balance": plain(usdt_wallet),
        "crossWalletBalance": plain(usdt_wallet),
        "crossUnPnl": plain(venue.unrealized(api_key)),
        "availableBalance": plain(available),
        "maxWithdrawAmount": plain(max(available, _ZERO)),
        "marginAvailable": True,
    }
    bnb_wallet = plain(venue.wallet(api_key, "BNB"))
    bnb = {
        "asset": "BNB",
        "balance": bnb_wallet,
        "crossWalletBalance": bnb_wallet,
        "crossUnPnl": "0",
        "availableBalance": bnb_wallet,
        "maxWithdrawAmount": bnb_wallet,
        "marginAvailable": False,
    }
    return [{"accountAlias": "SimAccount", **entry, "updateTime": now_ms} for entry in (usdt, bnb)]


def position_risk(venue: Venue, api_key: str) -> list[dict[str, Any]]:
    """``GET /fapi/v2/positionRisk``: every symbol the account has traded."""
    rows = []
    for (key, symbol), position in sorted(venue.positions.items()):
        if key != api_key:
            continue
        mark = venue.price(symbol)
        rows.append(
            {
                "symbol": symbol,
                "positionAmt": plain(position.amount),
                "entryPrice": plain(position.entry_price),
                "breakEvenPrice": plain(position.entry_price),
                "markPrice": plain(mark),
                "unRealizedProfit": plain(position.unrealized(mark)),
                "liquidationPrice": "0",
                "leverage": str(venue.config.leverage),
                "maxNotionalValue": "0",
                "marginType": "cross",
                "isolatedMargin": "0",
                "isAutoAddMargin": "false",
                "positionSide": "BOTH",
                "notional": plain(position.amount * mark),
                "isolatedWallet": "0",
                "updateTime": 0,
                "isolated": False,
            }
        )
    return rows


def position_risk_v3(venue: Venue, api_key: str, now_ms: int) -> list[dict[str, Any]]:
    """``GET /fapi/v3/positionRisk``: only open positions, v3's fields."""
    rows = []
    for (key, symbol), position in sorted(venue.positions.items()):
        if key != api_key or position.amount == 0:
            continue
        mark = venue.price(symbol)
        margin = abs(position.amount) * mark / venue.config.leverage
        rows.append(
            {
                "symbol": symbol,
                "positionSide": "BOTH",
                "positionAmt": plain(position.amount),
                "entryPrice": plain(position.entry_price),
                "breakEvenPrice": plain(position.entry_price),
                "markPrice": plain(mark),
                "unRealizedProfit": plain(position.unrealized(mark)),
                "liquidationPrice": "0",
                "isolatedMargin": "0",
                "notional": plain(position.amount * mark),
                "marginAsset": "USDT",
                "isolatedWallet": "0",
                "initialMargin": plain(margin),
                "maintMargin": "0",
                "positionInitialMargin": plain(margin),
                "openOrderInitialMargin": "0",
                "adl": 0,
                "bidNotional": "0",
                "askNotional": "0",
                "updateTime": now_ms,
            }
        )
    return rows
