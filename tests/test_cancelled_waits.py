"""A call cancelled while it waits (drain deadline, rebalance, group removal) is not a failed
call: it is neither counted as failed nor dead-lettered, and its next owner delivers it."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
from aiohttp import web

from bigpipe.delivery.limits import Limits
from tests.support import (
    Bigpipe,
    Downstream,
    dead_letter_topic,
    eventually,
    start_node,
    topic_record_count,
)


async def test_waiters_cancelled_while_a_slot_frees_leave_the_limits_consistent() -> None:
    limits = Limits(rate_limit=1000, concurrency=1)
    await limits.acquire()  # the one slot, held as a request in flight holds it
    waiters = [asyncio.create_task(limits.acquire()) for _ in range(5)]
    await asyncio.sleep(0)  # every waiter is queued for the slot
    for waiter in waiters:  # as a drain cancels every unfinished call at once...
        waiter.cancel()
    limits.release()  # ...and the request in flight gives its slot up in the same tick
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    await asyncio.wait_for(limits.acquire(), 1)  # the slot is free again, not leaked
    limits.release()


async def one_second(_request: web.Request, _number: int) -> web.Response:
    await asyncio.sleep(1)
    return web.Response(status=200)


async def test_a_drain_deadline_never_dead_letters_calls_waiting_for_a_slot(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """The issue's repro: concurrency 1, 30 calls to a 1 s downstream, SIGTERM after 2 s."""
    downstream = await Downstream(behaviour=one_second).start()
    first, _topic = await start_node(kafka, tmp_path, processes, concurrency=1, partitions=1)
    ids = []
    for index in range(30):
        status, reply = await first.post_call(http, data=str(index), url=downstream.url())
        assert (status, reply["errno"]) == (200, 0), reply
        ids.append(reply["data"]["id"])
    await eventually(lambda: len(downstream.requests) >= 2, 30, "two deliveries under way")
    first.signal(signal.SIGTERM)
    assert first.process is not None
    assert await asyncio.wait_for(first.process.wait(), 30) == 0
    by_first = len(downstream.call_ids())
    log = first.log_tail(200)
    dead = await asyncio.to_thread(topic_record_count, kafka, dead_letter_topic(first))
    print(f"\ncancelled waits: accepted=30 delivered_before_drain={by_first} dead_letters={dead}")
    assert "not in deque" not in log and "failed unexpectedly" not in log, log
    assert dead == 0, "calls cancelled while waiting for a slot were dead-lettered"

    # The rest at once (not one a second at concurrency 1): only that none is lost matters.
    group = {**first.config["kafka.consumer.list"][0], "concurrency": 30}
    second = await Bigpipe({**first.config, "kafka.consumer.list": [group]}, tmp_path).start()
    processes.append(second)
    await eventually(lambda: set(ids) <= downstream.call_ids(), 60, "every call delivered")
    assert await asyncio.to_thread(topic_record_count, kafka, dead_letter_topic(first)) == 0
    await downstream.stop()
