"""A new consumer group starts at the earliest offset: calls accepted before the group
existed are delivered too (README, "At-least-once, precisely")."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.support import (
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    topic_record_count,
    unique,
)

CALLS = 10


async def test_a_group_created_after_the_calls_delivers_every_one(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    topic = unique("early")
    ingest_only = await Bigpipe(base_config(kafka, topic, free_port()), tmp_path).start()
    processes.append(ingest_only)
    ids = set()
    for index in range(CALLS):
        status, reply = await ingest_only.post_call(
            http, data=str(index), url=downstream.url(), partition_key=str(index)
        )
        assert (status, reply["errno"]) == (200, 0), reply
        ids.add(reply["data"]["id"])
    assert await ingest_only.stop() == 0
    assert topic_record_count(kafka, topic) == CALLS

    group = unique("late-group")
    config = base_config(kafka, topic, free_port(), consumers=[consumer_entry(topic, group)])
    late = await Bigpipe(config, tmp_path).start()
    processes.append(late)
    await eventually(lambda: ids <= downstream.call_ids(), 30, "every earlier call delivered")
    assert len(downstream.requests) == CALLS
