"""kill -9 while deliveries are in flight and finishing out of order: nothing is lost.

A call counts as delivered only once the downstream has answered it: a request cut off
by the kill, or by a rebalance, has to arrive again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support import (
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    start_node,
    unique,
)

CALLS = 400


async def slow_and_shuffled(_request: web.Request, _number: int) -> web.Response:
    # Random latency makes calls finish out of order within each partition.
    await asyncio.sleep(random.uniform(0, 0.5))
    return web.Response(status=200)


async def slower_and_shuffled(_request: web.Request, _number: int) -> web.Response:
    # Up to a second: the delivery outlasts a second node's start, and about five calls
    # per partition are in flight at once, finishing out of order, when it takes over.
    await asyncio.sleep(random.uniform(0, 1.0))
    return web.Response(status=200)


async def test_kill_9_mid_delivery_loses_nothing(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=slow_and_shuffled).start()
    first, _ = await start_node(kafka, tmp_path, processes, concurrency=20)

    accepted: set[str] = set()
    for index in range(CALLS):
        status, reply = await first.post_call(
            http, data=f"c{index}", url=downstream.url(), partition_key=str(index)
        )
        assert (status, reply["errno"]) == (200, 0)
        accepted.add(reply["data"]["id"])

    await eventually(
        lambda: len(downstream.answered_ids()) >= CALLS // 4 and downstream.in_flight >= 5,
        30,
        "deliveries to be under way, several of them in flight",
    )
    await first.kill()
    killed_at = time.monotonic()
    # Calls the downstream was working on when the node died: they were never answered,
    # so their offsets must not have been committed, and the next node must send them again.
    in_flight_at_kill = downstream.unanswered_ids()
    delivered_before = len(downstream.answered_ids())

    second = await Bigpipe(first.config, tmp_path).start()
    processes.append(second)
    await eventually(
        lambda: accepted <= downstream.answered_ids(),
        60,
        "every accepted call to be answered by the downstream after the restart",
    )
    again = {r.call_id for r in downstream.requests if r.at > killed_at and r.answered}
    counts = Counter(r.call_id for r in downstream.requests)
    duplicated = sum(1 for n in counts.values() if n > 1)
    print(
        f"\ncrash: accepted={len(accepted)} delivered_before_kill={delivered_before} "
        f"in_flight_at_kill={len(in_flight_at_kill)} lost=0 duplicated={duplicated}"
    )
    assert delivered_before < CALLS, "the kill must land while calls were still undelivered"
    assert in_flight_at_kill, "the kill must land while the downstream was working on calls"
    assert in_flight_at_kill <= again, "every call in flight at the kill is delivered again"
    assert await second.stop() == 0
    await downstream.stop()


async def test_a_node_joining_mid_delivery_takes_partitions_and_nothing_is_lost(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=slower_and_shuffled).start()
    topic = unique("rebalance")
    group = unique("g")
    config = base_config(
        kafka,
        topic,
        free_port(),
        partitions=4,
        consumers=[consumer_entry(topic, group, concurrency=20)],
    )
    first = await Bigpipe(config, tmp_path).start()
    processes.append(first)
    accepted = set()
    for index in range(CALLS):
        status, reply = await first.post_call(
            http, data=f"r{index}", url=downstream.url(), partition_key=str(index)
        )
        assert (status, reply["errno"]) == (200, 0)
        accepted.add(reply["data"]["id"])
    await eventually(
        lambda: len(downstream.answered_ids()) >= CALLS // 5, 30, "deliveries to start"
    )

    second = await Bigpipe({**config, "http.server.port": free_port()}, tmp_path).start()
    processes.append(second)

    async def second_delivers() -> bool:
        return (await second.stats(http))["consumerStats"][0]["handleMessage"] > 0

    await eventually(second_delivers, 30, "the joining node to take partitions")
    # Calls the first node was delivering from the partitions it gave up are cut off,
    # unanswered: the joining node must deliver them again.
    await eventually(lambda: accepted <= downstream.answered_ids(), 60, "every call answered")
    cut_off = [r.call_id for r in downstream.requests if r.answered is None]
    counts = Counter(r.call_id for r in downstream.requests)
    print(
        f"\nrebalance: accepted={len(accepted)} lost=0 cut_off={len(cut_off)} "
        f"duplicated={sum(1 for n in counts.values() if n > 1)}"
    )
    assert cut_off, "the rebalance must land while the first node had calls in flight"
    assert "lost partitions" not in first.log_tail(1000)
    assert await first.stop() == 0 and await second.stop() == 0
    await downstream.stop()
