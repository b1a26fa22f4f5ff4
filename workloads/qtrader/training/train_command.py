"""``qtrader model train``: the command around ``training`` (imports torch: the train extra).

Input problems (kline files that break the format, too little data for the folds, an output that
is not a card path) print one line saying what is wrong and exit 2. A finished run prints the
card's figures (``backtest.report.format_card``) and how long it took, and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import TextIO

from qtrader.backtest.report import format_card
from qtrader.marketdata.csv_replay import KlineFormatError
from qtrader.training.training import TrainingConfig, train_and_export


def run_train(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    if args.output.suffix not in (".json", ".onnx"):
        print(
            f"qtrader model train: --output must name the card, NAME.json: {args.output}",
            file=err,
        )
        return 2
    if args.csv and (args.symbols or args.candles):
        print("qtrader model train: --symbols and --candles apply to synthetic data only", file=err)
        return 2
    overrides = {
        "epochs": args.epochs,
        "folds": args.folds,
        "symbols": tuple(args.symbols) if args.symbols else None,
        "candles_per_symbol": args.candles,
    }
    config = dataclasses.replace(
        TrainingConfig(seed=args.seed, csv_files=tuple(args.csv)),
        **{key: value for key, value in overrides.items() if value is not None},
    )
    started = time.perf_counter()
    try:
        card = train_and_export(config, output=args.output)
    except (KlineFormatError, ValueError) as exc:
        print(f"qtrader model train: {exc}", file=err)
        return 2
    print(format_card(card), file=out)
    print(
        f"wrote {args.output.with_suffix('.json')} and its members in "
        f"{time.perf_counter() - started:.0f} s",
        file=out,
    )
    return 0
