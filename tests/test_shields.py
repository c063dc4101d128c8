"""The shields in front of a downstream (rate limit, breaker) across hot reloads: a reload
changes them in place, for the calls already waiting as much as for new ones."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bigpipe.delivery.limits import RateLimit
from tests.support import (
    Bigpipe,
    Downstream,
    eventually,
    group_stats,
    reload,
    rewrite,
    start_node,
)

RATES = (20, 10)  # rateLimit alternates between these, one reload after another
RELOADS = 24


def busiest_second(times: list[float]) -> int:
    """The most arrivals in any one-second window [t, t + 1)."""
    times = sorted(times)
    busiest, start = 0, 0
    for end, at in enumerate(times):
        while times[start] <= at - 1:
            start += 1
        busiest = max(busiest, end - start + 1)
    return busiest


async def test_a_lower_rate_slows_the_calls_already_waiting() -> None:
    limit = RateLimit(10)
    await limit.acquire()  # the one-token bucket is empty now
    started = time.monotonic()
    waiting = [asyncio.create_task(limit.acquire()) for _ in range(3)]
    await asyncio.sleep(0)  # they queue at 10/s
    limit.set_rate(4)
    await asyncio.gather(*waiting)
    assert time.monotonic() - started >= 0.7, "three tokens at 4/s take 0.75 s, not 0.3 s"


async def test_a_higher_rate_speeds_up_the_call_already_waiting() -> None:
    limit = RateLimit(0.5)
    await limit.acquire()
    started = time.monotonic()
    waiting = asyncio.create_task(limit.acquire())  # 2 s away at 0.5/s
    await eventually(lambda: limit._rate_changed is not None, 5, "the call to wait for a token")
    limit.set_rate(100)
    await waiting
    assert time.monotonic() - started < 1.0


async def test_reloading_rate_limit_never_bursts_past_it(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """Found by the audit: rateLimit 20/s gave 74 requests in one second during reloads."""
    downstream = await Downstream().start()
    bigpipe, _ = await start_node(
        kafka, tmp_path, processes, rateLimit=RATES[0], concurrency=50, retries=0
    )
    calls = 0
    while calls < 400:  # a backlog that outlasts the reloads at either rate
        status, _ = await bigpipe.post_call(
            http, data=str(calls), url=downstream.url(), partition_key=str(calls)
        )
        assert status == 200
        calls += 1
    await eventually(lambda: len(downstream.requests) >= 10, 30, "deliveries to start")
    started = time.monotonic()
    for number in range(RELOADS):
        entry = {**bigpipe.config["kafka.consumer.list"][0], "rateLimit": RATES[number % 2]}
        rewrite(bigpipe, **{"kafka.consumer.list": [entry]})
        await reload(bigpipe, http)
        await asyncio.sleep(0.25)  # the pace of the reloads, not a wait for anything
    ended = time.monotonic()
    during = [r.at for r in downstream.requests if started <= r.at <= ended]
    busiest = busiest_second(during)
    print(
        f"\nrate reloads: {RELOADS} reloads in {ended - started:.1f} s between "
        f"{RATES[0]}/s and {RATES[1]}/s; busiest second {busiest} requests "
        f"({len(during)} in all)"
    )
    assert busiest <= max(RATES) * 1.1
    await downstream.stop()


async def test_calls_held_by_the_breaker_follow_it_through_a_reload(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """Calls held by an open breaker waited on the old breaker object after a reload that
    replaced it: here its breakPeriod of 20 s, though the new breaker had let them go.
    (Held, not parked: delayThreshold is longer than the break. A parked call comes back
    when the wait it was parked for ends, whatever a reload says meanwhile.)"""

    async def fail_three_times(_request: web.Request, number: int) -> web.Response:
        return web.Response(status=500 if number < 3 else 200)

    downstream = await Downstream(behaviour=fail_three_times).start()
    slow_breaker = {
        "breakPeriod": 20,
        "recoverPeriod": 1,
        "winSize": 20,
        "minStats": 3,
        "healthRate": 0.9,
    }
    bigpipe, _ = await start_node(
        kafka, tmp_path, processes, retries=5, circuitBreaker=slow_breaker, delayThreshold=30_000
    )
    for index in range(3):
        await bigpipe.post_call(http, data=str(index), url=downstream.url())

    async def broken() -> bool:
        return (await group_stats(bigpipe, http))["circuitIsBreak"] == 1

    await eventually(broken, 30, "three failures to open the breaker")
    await eventually(lambda: len(downstream.requests) == 3, 10, "the three failed attempts")
    entry = {
        **bigpipe.config["kafka.consumer.list"][0],
        "circuitBreaker": {**slow_breaker, "breakPeriod": 1},
    }
    rewrite(bigpipe, **{"kafka.consumer.list": [entry]})
    await reload(bigpipe, http)
    reloaded = time.monotonic()

    async def delivered() -> bool:
        return (await group_stats(bigpipe, http))["rpcSuccess"] == 3

    await eventually(delivered, 15, "the held calls to go out under the new breaker")
    print(f"\nheld calls delivered {time.monotonic() - reloaded:.1f} s after the reload")
    await downstream.stop()
