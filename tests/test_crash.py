"""kill -9 while deliveries are in flight and finishing out of order: nothing is lost."""

from __future__ import annotations

import asyncio
import random
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
    await asyncio.sleep(random.uniform(0, 0.3))
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
        lambda: len(downstream.requests) >= CALLS // 4, 30, "deliveries to be under way"
    )
    await first.kill()
    in_flight_at_kill = downstream.in_flight
    delivered_before = len(downstream.call_ids())

    second = await Bigpipe(first.config, tmp_path).start()
    processes.append(second)
    await eventually(
        lambda: accepted <= downstream.call_ids(),
        90,
        "every accepted call to be delivered after the restart",
    )
    counts = Counter(r.call_id for r in downstream.requests)
    lost = len(accepted - set(counts))
    duplicated = sum(1 for n in counts.values() if n > 1)
    print(
        f"\ncrash: accepted={len(accepted)} delivered_before_kill={delivered_before} "
        f"in_flight_at_kill={in_flight_at_kill} lost={lost} duplicated={duplicated}"
    )
    assert lost == 0
    assert delivered_before < CALLS, "the kill must land while calls were still undelivered"
    assert await second.stop() == 0
    await downstream.stop()


async def test_a_node_joining_mid_delivery_takes_partitions_and_nothing_is_lost(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=slow_and_shuffled).start()
    topic = unique("rebalance")
    group = unique("g")
    config = base_config(
        kafka,
        topic,
        free_port(),
        partitions=6,
        consumers=[consumer_entry(topic, group, concurrency=10)],
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
    await eventually(lambda: len(downstream.requests) >= CALLS // 5, 30, "deliveries to start")

    second = await Bigpipe({**config, "http.server.port": free_port()}, tmp_path).start()
    processes.append(second)

    async def second_delivers() -> bool:
        return (await second.stats(http))["consumerStats"][0]["handleMessage"] > 0

    await eventually(second_delivers, 30, "the joining node to take partitions")
    await eventually(lambda: accepted <= downstream.call_ids(), 60, "every call delivered")
    counts = Counter(r.call_id for r in downstream.requests)
    print(
        f"\nrebalance: accepted={len(accepted)} lost={len(accepted - set(counts))} "
        f"duplicated={sum(1 for n in counts.values() if n > 1)}"
    )
    assert "lost partitions" not in first.log_tail(1000)
    assert await first.stop() == 0 and await second.stop() == 0
    await downstream.stop()
