"""User-data stream events with Binance USD-M futures field names (pure builders).

* ``ORDER_TRADE_UPDATE`` on every order state change: ``x`` (execution type) NEW when booked,
  TRADE for each fill (with ``l``/``L``/``t``/``n``/``N``/``m``/``rp`` of that fill), CANCELED,
  EXPIRED; ``X`` the order status after it. ``n``/``N`` are the fill's commission and its asset
  (``"0"``/``"USDT"`` on events without a fill); ``b``/``a`` the open BUY/SELL notional of the
  account's orders on the symbol after the event (bids and asks notional).
* ``ACCOUNT_UPDATE`` ``a.m`` the reason: ORDER after a fill (``B`` the margin asset and, when a
  commission was paid in BNB, BNB; ``P`` the symbol's position), FUNDING_FEE (``B`` only, no
  ``P``: the account is cross-margined), DEPOSIT/WITHDRAW for admin transfers (``bc`` the
  change). ``bep`` (break-even price) is the entry price: the simulator does not fold fees in.
* ``listenKeyExpired``: ``E`` is a string there, as Binance sends it.

Within one fill the ORDER_TRADE_UPDATE comes before the ACCOUNT_UPDATE; Binance guarantees
ordering only within one event type.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .decimals import plain

if TYPE_CHECKING:
    from .matching import Order, Trade


@dataclass(frozen=True)
class PositionView:
    symbol: str
    amount: Decimal
    entry_price: Decimal
    realized: Decimal  # accumulated, pre-fee
    unrealized: Decimal


def order_update(
    order: Order,
    *,
    execution: str,
    now_ms: int,
    trade: Trade | None,
    book_notional: tuple[Decimal, Decimal],
) -> dict[str, Any]:
    avg = order.cum_quote / order.executed_qty if order.executed_qty else Decimal(0)
    bids, asks = book_notional
    return {
        "e": "ORDER_TRADE_UPDATE",
        "E": now_ms,
        "T": now_ms,
        "o": {
            "s": order.symbol,
            "c": order.client_order_id,
            "S": order.side,
            "o": order.type,
            "f": order.time_in_force,
            "q": plain(order.orig_qty),
            "p": plain(order.price),
            "ap": plain(avg.quantize(Decimal("1e-8"))) if avg else "0",
            "sp": "0",
            "x": execution,
            "X": order.status.value,
            "i": order.order_id,
            "l": plain(trade.qty) if trade else "0",
            "z": plain(order.executed_qty),
            "L": plain(trade.price) if trade else "0",
            "n": plain(trade.commission) if trade else "0",
            "N": trade.commission_asset if trade else "USDT",
            "T": now_ms,
            "t": trade.trade_id if trade else 0,
            "b": plain(bids),
            "a": plain(asks),
            "m": trade.maker if trade else False,
            "R": order.reduce_only,
            "wt": "CONTRACT_PRICE",
            "ot": order.type,
            "ps": "BOTH",
            "cp": False,
            "rp": plain(trade.realized_pnl) if trade else "0",
            "pP": False,
            "si": 0,
            "ss": 0,
            "V": "NONE",
            "pm": "NONE",
            "gtd": 0,
        },
    }


def balance(asset: str, wallet: Decimal, change: Decimal = Decimal(0)) -> dict[str, str]:
    return {"a": asset, "wb": plain(wallet), "cw": plain(wallet), "bc": plain(change)}


def position(view: PositionView) -> dict[str, str]:
    return {
        "s": view.symbol,
        "pa": plain(view.amount),
        "ep": plain(view.entry_price),
        "bep": plain(view.entry_price),
        "cr": plain(view.realized),
        "up": plain(view.unrealized),
        "mt": "cross",
        "iw": "0",
        "ps": "BOTH",
    }


def account_update(
    *,
    reason: str,
    now_ms: int,
    balances: list[dict[str, str]],
    positions: list[dict[str, str]],
) -> dict[str, Any]:
    return {
        "e": "ACCOUNT_UPDATE",
        "E": now_ms,
        "T": now_ms,
        "a": {"m": reason, "B": balances, "P": positions},
    }


def listen_key_expired(listen_key: str, now_ms: int) -> dict[str, Any]:
    return {"e": "listenKeyExpired", "E": str(now_ms), "listenKey": listen_key}
