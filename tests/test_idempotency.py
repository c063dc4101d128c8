"""Idempotency keys: one delivery per (caller, key), however often and wherever it is sent."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import orjson

from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    group_settled,
    group_stats,
    unique,
)


async def two_nodes(kafka: str, tmp_path: Path, processes: list[Bigpipe]) -> list[Bigpipe]:
    topic, group = unique("idem"), unique("g")
    nodes = []
    for _ in range(2):
        config = base_config(
            kafka, topic, free_port(), consumers=[consumer_entry(topic, group, concurrency=50)]
        )
        nodes.append(await Bigpipe(config, tmp_path).start())
        processes.append(nodes[-1])
    # Calls posted while the group still rebalances may be delivered again by the next
    # owner of their partition (at least once): more deliveries than the tests count.
    await group_settled(kafka, group, members=2, partitions=3)
    return nodes


async def test_a_hundred_keys_sent_three_times_to_two_nodes_are_delivered_once_each(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    nodes = await two_nodes(kafka, tmp_path, processes)
    keys = [unique("key") for _ in range(100)]
    sends = [(key, random.choice(nodes)) for key in keys for _ in range(3)]
    random.shuffle(sends)  # copies race: at once, on either node
    replies = await asyncio.gather(
        *(node.post_call(http, key, downstream.url(), idempotency_key=key) for key, node in sends)
    )
    refused = [(status, reply) for status, reply in replies if (status, reply["errno"]) != (200, 0)]
    assert not refused, refused
    await eventually(
        lambda: {r.body.decode() for r in downstream.requests} == set(keys), 60, "every key"
    )

    written = sum(1 for _, reply in replies if "duplicate" not in reply["data"])
    assert written >= 100

    async def settled() -> bool:  # every copy written either delivered or skipped
        finished = 0
        for node in nodes:
            stats = await group_stats(node, http)
            finished += stats["rpcSuccess"] + stats["duplicateSkipped"]
        return finished == written

    await eventually(settled, 60, f"all {written} calls written handled")
    bodies = [r.body.decode() for r in downstream.requests]
    assert len(bodies) == 100, f"{len(bodies) - 100} duplicate deliveries"
    print(f"{written - 100} of 200 copies raced past ingest and were skipped at delivery")


async def test_a_sequential_retry_gets_the_first_id_on_the_other_node(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    first_node, other_node = await two_nodes(kafka, tmp_path, processes)
    key = unique("key")
    _, first = await first_node.post_call(http, "once", downstream.url(), idempotency_key=key)
    assert set(first["data"]) == {"id", "partition", "offset"}
    payload = {"acl": {"name": ACL_NAME, "secret": ACL_SECRET}, "url": downstream.url()}
    body = orjson.dumps({**payload, "data": "once"})
    for node in (other_node, first_node):  # the header works as the field does
        status, again = await node.post_raw(http, body, {"Idempotency-Key": key})
        assert (status, again["errno"]) == (200, 0)
        assert again["data"] == {"id": first["data"]["id"], "duplicate": True}
    _, other = await other_node.post_call(
        http, "other", downstream.url(), idempotency_key=key + "x"
    )
    assert "duplicate" not in other["data"]
    await eventually(lambda: len(downstream.requests) == 2, 30, "two deliveries")
    assert sorted(r.call_id for r in downstream.requests) == sorted(
        [first["data"]["id"], other["data"]["id"]]
    )


async def test_keys_are_per_caller_and_checked(
    kafka: str,
    tmp_path: Path,
    processes: list[Bigpipe],
    http: aiohttp.ClientSession,
    downstream: Downstream,
) -> None:
    topic = unique("idem")
    config = base_config(kafka, topic, free_port())
    config["kafka.producer.acl"].append({"name": "other", "secret": "s", "topic": topic})
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    key = unique("key")
    _, mine = await bigpipe.post_call(http, "d", downstream.url(), idempotency_key=key)
    theirs = {"acl": {"name": "other", "secret": "s"}, "url": downstream.url(), "data": "d"}
    _, reply = await bigpipe.post_raw(http, orjson.dumps({**theirs, "idempotency_key": key}))
    assert reply["data"]["id"] != mine["data"]["id"] and "duplicate" not in reply["data"]
    status, reply = await bigpipe.post_call(http, "d", downstream.url(), idempotency_key="")
    assert (status, reply["msg"]) == (
        400,
        "field idempotency_key: must be a string of 1 to 255 characters",
    )
    status, reply = await bigpipe.post_raw(
        http, orjson.dumps({**theirs, "idempotency_key": "a"}), {"Idempotency-Key": "b"}
    )
    assert (status, reply["msg"]) == (
        400,
        "field idempotency_key: differs from the Idempotency-Key header",
    )
