"""``qtrader bench inference``: onnxruntime (what the inference workload runs) vs torch eager, on
the same weights.

The members are built by the training code (``inference.training``): an MLP and a temporal
convolution, each trained for one epoch on a small seeded synthetic market (the weights only
have to be real ones; speed does not depend on their values), then exported to ONNX by the same
export the shipped model went through and opened with ``MemberSession``, the serving code. The
baseline is the very torch module the graph was exported from, in eval mode under
``torch.no_grad()``. Both run on one thread (the serving sessions' setting; torch is pinned to
one thread for the run), on real feature rows of held-out candles.

Figures, per member and for the ensemble (both members and the mean of their probabilities,
``Ensemble.predict`` against the same done with the torch modules):

* single-sample latency, p50 and p99 over ``samples`` one-row predictions; onnxruntime and torch
  alternate row by row, so both see the same machine;
* batch throughput: rows per second of ``batch``-row predictions, over the same number of rows
  for both.

Each figure stands beside its torch baseline with the ratio (how many times faster onnxruntime
is: baseline latency / latency, throughput / baseline throughput). Exit 0 when every member's
and the ensemble's onnxruntime output matches torch within 1e-5; 1 when it does not, or when
torch is missing (the ``train`` extra). The last line of the output is one JSON object.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from numpy.typing import NDArray

from qtrader_tools.benchmarks.harness import percentile, report

TOLERANCE = 1e-5
SEED = 11
WARMUP = 50
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
CANDLES = 600

Predict = Callable[[Any], NDArray[np.float32]]


@dataclass(frozen=True)
class Pair:
    """One model both ways: onnxruntime and its torch baseline, on the same inputs."""

    name: str
    ort: Predict
    torch: Predict


def run(
    *, samples: int = 2000, batch: int = 64, json_path: Path | None = None, out: TextIO = sys.stdout
) -> int:
    """Run the benchmark, print the table and the JSON line; the exit code of ``qtrader bench``."""
    if samples < 1 or batch < 1:
        raise ValueError(f"samples and batch must be >= 1, got {samples} and {batch}")
    try:
        import torch

        from qtrader.training import training
    except ImportError as exc:
        print(
            "qtrader bench inference: needs torch, the train extra "
            f"(pip install -e '.[train]'): {exc}",
            file=sys.stderr,
        )
        return 1
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pairs, rows = _build(training)
        result = _measure(pairs, rows, samples=samples, batch=batch)
    finally:
        torch.set_num_threads(threads)
    result["wall_s"] = round(time.monotonic() - started, 3)
    result["torch_version"] = torch.__version__
    return report(
        "inference", result, render=render, verdict=_verdict, json_path=json_path, out=out
    )


def _verdict(result: dict[str, Any]) -> str | None:
    if result["parity_ok"]:
        return None
    return f"onnxruntime differs from torch by more than {TOLERANCE}"


def _build(training: Any) -> tuple[list[Pair], Any]:
    """The members (trained one epoch, exported, opened as the service opens them) and the
    held-out rows to feed them."""
    import torch

    from qtrader.backtest.data import synthetic_series
    from qtrader.backtest.policy import evaluation_policy
    from qtrader.inference.onnx_model import Ensemble, combine
    from qtrader.research.dataset import LABEL_HORIZON, examples_from_candles, round_trip_cost_bps

    series = synthetic_series(symbols=SYMBOLS, candles=CANDLES, seed=SEED)
    cost = round_trip_cost_bps(evaluation_policy(SYMBOLS).paper)
    examples = examples_from_candles(series, horizon=LABEL_HORIZON, cost_bps=cost)
    split = int(len(examples) * 0.7)
    train, held_out = (
        examples.take(np.arange(split)),
        examples.take(np.arange(split, len(examples))),
    )
    members = []
    for index, architecture in enumerate(training.ARCHITECTURES):
        net = training.train_member(
            architecture, train, seed=training.member_seed(SEED, 0, index), epochs=1
        )
        data = training.export_member(
            net, architecture.input_kind, training.view(train.inputs, architecture.input_kind)
        )
        members.append(training.TrainedMember(architecture, net, data))
    sessions = [member.session() for member in members]
    ensemble = Ensemble(version="bench", members=sessions)
    pairs = [
        Pair(member.architecture.name, session.run, _torch_predict(torch, training, member))
        for member, session in zip(members, sessions, strict=True)
    ]
    torch_members = [pair.torch for pair in pairs]
    pairs.append(
        Pair(
            "ensemble",
            lambda inputs: ensemble.predict(inputs).probabilities,
            lambda inputs: combine([predict(inputs) for predict in torch_members]),
        )
    )
    return pairs, held_out.inputs


def _torch_predict(torch: Any, training: Any, member: Any) -> Predict:
    net, kind = member.net, member.architecture.input_kind

    def predict(inputs: Any) -> NDArray[np.float32]:
        with torch.no_grad():
            view = np.ascontiguousarray(training.view(inputs, kind))
            probabilities: NDArray[np.float32] = net(torch.from_numpy(view)).numpy()
        return probabilities

    return predict


def _measure(pairs: list[Pair], rows: Any, *, samples: int, batch: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "inference",
        "samples": samples,
        "batch": batch,
        "threads": 1,
        "held_out_rows": rows.rows,
    }
    parity_ok = True
    for pair in pairs:
        figures = _measure_pair(pair, rows, samples=samples, batch=batch)
        parity_ok = parity_ok and figures["max_abs_diff"] <= TOLERANCE
        result.update({f"{pair.name}_{key}": value for key, value in figures.items()})
    result["parity_ok"] = parity_ok
    return result


def _measure_pair(pair: Pair, rows: Any, *, samples: int, batch: int) -> dict[str, float]:
    n = rows.rows
    batch_rows = rows.take(np.arange(batch) % n)
    difference = float(np.abs(pair.ort(batch_rows) - pair.torch(batch_rows)).max())
    singles = [rows.take(slice(i % n, i % n + 1)) for i in range(max(samples, WARMUP))]
    for row in singles[:WARMUP]:
        pair.ort(row)
        pair.torch(row)
    ort_ns, torch_ns = [], []
    for i, row in enumerate(singles[:samples]):
        first, second = (pair.ort, pair.torch) if i % 2 == 0 else (pair.torch, pair.ort)
        timings = []
        for predict in (first, second):
            began = time.perf_counter_ns()
            predict(row)
            timings.append(time.perf_counter_ns() - began)
        ort, base = timings if i % 2 == 0 else timings[::-1]
        ort_ns.append(ort)
        torch_ns.append(base)
    repeats = max(10, samples // 10)
    return {
        "ort_p50_us": _percentile_us(ort_ns, 50),
        "ort_p99_us": _percentile_us(ort_ns, 99),
        "torch_p50_us": _percentile_us(torch_ns, 50),
        "torch_p99_us": _percentile_us(torch_ns, 99),
        "ort_rows_per_s": _throughput(pair.ort, batch_rows, repeats),
        "torch_rows_per_s": _throughput(pair.torch, batch_rows, repeats),
        "max_abs_diff": difference,
    }


def _percentile_us(values: list[int], q: float) -> float:
    return round(percentile(values, q) / 1000, 2)


def _throughput(predict: Predict, batch_rows: Any, repeats: int) -> float:
    predict(batch_rows)  # warm
    began = time.perf_counter()
    for _ in range(repeats):
        predict(batch_rows)
    elapsed = time.perf_counter() - began
    return round(float(batch_rows.rows * repeats / elapsed), 1)


def render(result: dict[str, Any]) -> str:
    """The table: each onnxruntime figure beside its torch baseline and their ratio."""
    batch = result["batch"]
    lines = [
        f"qtrader bench inference: onnxruntime vs torch eager (baseline), same weights, 1 thread "
        f"each; {result['samples']} single-row predictions, batches of {batch}",
        f"{'figure':<38}  {'onnxruntime':>14}  {'torch eager':>14}  {'ratio':>7}",
    ]
    for name in ("mlp", "tcn", "ensemble"):
        for label, key, faster_when_lower in (
            ("single-row p50 (us)", "p50_us", True),
            ("single-row p99 (us)", "p99_us", True),
            (f"batch-{batch} throughput (rows/s)", "rows_per_s", False),
        ):
            ort, base = result[f"{name}_ort_{key}"], result[f"{name}_torch_{key}"]
            ratio = (base / ort if faster_when_lower else ort / base) if ort and base else 0.0
            lines.append(f"{name + ' ' + label:<38}  {ort:>14,.2f}  {base:>14,.2f}  {ratio:>6.2f}x")
    differences = ", ".join(
        f"{name} {result[f'{name}_max_abs_diff']:.1e}" for name in ("mlp", "tcn", "ensemble")
    )
    verdict = "ok" if result["parity_ok"] else "FAILED"
    lines.append(
        f"ratio: how many times faster onnxruntime is. Parity (max |onnxruntime - torch|, "
        f"tolerance {TOLERANCE:g}): {differences}: {verdict}"
    )
    return "\n".join(lines)
