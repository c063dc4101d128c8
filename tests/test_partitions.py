"""Every assigned partition is consuming, or paused for a reason /stats and /metrics show.

librdkafka keeps its own pause flag on a partition across an incremental unassign and
assign, so a partition paused when it was revoked comes back paused: the group must not
forget that it has to resume it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from confluent_kafka import Consumer

from bigpipe.delivery.partitions import BUFFER, WATERMARK_TIMEOUT, PartitionStates
from tests.support import (
    Bigpipe,
    Downstream,
    eventually,
    free_port,
    group_stats,
    start_node,
    topic_record_count,
)
from tests.test_metrics import scrape
from tests.test_waits import first_call_delivered

BREAKER = {"breakPeriod": 1, "recoverPeriod": 1, "winSize": 2, "minStats": 3, "healthRate": 0.5}


class Joiner:
    """A second member of a Bigpipe group: a plain Kafka consumer that takes partitions,
    reads nothing it commits, and leaves on `close()` (so its partitions go back)."""

    def __init__(self, kafka: str, topic: str, group: str) -> None:
        self.assigned: set[int] = set()
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": kafka,
                "group.id": group,
                "partition.assignment.strategy": "cooperative-sticky",
                "enable.auto.commit": False,
                "session.timeout.ms": 10_000,
            }
        )
        self._consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _on_assign(self, _consumer: Consumer, partitions: list[Any]) -> None:
        self.assigned |= {tp.partition for tp in partitions}

    def _on_revoke(self, _consumer: Consumer, partitions: list[Any]) -> None:
        self.assigned -= {tp.partition for tp in partitions}

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._consumer.poll(0.1)
        self._consumer.close()

    async def close(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)


async def test_a_partition_paused_when_revoked_is_resumed_when_it_comes_back(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    failing = True

    async def outage(_request: web.Request, _number: int) -> web.Response:
        return web.Response(status=503 if failing else 200)

    downstream = await Downstream(behaviour=outage).start()
    bigpipe, topic = await start_node(
        kafka,
        tmp_path,
        processes,
        partitions=4,
        retries=1000,
        backoffBase=50,
        backoffMax=100,
        circuitBreaker=BREAKER,
        destination={"maxHeld": 5},  # past 5 calls held by the open breaker: pause
    )
    group = bigpipe.config["kafka.consumer.list"][0]["groupId"]

    async def send(count: int) -> list[str]:
        ids = []
        for index in range(count):
            status, reply = await bigpipe.post_call(
                http, data=str(index), url=downstream.url(), partition_key=f"k{index}"
            )
            assert (status, reply["errno"]) == (200, 0), reply
            ids.append(reply["data"]["id"])
        return ids

    ids = await send(20)

    async def breaker_open() -> bool:
        return (await group_stats(bigpipe, http))["circuitIsBreak"] == 1

    await eventually(breaker_open, 30, "the breaker to open")

    async def partitions() -> dict[str, str]:
        return (await group_stats(bigpipe, http))["partitions"]

    async def all_paused_by_held_calls() -> bool:
        states = await partitions()
        return len(states) == 4 and set(states.values()) == {"paused:held"}

    await eventually(all_paused_by_held_calls, 10, "/stats to show every partition paused")
    ids += await send(8)  # calls that arrive while their partitions are paused

    async def lag_counts_them() -> bool:
        lag = (await group_stats(bigpipe, http))["lag"]
        return len(lag) == 4 and sum(lag.values()) == len(ids)

    await eventually(lag_counts_them, 20, "lag to count calls on paused partitions")

    joiner = Joiner(kafka, topic, group)
    await eventually(lambda: bool(joiner.assigned), 60, "the second member to take partitions")
    taken = set(joiner.assigned)
    failing = False  # the downstream recovers while those partitions are away

    async def breaker_closed() -> bool:
        return (await group_stats(bigpipe, http))["circuitIsBreak"] == 0

    await eventually(breaker_closed, 30, "the breaker to let calls through again")
    await joiner.close()

    async def all_back() -> bool:
        return len(await partitions()) == 4

    await eventually(all_back, 60, "the partitions to come back")
    ids += await send(20)
    started = time.monotonic()
    try:
        await eventually(lambda: set(ids) <= downstream.call_ids(), 30, "every call delivered")
    finally:
        missing = len(set(ids) - downstream.call_ids())
        print(
            f"\npaused partitions: taken_away={sorted(taken)} accepted={len(ids)} "
            f"undelivered={missing} after {time.monotonic() - started:.1f} s; "
            f"states={await partitions()}"
        )
    assert set((await partitions()).values()) == {"consuming"}
    samples = await scrape(bigpipe, http)
    states = samples["bigpipe_partition_state"]
    consuming = [labels for labels, value in states.items() if value == 1]
    assert len(consuming) == 4 and all(("state", "consuming") in labels for labels in consuming)
    await downstream.stop()


async def test_a_delay_rung_paused_when_revoked_is_resumed_when_it_comes_back(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """The delay ladder pauses a rung's partition at a record not yet ripe. Taken away
    while paused, and given back after its resume timer has gone off, the partition
    comes back with librdkafka's pause flag set: the ladder must resume it itself."""
    bigpipe, topic = await start_node(kafka, tmp_path, processes, partitions=1, delayThreshold=1000)
    group = bigpipe.config["kafka.consumer.list"][0]["groupId"]
    rung = f"{topic}.{group}.delay.10s"
    # The ladder's group is joined once a call has gone through a rung and come back.
    await first_call_delivered(bigpipe, http, downstream, 1500)

    status, reply = await bigpipe.post_call(http, url=downstream.url(), delay_ms=12_000)
    assert (status, reply["errno"]) == (200, 0), reply
    call_id = reply["data"]["id"]

    async def parked() -> bool:
        return await asyncio.to_thread(topic_record_count, kafka, rung) == 1

    await eventually(parked, 30, "the call to wait in the 10s rung")
    ripe = time.monotonic() + 10  # the ladder reads it at once and pauses the rung till then
    joiner = Joiner(kafka, rung, f"{group}.delay")  # only the 10s rung: it takes that one
    await eventually(lambda: 0 in joiner.assigned, 60, "a second member to take the rung")
    # Hold the rung past the ladder's resume timer, which then finds it gone.
    await asyncio.sleep(max(0.0, ripe + 1 - time.monotonic()))
    await joiner.close()
    await eventually(lambda: call_id in downstream.call_ids(), 30, "the parked call")


async def test_high_watermarks_from_an_unreachable_broker_take_one_timeout_in_all() -> None:
    """stop() waits for a query under way (settle): asked one paused partition after
    another, each with its own timeout, a broker that does not answer held up a stop for
    WATERMARK_TIMEOUT times the number of partitions."""
    nowhere = f"127.0.0.1:{free_port()}"
    kafka = Consumer({"bootstrap.servers": nowhere, "group.id": "g", "log_level": 0})
    try:
        states = PartitionStates(kafka, "t", {})
        states.assigned(list(range(8)))
        states.hold(BUFFER)
        started = time.monotonic()
        states.refresh_high_watermarks()
        await states.settle()
        took = time.monotonic() - started
        assert took < 2 * WATERMARK_TIMEOUT, f"{took:.1f} s for 8 paused partitions"
    finally:
        await asyncio.to_thread(kafka.close)
