"""When the feed's silence means stale: a live kline feed is quiet for an interval by design."""

from __future__ import annotations

from qtrader.marketdata.service import MarketDataConfig, Source


def test_a_live_feed_is_stale_only_an_interval_plus_the_threshold_after_its_last_candle() -> None:
    assert MarketDataConfig(source=Source.LIVE, interval="1m").stale_limit_s == 70.0
    five_minutes = MarketDataConfig(source=Source.LIVE, interval="5m", stale_after_s=30)
    assert five_minutes.stale_limit_s == 330.0


def test_a_paced_synthetic_or_replay_feed_is_stale_after_the_threshold_alone() -> None:
    assert MarketDataConfig(source=Source.SYNTHETIC).stale_limit_s == 10.0
    assert MarketDataConfig(source=Source.REPLAY, stale_after_s=3).stale_limit_s == 3.0
