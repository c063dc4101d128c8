"""POST /rpc/calls against a real broker: each call of a batch is checked, refused or
written on its own, as /rpc/call would; a batch refused whole writes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bigpipe.calls.envelope import decode_call
from bigpipe.ingest.server import INTERNAL_ERROR
from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    create_topic,
    eventually,
    free_port,
    read_topic,
    topic_record_count,
    unique,
)

BODY_LIMIT = 4096
BATCH_BODY_LIMIT = 64 * 1024
MAX_CALLS = 20
CHANNEL_SIZE = 5
ACL = {"name": ACL_NAME, "secret": ACL_SECRET}
OTHER_NAME, OTHER_SECRET = "system-2", "other-secret-for-tests"


def call(data: str = "x", url: str = "http://svc.test/hook", **extra: Any) -> dict[str, Any]:
    return {"url": url, "data": data, **extra}


def batch(*calls: Any, acl: dict[str, str] = ACL) -> bytes:
    return orjson.dumps({"acl": acl, "calls": list(calls)})


async def post(
    bigpipe: Bigpipe,
    http: aiohttp.ClientSession,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{bigpipe.url}/rpc/calls", data=body, headers=headers or {}) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


@pytest.fixture
def topics() -> tuple[str, str]:
    """A topic per test, and one for the second caller: counts start at zero."""
    return unique("batch"), unique("batch-other")


@pytest.fixture
async def bigpipe(
    kafka: str, topics: tuple[str, str], tmp_path: Path, processes: list[Bigpipe]
) -> Bigpipe:
    topic, other = topics
    config = base_config(
        kafka,
        topic,
        free_port(),
        **{
            "http.server.body.limit": BODY_LIMIT,
            "http.server.batch.body.limit": BATCH_BODY_LIMIT,
            "http.server.batch.calls": MAX_CALLS,
            "http.server.handler.channel.size": CHANNEL_SIZE,
        },
    )
    config["kafka.topics"].append({"name": other, "partitions": 1})
    config["kafka.producer.acl"] = [
        {**ACL, "topic": topic, "allow": ["http://svc.test/", "http://127.0.0.1"]},
        {"name": OTHER_NAME, "secret": OTHER_SECRET, "topic": other},
    ]
    node = await Bigpipe(config, tmp_path).start()
    processes.append(node)
    return node


async def test_each_call_gets_its_own_reply_in_order_and_only_good_ones_reach_kafka(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, kafka: str, topics: tuple[str, str]
) -> None:
    topic, _ = topics
    calls = [
        (call("first", partition_key="user-1", delay_ms=10, ttl_ms=60_000), 200),
        (5, 400),
        (call(url="http://elsewhere.test/hook"), 403),  # not in the caller's allow list
        ({"data": "no url"}, 400),
        (call(data={"not": "a string"}), 400),
        (call(callback="http://elsewhere.test/cb"), 403),
        (call(delay_ms=-1), 400),
        (call("second", callback="http://svc.test/cb"), 200),
        (call(url="ftp://svc.test/x"), 400),
        (call("third"), 200),
    ]
    status, reply = await post(bigpipe, http, batch(*(c for c, _ in calls)))
    assert (status, reply["errno"], reply["msg"]) == (200, 0, "3 of 10 calls accepted")
    got = reply["data"]
    assert [one["status"] for one in got] == [expected for _, expected in calls]
    for one, (_, expected) in zip(got, calls, strict=True):
        assert one["errno"] == (0 if expected == 200 else -1), one
        assert (one["data"] is None) == (expected != 200), one
    assert "field url" in got[3]["msg"] and "field data" in got[4]["msg"]
    assert "field delay_ms" in got[6]["msg"] and "field url" in got[8]["msg"]
    assert got[1]["msg"].startswith("call must be a JSON object")
    accepted = {
        got[i]["data"]["id"]: data for i, data in ((0, "first"), (7, "second"), (9, "third"))
    }
    records = read_topic(kafka, topic, 3)
    stored = {c.id: c for c in map(decode_call, (r.value() for r in records))}
    assert {i: c.data for i, c in stored.items()} == accepted
    first = stored[got[0]["data"]["id"]]
    assert (first.ttl_ms, first.due_ms > first.created_ms) == (60_000, True)
    assert stored[got[7]["data"]["id"]].callbacks == {"callback": "http://svc.test/cb"}
    assert topic_record_count(kafka, topic) == 3
    server = (await bigpipe.stats(http))["serverStats"]
    assert (server["receivedCall"], server["acceptedCall"]) == (10, 3)


async def test_a_batch_refused_whole_writes_nothing_and_says_why(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, kafka: str, topics: tuple[str, str]
) -> None:
    topic, _ = topics
    good = call()
    cases = [
        ("bad JSON", batch(good)[:-3], {}, 400, "invalid JSON"),
        ("not an object", orjson.dumps([good]), {}, 400, "body must be a JSON object"),
        ("no calls", orjson.dumps({"acl": ACL}), {}, 400, "field calls: is missing"),
        ("calls not an array", orjson.dumps({"acl": ACL, "calls": good}), {}, 400, "field calls"),
        ("no acl", orjson.dumps({"calls": [good]}), {}, 400, "field acl"),
        ("wrong secret", batch(good, acl={**ACL, "secret": "nope"}), {}, 403, "acl refused"),
        ("unknown caller", batch(good, acl={**ACL, "name": "nobody"}), {}, 403, "acl refused"),
        ("too many calls", batch(*[good] * (MAX_CALLS + 1)), {}, 413, "http.server.batch.calls"),
        (
            "body over the batch limit",
            batch(*[call("x" * 4000)] * 17),
            {},
            413,
            "http.server.batch.body.limit",
        ),
        ("a key for the batch", batch(good), {"Idempotency-Key": "k"}, 400, "Idempotency-Key"),
    ]
    for name, body, headers, expected, message in cases:
        status, reply = await post(bigpipe, http, body, headers)
        assert (status, reply["errno"], reply["data"]) == (expected, -1, None), name
        assert message in reply["msg"], f"{name}: {reply['msg']}"
    async with http.get(f"{bigpipe.url}/rpc/calls") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
    assert topic_record_count(kafka, topic) == 0
    status, reply = await post(bigpipe, http, batch())
    assert (status, reply["errno"], reply["data"]) == (200, 0, [])


async def test_each_call_is_held_to_the_limits_of_a_call(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, kafka: str, topics: tuple[str, str]
) -> None:
    """A call over http.server.body.limit is refused in a batch within its own limit; past
    http.server.handler.channel.size calls waiting for Kafka, the rest are "overloaded"."""
    topic, _ = topics
    status, reply = await post(bigpipe, http, batch(call("small"), call("x" * BODY_LIMIT)))
    assert status == 200
    assert [one["status"] for one in reply["data"]] == [200, 413]
    assert "http.server.body.limit" in reply["data"][1]["msg"]
    assert topic_record_count(kafka, topic) == 1

    # Every call of a batch waits for Kafka at once: the ones past the channel are refused,
    # in the words of /rpc/call (errno -1 as in the original, HTTP 503: retry later).
    status, reply = await post(bigpipe, http, batch(*(call(f"c{i}") for i in range(8))))
    assert status == 200
    assert [one["status"] for one in reply["data"]] == [200] * CHANNEL_SIZE + [503] * 3
    assert all(one["msg"].startswith("overloaded") for one in reply["data"][CHANNEL_SIZE:])
    assert topic_record_count(kafka, topic) == 1 + CHANNEL_SIZE


async def test_duplicate_idempotency_keys_within_and_across_batches(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, kafka: str, topics: tuple[str, str]
) -> None:
    topic, _ = topics
    # Keys unique to this run: the test broker's index outlives a session.
    key_a, key_b, key_c = unique("key-a"), unique("key-b"), unique("key-c")
    first_batch = batch(
        call("a", idempotency_key=key_a),
        call("a again", idempotency_key=key_a),
        call("b", idempotency_key=key_b),
        call("a third time", idempotency_key=key_a),
    )
    status, reply = await post(bigpipe, http, first_batch)
    assert status == 200, reply
    a, a_again, b, a_third = reply["data"]
    assert [one["errno"] for one in reply["data"]] == [0, 0, 0, 0]
    assert "duplicate" not in a["data"] and "duplicate" not in b["data"]
    assert a_again["data"] == a_third["data"] == {"id": a["data"]["id"], "duplicate": True}
    assert topic_record_count(kafka, topic) == 2

    status, reply = await post(
        bigpipe,
        http,
        batch(call("b later", idempotency_key=key_b), call("new", idempotency_key=key_c)),
    )
    b_later, new = reply["data"]
    assert b_later["data"] == {"id": b["data"]["id"], "duplicate": True}
    assert "duplicate" not in new["data"]
    assert topic_record_count(kafka, topic) == 3

    # Keys are per caller: another caller's same key is a call of its own.
    other = {"name": OTHER_NAME, "secret": OTHER_SECRET}
    status, reply = await post(bigpipe, http, batch(call(idempotency_key=key_a), acl=other))
    assert "duplicate" not in reply["data"][0]["data"]


async def test_the_batch_acl_writes_to_its_own_topic(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, kafka: str, topics: tuple[str, str]
) -> None:
    topic, other_topic = topics
    other = {"name": OTHER_NAME, "secret": OTHER_SECRET}
    status, reply = await post(bigpipe, http, batch(call("1"), call("2"), acl=other))
    assert status == 200 and [one["errno"] for one in reply["data"]] == [0, 0]
    assert topic_record_count(kafka, other_topic) == 2
    assert topic_record_count(kafka, topic) == 0
    # system-2 has no allow list; system-1's refuses the same url.
    url = "http://elsewhere.test/hook"
    _, mine = await post(bigpipe, http, batch(call(url=url)))
    _, theirs = await post(bigpipe, http, batch(call(url=url), acl=other))
    assert (mine["data"][0]["status"], theirs["data"][0]["status"]) == (403, 200)


async def test_batched_calls_are_delivered(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    topic = unique("batch-delivered")
    config = base_config(kafka, topic, free_port(), consumers=[consumer_entry(topic, unique("g"))])
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    calls = [call(f"call-{i}", url=downstream.url(), partition_key=f"k{i % 5}") for i in range(100)]
    status, reply = await post(bigpipe, http, batch(*calls))
    assert status == 200 and reply["msg"] == "100 of 100 calls accepted"
    expected = {one["data"]["id"]: f"call-{i}".encode() for i, one in enumerate(reply["data"])}
    await eventually(
        lambda: set(expected) <= downstream.call_ids(), 60, "every batched call to arrive"
    )
    for request in downstream.requests:
        assert request.body == expected[request.call_id]


async def test_a_call_kafka_refuses_for_good_is_refused_alone(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """Kafka's refusal of one call (too large for its topic) is that call's 413, "retrying
    cannot help", as on /rpc/call; the calls around it are stored.

    The topic's max.message.bytes is under librdkafka's batch.size, so the first time the
    large call takes down the record batch it is written in, and the small ones are
    written again (bigpipe.ingest.record_limits); the second time the node knows the
    limit and refuses the large call before it joins a batch."""
    topic = unique("batch-small-records")
    await asyncio.to_thread(create_topic, kafka, topic, **{"max.message.bytes": "2000"})
    bigpipe = await Bigpipe(base_config(kafka, topic, free_port(), partitions=1), tmp_path).start()
    processes.append(bigpipe)
    for attempt in (1, 2):
        status, reply = await post(bigpipe, http, batch(call("a"), call("x" * 5000), call("b")))
        assert (status, reply["msg"]) == (200, "2 of 3 calls accepted"), (attempt, reply)
        outcomes = reply["data"]
        statuses = [(one["status"], one["errno"]) for one in outcomes]
        assert statuses == [(200, 0), (413, -1), (200, 0)], attempt
        assert "retrying cannot help" in outcomes[1]["msg"] and topic in outcomes[1]["msg"]
        assert "max.message.bytes of 2000" in outcomes[1]["msg"], outcomes[1]["msg"]
    stored = [decode_call(r.value()).data for r in read_topic(kafka, topic, 4)]
    assert sorted(stored) == ["a", "a", "b", "b"]
    assert topic_record_count(kafka, topic) == 4


async def test_calls_over_a_topics_limit_only_together_are_told_to_retry_later(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """Small calls that Kafka refuses together (their record batch over a topic's
    max.message.bytes, each alone under it) are "retry later" (503), never "retrying
    cannot help": each of them fits. Whatever is answered accepted is in the topic."""
    topic = unique("batch-tiny-limit")
    await asyncio.to_thread(create_topic, kafka, topic, **{"max.message.bytes": "600"})
    bigpipe = await Bigpipe(base_config(kafka, topic, free_port(), partitions=1), tmp_path).start()
    processes.append(bigpipe)
    status, reply = await post(bigpipe, http, batch(*(call("y" * 200) for _ in range(20))))
    assert status == 200, reply
    outcomes = [(one["status"], one["errno"]) for one in reply["data"]]
    assert set(outcomes) <= {(200, 0), (503, INTERNAL_ERROR)}, reply
    refused = [one["msg"] for one in reply["data"] if one["status"] == 503]
    assert refused, "20 calls of 200 bytes in one record batch should be over 600 bytes"
    assert all("a retry may pass" in msg for msg in refused), refused
    accepted = outcomes.count((200, 0))
    assert topic_record_count(kafka, topic) == accepted
