"""Full-jitter exponential backoff: ``sleep = U(0, min(cap, base * 2**attempt))``.

Full jitter (rather than a fixed or "equal jitter" delay) spreads the retries of many clients
that failed together, so they do not come back in lock-step and trip the same limit again.
"""

from __future__ import annotations

import math
import random

# 2.0 ** 1024 overflows a float; any attempt past this is far beyond every sensible cap anyway.
_MAX_EXPONENT = 1000
_RNG = random.Random()


def full_jitter(
    attempt: int,
    *,
    base_s: float = 0.2,
    cap_s: float = 10.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to sleep before retry number ``attempt`` (0 for the first retry)."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if not (math.isfinite(base_s) and math.isfinite(cap_s)) or base_s < 0 or cap_s < 0:
        raise ValueError(f"base_s and cap_s must be finite and >= 0, got {base_s}, {cap_s}")
    bound = min(cap_s, base_s * 2.0 ** min(attempt, _MAX_EXPONENT))
    return (rng or _RNG).uniform(0.0, bound)
