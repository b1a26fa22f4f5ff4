"""Where a starting portfolio begins: the newest checkpoint it can use, or the first fill.

A checkpoint is the exact ledger after every fill of FILLS through one stream sequence
(``PortfolioCheckpoint``). The newest is tried first; one that does not decode, was written for
another initial capital (the policy changed it: a full replay is what the new capital means), or
does not restore is passed over for the one before it, and with none left the portfolio replays
FILLS from the first message. Each fallback is said in the log and in ``Start.note``, which the
portfolio's ``/health`` shows (DEGRADED until it has written a checkpoint of its own).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import PortfolioCheckpoint, Undecodable
from qtrader.instruments import ExchangeInfo
from qtrader.portfolio.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Start:
    ledger: Ledger
    fills_through: int  # FILLS is replayed after this sequence
    skipped: tuple[int, ...]  # sequences passed over on a person's word, before this start
    note: str  # how it started, for /health
    fell_back: bool  # a newer checkpoint could not be used


async def start_from_checkpoint(
    bus: Bus, *, initial_capital: Decimal, exchange: ExchangeInfo
) -> Start:
    newest = await bus.last_message(
        subjects.CHECKPOINTS, subjects.PORTFOLIO_CHECKPOINT, PortfolioCheckpoint
    )
    if newest is None:
        ledger = Ledger(initial_capital=initial_capital, exchange=exchange)
        return Start(
            ledger=ledger, fills_through=0, skipped=(), note="no checkpoint yet", fell_back=False
        )
    passed_over = [] if not isinstance(newest, Undecodable) else [f"the newest {newest}"]
    stored = await bus.stored_messages(
        subjects.CHECKPOINTS, subjects.PORTFOLIO_CHECKPOINT, PortfolioCheckpoint
    )
    for checkpoint in reversed(stored):
        why_not = _unusable(checkpoint, initial_capital)
        if why_not is None:
            try:
                ledger = Ledger.restore(checkpoint, exchange=exchange)
            except ValueError as exc:
                why_not = f"does not restore: {exc}"
            else:
                return _started(ledger, checkpoint, passed_over)
        through = checkpoint.fills_through
        passed_over.append(f"the checkpoint through FILLS sequence {through} {why_not}")
    for reason in passed_over:
        log.error("portfolio start: passed over %s", reason)
    note = "replayed FILLS from the first: passed over " + "; ".join(passed_over)
    ledger = Ledger(initial_capital=initial_capital, exchange=exchange)
    return Start(ledger=ledger, fills_through=0, skipped=(), note=note, fell_back=True)


def _unusable(checkpoint: PortfolioCheckpoint, initial_capital: Decimal) -> str | None:
    if checkpoint.initial_capital != initial_capital:
        return (
            f"was written for an initial capital of {checkpoint.initial_capital}, "
            f"the policy says {initial_capital}"
        )
    return None


def _started(ledger: Ledger, checkpoint: PortfolioCheckpoint, passed_over: list[str]) -> Start:
    note = f"restored the checkpoint through FILLS sequence {checkpoint.fills_through}"
    for reason in passed_over:
        log.error("portfolio start: passed over %s", reason)
    if passed_over:
        note += ", having passed over " + "; ".join(passed_over)
    log.info("portfolio start: %s (%d fills)", note, checkpoint.fills_applied)
    return Start(
        ledger=ledger,
        fills_through=checkpoint.fills_through,
        skipped=checkpoint.skipped,
        note=note,
        fell_back=bool(passed_over),
    )
