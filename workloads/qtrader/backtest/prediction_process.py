"""Part 1 of the streamed backtest in a process of its own, so that it runs beside part 2.

Reading the kline files, the features and the ensemble (``blocks.predicted_blocks``) take about
a third of a streamed backtest, the sequential trading the rest. In one process they take turns;
here a child process reads and predicts block after block while the parent trades the blocks
already made, so on a machine with a second core the run takes about as long as its trading.
(A thread cannot do this: the reading and the features are Python and hold the GIL.)

The child opens the files and the model itself (``KlineFiles``, the model's path): nothing but
their names crosses to it. Each block comes back as one frame on its stdout (a kind byte and an
8-byte length, then the pickled block and its predictions; the child is this package's own
code, so its pickles are trusted). The child makes at most ``_AHEAD`` blocks ahead of what the
trading has read, then waits: memory stays bounded. What the child cannot read (a bad row, a
missing file, a model that does not load) comes back as an error frame and is raised here with
the child's message, after the blocks before it, as in one process. A child that dies, or sends
nothing for ``stall_s`` (a hung one), ends the run with a ``BacktestError`` saying so; the
child never outlives the run.
"""

from __future__ import annotations

import os
import pickle
import queue
import select
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from qtrader.backtest.bars import DEFAULT_CHUNK_ROWS, Bars, csv_bars
from qtrader.backtest.blocks import Block, ChunkPredictions, predicted_blocks
from qtrader.backtest.errors import BacktestError
from qtrader.inference.onnx_model import ModelLoadError, SignalModel
from qtrader.marketdata.csv_replay import KlineFormatError

DEFAULT_STALL_S = 120.0
_AHEAD = 4  # blocks made ahead of the trading, at most: what bounds the memory
_FIRST_CHUNK_ROWS = 1024
_HEADER = struct.Struct("<BQ")  # a frame's kind and length
_BLOCK, _END, _ERROR = 0, 1, 2
# The child's errors raised again here under their own type; any other ends the run as a
# BacktestError carrying the child's message.
_ERRORS: dict[str, type[Exception]] = {
    "BacktestError": BacktestError,
    "KlineFormatError": KlineFormatError,
    "ModelLoadError": ModelLoadError,
}


@dataclass(frozen=True)
class KlineFiles:
    """Each symbol's kline files of one interval (consecutive months, in order): a source
    another process can open by itself."""

    files: Mapping[str, tuple[Path, ...]]
    interval: str
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    first_chunk_rows: int | None = None  # the first file's first chunk, if smaller

    def bars(self) -> dict[str, Iterator[Bars]]:
        """Each symbol's candles in chunks, read as they are reached."""
        return {symbol: self._chained(paths, symbol) for symbol, paths in self.files.items()}

    def _chained(self, paths: Sequence[Path], symbol: str) -> Iterator[Bars]:
        first = self.first_chunk_rows
        for path in paths:
            yield from csv_bars(
                path,
                symbol=symbol,
                interval=self.interval,
                chunk_rows=self.chunk_rows,
                first_chunk_rows=first,
            )
            first = None


@dataclass(frozen=True)
class _Job:
    files: KlineFiles
    model_path: Path


