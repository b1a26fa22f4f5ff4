"""Benchmarks run by ``qtrader bench NAME``, each beside a baseline measured in the same run.

A figure alone says little on a shared 2-core machine: each benchmark also measures the floor
it stands on (the transport, same topology, same moment), and reports both and their ratio.
They live in a package, not in ``bench/``, so the installed ``qtrader`` command can run them;
the CLI imports a benchmark only when it is asked for. Speed is reported, never asserted in
tests: a test checks that a benchmark runs and that its correctness figures hold.

- ``halt`` (``qtrader_tools.benchmarks.halt``): operator trips the latch -> the last execution
  worker acknowledges it, against a plain NATS fan-out round trip; and no order filled after an
  ack.
- ``limiter`` (``qtrader_tools.benchmarks.limiter``): acquisitions through the Redis-shared
  limiter vs the in-process one; a two-process flood against the local Binance server (budget
  share used, 429s and 418s, which must be 0) vs one unthrottled client.
- ``outbox`` (``qtrader_tools.benchmarks.outbox``): events buffered in the SQLite outbox while
  NATS is down vs raw SQLite inserts (synchronous FULL and NORMAL), the replay vs raw JetStream
  publishes; and N events across a broker outage, read back: lost and duplicated, which must be
  0, in order.
- ``pipeline`` (``qtrader_tools.benchmarks.pipeline``): candles -> signals -> order decisions
  through the real portfolio, inference and execution processes, per second, vs raw nats-py
  JetStream publish and pull-consume on the same server; candle -> signal and -> intent latency;
  every candle accounted for.
- ``pnl`` (``qtrader_tools.benchmarks.pnl``): N fills through the Decimal ledger vs the same
  accounting in floats, the float's error, and the ledger against an exact Fraction account.
- ``all`` (``qtrader_tools.benchmarks.suite``): every benchmark in turn, one JSON object of all
  figures.
"""
