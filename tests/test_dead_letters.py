"""Dead letters always fit, Kafka's permanent refusals are told from transient ones, and
no single record can stall its partition."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bigpipe.calls.callbacks import send_callback
from bigpipe.calls.envelope import encode_call, encode_dead_letter, new_call
from bigpipe.config import parse_config
from bigpipe.delivery.client import AttemptResult, Outcome
from bigpipe.delivery.retry import Verdict
from bigpipe.ingest.producer import ProduceFailed, Producer
from tests.support import (
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    create_topic,
    dead_letter_topic,
    eventually,
    free_port,
    group_stats,
    read_topic,
    unique,
)
from tests.test_config import EXAMPLE


def letter_of(data: str, max_bytes: int) -> dict[str, Any]:
    call = new_call("http://svc.example/hook", data, "caller", {"X-Trace": "t1"})
    return orjson.loads(
        encode_dead_letter(
            value=encode_call(call),
            call=call,
            topic="calls",
            partition=2,
            offset=41,
            group_id="g",
            attempts=3,
            last_status=500,
            last_error="HTTP 500: boom",
            first_attempt_ms=1,
            max_bytes=max_bytes,
        )
    )


def test_a_dead_letter_over_the_limit_cuts_only_the_data_and_says_what_it_cut() -> None:
    data = "\x01é" * 50_000  # escapes and multi-byte characters make the JSON longer
    letter = letter_of(data, 20_000)
    assert len(orjson.dumps(letter)) <= 20_000
    whole = data.encode()
    assert letter["cut"] == {
        "field": "call.data",
        "length": len(whole),
        "sha256": hashlib.sha256(whole).hexdigest(),
    }
    assert data.startswith(letter["call"]["data"]) and len(letter["call"]["data"]) > 1000
    assert letter["call"]["headers"] == {"X-Trace": "t1"}
    assert letter["source"] == {"topic": "calls", "partition": 2, "offset": 41, "group": "g"}
    assert (letter["attempts"], letter["lastStatus"]) == (3, 500)
    assert letter_of("small", 20_000)["cut"] is None
    assert letter_of(data, 0)["call"]["data"] == "", "0 bytes: the metadata alone"


async def test_a_write_pending_when_its_producer_closes_fails_instead_of_waiting_forever() -> None:
    """A reload that replaces the producer must not strand a dead letter on the old one."""
    nowhere = f"127.0.0.1:{free_port()}"
    producer = Producer(parse_config({**EXAMPLE, "kafka.bootstrap.servers": nowhere}))
    pending = asyncio.ensure_future(producer.send("t", b"dead letter"))
    await producer.close(0.2)
    try:
        await asyncio.wait_for(pending, 5)
    except ProduceFailed as exc:
        assert not exc.permanent, "it may still be stored: write it again elsewhere"
    else:
        raise AssertionError("the write cannot have been acknowledged")


async def test_a_write_to_a_closed_producer_fails_at_once() -> None:
    """Nobody polls a closed producer: a write to it would never be answered."""
    nowhere = f"127.0.0.1:{free_port()}"
    producer = Producer(parse_config({**EXAMPLE, "kafka.bootstrap.servers": nowhere}))
    await producer.close(0.2)
    try:
        await asyncio.wait_for(producer.send("t", b"late write"), 2)
    except ProduceFailed as exc:
        assert not exc.permanent, "another producer may take it"
    else:
        raise AssertionError("a closed producer cannot have stored the write")


async def test_a_callback_pending_when_a_reload_replaces_the_producer_is_written_by_the_new_one(
    kafka: str,
) -> None:
    """The callback's retries follow the producer in place, as dead letters' and parked
    calls' do: before, it kept retrying on the closed one and never returned."""
    topic = unique("callbacks")
    await asyncio.to_thread(create_topic, kafka, topic)
    nowhere = f"127.0.0.1:{free_port()}"
    old = Producer(parse_config({**EXAMPLE, "kafka.bootstrap.servers": nowhere}))
    new = Producer(parse_config({**EXAMPLE, "kafka.bootstrap.servers": kafka}))
    current = old
    call = new_call("http://svc.example/h", "d", "caller", {})
    call.callbacks = {"callback": "http://svc.example/done"}
    outcome = Outcome(True, 1, AttemptResult(Verdict.SUCCESS, status=200), None)
    sending = asyncio.ensure_future(send_callback(lambda: current, topic, "g", call, outcome, None))
    await eventually(lambda: old._pending == 1, 5, "the callback pending on the old producer")
    current = new  # what a reload does: the groups get the new producer, the old one closes
    await old.close(0.2)
    try:
        await asyncio.wait_for(sending, 15)
        [record] = await asyncio.to_thread(read_topic, kafka, topic, 1)
        assert record.key() == call.id.encode()
    finally:
        await new.close(5)


async def failing(_request: web.Request, _number: int) -> web.Response:
    return web.Response(status=500, text="boom")


