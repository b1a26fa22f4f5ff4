"""Exchange access: Binance USD-M futures over python-binance, the shared rate limiter, retries."""