class PredictionProcess:
    """``predicted_blocks(files.bars(), SignalModel.load(model_path))``, made by a child
    process (started on entering) while the caller handles the blocks already received; the
    child is stopped on leaving, whatever happened."""

    def __init__(
        self, files: KlineFiles, model_path: Path, *, stall_s: float = DEFAULT_STALL_S
    ) -> None:
        # The trading waits for the first block: a small first chunk makes it sooner.
        first = min(_FIRST_CHUNK_ROWS, files.chunk_rows)
        self.files = replace(files, first_chunk_rows=first)
        """What the child reads, chunked as it chunks them: the same blocks, made here."""
        self._job = _Job(self.files, model_path)
        self._stall_s = stall_s
        self._stderr: BinaryIO | None = None
        self._child: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PredictionProcess:
        self._stderr = tempfile.TemporaryFile()
        self._child = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self._child.stdin is not None
        with self._child.stdin:
            self._child.stdin.write(pickle.dumps(self._job))
        return self

    def __exit__(self, *exc_info: object) -> None:
        child, stderr = self._child, self._stderr
        if child is not None:
            if child.poll() is None:
                child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        if stderr is not None:
            stderr.close()

    def ready(self) -> bool:
        """The child has sent something (a block, the end, an error) or ended: reading the
        next frame does not wait for it to start up."""
        child = self._running()
        assert child.stdout is not None
        readable, _, _ = select.select([child.stdout.fileno()], [], [], 0)
        return bool(readable)

    def blocks(self, *, skip: int = 0) -> Iterator[tuple[Block, ChunkPredictions]]:
        """The child's blocks in order, after its first ``skip`` (read and dropped unopened);
        raises what the child reported, or that it died or stalled."""
        child = self._running()
        assert self._stderr is not None
        reader = _FrameReader(child, self._stall_s, self._stderr)
        while True:
            kind, data = reader.next()
            if kind == _BLOCK and skip:
                skip -= 1
                continue
            if kind == _BLOCK:
                block, predictions = pickle.loads(data)
                yield block, predictions
            elif kind == _END:
                return
            else:
                name, message = pickle.loads(data)
                raise _ERRORS.get(name, BacktestError)(message)

    def _running(self) -> subprocess.Popen[bytes]:
        assert self._child is not None, "enter the PredictionProcess first"
        return self._child


class _FrameReader:
    """The child's frames, one at a time, each read within the stall time."""

    def __init__(self, child: subprocess.Popen[bytes], stall_s: float, stderr: BinaryIO) -> None:
        self._child = child
        self._stall_s = stall_s
        self._stderr = stderr

    def next(self) -> tuple[int, bytes]:
        """The next frame's kind and content."""
        kind, size = _HEADER.unpack(self._read(_HEADER.size))
        return kind, self._read(size)

    def _read(self, size: int) -> bytes:
        return _read_exactly(self._child, size, self._stall_s, self._stderr)


def _read_exactly(
    child: subprocess.Popen[bytes], size: int, stall_s: float, stderr: BinaryIO
) -> bytes:
    assert child.stdout is not None
    fd = child.stdout.fileno()
    parts: list[bytes] = []
    left = size
    while left:
        ready, _, _ = select.select([fd], [], [], stall_s)
        if not ready:
            raise BacktestError(
                f"the prediction process (pid {child.pid}) sent nothing for {stall_s:g} s"
            )
        part = os.read(fd, min(left, 1 << 20))
        if not part:
            raise BacktestError(_died(child, stderr))
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _died(child: subprocess.Popen[bytes], stderr: BinaryIO) -> str:
    code = child.wait()
    stderr.seek(0)
    tail = stderr.read().decode(errors="replace").strip().splitlines()[-3:]
    said = f": {' | '.join(tail)}" if tail else ""
    return f"the prediction process ended before the last block (exit code {code}){said}"


# --- the child --------------------------------------------------------------------------------


def _serve(job: _Job, frames: queue.Queue[bytes | None]) -> None:
    """Every block as a frame into ``frames``, then the end (or the error that stopped it)."""
    try:
        model = SignalModel.load(job.model_path)
        for block, predictions in predicted_blocks(job.files.bars(), model):
            frames.put(_frame(_BLOCK, (block, predictions)))
    except (BacktestError, KlineFormatError, ModelLoadError, OSError) as exc:
        frames.put(_frame(_ERROR, (type(exc).__name__, str(exc))))
    else:
        frames.put(_frame(_END, ()))
    finally:
        frames.put(None)


def _frame(kind: int, content: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(content, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(kind, len(data)) + data


def _write(frames: queue.Queue[bytes | None], out: BinaryIO) -> None:
    """Frames to ``out`` as the parent takes them; a pipe the parent closed ends it."""
    try:
        while (frame := frames.get()) is not None:
            out.write(frame)
            out.flush()
    except BrokenPipeError:  # the run ended (or died) before the last block
        os._exit(1)


def main() -> int:
    job = pickle.load(sys.stdin.buffer)
    # The blocks are made ahead of the trading, up to ``_AHEAD`` of them, by this thread while
    # a second one writes them: a few blocks that trade quickly (a halted stretch) then find
    # theirs ready. The writer's blocking writes leave the GIL to the maker.
    frames: queue.Queue[bytes | None] = queue.Queue(maxsize=_AHEAD)
    writer = threading.Thread(target=_write, args=(frames, sys.stdout.buffer))
    writer.start()
    _serve(job, frames)
    writer.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
