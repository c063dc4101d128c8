"""The breaker on a live node: it holds calls through an outage that retries cannot ride out,
and walks NORMAL -> BREAK -> RECOVER -> NORMAL, as /stats shows it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support import Bigpipe, Downstream, eventually, group_stats, start_node

BREAKER = {"breakPeriod": 3, "recoverPeriod": 2, "winSize": 2, "minStats": 3, "healthRate": 0.5}
NAMES = {0: "NORMAL", 1: "BREAK", 2: "RECOVER"}


class Outage:
    """A downstream behaviour: 503 (with `Retry-After`, if given) while `down`, else 200.
    Records the calls answered 200: delivered."""

    def __init__(self, retry_after: int | None = None) -> None:
        self.down = True
        self._headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        self.delivered: set[str] = set()

    async def __call__(self, request: web.Request, _number: int) -> web.Response:
        if self.down:
            return web.Response(status=503, headers=self._headers)
        self.delivered.add(request.headers["X-Bigpipe-Call-Id"])
        return web.Response(status=200)


async def test_the_breaker_holds_calls_through_an_outage_and_recovers_end_to_end(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    outage = Outage()
    downstream = await Downstream(behaviour=outage).start()
    # One retry with at most 0.2 s of backoff: alone, a call rides out 0.2 s of outage.
    bigpipe, _ = await start_node(
        kafka,
        tmp_path,
        processes,
        retries=1,
        backoffBase=100,
        backoffMax=200,
        circuitBreaker=BREAKER,
    )
    states: list[tuple[float, int]] = []  # (when, breakerState) each time it changes

    async def watch() -> None:
        while True:
            state = (await group_stats(bigpipe, http))["breakerState"]
            if not states or states[-1][1] != state:
                states.append((time.monotonic(), state))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:

        async def send() -> str:
            status, reply = await bigpipe.post_call(http, url=downstream.url())
            assert (status, reply["errno"]) == (200, 0)
            return reply["data"]["id"]

        while not states or states[-1][1] != 1:  # failures until the breaker opens
            await send()
            await eventually(lambda: downstream.in_flight == 0, 10, "the attempt to end")
        broke_at = states[-1][0]
        held = [await send() for _ in range(20)]
        # The outage outlasts what the retries alone could ride out, by far.
        await eventually(lambda: time.monotonic() > broke_at + 1, 5, "a second of outage")
        assert states[-1][1] == 1, "still BREAK: the break period is 3 s"
        outage.down = False
        outage_ended = time.monotonic()

        await eventually(
            lambda: set(held) <= downstream.answered_ids(), 30, "the held calls delivered"
        )
        await eventually(lambda: states[-1][1] == 0, 30, "the breaker back to NORMAL")
    finally:
        watcher.cancel()
    seen = [NAMES[state] for _, state in states]
    tries = {i: [r for r in downstream.requests if r.call_id == i] for i in held}
    earliest = min(r.at for attempts in tries.values() for r in attempts) - broke_at
    print(f"\nbreaker: states {seen}; held calls first tried {earliest:.1f} s after BREAK")
    assert seen == ["NORMAL", "BREAK", "RECOVER", "NORMAL"]
    assert all(len(attempts) == 1 for attempts in tries.values()), "one attempt each"
    assert all(a.at > outage_ended for attempts in tries.values() for a in attempts), (
        "a held call is not tried during the outage, so its one attempt is delivered"
    )
    assert earliest > 2.5, "nothing held goes out before the break period (3 s) is over"
    await downstream.stop()
