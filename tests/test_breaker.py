"""The original's breaker, driven by a fake clock through every transition."""

from __future__ import annotations

import random

from bigpipe.config import BreakerConfig
from bigpipe.delivery.breaker import BREAK, NORMAL, RECOVER, Breaker, HealthWindow

CONFIG = BreakerConfig(break_period=5, recover_period=5, win_size=3, min_stats=4, health_rate=0.5)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Breaker, Clock, list[str]]:
    clock, transitions = Clock(), []
    return Breaker(CONFIG, "t/g", transitions.append, clock, random.Random(1)), clock, transitions


def fail(breaker: Breaker, times: int) -> None:
    for _ in range(times):
        breaker.record(False)


def test_window_is_healthy_below_min_stats_and_judges_the_rate_above() -> None:
    window = HealthWindow(size=3, min_stats=4, health_rate=0.5)
    for _ in range(3):
        window.record(0, False)
    assert window.healthy(0), "3 samples < minStats 4"
    window.record(0, True)
    assert not window.healthy(0), "1/4 success < 0.5"
    window.record(1, True)
    assert not window.healthy(1), "2/5 success < 0.5"
    window.record(1, True)
    assert window.healthy(1), "3/6 success == 0.5"
    assert window.healthy(3.5), "second 0 has left a 3-second window; only 2 samples remain"


def test_an_empty_window_is_healthy_with_min_stats_0() -> None:
    """minStats 0 is valid: with nothing recorded, the window is healthy, not 0 / 0."""
    window = HealthWindow(size=3, min_stats=0, health_rate=0.5)
    assert window.healthy(0)
    window.record(0, False)
    assert not window.healthy(0), "with minStats 0 one failure judges the rate"
    assert window.healthy(3), "and it leaves with its second"


def test_every_transition() -> None:
    breaker, clock, transitions = make()
    assert breaker.update() == NORMAL and breaker.allows()

    fail(breaker, 3)
    assert breaker.update() == NORMAL, "too few samples to judge"
    fail(breaker, 1)
    assert breaker.update() == BREAK and not breaker.allows()

    clock.now += 3.5  # window empty again, but breakPeriod not over: BREAK holds
    assert breaker.update() == BREAK

    clock.now += 1.5  # breakPeriod over and window healthy: RECOVER
    assert breaker.update() == RECOVER
    admitted = sum(breaker.allows() for _ in range(2000)) / 2000
    assert 0.4 < admitted < 0.6, "at 5 s of a 10 s ramp about half the calls go through"

    fail(breaker, 4)  # unhealthy again while recovering: back to BREAK, clock restarts
    assert breaker.update() == BREAK
    clock.now += 4.9
    assert breaker.update() == BREAK
    clock.now += 0.2
    assert breaker.update() == RECOVER
    clock.now += 3
    admitted = sum(breaker.allows() for _ in range(2000)) / 2000
    assert 0.7 < admitted < 0.9, "the ramp rises with time"
    clock.now += 2
    assert breaker.update() == NORMAL and breaker.allows()

    assert transitions == [BREAK, RECOVER, BREAK, RECOVER, NORMAL]


def test_an_unhealthy_window_keeps_break_past_the_break_period() -> None:
    breaker, clock, _ = make()
    fail(breaker, 4)
    assert breaker.update() == BREAK
    clock.now += 3
    fail(breaker, 4)  # failures recorded while BREAK still count (calls already in flight)
    clock.now += 2.5
    assert breaker.update() == BREAK, "break period over but window still unhealthy"
    clock.now += 2
    assert breaker.update() == RECOVER


def test_the_window_is_healthy_from_when_enough_old_buckets_have_left() -> None:
    window = HealthWindow(size=3, min_stats=2, health_rate=0.5)
    for _ in range(3):
        window.record(0, False)
    window.record(1, True)
    window.record(1, False)
    assert window.healthy_from(1.5) == 3, "1/5 now; 1/2 once second 0 has left, at 3"
    window.record(2, False)
    assert window.healthy_from(2.5) == 4, "1/3 at 3; at 4 one sample, under minStats"
    window.record(2, False)
    assert window.healthy_from(2.5) == 5, "2 failures of second 2 too: all must leave"
    assert window.healthy_from(5.5) == 5.5, "healthy (empty) now"


def test_break_left_is_the_rest_of_the_break_period_or_of_an_unhealthy_window() -> None:
    """What a call held for the breaker would wait: it parks in Kafka past delayThreshold."""
    breaker, clock, _ = make()
    assert breaker.break_left_s() == 0.0, "NORMAL: nothing to wait for"
    fail(breaker, 4)
    assert breaker.update() == BREAK
    assert breaker.break_left_s() == 5.0, "the whole breakPeriod"
    clock.now += 3
    fail(breaker, 4)  # second 1003's failures leave a 3 s window at 1006
    assert breaker.break_left_s() == 3.0, "breakPeriod ends at 1005, the window heals at 1006"
    clock.now += 3
    assert breaker.break_left_s() == 0.0 and breaker.update() == RECOVER
    assert breaker.break_left_s() == 0.0, "RECOVER: the ramp lets calls through soon"
