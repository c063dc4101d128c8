"""The calls a group holds in memory are bounded in bytes too, not only in count:
with large calls, maxBuffered alone let a worker hold hundreds of MiB."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from bigpipe.calls.status import NO_TRAIL
from bigpipe.config import parse_config
from bigpipe.delivery.consumer import BUFFER_BYTES, ConsumerGroup
from bigpipe.delivery.delay_topics import _Rung
from bigpipe.ingest.producer import Producer
from bigpipe.metrics import Latencies
from bigpipe.stats import GroupCounters
from tests.support import (
    Bigpipe,
    Downstream,
    eventually,
    free_port,
    group_stats,
    rss_mib,
    start_node,
)
from tests.test_config import EXAMPLE

CALL_BYTES = 900_000
CALLS = 80  # 72 MB: under maxBuffered (100 here), over the byte bound


async def test_large_calls_pause_the_group_at_the_byte_bound_before_max_buffered(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    release = asyncio.Event()

    async def blocked(_request: web.Request, _number: int) -> web.Response:
        await release.wait()
        return web.Response(status=200)

    downstream = await Downstream(behaviour=blocked).start()
    bigpipe, _ = await start_node(
        kafka, tmp_path, processes, partitions=1, concurrency=1, maxBuffered=100, timeout=60_000
    )
    assert bigpipe.process is not None
    rss_before = rss_mib(bigpipe.process.pid)
    ids = []
    for index in range(CALLS):
        status, reply = await bigpipe.post_call(
            http, data=chr(65 + index % 26) * CALL_BYTES, url=downstream.url()
        )
        assert (status, reply["errno"]) == (200, 0), reply
        ids.append(reply["data"]["id"])

    async def paused_for_the_buffer() -> bool:
        return (await group_stats(bigpipe, http))["partitions"] == {"0": "paused:buffer"}

    try:
        await eventually(paused_for_the_buffer, 30, "the group to pause at the byte bound")
    finally:
        read = (await group_stats(bigpipe, http))["handleMessage"]
        rss_after = rss_mib(bigpipe.process.pid)
        print(
            f"\nbuffer bytes: {CALLS} calls of {CALL_BYTES:,} B; read into memory={read} "
            f"({read * CALL_BYTES / 2**20:.0f} MiB of records); "
            f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
        )
    # librdkafka's own prefetch queue (8 MiB) and one consume() batch may go past the bound.
    assert read * CALL_BYTES <= BUFFER_BYTES + (12 << 20)
    release.set()
    await eventually(lambda: set(ids) <= downstream.call_ids(), 120, "every call delivered")
    await downstream.stop()


async def test_calls_the_delay_ladder_holds_make_no_room_in_the_call_topics_buffer() -> None:
    """A call read back from a delay topic and held for its destination counts in the
    group's `held`, though it is none of the call topic's buffer: subtracted from that
    buffer, it let the group read one more working call past maxBuffered per such call."""
    nowhere = f"127.0.0.1:{free_port()}"
    config = parse_config({**EXAMPLE, "kafka.bootstrap.servers": nowhere})
    counters = GroupCounters()
    producer = Producer(config)
    group = ConsumerGroup(
        config,
        config.consumers[0],
        producer,
        counters,
        Latencies().group("t", "g"),
        lambda _name, _topic: None,
        lambda _call: asyncio.sleep(0, True),
        NO_TRAIL,
    )
    try:
        room = group._room()
        rung = group._ladder._rungs[("t.g.delay.1s", 0)] = _Rung(generation=0)
        for offset in range(5):  # five calls read back from a rung...
            rung.offsets.track(offset)
        counters.held += 5  # ...and held for their destination (Destination.admit)
        assert group._room() == room
    finally:
        await group.stop(0.1)
        await producer.close(0.1)
