"""``qtrader bench NAME``: the arguments of each benchmark, and the one to run.

The runtime's command line makes the ``bench`` parser and finds this module through the
entry point ``qtrader.commands`` (tools/pyproject.toml); each benchmark module is imported only
when it runs.
"""

from __future__ import annotations

import argparse
import sys

from qtrader.commands.args import Commands, integer, json_output, short_seconds, whole

_bench_duration = short_seconds("--duration")


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """One subcommand per benchmark: an unknown NAME exits 2 with the list of names."""
    names = bench.add_subparsers(dest="bench_name", required=True, metavar="NAME")
    _halt_limiter_outbox(names)
    _suite_bench_commands(names)


def _halt_limiter_outbox(names: Commands) -> None:
    halt = names.add_parser(
        "halt", help="trip -> every execution worker acknowledged, vs a NATS fan-out round trip"
    )
    halt.add_argument(
        "--trips",
        type=integer(minimum=1, maximum=100_000),
        default=200,
        help="trips measured (default %(default)s), and as many baseline rounds",
    )
    halt.add_argument(
        "--workers",
        type=integer(minimum=1, maximum=16),
        default=4,
        help="execution worker processes (default %(default)s), and as many echo processes",
    )
    _bench_json(halt)
    limiter = names.add_parser(
        "limiter",
        help="rate limiter: Redis-shared vs in-process acquire, and a two-process flood against "
        "the local Binance simulator vs one raw client",
    )
    limiter.add_argument(
        "--requests",
        type=integer(minimum=100, maximum=1_000_000),
        default=5000,
        help="HTTP requests sent by each of the 2 flood processes (default %(default)s)",
    )
    limiter.add_argument(
        "--duration",
        type=_bench_duration,
        default=3.0,
        help="seconds each rate is timed: the two acquire loops and the raw client "
        "(default %(default)s)",
    )
    _bench_json(limiter)
    outbox = names.add_parser(
        "outbox",
        help="disk outbox: buffering vs raw SQLite inserts, replay vs raw JetStream publishes, "
        "and N events across a broker outage (none lost, none duplicated, in order)",
    )
    outbox.add_argument(
        "--events",
        type=integer(minimum=100, maximum=1_000_000),
        default=20_000,
        help="events published in each phase (default %(default)s)",
    )
    outbox.add_argument(
        "--outage",
        type=short_seconds("--outage"),
        default=2.0,
        help="seconds the broker stays down in the end-to-end run (default %(default)s)",
    )
    _bench_json(outbox)


def _bench_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        type=json_output,
        metavar="PATH",
        help="also write the figures (the last line's JSON object) to this file",
    )


def _suite_bench_commands(names: Commands) -> None:
    """``pipeline``, ``pnl``, ``inference`` and ``all`` (every benchmark in turn)."""
    pipeline = names.add_parser(
        "pipeline",
        help="candles -> signals -> order decisions through real worker processes, per second, "
        "vs raw nats-py JetStream publish and pull-consume",
    )
    pipeline.add_argument(
        "--candles",
        type=integer(minimum=10, maximum=100_000),
        default=1000,
        help="steps in the throughput run, one candle per symbol each (default %(default)s)",
    )
    pipeline.add_argument(
        "--symbols",
        type=integer(minimum=1, maximum=20),
        default=4,
        help="symbols, the paper exchange's first N of its 20 (default %(default)s)",
    )
    _bench_json(pipeline)
    pnl = names.add_parser(
        "pnl", help="PnL replay of N fills through the Decimal ledger vs the same in floats"
    )
    pnl.add_argument(
        "--fills",
        type=integer(minimum=1000, maximum=10_000_000),
        default=1_000_000,
        help="fills replayed (default %(default)s)",
    )
    pnl.add_argument("--seed", type=whole, default=7, help="of the fill tape (default 7)")
    _bench_json(pnl)
    inference = names.add_parser(
        "inference", help="onnxruntime vs torch eager: single-sample p50/p99, batch throughput"
    )
    inference.add_argument(
        "--samples",
        type=integer(minimum=10, maximum=1_000_000),
        default=2000,
        help="single-sample predictions timed (default %(default)s)",
    )
    inference.add_argument(
        "--batch",
        type=integer(minimum=1, maximum=4096),
        default=64,
        help="rows per batch in the throughput run (default %(default)s)",
    )
    _bench_json(inference)
    backtest = names.add_parser(
        "backtest",
        help="the streamed backtest in candles/s beside the vectorised floor, the per-candle "
        "engine and backtrader (if installed); growth with candles and symbols",
    )
    backtest.add_argument(
        "--candles",
        type=integer(minimum=1000, maximum=1_000_000),
        default=50_000,
        help="1m candles per symbol (default %(default)s)",
    )
    backtest.add_argument(
        "--symbols",
        type=integer(minimum=1, maximum=16),
        default=4,
        help="symbols, the paper exchange's first N (default %(default)s)",
    )
    backtest.add_argument(
        "--repeats", type=integer(minimum=1, maximum=20), default=3, help="(default 3)"
    )
    backtest.add_argument(
        "--no-growth", action="store_true", help="skip the growth tables and the memory runs"
    )
    _bench_json(backtest)
    every = names.add_parser(
        "all", help="every benchmark in turn, a summary table, all figures in one JSON object"
    )
    every.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    _bench_json(every)


def run(args: argparse.Namespace) -> int:
    # argparse refused any other NAME; each benchmark is imported only when it runs.
    if args.bench_name == "limiter":
        from qtrader_tools.benchmarks import limiter

        return limiter.run(requests=args.requests, duration_s=args.duration, json_path=args.json)
    if args.bench_name == "outbox":
        from qtrader_tools.benchmarks import outbox

        return outbox.run(events=args.events, outage_s=args.outage, json_path=args.json)
    if args.bench_name in ("pipeline", "pnl", "inference", "backtest", "all"):
        return _run_suite_bench(args)
    from qtrader_tools.benchmarks import halt

    return halt.run(trips=args.trips, workers=args.workers, json_path=args.json)


def _run_suite_bench(args: argparse.Namespace) -> int:
    if args.bench_name == "pipeline":
        from qtrader_tools.benchmarks import pipeline

        return pipeline.run(candles=args.candles, symbols=args.symbols, json_path=args.json)
    if args.bench_name == "pnl":
        from qtrader_tools.benchmarks import pnl

        return pnl.run(fills=args.fills, seed=args.seed, json_path=args.json)
    if args.bench_name == "inference":
        try:
            from qtrader_tools.benchmarks import inference  # type: ignore[attr-defined,unused-ignore]
        except ImportError as exc:
            print(f"qtrader bench inference: not available: {exc}", file=sys.stderr)
            return 1
        code: int = inference.run(samples=args.samples, batch=args.batch, json_path=args.json)
        return code
    if args.bench_name == "backtest":
        from qtrader_tools.benchmarks import backtest

        return backtest.run(
            candles=args.candles,
            symbols=args.symbols,
            repeats=args.repeats,
            growth=not args.no_growth,
            json_path=args.json,
        )
    from qtrader_tools.benchmarks import suite

    return suite.run(json_path=args.json, quick=args.quick)
