"""The records Bigpipe writes, read back with Kafka's own Java console consumer (a client
independent of Bigpipe's librdkafka): the call envelope and the dead letter carry every
field the README documents, with the right values, and the Kafka record key of both is
the caller's `partition_key`."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from confluent_kafka import Producer

from tests.support import (
    ACL_NAME,
    LOCAL_KAFKA,
    REPO,
    Bigpipe,
    Downstream,
    dead_letter_topic,
    eventually,
    group_stats,
    start_node,
)

NULL_KEY = "<no key>"
README = (REPO / "README.md").read_text()


@dataclass
class Record:
    partition: int
    offset: int
    key: str | None
    text: str

    @property
    def value(self) -> dict[str, Any]:
        return orjson.loads(self.text)


def console_consume(bootstrap: str, topic: str, count: int) -> list[Record]:
    """Read `count` records from the start of `topic` with kafka-console-consumer."""
    result = subprocess.run(
        [
            str(LOCAL_KAFKA),
            "tool",
            "console-consumer",
            f"--bootstrap-server={bootstrap}",
            f"--topic={topic}",
            "--from-beginning",
            f"--max-messages={count}",
            "--timeout-ms=30000",
            *("--formatter-property", "print.key=true"),
            *("--formatter-property", "print.partition=true"),
            *("--formatter-property", "print.offset=true"),
            *("--formatter-property", f"null.literal={NULL_KEY}"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    records = []
    for line in result.stdout.splitlines():
        if not line.startswith("Partition:"):
            continue
        partition, offset, key, value = line.split("\t", 3)
        records.append(
            Record(
                int(partition.removeprefix("Partition:")),
                int(offset.removeprefix("Offset:")),
                None if key == NULL_KEY else key,
                value,
            )
        )
    assert len(records) == count, f"{topic}: read {len(records)} of {count}: {result.stderr}"
    return records


def documented_fields(heading: str) -> set[str]:
    """The JSON keys in the README's example block right after `heading`."""
    start = README.index(heading)
    block = README[README.index("```json", start) : README.index("```\n", start + 1)]
    return set(re.findall(r'"(\w+)":', block))


def documented_rows(heading: str) -> set[str]:
    """The names in the first column of the README's table after `heading`."""
    start = README.index(heading)
    section = README[start : README.index("\n\n**", start)]
    rows = re.findall(r"^\| (.+?) \|", section, re.M)
    return {name for row in rows for name in re.findall(r"`(\w+)`", row)}


async def boom(_request: web.Request, _number: int) -> web.Response:
    return web.Response(status=500, text="boom")


async def test_dead_letters_carry_every_documented_field_and_the_call_key(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=boom).start()
    bigpipe, topic = await start_node(kafka, tmp_path, processes, retries=1)
    group = bigpipe.config["kafka.consumer.list"][0]["groupId"]
    before_ms = int(time.time() * 1000)
    sent: dict[str, str | None] = {}  # call id -> partition_key
    for key in ("user-7", None):
        extra = {"partition_key": key} if key else {}
        status, reply = await bigpipe.post_call(
            http, data=f"payload of {key}", url=downstream.url(), **extra
        )
        assert (status, reply["errno"]) == (200, 0), reply
        sent[reply["data"]["id"]] = key
    producer = Producer({"bootstrap.servers": kafka})
    producer.produce(topic, b"not json", b"bad-key")
    producer.flush(10)

    async def all_dead() -> bool:
        return (await group_stats(bigpipe, http))["deadLetter"] == 3

    await eventually(all_dead, 60, "three dead letters")
    after_ms = int(time.time() * 1000)
    calls = await asyncio.to_thread(console_consume, kafka, topic, 3)
    letters = await asyncio.to_thread(console_consume, kafka, dead_letter_topic(bigpipe), 3)
    await downstream.stop()

    envelope_fields = {"v", "id", "url", "data", "caller", "ts", "headers"}
    # Rows for fields only some calls carry: sent again, keyed, or with callbacks.
    optional = {"group", "redrive", "replay", "ikey", "callbacks"}
    assert envelope_fields == documented_rows("**Call envelope**") - optional
    letter_fields = documented_fields("**Dead letter**")
    by_id = {r.value["id"]: r for r in calls if r.key != "bad-key"}
    for call_id, key in sent.items():
        call = by_id[call_id]
        assert call.key == key, "the call's record key is its partition_key"
        assert set(call.value) == envelope_fields
        assert call.value["v"] == 1 and call.value["caller"] == ACL_NAME
        assert (call.value["url"], call.value["data"]) == (downstream.url(), f"payload of {key}")
        assert before_ms <= call.value["ts"] <= after_ms
        [letter] = [r for r in letters if (r.value["call"] or {}).get("id") == call_id]
        assert letter.key == key, "a dead letter keeps the call's key"
        body = letter.value
        fields = set(body) | set(body["source"])
        assert fields == letter_fields, f"undocumented or missing: {fields ^ letter_fields}"
        assert body["v"] == 1
        assert body["call"] == call.value, "the envelope, as it was in the call topic"
        assert body["raw"] is None
        assert body["source"] == {
            "topic": topic,
            "partition": call.partition,
            "offset": call.offset,
            "group": group,
        }
        assert (body["attempts"], body["lastStatus"], body["lastError"]) == (
            2,
            500,
            "HTTP 500: boom",
        )
        assert call.value["ts"] <= body["firstAttemptAt"] <= body["failedAt"] <= after_ms

    [invalid] = [r for r in letters if r.value["call"] is None]
    [raw_call] = [r for r in calls if r.key == "bad-key"]
    assert invalid.key == "bad-key"
    assert invalid.value["raw"] == "bm90IGpzb24=", "the record's bytes, in base64"
    assert invalid.value["attempts"] == 0 and invalid.value["lastStatus"] is None
    assert invalid.value["lastError"].startswith("invalid record: not JSON")
    assert invalid.value["source"]["offset"] == raw_call.offset
