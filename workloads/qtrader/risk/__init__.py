"""Risk: the automatic trip evaluators that turn market, portfolio and order events into alerts."""

from __future__ import annotations

from qtrader.risk.evaluators import (
    DrawdownEvaluator,
    ErrorRateEvaluator,
    FlashCrashEvaluator,
    StaleDataEvaluator,
    is_execution_error,
)

__all__ = [
    "DrawdownEvaluator",
    "ErrorRateEvaluator",
    "FlashCrashEvaluator",
    "StaleDataEvaluator",
    "is_execution_error",
]
