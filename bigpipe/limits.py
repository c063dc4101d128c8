"""The shield in front of each downstream: a rate limit and a cap on calls in flight."""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter

# The bucket holds a tenth of a second of tokens: enough to absorb scheduling jitter,
# small enough that a downstream never sees a burst far above its configured rate.
BURST_SECONDS = 0.1


class Limits:
    def __init__(self, rate_limit: float, concurrency: int) -> None:
        burst = max(1.0, rate_limit * BURST_SECONDS)
        self._rate = AsyncLimiter(burst, burst / rate_limit)
        self._slots = asyncio.Semaphore(concurrency)

    async def acquire(self) -> None:
        """Take a concurrency slot, then one rate token, for the span of one request.

        The slot is taken first, so the token is spent right before the request
        goes out and the downstream sees the configured rate, not bursts of
        requests whose tokens were taken long before. Pair with `release()`.
        """
        await self._slots.acquire()
        try:
            await self._rate.acquire()
        except BaseException:
            self._slots.release()
            raise

    def release(self) -> None:
        self._slots.release()
