"""Backtests on the live code path: ``run_backtest`` and the ``qtrader backtest`` command."""
