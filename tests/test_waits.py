"""Calls that wait: `delay_ms` and `ttl_ms` on /rpc/call, envelope version 2, and the
`expired` dead letter, on a real broker and real HTTP servers."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from bigpipe.calls.envelope import decode_call, encode_call, new_call
from bigpipe.config import DEFAULT_MAX_DELAY_MS
from bigpipe.ingest.server import Reject, parse_call_request
from tests.support import (
    Bigpipe,
    Downstream,
    dead_letter_topic,
    eventually,
    group_stats,
    read_topic,
    start_node,
    topic_record_count,
)


# ---------------------------------------------------------------- units
def request_body(**fields: object) -> bytes:
    payload = {"acl": {"name": "a", "secret": "s"}, "url": "http://svc/h", "data": "", **fields}
    return orjson.dumps(payload)


def test_delay_and_ttl_are_optional_and_read_when_given() -> None:
    plain = parse_call_request(request_body(), DEFAULT_MAX_DELAY_MS)
    assert (plain.delay_ms, plain.ttl_ms) == (0, None)
    waiting = parse_call_request(request_body(delay_ms=1500, ttl_ms=60_000), DEFAULT_MAX_DELAY_MS)
    assert (waiting.delay_ms, waiting.ttl_ms) == (1500, 60_000)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"delay_ms": -1}, "delay_ms"),
        ({"delay_ms": 1.5}, "delay_ms"),
        ({"delay_ms": True}, "delay_ms"),
        ({"delay_ms": "10"}, "delay_ms"),
        ({"delay_ms": 7 * 24 * 3600 * 1000 + 1}, "delay_ms"),
        ({"ttl_ms": 0}, "ttl_ms"),
        ({"ttl_ms": "1"}, "ttl_ms"),
    ],
)
def test_bad_delay_or_ttl_is_a_400_naming_the_field(fields: dict[str, object], named: str) -> None:
    with pytest.raises(Reject) as refused:
        parse_call_request(request_body(**fields), DEFAULT_MAX_DELAY_MS)
    assert refused.value.status == 400
    assert refused.value.msg.startswith(f"field {named}:")


def test_delay_past_the_maximum_names_the_config_key() -> None:
    with pytest.raises(Reject, match=r"field delay_ms: must be <= 1000 \(kafka.delay.max\)"):
        parse_call_request(request_body(delay_ms=1001), 1000)


def test_a_call_that_waits_is_envelope_version_2_and_round_trips() -> None:
    call = new_call("http://svc/h", "x", "c", {}, delay_ms=5000, ttl_ms=9000)
    call.attempts = 3
    value = orjson.loads(encode_call(call))
    assert value["v"] == 2
    assert (value["due"], value["ttl"], value["attempts"]) == (call.created_ms + 5000, 9000, 3)
    assert decode_call(encode_call(call)) == call


def test_a_call_that_does_not_wait_stays_version_1_for_older_nodes() -> None:
    call = new_call("http://svc/h", "x", "c", {})
    assert orjson.loads(encode_call(call))["v"] == 1
    old = b'{"v":1,"id":"a","url":"u","data":"","caller":"c","ts":5,"headers":{}}'
    assert (decode_call(old).due_ms, decode_call(old).ttl_ms, decode_call(old).attempts) == (
        0,
        None,
        0,
    )


# ---------------------------------------------------------------- end to end
async def first_call_delivered(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, downstream: Downstream, delay_ms: int
) -> None:
    """Post one call until Kafka takes it (a fresh topic may answer errno 1 at first),
    wait for its delivery, then forget it: the node is then running in full."""
    accepted: list[str] = []

    async def accepted_once() -> bool:
        _, reply = await bigpipe.post_call(http, url=downstream.url(), delay_ms=delay_ms)
        assert reply["errno"] in (0, 1), reply
        accepted.extend([reply["data"]["id"]] if reply["errno"] == 0 else [])
        return bool(accepted)

    await eventually(accepted_once, 30, "Kafka to take a first call")
    await eventually(lambda: accepted[0] in downstream.call_ids(), 30, "a first call")
    downstream.requests.clear()


Due = dict[str, tuple[float, float]]  # call id -> (earliest, latest) due time, monotonic


async def post_delayed(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, url: str, delays_ms: list[int]
) -> Due:
    """Post a call per delay, 50 at a time. A call is accepted between its post and its
    reply, so its due time lies between those two plus its delay."""
    due: Due = {}
    gate = asyncio.Semaphore(50)

    async def send(delay_ms: int) -> None:
        async with gate:
            posted = time.monotonic()
            status, reply = await bigpipe.post_call(http, url=url, delay_ms=delay_ms)
            assert (status, reply["errno"]) == (200, 0), reply
            answered = time.monotonic()
            due[reply["data"]["id"]] = (posted + delay_ms / 1000, answered + delay_ms / 1000)

    await asyncio.gather(*(send(delay) for delay in delays_ms))
    return due


def assert_on_time(downstream: Downstream, due: Due, most_late: float) -> float:
    """No first delivery before its due time, none more than `most_late` s after; returns
    the latest. 10 ms of slack: Bigpipe keeps due times in whole wall-clock ms. Other
    calls are left out: after a kill -9 the warm-up call may come again (at least once)."""
    first: dict[str, float] = {}
    for request in downstream.requests:
        if request.call_id in due:
            first.setdefault(request.call_id, request.at)
    early = [due[i][0] - at for i, at in first.items() if at < due[i][0] - 0.01]
    assert not early, f"{len(early)} calls delivered early, by up to {max(early):.2f} s"
    latest = max(at - due[i][1] for i, at in first.items())
    assert latest <= most_late, f"a call delivered {latest:.2f} s late"
    return latest


async def test_delayed_calls_arrive_between_due_and_due_plus_a_second(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes)

    # A node that just started may still be joining its group: one call first.
    await first_call_delivered(bigpipe, http, downstream, 0)
    rng = random.Random(11)
    due = await post_delayed(
        bigpipe, http, downstream.url(), [rng.randrange(3000) for _ in range(60)]
    )
    await eventually(lambda: set(due) <= downstream.call_ids(), 30, "every delayed call")
    assert_on_time(downstream, due, 1.5)


async def test_calls_past_their_ttl_are_dead_lettered_expired_and_others_delivered(
    kafka: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    down = True

    async def broken_for_a_while(_request: web.Request, _number: int) -> web.StreamResponse:
        return web.Response(status=503 if down else 200)

    downstream = await Downstream(broken_for_a_while).start()
    try:
        bigpipe, _ = await start_node(
            kafka, tmp_path, processes, retries=1000, backoffBase=50, backoffMax=100
        )
        expiring, lasting = set(), set()
        for index in range(20):
            ttl = {"ttl_ms": 1500} if index % 2 else {}
            status, reply = await bigpipe.post_call(http, url=downstream.url(), **ttl)
            assert (status, reply["errno"]) == (200, 0), reply
            (expiring if ttl else lasting).add(reply["data"]["id"])
        letters = await asyncio.to_thread(
            read_topic, kafka, dead_letter_topic(bigpipe), len(expiring), 60
        )
        records = [orjson.loads(letter.value()) for letter in letters]
        assert {record["call"]["id"] for record in records} == expiring
        assert {record["reason"] for record in records} == {"expired"}
        assert all(record["lastError"].startswith("expired") for record in records)
        assert all(record["attempts"] >= 1 for record in records)
        stats = await group_stats(bigpipe, http)
        assert (stats["expired"], stats["deadLetter"]) == (len(expiring), len(expiring))
        async with http.get(f"{bigpipe.url}/metrics") as response:
            lines = (await response.text()).splitlines()
        expired = [line for line in lines if line.startswith("bigpipe_expired_total{")]
        assert [float(line.rsplit(" ", 1)[1]) for line in expired] == [len(expiring)]
        down, recovered = False, time.monotonic()
        await eventually(
            lambda: lasting <= downstream.answered_ids(), 30, "calls with no ttl after recovery"
        )
        late = [r for r in downstream.requests if r.call_id in expiring and r.at >= recovered]
        assert not late, "an expired call was attempted after recovery"
    finally:
        await downstream.stop()


async def test_a_groups_ttl_applies_to_calls_without_their_own(
    kafka: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    async def always_503(_request: web.Request, _number: int) -> web.StreamResponse:
        return web.Response(status=503)

    downstream = await Downstream(always_503).start()
    try:
        bigpipe, _ = await start_node(
            kafka, tmp_path, processes, retries=1000, backoffBase=50, backoffMax=100, ttl=1000
        )
        status, reply = await bigpipe.post_call(http, url=downstream.url())
        assert (status, reply["errno"]) == (200, 0), reply
        [letter] = await asyncio.to_thread(read_topic, kafka, dead_letter_topic(bigpipe), 1, 30)
        record = orjson.loads(letter.value())
        assert (record["call"]["id"], record["reason"]) == (reply["data"]["id"], "expired")
        assert "ttl of 1000 ms" in record["lastError"]
    finally:
        await downstream.stop()


async def test_delay_over_the_maximum_is_refused_with_400(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    bigpipe, _ = await start_node(kafka, tmp_path, processes, node={"kafka.delay.max": 60_000})
    status, reply = await bigpipe.post_call(http, delay_ms=60_001)
    assert (status, reply["errno"]) == (400, -1)
    assert reply["msg"] == "field delay_ms: must be <= 60000 (kafka.delay.max), got 60001"


async def test_long_waits_go_through_the_delay_topics_and_arrive_on_time(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, topic = await start_node(kafka, tmp_path, processes, delayThreshold=1000)
    group = bigpipe.config["kafka.consumer.list"][0]["groupId"]

    # A node that just started may still be joining the delay topics' consumer group
    # (a few seconds): the accuracy is that of a running node, so one call first.
    await first_call_delivered(bigpipe, http, downstream, 1500)
    rng = random.Random(12)
    delays = [rng.randrange(14_000) for _ in range(200)]
    due = await post_delayed(bigpipe, http, downstream.url(), delays)
    await eventually(lambda: set(due) <= downstream.call_ids(), 40, "every delayed call")
    parked = await asyncio.to_thread(topic_record_count, kafka, f"{topic}.{group}.delay.1s")
    assert parked > 0, "no call went through the delay topics"
    assert_on_time(downstream, due, 1.5)
    assert (await group_stats(bigpipe, http))["rpcTotal"] == 201  # the first call too


async def test_a_backoff_longer_than_the_threshold_waits_in_the_delay_topics(
    kafka: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    async def fail_twice(request: web.Request, _number: int) -> web.StreamResponse:
        return web.Response(status=503 if int(request.headers["X-Bigpipe-Attempt"]) < 3 else 200)

    downstream = await Downstream(fail_twice).start()
    try:
        # Backoffs uniform in [0, 4 s]: about 3 in 4 retries (15 of 20) wait in Kafka.
        bigpipe, topic = await start_node(
            kafka, tmp_path, processes, delayThreshold=1000, backoffBase=4000, backoffMax=4000
        )
        group = bigpipe.config["kafka.consumer.list"][0]["groupId"]
        sent = set()
        for _ in range(10):
            status, reply = await bigpipe.post_call(http, url=downstream.url())
            assert (status, reply["errno"]) == (200, 0), reply
            sent.add(reply["data"]["id"])

        def third_attempts() -> set[str]:
            return {r.call_id for r in downstream.requests if r.attempt == 3 and r.answered}

        await eventually(lambda: sent <= third_attempts(), 60, "calls after 2 retries")
        attempts = sorted(r.attempt for r in downstream.requests)
        assert attempts == [1] * 10 + [2] * 10 + [3] * 10, "attempts numbered across the waits"
        rungs = [f"{topic}.{group}.delay.1s", f"{topic}.{group}.delay.10s"]
        parked = sum([await asyncio.to_thread(topic_record_count, kafka, t) for t in rungs])
        assert parked >= 10, "the retries did not wait in the delay topics"
        stats = await group_stats(bigpipe, http)
        assert (stats["rpcSuccess"], stats["rpcRetries"], stats["deadLetter"]) == (10, 20, 0)
    finally:
        await downstream.stop()
