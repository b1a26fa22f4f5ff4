"""The positions an EmergencyStop's status shows: what the portfolio holds in every stack it covers.

After a trip a person's first question is whether anything is still open, and after a trip that
flattens, whether the flatten finished. The status answers both in its ``PositionsOpen``
condition (``ess_conditions``) from the portfolio's latest snapshot of each covered stack: the
same figures the dashboards show, read from the one owner of positions. The execution workers'
``/health`` (``flatten``) and the ``QtraderFlattenUnfinished`` alert say the same from their side.

``follow`` reads each stack's PORTFOLIO stream from its last stored snapshot on (an ordered
consumer: nothing missed across a reconnect), so a control plane that starts knows the positions
at once; a stack whose portfolio never published one is Unknown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import PortfolioSnapshot

log = logging.getLogger(__name__)

FOLLOW_RETRY_S = 1.0
LOCAL_STACK = ""  # local mode's one stack, under the logical names


@dataclass(frozen=True, kw_only=True)
class StackPositions:
    """One stack's open positions (non-zero quantities, signed, by symbol) as of a snapshot."""

    stack: str  # LOCAL_STACK in local mode
    positions: tuple[tuple[str, Decimal], ...]
    as_of_ms: int


@dataclass(frozen=True, kw_only=True)
class PositionsSeen:
    """The positions of the stacks a stop covers: each known stack's, and those with none yet."""

    known: tuple[StackPositions, ...]
    missing: tuple[str, ...]  # covered stacks no snapshot has been seen of

    @property
    def open_count(self) -> int:
        return sum(len(s.positions) for s in self.known)


class OpenPositions:
    """The latest portfolio snapshot's positions of every stack, fed by ``on_snapshot``."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[tuple[int, int], StackPositions]] = {}

    async def follow(self, bus: Bus, stack: str) -> None:
        """Every snapshot of ``bus``'s stack from the last stored on, until cancelled."""

        async def on_snapshot(snapshot: PortfolioSnapshot) -> None:
            await self.on_snapshot(stack, snapshot)

        while True:
            try:
                await bus.replay(
                    subjects.PORTFOLIO,
                    subjects.PORTFOLIO_SNAPSHOT,
                    PortfolioSnapshot,
                    on_snapshot,
                    label="positions",
                    from_last=True,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away at the start: the positions stay as last seen
                log.warning("positions of %s not followed (%s); retrying", stack or "-", exc)
            await asyncio.sleep(FOLLOW_RETRY_S)

    async def on_snapshot(self, stack: str, snapshot: PortfolioSnapshot) -> None:
        """Keep the newest by the portfolio's own (time, sequence): a late one changes nothing."""
        order = (snapshot.ts_ms, snapshot.sequence)
        kept = self._latest.get(stack)
        if kept is not None and kept[0] >= order:
            return
        held = tuple(sorted((p.symbol, p.quantity) for p in snapshot.positions if p.quantity))
        self._latest[stack] = (
            order,
            StackPositions(stack=stack, positions=held, as_of_ms=snapshot.ts_ms),
        )

    def forget(self, stack: str) -> None:
        """A stack that is gone (its policy deleted)."""
        self._latest.pop(stack, None)

    def seen(self, stacks: Iterable[str]) -> PositionsSeen:
        covered = sorted(set(stacks))
        return PositionsSeen(
            known=tuple(self._latest[s][1] for s in covered if s in self._latest),
            missing=tuple(s for s in covered if s not in self._latest),
        )
