"""Local stand-ins for external services, for tests, benchmarks and stress runs.

``binance_futures`` is a strict, deterministic Binance USD-M futures REST server: real HTTP, real
signatures, real rate limits and bans, and switchable faults, so the exchange client is tested
against the failure modes it must survive without ever touching Binance.
"""
