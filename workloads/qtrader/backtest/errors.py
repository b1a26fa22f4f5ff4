"""The backtest's one error type, apart from the heavy engine so that the light modules (the
blocks and the prediction process) can raise it."""

from __future__ import annotations


class BacktestError(ValueError):
    """Input a backtest cannot run on; the message says what is wrong."""
