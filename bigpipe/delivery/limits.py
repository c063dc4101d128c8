"""The shield in front of each downstream: a rate limit and a cap on calls in flight.

Both can change while calls wait (a reload), without dropping a waiter.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

# The bucket holds a twentieth of a second of tokens (at least one): enough to absorb
# scheduling jitter, small enough that no second sees more than the rate plus 5 %.
BURST_SECONDS = 0.05


class RateLimit:
    """A token bucket whose rate changes in place, keeping its fill and its queue.

    One bucket for a group's whole life. Replacing it on reload let the calls
    waiting on each old bucket go on at the old rate beside a full new one, and
    repeated reloads stacked them (20/s gave 88 requests in one second).
    """

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._size = _bucket_size(rate)
        self._tokens = self._size
        self._filled_at = time.monotonic()
        self._turn = asyncio.Lock()  # first come, first served: one waiter at a time
        self._queued = 0  # acquirers at or in the lock
        self._rate_changed: asyncio.Future[None] | None = None

    def set_rate(self, rate: float) -> None:
        """The time until now earns tokens at the old rate, from now on at the new one."""
        self._refill()
        self._rate = rate
        self._size = _bucket_size(rate)
        self._tokens = min(self._tokens, self._size)
        if self._rate_changed is not None and not self._rate_changed.done():
            self._rate_changed.set_result(None)  # the waiter works out its wait anew

    async def acquire(self) -> None:
        # A token at hand and nobody queued: take it without the lock, as most calls
        # under a generous rate do (the lock was 1-2 % of a delivery's CPU).
        if not self._queued and self._refill() >= 1.0:
            self._tokens -= 1.0
            return
        self._queued += 1
        try:
            async with self._turn:
                while (missing := 1.0 - self._refill()) > 0:
                    await self._sleep(missing / self._rate)
                self._tokens -= 1.0
        finally:
            self._queued -= 1

    def _refill(self) -> float:
        now = time.monotonic()
        self._tokens = min(self._size, self._tokens + (now - self._filled_at) * self._rate)
        self._filled_at = now
        return self._tokens

    async def _sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or until the rate changes."""
        loop = asyncio.get_running_loop()
        self._rate_changed = woken = loop.create_future()
        timer = loop.call_later(seconds, _settle, woken)
        try:
            await woken
        finally:
            timer.cancel()
            self._rate_changed = None


def _bucket_size(rate: float) -> float:
    return max(1.0, rate * BURST_SECONDS)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Limits:
    def __init__(self, rate_limit: float, concurrency: int) -> None:
        self._rate = RateLimit(rate_limit)
        self._capacity = concurrency
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_use(self) -> int:
        """Slots taken now: after a cut, for a while more than the concurrency."""
        return self._in_use

    def update(self, rate_limit: float, concurrency: int) -> None:
        """Apply new limits now; calls already waiting are served under the new ones."""
        self._rate.set_rate(rate_limit)
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
