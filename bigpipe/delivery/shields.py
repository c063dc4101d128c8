"""Per-destination shields inside a consumer group: one bad destination holds back only itself.

A destination is the scheme, host and port of a call's url. Each has its own
circuit breaker (the group's `circuitBreaker` parameters), its own pause on a
429 or 503 with `Retry-After`, and optionally its own caps (`destination` in the
group's config), all under the group's `rateLimit` and `concurrency`.

A call whose destination may not be called yet waits, and is neither dropped nor
dead-lettered. If the wait known now (the rest of a Retry-After pause, or of the
breaker's BREAK: Breaker.break_left_s) is longer than the group's delayThreshold,
the call is *parked*: Destination.admit returns the wait, and the call goes to the
group's delay topics due then, like a long backoff, its source offset committed.
Otherwise it is *held*: it waits in memory, pinning its partition's commit point,
and does not count against `maxBuffered`, so the calls to other destinations keep
flowing. Held calls are bounded by `destination.maxHeld`; at the bound the
consumer pauses its partitions (see ConsumerGroup._steer). A call of a key in a
group with `ordering: "key"` is always held, however long (see
bigpipe.delivery.ordering).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from yarl import URL

from bigpipe.config import ConsumerConfig, DestinationCaps
from bigpipe.delivery.breaker import BREAK, NORMAL, RECOVER, STATE_NUMBERS, Breaker
from bigpipe.delivery.limits import Limits
from bigpipe.metrics import LATENCY_BUCKETS
from bigpipe.stats import DESTINATIONS_SHOWN, OTHER_DESTINATIONS, GroupCounters, worst_state

DEFAULT_PORTS = {"http": 80, "https": 443}
# Destinations kept with their state; past this, idle ones (nothing held or in flight,
# breaker NORMAL, no pause) are forgotten, their counts folded into `other`.
MAX_DESTINATIONS = 10_000
RECHECK_SECONDS = (0.05, 0.25)  # held calls re-check at random in this range: no herd
# A call parked for its destination's wait comes back up to this fraction of it later,
# at random: the calls parked together reach a recovered destination spread out.
PARK_JITTER = 0.1
# Adaptive concurrency (AIMD on latency): start here, add 1/limit per fast attempt made
# at the limit (a quarter of that once it has been cut), cut to BACKOFF of it when the
# recent latency (smoothed, so one late sample is not a congestion) is over TOLERANCE
# times the fastest lately (at most once per that latency: one cut per congestion).
INITIAL_LIMIT = 4
TOLERANCE = 2.0
SMOOTHING = 0.25  # weight of the newest attempt in the recent latency
BACKOFF = 0.9
# After the first cut the knee is near: probe above it this many times slower, since each
# probe past a steep knee slows every request open meanwhile.
SLOW_PROBE = 4
FLOOR_WINDOW_SECONDS = 10.0  # the fastest attempt is remembered for one to two of these


@functools.lru_cache(maxsize=4096)
def destination_of(url: str) -> str:
    """`scheme://host:port` of a url, the port made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port out of range: the attempt fails on it as an invalid url
        port = None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}"


@dataclass(slots=True)
class Usage:
    """Attempts to a destination and their latency, as histogram buckets (LATENCY_BUCKETS)."""

    attempts: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    seconds: float = 0.0

    def observe(self, seconds: float) -> None:
        self.attempts += 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def add(self, other: Usage) -> None:
        self.attempts += other.attempts
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.seconds += other.seconds


class LatencyFloor:
    """The fastest attempt over the last one to two windows: the destination unloaded.

    Windowed, so that a destination that became slower for good is judged by its new pace.
    """

    def __init__(self) -> None:
        self._window_started = time.monotonic()
        self._current = math.inf
        self._previous = math.inf

    def observe(self, seconds: float) -> float:
        now = time.monotonic()
        if now - self._window_started >= FLOOR_WINDOW_SECONDS:
            self._window_started, self._previous, self._current = now, self._current, math.inf
        self._current = min(self._current, seconds)
        return min(self._current, self._previous)


class AdaptiveLimit:
    """A destination's concurrency found from its latency (AIMD, as uForwarder's), <= cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.limit = float(min(cap, INITIAL_LIMIT))
        self._floor = LatencyFloor()
        self._cut_at = -math.inf
        self._step = 1.0  # the increase per fast attempt, over the limit
        self._recent: float | None = None  # smoothed latency of the latest attempts

    @property
    def concurrency(self) -> int:
        return max(1, int(self.limit))

    def set_cap(self, cap: int) -> None:
        self.cap = cap
        self.limit = min(self.limit, cap)

    def observe(self, seconds: float, in_flight: int) -> None:
        """One attempt's latency, with `in_flight` attempts open (this one included)."""
        floor = self._floor.observe(seconds)
        recent = self._recent = (
            seconds if self._recent is None else self._recent + SMOOTHING * (seconds - self._recent)
        )
        now = time.monotonic()
        if recent > TOLERANCE * floor:
            if now - self._cut_at >= recent:  # attempts of the same congestion: one cut
                self.limit = max(1.0, self.limit * BACKOFF)
                self._cut_at = now
                self._step = 1 / SLOW_PROBE
        elif in_flight >= self.concurrency:  # only a limit in use earns a higher one
            self.limit = min(float(self.cap), self.limit + self._step / self.limit)


