"""Reading Binance's kline archive files: header or not, zip or csv, bad rows, order, merging."""

from __future__ import annotations

import itertools
import zipfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.contracts.messages import Candle, CandleSource
from qtrader.marketdata.csv_replay import (
    KLINE_COLUMNS,
    KlineFormatError,
    infer_symbol_interval,
    merge_replays,
    read_klines,
)

HEADER = ",".join(KLINE_COLUMNS)
T0 = 1_704_067_200_000  # 2024-01-01T00:00Z
MINUTE = 60_000
EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "data"


def _row(open_time: int, /, **overrides: str) -> str:
    """One archive row with plausible values; ``overrides`` replace columns by name."""
    values = {
        "open_time": str(open_time),
        "open": "42000.10",
        "high": "42100.00",
        "low": "41900.50",
        "close": "42050.20",
        "volume": "12.345",
        "close_time": str(open_time + MINUTE - 1),
        "quote_volume": "518900.1234",
        "count": "321",
        "taker_buy_volume": "6.100",
        "taker_buy_quote_volume": "256400.0000",
        "ignore": "0",
    }
    values.update(overrides)
    return ",".join(values[column] for column in KLINE_COLUMNS)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _minutes(count: int) -> list[str]:
    return [_row(T0 + i * MINUTE) for i in range(count)]


def _replay(path: Path) -> Iterator[Candle]:
    symbol, interval = infer_symbol_interval(path)
    return read_klines(path, symbol=symbol, interval=interval)


def _read(path: Path) -> list[Candle]:
    return list(read_klines(path, symbol="BTCUSDT", interval="1m"))


def test_read_klines_when_file_has_header_then_skips_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "BTCUSDT-1m-2024-01.csv", [HEADER, *_minutes(3)])

    candles = _read(path)

    assert [c.open_time_ms for c in candles] == [T0, T0 + MINUTE, T0 + 2 * MINUTE]


def test_read_klines_when_file_has_no_header_then_reads_every_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "BTCUSDT-1m-2020-01.csv", _minutes(3))

    assert len(_read(path)) == 3


def test_read_klines_when_row_is_read_then_candle_carries_its_columns_exactly(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path / "BTCUSDT-1m-2024-01.csv", [HEADER, _row(T0)])

    (candle,) = _read(path)

    assert candle == Candle(
        symbol="BTCUSDT",
        interval="1m",
        open_time_ms=T0,
        close_time_ms=T0 + MINUTE - 1,
        open=Decimal("42000.10"),
        high=Decimal("42100.00"),
        low=Decimal("41900.50"),
        close=Decimal("42050.20"),
        volume=Decimal("12.345"),
        trades=321,
        source=CandleSource.REPLAY,
    )


def test_read_klines_when_file_is_zip_then_reads_the_csv_inside(tmp_path: Path) -> None:
    path = tmp_path / "BTCUSDT-1m-2024-01.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("BTCUSDT-1m-2024-01.csv", "\n".join([HEADER, *_minutes(4)]) + "\n")

    assert len(_read(path)) == 4


def test_read_klines_when_zip_holds_no_csv_then_raises(tmp_path: Path) -> None:
    path = tmp_path / "BTCUSDT-1m-2024-01.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.txt", "nothing here")

    with pytest.raises(KlineFormatError, match=r"exactly one \.csv"):
        _read(path)


def test_read_klines_when_zip_file_is_not_a_zip_then_raises_at_call(tmp_path: Path) -> None:
    path = _write(tmp_path / "BTCUSDT-1m-2024-01.zip", _minutes(1))

    with pytest.raises(KlineFormatError, match="not a zip file"):
        read_klines(path, symbol="BTCUSDT", interval="1m")


def test_read_klines_when_bad_row_is_in_zip_then_error_names_zip_member_and_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "BTCUSDT-1m-2024-01.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("BTCUSDT-1m-2024-01.csv", "\n".join([HEADER, _row(T0, open="x")]))

    with pytest.raises(KlineFormatError, match=r"\(BTCUSDT-1m-2024-01\.csv\), line 2: open"):
        _read(path)


def test_read_klines_when_row_has_wrong_column_count_then_error_names_file_and_line(
    tmp_path: Path,
) -> None:
    lines = [HEADER, *_minutes(2), _row(T0 + 2 * MINUTE) + ",extra"]
    path = _write(tmp_path / "BTCUSDT-1m-2024-01.csv", lines)

    with pytest.raises(KlineFormatError) as raised:
        _read(path)

    assert str(raised.value) == f"{path}, line 4: expected 12 columns, got 13"


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"open": "abc"}, "open is not a number: 'abc'"),
        ({"close": "NaN"}, "close is not a finite number"),
        ({"open_time": "1.5"}, "open_time is not an integer"),
        ({"count": "-3"}, "count is negative"),
        ({"quote_volume": "?"}, "quote_volume is not a number"),
        ({"high": "41000", "low": "41500"}, "high 41000 is below low 41500"),
        ({"high": "42010.00"}, "high 42010.00 is below open 42000.10 or close 42050.20"),
        ({"low": "42020.00"}, "low 42020.00 is above open 42000.10 or close 42050.20"),
        ({"open": "0", "low": "0"}, "open must be positive"),
        ({"volume": "-1"}, "volume must be non-negative"),
        ({"close_time": str(T0)}, f"close_time {T0} is before open_time {T0 + MINUTE}"),
    ],
)
def test_read_klines_when_row_is_invalid_then_error_names_line_and_problem(
    tmp_path: Path, overrides: dict[str, str], problem: str
) -> None:
    path = _write(
        tmp_path / "BTCUSDT-1m-2024-01.csv", [HEADER, _row(T0), _row(T0 + MINUTE, **overrides)]
    )

    with pytest.raises(KlineFormatError) as raised:
        _read(path)

    assert str(raised.value).startswith(f"{path}, line 3: ")
    assert problem in str(raised.value)


