"""Training the ensemble (torch, exported to ONNX) and the ``qtrader train`` command: above the
backtest, which judges candidate models walk-forward. Never imported by a workload.
"""
