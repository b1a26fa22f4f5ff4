"""The wallet reconciliation: the venue's USDT wallet against the ledger's, at settled moments.

Execution publishes a ``VenueAccount`` when a read of the venue's account is settled (see
``qtrader.execution.venue_account``): everything the wallet held then is on FILLS at or before
``fills_through``. The portfolio compares it with its ledger as of exactly that sequence (held
until the ledger gets there; one the ledger has passed already is not comparable and dropped):

- the wallet: the venue's USDT walletBalance against the ledger's USDT wallet, capital +
  realized PnL - the fees paid *in USDT* + USDT funding, transfers and other income
  (``Ledger.usdt_wallet``): a commission paid in BNB is not paid from the USDT wallet;
- the unrealized PnL, when the venue's positions equal the ledger's (else the positions'
  reconciliation has the difference): the venue's against the ledger's at the venue's own marks
  (each position's quantity x mark - its exact cost basis), which checks every entry price.

A difference beyond one cent is not yet an alert: a venue may show an income row a while after
the money moved. It is one once settled reads have shown a difference at least twice in a row,
``grace_s`` apart or more, with no agreeing read between: then a ``wallet_reconciliation`` risk
alert with the figures (once per episode; an agreeing read ends it), ``qtrader_wallet_mismatch``
is 1 and ``/health`` (wallet) is DEGRADED naming both amounts.

Why the alert trips the EmergencyStop to Reducing by default (``ALWAYS_TRIPS``), as the
position's reconciliation does: the ledger's equity is what every order is sized on and what
the drawdown trigger watches, and money no fill and no income row explains means that figure is
wrong by an unknown cause (a venue fee type the contract does not know, a liquidation, someone
else's hand on the account). Reducing still closes risk and adds none until a person has looked;
the rule above is what keeps it from tripping on a row that is only late.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from prometheus_client import Counter, Gauge

from qtrader.contracts.messages import RiskAlert, RiskAlertKind, VenueAccount
from qtrader.health.contract import DependencyHealth, Status
from qtrader.portfolio.ledger import Ledger

log = logging.getLogger(__name__)

CENT = Decimal("0.01")
_SHOWN = Decimal("1e-8")
_MAX_PENDING = 64  # settled reads held for a ledger behind them; older ones are dropped
NAME = "wallet"

WALLET_COMPARISONS = Counter(
    "qtrader_wallet_reconciliations_total",
    "Settled reads of the venue's account compared with the ledger, by outcome: agrees, differs "
    "(beyond one cent), passed (the ledger was past the read's FILLS sequence: not comparable).",
    ["outcome"],
)
WALLET_MISMATCH = Gauge(
    "qtrader_wallet_mismatch",
    "1 while the venue's USDT wallet (or unrealized PnL) has differed from the ledger's over "
    "settled reads for longer than the grace: money no fill and no income row explains.",
)
WALLET_DIFFERENCE = Gauge(
    "qtrader_wallet_difference_usd",
    "The venue's USDT wallet less the ledger's at the last settled read.",
)


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """One settled read against the ledger as of its FILLS sequence, exact."""

    ts_ms: int
    sequence: int
    venue_wallet: Decimal
    ledger_wallet: Decimal
    # None when the positions differ: then the unrealized PnL is not comparable.
    venue_unrealized: Decimal | None
    ledger_unrealized: Decimal | None

    @property
    def wallet_difference(self) -> Decimal:
        return self.venue_wallet - self.ledger_wallet

    @property
    def unrealized_difference(self) -> Decimal:
        if self.venue_unrealized is None or self.ledger_unrealized is None:
            return Decimal(0)
        return self.venue_unrealized - self.ledger_unrealized

    @property
    def differs(self) -> bool:
        return abs(self.wallet_difference) > CENT or abs(self.unrealized_difference) > CENT

    def __str__(self) -> str:
        text = f"wallet: venue {_show(self.venue_wallet)}, ledger {_show(self.ledger_wallet)}"
        if self.venue_unrealized is not None and self.ledger_unrealized is not None:
            text += (
                f"; unrealized PnL at the venue's marks: venue {_show(self.venue_unrealized)}, "
                f"ledger {_show(self.ledger_unrealized)}"
            )
        return f"{text} (FILLS sequence {self.sequence})"


def compare(read: VenueAccount, ledger: Ledger) -> Comparison:
    """``read`` against ``ledger``, which must be as of ``read.fills_through``."""
    venue_positions = {p.symbol: p.quantity for p in read.positions}
    comparable = venue_positions == dict(ledger.positions)
    return Comparison(
        ts_ms=read.ts_ms,
        sequence=read.fills_through,
        venue_wallet=read.wallet,
        ledger_wallet=ledger.usdt_wallet,
        venue_unrealized=sum((p.unrealized_pnl for p in read.positions), Decimal(0))
        if comparable
        else None,
        ledger_unrealized=ledger.unrealized_at({p.symbol: p.mark_price for p in read.positions})
        if comparable
        else None,
    )


class WalletCheck:
    """Holds settled reads until the ledger reaches their sequence, compares, and decides."""

    def __init__(self, *, grace_s: float, source: str) -> None:
        self._grace_ms = int(grace_s * 1000)
        self._source = source
        self._pending: dict[int, VenueAccount] = {}  # by fills_through
        self._last: Comparison | None = None
        self._first_differing: Comparison | None = None  # the current episode's first
        self._differing_reads = 0
        self._alerted = False

    def offer(self, read: VenueAccount, ledger: Ledger | None, through: int) -> RiskAlert | None:
        """A settled read arrived; the ledger (None before it starts) is as of ``through``."""
        if ledger is None or read.fills_through < through:
            WALLET_COMPARISONS.labels("passed").inc()
            return None
        self._pending[read.fills_through] = read
        while len(self._pending) > _MAX_PENDING:
            self._pending.pop(min(self._pending))
            WALLET_COMPARISONS.labels("passed").inc()
        return self.reached(ledger, through)

    def reached(self, ledger: Ledger, through: int) -> RiskAlert | None:
        """The ledger is as of FILLS sequence ``through`` now: compare the read held for it."""
        passed = [s for s in self._pending if s < through]
        for sequence in passed:
            del self._pending[sequence]
            WALLET_COMPARISONS.labels("passed").inc()
        read = self._pending.pop(through, None)
        if read is None:
            return None
        return self._judge(compare(read, ledger))

    def _judge(self, comparison: Comparison) -> RiskAlert | None:
        self._last = comparison
        WALLET_DIFFERENCE.set(float(comparison.wallet_difference))
        if not comparison.differs:
            WALLET_COMPARISONS.labels("agrees").inc()
            if self._alerted:
                log.warning("wallet agrees with the venue again: %s", comparison)
            self._first_differing, self._differing_reads, self._alerted = None, 0, False
            WALLET_MISMATCH.set(0)
            return None
        WALLET_COMPARISONS.labels("differs").inc()
        first = self._first_differing or comparison
        self._first_differing = first
        self._differing_reads += 1
        lasted = comparison.ts_ms - first.ts_ms
        if self._alerted:
            log.debug("wallet still differs from the venue (alerted): %s", comparison)
            return None
        if self._differing_reads < 2 or lasted < self._grace_ms:
            log.info("wallet differs from the venue (not yet persistent): %s", comparison)
            return None
        self._alerted = True
        WALLET_MISMATCH.set(1)
        return self._alert(comparison, lasted)

    def _alert(self, comparison: Comparison, lasted_ms: int) -> RiskAlert:
        detail = (
            f"{comparison}: money no fill and no income row explains, over "
            f"{self._differing_reads} settled reads in {lasted_ms / 1000:.0f} s"
        )
        log.error("wallet reconciliation: %s", detail)
        return RiskAlert(
            alert_id=f"wallet:{self._source}:{comparison.ts_ms}"[:128],
            alert_kind=RiskAlertKind.WALLET_RECONCILIATION,
            source=self._source,
            value=_shown(comparison.venue_wallet),
            threshold=_shown(comparison.ledger_wallet),
            detail=detail[:1024],
            ts_ms=comparison.ts_ms,
        )

    def health(self) -> DependencyHealth:
        last = self._last
        if last is None:
            return DependencyHealth(name=NAME, status=Status.OK, detail="nothing compared yet")
        if self._alerted:
            detail = f"differs from the venue over {self._differing_reads} settled reads: {last}"
            return DependencyHealth(name=NAME, status=Status.DEGRADED, detail=detail[:512])
        state = "differs (not yet persistent)" if last.differs else "agrees with the venue"
        return DependencyHealth(name=NAME, status=Status.OK, detail=f"{state}: {last}"[:512])


def _shown(value: Decimal) -> Decimal:
    return value.quantize(_SHOWN, rounding=ROUND_HALF_UP)


def _show(value: Decimal) -> str:
    return f"{_shown(value):f}"