def test_read_klines_when_open_time_goes_backwards_then_raises(tmp_path: Path) -> None:
    lines = [_row(T0 + MINUTE), _row(T0 + 2 * MINUTE), _row(T0)]
    path = _write(tmp_path / "BTCUSDT-1m-2024-01.csv", lines)

    with pytest.raises(KlineFormatError, match=r"line 3: open_time \d+ goes back before"):
        _read(path)


def test_read_klines_when_open_time_repeats_then_raises(tmp_path: Path) -> None:
    path = _write(tmp_path / "BTCUSDT-1m-2024-01.csv", [_row(T0), _row(T0)])

    with pytest.raises(KlineFormatError, match=r"line 2: open_time \d+ repeats"):
        _read(path)


def test_read_klines_when_good_rows_precede_a_bad_one_then_yields_them_before_raising(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path / "BTCUSDT-1m-2024-01.csv", [*_minutes(2), "garbage"])
    replay = read_klines(path, symbol="BTCUSDT", interval="1m")

    first_two = list(itertools.islice(replay, 2))

    assert len(first_two) == 2
    with pytest.raises(KlineFormatError, match="line 3"):
        next(replay)


def test_read_klines_when_timestamps_are_microseconds_then_converts_to_milliseconds(
    tmp_path: Path,
) -> None:
    row = _row(T0 * 1000, close_time=str((T0 + MINUTE) * 1000 - 1))
    path = _write(tmp_path / "BTCUSDT-1m-2025-01.csv", [HEADER, row])

    (candle,) = _read(path)

    assert (candle.open_time_ms, candle.close_time_ms) == (T0, T0 + MINUTE - 1)


def test_read_klines_when_file_has_blank_lines_and_crlf_then_ignores_them(tmp_path: Path) -> None:
    path = tmp_path / "BTCUSDT-1m-2024-01.csv"
    path.write_bytes(("\r\n".join([HEADER, *_minutes(2), "", ""])).encode())

    assert len(_read(path)) == 2


def test_read_klines_when_symbol_is_invalid_then_raises_before_opening_the_file(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="symbol"):
        read_klines(tmp_path / "missing.csv", symbol="btc-usdt", interval="1m")


def test_read_klines_when_file_is_missing_then_raises_at_call(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_klines(tmp_path / "BTCUSDT-1m-2024-01.csv", symbol="BTCUSDT", interval="1m")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("BTCUSDT-1m-2024-01.zip", ("BTCUSDT", "1m")),
        ("ETHUSDT-15m-2024-03-17.csv", ("ETHUSDT", "15m")),
        ("1000PEPEUSDT-1h-2023-12.zip", ("1000PEPEUSDT", "1h")),
        ("BTCUSDT-1m-sample.csv", ("BTCUSDT", "1m")),
    ],
)
def test_infer_symbol_interval_when_name_follows_archive_convention_then_returns_both(
    name: str, expected: tuple[str, str]
) -> None:
    assert infer_symbol_interval(Path("/data") / name) == expected


@pytest.mark.parametrize(
    "name",
    ["klines.csv", "btcusdt-1m-2024-01.csv", "BTCUSDT_1m_2024-01.zip", "BTCUSDT-1M-2024.csv"],
)
def test_infer_symbol_interval_when_name_breaks_convention_then_raises_clear_error(
    name: str,
) -> None:
    with pytest.raises(ValueError, match="cannot infer symbol and interval from the file name"):
        infer_symbol_interval(Path(name))


def test_merge_replays_when_several_symbols_then_interleaves_in_open_time_order(
    tmp_path: Path,
) -> None:
    btc = _write(tmp_path / "BTCUSDT-1m-2024-01.csv", [HEADER, *_minutes(3)])
    eth_rows = [
        _row(T0 + i * 2 * MINUTE, open="2300", high="2310", low="2290", close="2305")
        for i in range(2)
    ]
    eth = _write(tmp_path / "ETHUSDT-1m-2024-01.csv", eth_rows)
    merged = [(c.open_time_ms - T0, c.symbol) for c in merge_replays([_replay(btc), _replay(eth)])]

    assert merged == [
        (0, "BTCUSDT"),
        (0, "ETHUSDT"),
        (MINUTE, "BTCUSDT"),
        (2 * MINUTE, "BTCUSDT"),
        (2 * MINUTE, "ETHUSDT"),
    ]


def test_merge_replays_when_inputs_come_in_any_order_then_same_minute_is_ordered_by_symbol(
    tmp_path: Path,
) -> None:
    btc = _write(tmp_path / "BTCUSDT-1m-2024-01.csv", _minutes(2))
    eth = _write(tmp_path / "ETHUSDT-1m-2024-01.csv", _minutes(2))

    def merged(paths: list[Path]) -> list[str]:
        return [c.symbol for c in merge_replays(_replay(p) for p in paths)]

    assert merged([eth, btc]) == merged([btc, eth]) == ["BTCUSDT", "ETHUSDT"] * 2


def test_example_sample_files_when_merged_then_replay_as_one_market_of_two_symbols() -> None:
    paths = sorted(EXAMPLES.glob("*-1m-sample.csv"))
    candles = list(merge_replays(_replay(p) for p in paths))

    assert [p.name for p in paths] == ["BTCUSDT-1m-sample.csv", "ETHUSDT-1m-sample.csv"]
    assert len(candles) == 1200
    assert all(
        a.open_time_ms == b.open_time_ms and (a.symbol, b.symbol) == ("BTCUSDT", "ETHUSDT")
        for a, b in zip(candles[::2], candles[1::2], strict=True)
    )