class Destination:
    """One destination's breaker, Retry-After pause, caps, and numbers."""

    def __init__(
        self,
        name: str,
        caps: DestinationCaps,
        adaptive_cap: int | None,
        counters: GroupCounters,
    ) -> None:
        self.name = name
        self.breaker: Breaker | None = None
        self.limits: Limits | None = None
        self.adaptive: AdaptiveLimit | None = None
        self._caps = caps
        self.paused_until = 0.0  # time.monotonic() before which no attempt goes out
        self.in_flight = 0
        self.held = 0
        self.usage = Usage()
        self._counters = counters  # the group's: its `held` bounds what the group holds
        self.set_caps(caps, adaptive_cap)

    @property
    def state(self) -> str:
        return NORMAL if self.breaker is None else self.breaker.state

    @property
    def idle(self) -> bool:
        return (
            not self.in_flight
            and not self.held
            and self.state == NORMAL
            and self.paused_until <= time.monotonic()
        )

    def set_caps(self, caps: DestinationCaps, adaptive_cap: int | None) -> None:
        """Apply caps in place: calls waiting on the old ones go on under the new ones.

        With `adaptive_cap`, the concurrency is found from latency, up to that cap.
        """
        self._caps = caps
        if adaptive_cap is None:
            self.adaptive = None
        elif self.adaptive is None:
            self.adaptive = AdaptiveLimit(adaptive_cap)
        else:
            self.adaptive.set_cap(adaptive_cap)
        self._apply_caps()

    def _apply_caps(self) -> None:
        rate = self._caps.rate_limit or math.inf
        concurrency = self._caps.concurrency or math.inf
        if self.adaptive is not None:
            concurrency = self.adaptive.concurrency
        if self.limits is not None:
            self.limits.update(rate, concurrency)
        elif self._caps != DestinationCaps() or self.adaptive is not None:
            self.limits = Limits(rate, concurrency)  # else only the group's caps apply

    def observe(self, seconds: float) -> None:
        """One attempt's latency: for /metrics, and for the adaptive concurrency."""
        self.usage.observe(seconds)
        if self.adaptive is not None:
            before = self.adaptive.concurrency
            self.adaptive.observe(seconds, self.in_flight)
            if self.adaptive.concurrency != before:
                self._apply_caps()

    def _may_go(self) -> bool:
        return self.paused_until <= time.monotonic() and (
            self.breaker is None or self.breaker.allows()
        )

    def wait_s(self) -> float:
        """Seconds before this destination may be called, as far as is known now: the rest
        of its Retry-After pause, or of its breaker's BREAK. 0 in RECOVER: the ramp lets
        calls through at random, soon."""
        breaker = 0.0 if self.breaker is None else self.breaker.break_left_s()
        return max(0.0, self.paused_until - time.monotonic(), breaker)

    async def admit(
        self, give_up: Callable[[], bool], parks_after: float = math.inf
    ) -> float | None:
        """Wait until an attempt may go out, or `give_up()` says the call need not wait:
        None. But when the wait ahead is longer than `parks_after` seconds, now or while
        held (a breaker that trips again, a new Retry-After), return it, with up to
        PARK_JITTER more so that the calls parked together do not all come back at once:
        the call is to wait in Kafka, not here (issue 11).

        Each check asks the breaker in force now: a reload may replace it while calls wait.
        """
        if self._may_go():
            return None
        self._hold(1)
        try:
            while not self._may_go() and not give_up():
                if (wait := self.wait_s()) > parks_after:
                    return wait * (1 + random.uniform(0, PARK_JITTER))
                pause = max(0.0, self.paused_until - time.monotonic())
                await asyncio.sleep(pause + random.uniform(*RECHECK_SECONDS))
        finally:
            self._hold(-1)
        return None

    async def acquire(self) -> None:
        """A slot and a token under the destination's own caps; waiting for them is held."""
        if self.limits is None:
            return
        self._hold(1)
        try:
            await self.limits.acquire()
        finally:
            self._hold(-1)

    def release(self) -> None:
        if self.limits is not None:
            self.limits.release()

    def record(
        self, success: bool, status: int | None, retry_after: float | None, most: float
    ) -> None:
        """One attempt's outcome: to the breaker, and a 429/503's Retry-After (up to `most` s)."""
        if self.breaker is not None:
            self.breaker.record(success)
            if not success:  # trip now, not at the next call: /stats must show it
                self.breaker.update()
        if retry_after is not None and status in (429, 503):
            until = time.monotonic() + min(retry_after, most)
            self.paused_until = max(self.paused_until, until)

    def _hold(self, change: int) -> None:
        self.held += change
        self._counters.held += change


