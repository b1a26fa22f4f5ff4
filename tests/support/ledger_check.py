"""The exact account of a fill stream (``qtrader_tools.exact``) and the last snapshot."""

from __future__ import annotations

from qtrader.contracts import subjects
from qtrader.contracts.messages import PortfolioSnapshot
from qtrader_tools.exact import cents, independent_portfolio
from support.streams import read_all

__all__ = ["cents", "independent_portfolio", "last_snapshot"]


async def last_snapshot(url: str) -> PortfolioSnapshot | None:
    """The newest snapshot stored (a restarted portfolio numbers its snapshots from 0 again)."""
    snapshots = await read_all(
        url,
        stream=subjects.PORTFOLIO.name,
        subject=subjects.PORTFOLIO_SNAPSHOT,
        message_type=PortfolioSnapshot,
    )
    return snapshots[-1] if snapshots else None