async def test_a_dead_letter_larger_than_the_producer_takes_after_body_limit_shrank_is_cut(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=failing).start()
    topic, group = unique("calls"), unique("g")
    # Accepted under a 3 MiB body limit, by a node that delivers nothing...
    ingest = base_config(
        kafka, topic, free_port(), partitions=1, **{"http.server.body.limit": 3 << 20}
    )
    first = await Bigpipe(ingest, tmp_path).start()
    processes.append(first)
    data = "x" * (2_500_000)
    big_id = (await first.post_call(http, data=data, url=downstream.url(), partition_key="k"))[1][
        "data"
    ]["id"]
    ok = await Downstream().start()
    small = [
        (await first.post_call(http, data=str(i), url=ok.url(), partition_key="k"))[1]["data"]["id"]
        for i in range(5)
    ]
    assert await first.stop() == 0
    # ...then delivered by a node restarted with a body limit of 100 kB.
    delivery = base_config(
        kafka,
        topic,
        free_port(),
        partitions=1,
        consumers=[consumer_entry(topic, group, retries=0)],
        **{"http.server.body.limit": 100_000},
    )
    second = await Bigpipe(delivery, tmp_path).start()
    processes.append(second)
    await eventually(lambda: set(small) <= ok.call_ids(), 30, "the small calls")

    async def settled() -> bool:
        stats = await group_stats(second, http)
        return stats["deadLetter"] == 1 and stats["lag"].get("0") == 0

    try:
        await eventually(settled, 30, "the dead letter written and the partition committed")
    finally:
        stats = await group_stats(second, http)
        print(f"\nbig dead letter: deadLetter={stats['deadLetter']} lag={stats['lag']}")
    [record] = await asyncio.to_thread(read_topic, kafka, dead_letter_topic(second), 1)
    letter = orjson.loads(record.value())
    assert letter["call"]["id"] == big_id and record.key() == b"k"
    whole = data.encode()
    assert letter["cut"] == {
        "field": "call.data",
        "length": len(whole),
        "sha256": hashlib.sha256(whole).hexdigest(),
    }
    assert len(record.value()) <= 100_000 + (1 << 20)
    log = second.log_tail(200)
    assert (
        f"call {big_id} to 127.0.0.1 dead-lettered to {dead_letter_topic(second)}: HTTP 500: boom"
        in log
    ), log
    await downstream.stop()
    await ok.stop()


async def test_a_dead_letter_kafka_refuses_for_good_is_written_bare_or_skipped_never_retried(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """The dead-letter topic takes at most 1500 bytes a record (an operator made it)."""
    downstream = await Downstream(behaviour=failing).start()
    ok = await Downstream().start()
    topic, group = unique("calls"), unique("g")
    await asyncio.to_thread(
        create_topic, kafka, f"{topic}.{group}.dlq", **{"max.message.bytes": "1500"}
    )
    config = base_config(
        kafka,
        topic,
        free_port(),
        partitions=1,
        consumers=[consumer_entry(topic, group, retries=0)],
    )
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)

    async def post(data: str, url: str) -> str:
        status, reply = await bigpipe.post_call(http, data=data, url=url, partition_key="k")
        assert (status, reply["errno"]) == (200, 0), reply
        return reply["data"]["id"]

    bare_id = await post("d" * 5000, downstream.url())  # fits once its data is cut away

    async def dead_lettered() -> bool:
        return (await group_stats(bigpipe, http))["deadLetter"] == 1

    await eventually(dead_lettered, 30, "the dead letter without its data")
    long_url = downstream.url("/" + "u" * 3000)  # the metadata alone is too large
    skipped_id = await post("s", long_url)
    after = [await post(str(i), ok.url()) for i in range(5)]
    await eventually(lambda: set(after) <= ok.call_ids(), 30, "the calls after them")

    async def settled() -> bool:
        stats = await group_stats(bigpipe, http)
        return stats["rpcFail"] == 2 and stats["lag"].get("0") == 0

    try:
        await eventually(settled, 30, "both failures finished and the partition committed")
    finally:
        stats = await group_stats(bigpipe, http)
        print(
            f"\nrefused dead letters: deadLetter={stats['deadLetter']} "
            f"skipped={stats['deadLetterSkipped']} lag={stats['lag']}"
        )
    assert (stats["deadLetter"], stats["deadLetterSkipped"]) == (1, 1)
    [record] = await asyncio.to_thread(read_topic, kafka, dead_letter_topic(bigpipe), 1)
    letter = orjson.loads(record.value())
    assert letter["call"]["id"] == bare_id and letter["call"]["data"] == ""
    assert letter["cut"]["length"] == 5000
    log = bigpipe.log_tail(200)
    assert f"call {skipped_id} to 127.0.0.1 SKIPPED" in log, log
    async with http.get(f"{bigpipe.url}/metrics") as response:
        metrics = await response.text()
    assert f'bigpipe_dead_letters_skipped_total{{group="{group}",topic="{topic}"}} 1.0' in metrics
    await downstream.stop()
    await ok.stop()


def test_an_invalid_record_over_the_limit_keeps_the_start_of_its_raw_bytes() -> None:
    value = bytes(range(256)) * 400  # not an envelope: dead-lettered as raw base64
    letter = orjson.loads(
        encode_dead_letter(
            value=value,
            call=None,
            topic="calls",
            partition=0,
            offset=7,
            group_id="g",
            attempts=0,
            last_status=None,
            last_error="invalid record: not JSON",
            first_attempt_ms=None,
            max_bytes=10_000,
        )
    )
    assert len(orjson.dumps(letter)) <= 10_000
    kept = base64.b64decode(letter["raw"])
    assert value.startswith(kept) and len(kept) > 5000
    assert letter["cut"] == {
        "field": "raw",
        "length": len(value),
        "sha256": hashlib.sha256(value).hexdigest(),
    }
