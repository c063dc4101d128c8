"""The original bigpipe's circuit breaker, one per destination of a consumer group.

Health is judged over a sliding window of `winSize` one-second buckets. The
states map onto pybreaker's, whose state machine and listeners carry the
transitions (and so the logging and `circuitIsBreak`):

    NORMAL  (closed)     every call goes through
    BREAK   (open)       every call is held (see bigpipe.delivery.shields)
    RECOVER (half-open)  a call goes through with a probability that ramps
                         from 0 to 1 over breakPeriod + recoverPeriod
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable

import pybreaker

from bigpipe.config import BreakerConfig

log = logging.getLogger(__name__)

NORMAL, BREAK, RECOVER = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
STATE_NAMES = {NORMAL: "NORMAL", BREAK: "BREAK", RECOVER: "RECOVER"}
STATE_NUMBERS = {NORMAL: 0, BREAK: 1, RECOVER: 2}  # for gauges


class HealthWindow:
    """Success and failure counts in one-second buckets over the last `size` seconds.

    With running totals: every attempt asks it (Breaker.allows), so it must not sum
    the buckets each time.
    """

    def __init__(self, size: int, min_stats: int, health_rate: float) -> None:
        self._size = size
        self._min_stats = min_stats
        self._health_rate = health_rate
        self._buckets: deque[list[int]] = deque()  # [second, successes, failures]
        self._successes = 0
        self._total = 0

    def record(self, now: float, success: bool) -> None:
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        self._buckets[-1][1 if success else 2] += 1
        self._successes += success
        self._total += 1
        self._expire(second)

    def healthy(self, now: float) -> bool:
        self._expire(int(now))
        return self._judge(self._successes, self._total)

    def healthy_from(self, now: float) -> float:
        """When the window turns healthy if nothing more is recorded (`now` if it is):
        once enough of its oldest buckets have left it."""
        self._expire(int(now))
        successes, total, healthy_at = self._successes, self._total, now
        for second, bucket_successes, failures in self._buckets:  # the oldest first
            if self._judge(successes, total):
                break
            successes -= bucket_successes
            total -= bucket_successes + failures
            healthy_at = max(now, second + self._size)  # when this bucket has left
        return healthy_at  # once every bucket has left at the latest: empty is healthy

    def _judge(self, successes: int, total: int) -> bool:
        # An empty window is healthy, minStats 0 included (whose 0 / 0 raised in every
        # allows(), and so dead-lettered the calls of an idle destination as "internal").
        return total < max(self._min_stats, 1) or successes / total >= self._health_rate

    def _expire(self, second: int) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] <= second - self._size:
            _, successes, failures = buckets.popleft()
            self._successes -= successes
            self._total -= successes + failures


class Breaker:
    def __init__(
        self,
        config: BreakerConfig,
        name: str,
        on_change: Callable[[str], None] = lambda _state: None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._window = HealthWindow(config.win_size, config.min_stats, config.health_rate)
        self._machine = pybreaker.CircuitBreaker(name=name, listeners=[_Transitions(on_change)])
        self._break_time = 0.0

    @property
    def state(self) -> str:
        return self._machine.current_state

    def record(self, success: bool) -> None:
        """Count one attempt's outcome; every attempt counts, retries included."""
        self._window.record(self._clock(), success)

    def update(self) -> str:
        """Move between states as the window and the clock say; return the state.

        After a long quiet spell BREAK may be due for RECOVER and RECOVER for NORMAL
        at once, so steps repeat until the state settles.
        """
        now = self._clock()
        healthy = self._window.healthy(now)
        while self._step(now, healthy):
            pass
        return self.state

    def _step(self, now: float, healthy: bool) -> bool:
        """Take one transition if one is due; say whether one was taken."""
        state = self.state
        held_for = now - self._break_time
        if state != BREAK and not healthy:
            self._trip(now)
            return True
        if state == BREAK and healthy and held_for >= self._config.break_period:
            self._machine.half_open()
            return True
        if state == RECOVER and held_for >= self._ramp_seconds:
            self._machine.close()
            return True
        return False

    def break_left_s(self) -> float:
        """Seconds until BREAK may turn RECOVER if nothing more is recorded: the rest of
        breakPeriod, or longer while the health window is not healthy. 0 if not in BREAK."""
        if self.state != BREAK:
            return 0.0
        now = self._clock()
        ends = max(self._break_time + self._config.break_period, self._window.healthy_from(now))
        return max(0.0, ends - now)

    def allows(self) -> bool:
        """May one attempt go out now? In RECOVER the chance ramps up with time."""
        state = self.update()
        if state == NORMAL:
            return True
        if state == BREAK:
            return False
        ramp = (self._clock() - self._break_time) / self._ramp_seconds
        return self._rng.random() < ramp

    @property
    def _ramp_seconds(self) -> float:
        return self._config.break_period + self._config.recover_period

    def _trip(self, now: float) -> None:
        self._break_time = now
        self._machine.open()


class _Transitions(pybreaker.CircuitBreakerListener):
    """Logs each transition and reports the new state (NORMAL, BREAK or RECOVER)."""

    def __init__(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = STATE_NAMES.get(old_state.name, "?") if old_state else "?"
        log.warning("breaker %s: %s -> %s", cb.name, old, STATE_NAMES[new_state.name])
        self._on_change(new_state.name)
