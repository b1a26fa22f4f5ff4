"""Text tables of backtest figures and of a model card's measurements (the same rows for both)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal

from qtrader.inference.card import BacktestFigures, ClassificationMetrics, ModelCard


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _money(value: Decimal) -> str:
    return f"{value:,.2f} USDT"


def backtest_rows(figures: BacktestFigures) -> list[tuple[str, str]]:
    """(label, value) rows, the same for ``qtrader backtest`` and a card's folds."""
    per_year = figures.periods_per_year
    denials = ", ".join(f"{reason} {count}" for reason, count in figures.denials.items())
    halted = "no" if figures.halted_at_ms is None else f"at {_time(figures.halted_at_ms)} UTC"
    return [
        (
            "range",
            f"{_time(figures.start_ms)} -> {_time(figures.end_ms)} UTC, {figures.steps} steps",
        ),
        ("initial capital", _money(figures.initial_capital)),
        ("final equity", _money(figures.final_equity)),
        ("return", f"{figures.return_pct:+.2f} %"),
        ("max drawdown", f"{figures.max_drawdown_pct:.2f} %"),
        (
            "Sharpe",
            f"{_number(figures.sharpe)} (per-candle equity returns x sqrt({per_year:g} "
            "candles/year), risk-free 0)",
        ),
        ("realized PnL", _money(figures.realized_pnl)),
        ("unrealized PnL", _money(figures.unrealized_pnl)),
        ("fees", _money(figures.fees)),
        ("signals", str(figures.signals)),
        (
            "directional signals",
            f"{figures.directional_signals} above the confidence threshold, hit rate "
            f"{_ratio(figures.signal_hit_rate)}",
        ),
        ("orders", f"{figures.orders} ({figures.unfilled_orders} without a fill)"),
        ("trades (fills)", str(figures.trades)),
        (
            "win rate",
            f"{_ratio(figures.win_rate)} of {figures.reducing_trades} position-reducing fills",
        ),
        ("denied signals", denials or "none"),
        ("halted (drawdown)", halted),
    ]


def format_rows(rows: list[tuple[str, str]], *, indent: str = "  ") -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{indent}{label:<{width}}  {value}" for label, value in rows)


def _classification(metrics: ClassificationMetrics) -> str:
    return (
        f"accuracy {metrics.accuracy:.3f}  log loss {metrics.log_loss:.4f}  "
        f"Brier {metrics.brier_score:.4f}  ECE {metrics.expected_calibration_error:.4f}  "
        f"hit rate {_ratio(metrics.hit_rate)} of {metrics.directional_signals}"
    )


def format_card(card: ModelCard) -> str:
    """What ``qtrader model train`` prints: the ensemble, each fold and the overall figures."""
    evaluation = card.evaluation
    data = card.training
    lines = [
        f"model {card.model_version}: {' + '.join(m.name for m in card.members)}, "
        f"mean probability, opset {', '.join(str(m.opset) for m in card.members)}",
        f"data: {data.source}, {', '.join(data.symbols)} ({data.interval}), "
        f"{_time(data.start_ms)} -> {_time(data.end_ms)} UTC, {data.examples} examples, "
        f"labels {data.label_horizon_candles} candles ahead net of {data.label_cost_bps:g} bps",
        f"walk-forward: {data.folds} folds after the first {data.initial_train_fraction:.0%}; "
        f"the last fold is the shipped members' held-out test; confidence threshold "
        f"{evaluation.policy.risk.min_confidence}",
    ]
    for fold in evaluation.folds:
        lines.append(
            f"fold {fold.index} ({_time(fold.test_from_ms)} -> {_time(fold.test_to_ms)} UTC, "
            f"trained on {fold.train_examples}):"
        )
        lines.append(f"  ensemble  {_classification(fold.ensemble)}")
        for name, metrics in fold.members.items():
            lines.append(f"  {name:<8}  {_classification(metrics)}")
        lines.append(
            f"  baseline  accuracy {fold.baseline.majority_class_accuracy:.3f}  "
            f"log loss {fold.baseline.prior_log_loss:.4f}; members agree on "
            f"{fold.agreement_rate:.1%}"
        )
        lines.append(_backtest_line(fold.backtest))
    overall = evaluation.overall
    lines.append("overall (every fold's held-out predictions; one backtest over all folds):")
    lines.append(f"  ensemble  {_classification(overall.ensemble)}")
    for name, metrics in overall.members.items():
        lines.append(f"  {name:<8}  {_classification(metrics)}")
    lines.append(f"  members agree on {overall.agreement_rate:.1%}")
    lines.append(_backtest_line(overall.backtest))
    return "\n".join(lines)


def _backtest_line(figures: BacktestFigures) -> str:
    return (
        f"  backtest  return {figures.return_pct:+.2f} %  Sharpe {_number(figures.sharpe)}  "
        f"max drawdown {figures.max_drawdown_pct:.2f} %  {figures.trades} trades  "
        f"fees {figures.fees:,.2f}  win rate {_ratio(figures.win_rate)}"
    )
