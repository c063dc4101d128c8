"""One dead-letter topic per consumer group by default, as the README and the shipped
config say; a topic shared by hand still tells the groups apart (source.group)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from bigpipe.config import ConfigError, parse_config
from bigpipe.node.preflight import load_checked
from tests.support import (
    REPO,
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    read_topic,
    unique,
)
from tests.test_config import EXAMPLE


def test_the_shipped_config_gives_each_group_its_own_dead_letter_topic() -> None:
    groups = load_checked(REPO / "config" / "bigpipe.json")[1].consumers
    assert len(groups) >= 2
    topics = [g.dead_letter_topic for g in groups]
    assert topics == [f"{g.topic}.{g.group_id}.dlq" for g in groups]
    assert len(set(topics)) == len(topics)


def test_a_group_id_that_cannot_name_a_topic_asks_for_a_dead_letter_topic() -> None:
    raw = orjson.loads(orjson.dumps(EXAMPLE))
    raw["kafka.consumer.list"][0]["groupId"] = "billing team"
    with pytest.raises(ConfigError) as refused:
        parse_config(raw)
    [problem] = refused.value.problems
    assert problem.startswith("kafka.consumer.list[0].deadLetterTopic: the default ")
    raw["kafka.consumer.list"][0]["deadLetterTopic"] = "billing.dlq"
    assert parse_config(raw).consumers[0].dead_letter_topic == "billing.dlq"


async def refuse(_request: web.Request, _number: int) -> web.StreamResponse:
    return web.Response(status=400)  # final: dead-lettered at once


async def test_two_groups_of_one_topic_dead_letter_apart(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=refuse).start()
    topic, shared = unique("dl"), unique("shared-dlq")
    groups = [unique("a"), unique("b"), unique("c"), unique("d")]
    entries = [consumer_entry(topic, group) for group in groups]
    for entry in entries[2:]:  # two groups share one dead-letter topic, set by hand
        entry["deadLetterTopic"] = shared
    bigpipe = await Bigpipe(
        base_config(kafka, topic, free_port(), consumers=entries), tmp_path
    ).start()
    processes.append(bigpipe)
    status, reply = await bigpipe.post_call(http, url=downstream.url())
    assert status == 200

    async def all_dead_lettered() -> bool:
        stats = (await bigpipe.stats(http))["consumerStats"]
        return [s["deadLetter"] for s in stats] == [1, 1, 1, 1]

    await eventually(all_dead_lettered, 60, "a dead letter from each group")
    for group in groups[:2]:
        [record] = await asyncio.to_thread(read_topic, kafka, f"{topic}.{group}.dlq", 1)
        letter = orjson.loads(record.value())
        assert (letter["source"]["group"], letter["call"]["id"]) == (group, reply["data"]["id"])
    records = await asyncio.to_thread(read_topic, kafka, shared, 2)
    assert sorted(orjson.loads(r.value())["source"]["group"] for r in records) == groups[2:]
    assert await bigpipe.stop() == 0
    await downstream.stop()
