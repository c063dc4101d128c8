"""What to do after an attempt: stop, or wait how long and try again. Pure functions."""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime
from enum import Enum


class Verdict(Enum):
    SUCCESS = "success"
    RETRY = "retry"
    FINAL = "final"  # a failure that another attempt will not fix
    EXPIRED = "expired"  # the call's ttl ran out: it is not attempted again
    HELD = "held"  # its destination may not be called for long: it waits, not an attempt


def classify(status: int, retry_status: frozenset[int]) -> Verdict:
    """2xx succeeds; 5xx and the listed 4xx are retried; the rest fail for good.

    3xx is final: Bigpipe does not follow redirects, because a redirected POST may
    turn into a GET and would leave the destination the caller was allowed to reach.
    """
    if 200 <= status < 300:
        return Verdict.SUCCESS
    if status >= 500 or status in retry_status:
        return Verdict.RETRY
    return Verdict.FINAL


def backoff_seconds(
    retry_number: int, base_ms: int, max_ms: int, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2^(n-1))]."""
    ceiling = min(max_ms, base_ms * 2 ** min(retry_number - 1, 32))
    return (rng or random).uniform(0, ceiling) / 1000


def retry_after_seconds(header: str | None, now: float) -> float | None:
    """Parse Retry-After, as delay-seconds or an HTTP date; None when absent or unusable."""
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