class DestinationShields:
    """A group's destinations, made on first use and kept while they are busy."""

    def __init__(self, group: str, config: ConsumerConfig, counters: GroupCounters) -> None:
        self._group = group
        self._config = config
        self._counters = counters
        self._destinations: dict[str, Destination] = {}
        # Destinations whose breaker is not NORMAL, with its state: ticked, and counted.
        # (A breaker reports a new state before its `state` shows it.)
        self._unsettled: dict[Destination, str] = {}
        self._forgotten = Usage()  # the usage of destinations forgotten while idle

    def get(self, url: str) -> Destination:
        name = destination_of(url)
        destination = self._destinations.get(name)
        if destination is None:
            # Before adding it: the new one is idle too, and forgotten it would come back
            # as a second object for the same destination (its breaker split in two).
            if len(self._destinations) >= MAX_DESTINATIONS:
                self._forget_idle()
            destination = self._destinations[name] = self._new(name)
        return destination

    def _new(self, name: str) -> Destination:
        destination = Destination(name, self._caps(name), self._adaptive_cap(name), self._counters)
        destination.breaker = self._breaker(destination)
        return destination

    def _caps(self, name: str) -> DestinationCaps:
        try:
            return self._config.destination.caps_for(URL(name))
        except ValueError:  # not a URL: its attempt fails on it as an invalid url
            return self._config.destination.caps

    def _adaptive_cap(self, name: str) -> int | None:
        """With adaptiveConcurrency, the most the found concurrency may be: the
        destination's own cap, else the group's."""
        if not self._config.adaptive_concurrency:
            return None
        return self._caps(name).concurrency or self._config.concurrency

    def _breaker(self, destination: Destination) -> Breaker | None:
        config = self._config.breaker
        if config is None:
            return None
        name = f"{self._group} {destination.name}"
        return Breaker(config, name, partial(self._changed, destination))

    def _changed(self, destination: Destination, state: str) -> None:
        if state == NORMAL:
            self._unsettled.pop(destination, None)
        else:
            self._unsettled[destination] = state
        self._show_state()

    def _show_state(self) -> None:
        """circuitIsBreak is 1 while any destination is in BREAK, as /stats always said."""
        states = set(self._unsettled.values())
        worst = BREAK if BREAK in states else RECOVER if RECOVER in states else NORMAL
        self._counters.circuitIsBreak = int(worst == BREAK)
        self._counters.breakerState = STATE_NUMBERS[worst]

    def update(self, config: ConsumerConfig) -> None:
        """A reload: new caps in place; a changed breaker starts anew (NORMAL, empty window)."""
        new_breaker = config.breaker != self._config.breaker
        self._config = config
        for destination in self._destinations.values():
            name = destination.name
            destination.set_caps(self._caps(name), self._adaptive_cap(name))
            if new_breaker:
                destination.breaker = self._breaker(destination)
        if new_breaker:
            self._unsettled.clear()
            self._show_state()

    def publish(self) -> None:
        """The DESTINATIONS_SHOWN busiest destinations by attempts, the rest as `other`.

        Unsettled breakers are moved along first, so a destination nobody calls leaves
        BREAK too. Here, at each commit interval, and not on every poll-loop pass: a
        call held for its destination asks its breaker itself (Breaker.allows), so only
        /stats waits for this, and with a thousand broken destinations the pass took
        4 ms, hundreds of times a second.
        """
        for destination in list(self._unsettled):
            if destination.breaker is not None:
                destination.breaker.update()
        destinations = self._destinations.values()
        top = heapq.nlargest(DESTINATIONS_SHOWN, destinations, key=lambda d: d.usage.attempts)
        shown = {d.name: _numbers(d) for d in top}
        rest = [d for d in destinations if d.name not in shown]
        if rest or self._forgotten.attempts:
            usage = Usage()
            usage.add(self._forgotten)
            for destination in rest:
                usage.add(destination.usage)
            shown[OTHER_DESTINATIONS] = {
                # BREAK (1) over RECOVER (2): as the workers' rows are merged in /stats
                "breakerState": functools.reduce(
                    worst_state, (STATE_NUMBERS[d.state] for d in rest), STATE_NUMBERS[NORMAL]
                ),
                "inFlight": sum(d.in_flight for d in rest),
                "held": sum(d.held for d in rest),
                **_usage_numbers(usage),
            }
        self._counters.destinations = shown

    def _forget_idle(self) -> None:
        for name, destination in list(self._destinations.items()):
            if destination.idle:
                self._forgotten.add(destination.usage)
                del self._destinations[name]


def _numbers(destination: Destination) -> dict[str, Any]:
    return {
        "breakerState": STATE_NUMBERS[destination.state],
        "inFlight": destination.in_flight,
        "held": destination.held,
        **_usage_numbers(destination.usage),
    }


def _usage_numbers(usage: Usage) -> dict[str, Any]:
    return {"attempts": usage.attempts, "latency": list(usage.buckets), "latencySum": usage.seconds}
