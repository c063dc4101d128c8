"""The shield in front of each downstream: a rate limit and a cap on calls in flight.

Both can change while calls wait (a reload), without dropping a waiter.
"""

from __future__ import annotations

import asyncio
from collections import deque

from aiolimiter import AsyncLimiter

# The bucket holds a tenth of a second of tokens: enough to absorb scheduling jitter,
# small enough that a downstream never sees a burst far above its configured rate.
BURST_SECONDS = 0.1


def rate_limiter(rate_limit: float) -> AsyncLimiter:
    burst = max(1.0, rate_limit * BURST_SECONDS)
    return AsyncLimiter(burst, burst / rate_limit)


class Limits:
    def __init__(self, rate_limit: float, concurrency: int) -> None:
        self._rate_limit = rate_limit
        self._rate = rate_limiter(rate_limit)
        self._capacity = concurrency
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def update(self, rate_limit: float, concurrency: int) -> None:
        """Apply new limits now; calls already waiting are served under the new cap."""
        if rate_limit != self._rate_limit:
            self._rate_limit = rate_limit
            self._rate = rate_limiter(rate_limit)
        self._capacity = concurrency
        self._wake()

    async def acquire(self) -> None:
        """Take a concurrency slot, then one rate token, for the span of one request.

        The slot is taken first, so the token is spent right before the request
        goes out and the downstream sees the configured rate, not bursts of
        requests whose tokens were taken long before. Pair with `release()`.
        """
        await self._take_slot()
        try:
            await self._rate.acquire()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self._in_use -= 1
        self._wake()

    async def _take_slot(self) -> None:
        if self._in_use < self._capacity and not self._waiters:
            self._in_use += 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # the slot came just as we were cancelled: pass it on
            elif granted in self._waiters:
                # Not there when a release ran between the cancel and this line: _wake
                # drops cancelled waiters itself. A ValueError here would turn the
                # cancellation into a failed call (a false dead letter on every drain).
                self._waiters.remove(granted)
            raise

    def _wake(self) -> None:
        while self._waiters and self._in_use < self._capacity:
            granted = self._waiters.popleft()
            if not granted.done():
                self._in_use += 1
                granted.set_result(None)
