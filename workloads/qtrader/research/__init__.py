"""Research on the models: labelled datasets from candles and the evaluation of predictions.

Below the backtest (which labels and scores its runs with it), above inference (it reads the
feature windows and the model's classes); the runtime never imports it.
"""
