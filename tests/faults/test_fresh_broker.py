"""Every call a node acknowledges is in Kafka, on a broker started a moment before.

Seen twice on this machine, both times on a loaded one, and not explained yet: a node of
2 workers on a freshly started one-broker Kafka took 1,000 calls from 8 clients as soon
as it was ready, answered every one errno 0 with its partition and offset, and 2 (and,
in another run, 3) of them were not in the topic afterwards: its consumer group read
997 records, and so did a plain reader. The lost calls were accepted within a second of
the producer's "Failed to acquire idempotence PID ... Coordinator load in progress:
retrying". 1 run in 22 lost calls here; so this test repeats the scenario.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    free_port,
    own_kafka,
    read_whole_topic,
    unique,
)

pytestmark = [pytest.mark.faults, pytest.mark.long, pytest.mark.timeout(1200)]

RUNS, CALLS, CLIENTS = 8, 1000, 8


async def post_all(bigpipe: Bigpipe, url: str) -> dict[str, tuple[int, int]]:
    """CALLS calls from CLIENTS clients at once: each accepted call's (partition, offset)."""
    body = orjson.dumps({"acl": {"name": ACL_NAME, "secret": ACL_SECRET}, "url": url, "data": "x"})
    placed: dict[str, tuple[int, int]] = {}
    remaining = CALLS

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with http.post(f"{bigpipe.url}/rpc/call", data=body) as response:
                reply = await response.json()
            if reply["errno"] == 0:
                placed[reply["data"]["id"]] = (reply["data"]["partition"], reply["data"]["offset"])

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
    return placed


@pytest.mark.parametrize("run", range(RUNS))
async def test_every_acknowledged_call_is_in_kafka_on_a_broker_just_started(
    run: int, downstream: Downstream, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    async with own_kafka(tmp_path / "kafka") as (kafka, _pid):
        topic = unique("fresh")
        config = base_config(
            kafka,
            topic,
            free_port(),
            partitions=6,
            consumers=[consumer_entry(topic, unique("g"), concurrency=64)],
            **{"http.server.workers": 2},
        )
        bigpipe = await Bigpipe(config, tmp_path).start()
        processes.append(bigpipe)
        placed = await post_all(bigpipe, downstream.url())
        records = await asyncio.to_thread(read_whole_topic, kafka, topic)
        stored = {orjson.loads(record.value())["id"] for record in records}
        lost = {call: placed[call] for call in placed if call not in stored}
        claimed_twice = [place for place, n in Counter(placed.values()).items() if n > 1]
        print(f"\nrun {run}: {len(placed)} acknowledged, {len(stored)} in the topic")
        assert not lost, (
            f"{len(lost)} acknowledged calls not in the topic, at the places claimed: {lost}; "
            f"places claimed twice: {claimed_twice}; node log {bigpipe.log_path}"
        )
        assert await bigpipe.stop() == 0
