"""Pure units: offsets, retry policy, envelope, ACL, stats shape."""

from __future__ import annotations

import asyncio
import hashlib
import random
import subprocess
import sys
import time

import orjson
import pytest

from bigpipe.calls.envelope import (
    InvalidRecord,
    decode_call,
    encode_call,
    encode_dead_letter,
    forwardable_headers,
    new_call,
)
from bigpipe.config import AclEntry, parse_config
from bigpipe.delivery.offsets import PartitionOffsets
from bigpipe.delivery.retry import Verdict, backoff_seconds, classify, retry_after_seconds
from bigpipe.ingest.acl import Acl
from bigpipe.ingest.producer import ProduceFailed, Producer
from bigpipe.kafka import Throttle
from bigpipe.metrics import Latencies
from bigpipe.node.reload import plan_reload
from bigpipe.stats import Stats
from tests.support import free_port
from tests.test_config import EXAMPLE


# ---------------------------------------------------------------- offsets
def test_commit_point_advances_only_over_contiguous_finished_offsets() -> None:
    offsets = PartitionOffsets()
    for offset in (10, 11, 12, 13):
        offsets.track(offset)
    assert offsets.to_commit() is None
    offsets.finish(12)
    offsets.finish(13)
    assert offsets.to_commit() is None, "10 and 11 are unfinished: nothing may be committed"
    offsets.finish(10)
    assert offsets.to_commit() == 11
    offsets.committed(11)
    assert offsets.to_commit() is None
    offsets.finish(11)
    assert offsets.to_commit() == 14
    assert len(offsets) == 0


def test_commit_point_skips_gaps_in_offsets() -> None:
    offsets = PartitionOffsets()
    offsets.track(5)
    offsets.track(9)  # 6-8 were transaction markers or compacted away
    offsets.finish(9)
    assert len(offsets) == 1
    offsets.finish(5)
    assert offsets.to_commit() == 10


# ---------------------------------------------------------------- retry
@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.SUCCESS),
        (204, Verdict.SUCCESS),
        (299, Verdict.SUCCESS),
        (301, Verdict.FINAL),
        (302, Verdict.FINAL),
        (400, Verdict.FINAL),
        (404, Verdict.FINAL),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
    ],
)
def test_classify(status: int, verdict: Verdict) -> None:
    assert classify(status, frozenset({408, 429})) is verdict


def test_classify_honours_configured_retry_statuses() -> None:
    assert classify(409, frozenset({409})) is Verdict.RETRY
    assert classify(429, frozenset()) is Verdict.FINAL


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(7)
    for retry in range(1, 12):
        ceiling = min(5000, 100 * 2 ** (retry - 1)) / 1000
        delays = [backoff_seconds(retry, 100, 5000, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8, "jitter should spread up to the ceiling"


def test_retry_after_parses_seconds_and_dates() -> None:
    assert retry_after_seconds("7", now=0) == 7
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480) == 10
    assert retry_after_seconds("soon", now=0) is None
    assert retry_after_seconds(None, now=0) is None


# ---------------------------------------------------------------- envelope
def test_envelope_round_trips_and_is_plain_json() -> None:
    call = new_call("http://svc/hook", "héllo ✓", "system-1", {"X-Trace": "abc"})
    value = encode_call(call)
    assert decode_call(value) == call
    assert set(orjson.loads(value)) == {"v", "id", "url", "data", "caller", "ts", "headers"}


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"nope",
        b"[]",
        b'{"v": 2}',
        b'{"v":1,"id":"x","url":"u","data":3,"caller":"c","ts":1,"headers":{}}',
    ],
)
def test_undecodable_records_are_refused_with_a_reason(value: bytes | None) -> None:
    with pytest.raises(InvalidRecord):
        decode_call(value)


def test_forwarded_headers_drop_hop_by_hop_host_and_the_secret() -> None:
    headers = [
        ("Host", "bigpipe"),
        ("Content-Length", "10"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "5"),
        ("Transfer-Encoding", "chunked"),
        ("Authorization", "Bearer t"),
        ("X-Bigpipe-Call-Id", "forged"),
        ("X-Leak", "pre-s3cret-post"),
        ("X-Trace", "a"),
        ("X-Trace", "b"),
        ("User-Agent", "curl/8"),
    ]
    assert forwardable_headers(headers, "s3cret") == {"X-Trace": "a, b", "User-Agent": "curl/8"}


def test_dead_letter_keeps_the_envelope_or_the_raw_bytes() -> None:
    call = new_call("http://svc/hook", "d", "c", {})
    letter = orjson.loads(
        encode_dead_letter(
            value=encode_call(call),
            call=call,
            topic="t",
            partition=1,
            offset=5,
            group_id="g",
            attempts=3,
            last_status=500,
            last_error="HTTP 500",
            first_attempt_ms=1,
        )
    )
    assert letter["call"]["id"] == call.id and letter["raw"] is None
    assert letter["source"] == {"topic": "t", "partition": 1, "offset": 5, "group": "g"}
    assert (letter["attempts"], letter["lastStatus"]) == (3, 500)
    raw = orjson.loads(
        encode_dead_letter(
            value=b"\xff junk",
            call=None,
            topic="t",
            partition=0,
            offset=0,
            group_id="g",
            attempts=0,
            last_status=None,
            last_error="invalid",
            first_attempt_ms=None,
        )
    )
    assert raw["call"] is None and raw["raw"] == "/yBqdW5r"


# ---------------------------------------------------------------- acl
def test_acl_checks_name_and_secret() -> None:
    entry = AclEntry(name="a", secret_sha256=hashlib.sha256(b"right").digest(), topic="t")
    acl = Acl((entry,))
    assert acl.authenticate("a", "right") is entry
    assert acl.authenticate("a", "wrong") is None
    assert acl.authenticate("b", "right") is None
    assert acl.authenticate("a", "") is None


# ---------------------------------------------------------------- stats
def test_stats_shape_matches_the_original() -> None:
    config = parse_config(EXAMPLE)
    stats = Stats()
    stats.group("test", "G1").rpcSuccess += 2
    stats.group("test", "G2").rpcSuccess += 3
    stats.group("test", "G2").circuitIsBreak = 1
    snapshot = stats.snapshot(config)
    assert list(snapshot)[:4] == ["serverStats", "producerStats", "consumerStats", "clientStats"]
    assert snapshot["serverStats"] == {"receivedCall": 0, "acceptedCall": 0, "overloadCall": 0}
    assert snapshot["producerStats"] == {"test": {"deliverySuccess": 0, "deliveryFail": 0}}
    assert [(c["topic"], c["groupId"]) for c in snapshot["consumerStats"]] == [
        ("test", "G1"),
        ("test", "G2"),
    ]
    assert {"handleMessage", "invalidMessage"} <= set(snapshot["consumerStats"][0])
    assert snapshot["clientStats"] == {
        "test": {"rpcTotal": 0, "rpcSuccess": 5, "rpcFail": 0, "rpcRetries": 0, "circuitIsBreak": 1}
    }


# ---------------------------------------------------------------- reload plan
def test_reload_plan_changes_only_what_changed() -> None:
    running = parse_config(EXAMPLE)
    raw = orjson.loads(orjson.dumps(EXAMPLE))
    raw["kafka.consumer.list"][0]["rateLimit"] = 5  # G1: limits change in place
    raw["kafka.consumer.list"].pop(1)  # G2: removed
    raw["kafka.topics"].append({"name": "new", "partitions": 1})
    raw["kafka.consumer.list"].append(
        {**raw["kafka.consumer.list"][0], "topic": "new", "groupId": "G3"}
    )
    raw["http.server.port"] = 1  # needs a restart, keeps running on the old port
    plan = plan_reload(running, parse_config(raw))
    assert plan.removed == [("test", "G2")]
    assert [c.key for c in plan.added] == [("new", "G3")]
    assert [(c.key, c.rate_limit) for c in plan.changed] == [(("test", "G1"), 5)]
    rungs = [f"new.G3.delay.{rung}" for rung in ("1s", "10s", "1m", "10m", "1h")]
    assert plan.new_topics == ["new", "new.G3.dlq", *rungs]
    assert plan.needs_restart == ["http.server.port"]
    assert plan.config.http_port == running.http_port
    assert not plan.new_producer and not plan.regroup_all


def test_reload_plan_moves_every_group_when_the_client_settings_change() -> None:
    running = parse_config(EXAMPLE)
    settings = {"kafka.client.config": {"socket.timeout.ms": 30_000}}
    plan = plan_reload(running, parse_config({**EXAMPLE, **settings}))
    assert plan.new_producer and plan.regroup_all
    assert plan.removed == [("test", "G1"), ("test", "G2")]
    assert [c.key for c in plan.added] == [("test", "G1"), ("test", "G2")]


# ---------------------------------------------------------------- log throttling
def test_throttle_lets_the_first_through_then_counts_the_rest(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr("bigpipe.kafka.time.monotonic", lambda: now[0])
    throttle = Throttle(interval=60)
    assert throttle.admit("a") == 0
    assert throttle.admit("a") is None and throttle.admit("a") is None
    assert throttle.admit("b") == 0, "each kind has its own allowance"
    now[0] += 61
    assert throttle.admit("a") == 2, "the next one through says how many were held back"


async def test_a_write_nobody_acknowledges_fails_at_its_timeout_not_before() -> None:
    """No broker listens on the bootstrap address: only the write timeout can end the wait."""
    nowhere = f"127.0.0.1:{free_port()}"
    config = parse_config(
        {**EXAMPLE, "kafka.bootstrap.servers": nowhere, "kafka.producer.ack.timeout": 5000}
    )
    producer = Producer(config)
    started = time.monotonic()
    results = await asyncio.gather(
        producer.send("t", b"first", timeout=0.2),
        producer.send("t", b"later", timeout=0.6),
        return_exceptions=True,
    )
    waited = time.monotonic() - started
    assert all(isinstance(result, ProduceFailed) for result in results), results
    # Well before librdkafka's own message timeout (5 s here) would end the wait.
    assert 0.6 <= waited < 2.5, waited
    await producer.close(0)


async def test_a_producer_closed_with_no_time_left_and_nothing_pending_reports_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A drain that used up the shutdown timeout closes the producer with 0 s left; idle,
    it has nothing unacknowledged, and saying "0 writes still unacknowledged" at ERROR
    sent operators looking for lost calls."""
    producer = Producer(
        parse_config({**EXAMPLE, "kafka.bootstrap.servers": f"127.0.0.1:{free_port()}"})
    )
    await producer.close(0)
    errors = [
        r for r in caplog.records if r.name == "bigpipe.ingest.producer" and r.levelname == "ERROR"
    ]
    assert not errors, caplog.text


LEAVE_HANGS = """
import asyncio, threading
from bigpipe.kafka_client import leave_off_loop

async def main():
    ended = await leave_off_loop("stuck", threading.Event().wait, 0.2)
    print("ended" if ended else "abandoned", flush=True)

asyncio.run(main())
"""


def test_a_close_that_never_ends_is_abandoned_and_never_holds_up_the_exit() -> None:
    """librdkafka's close, started mid-rebalance, was seen to wait for ever inside its own
    revoke; run on an executor thread, it kept the worker alive after its loop ended (the
    interpreter joins those threads), deaf to SIGTERM, until a SIGKILL."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", LEAVE_HANGS], capture_output=True, text=True, timeout=20
    )
    assert (done.returncode, done.stdout.strip()) == (0, "abandoned"), done.stderr
    assert time.monotonic() - started < 10


async def test_a_stalled_event_loop_shows_in_the_loop_lag() -> None:
    latencies = Latencies()
    measuring = asyncio.create_task(latencies.measure_loop_lag())
    await asyncio.sleep(0.05)
    time.sleep(0.4)  # noqa: ASYNC251 (a blocking call on the loop: the stall to be seen)
    await asyncio.sleep(0.25)  # the timer due during the stall has run, late
    measuring.cancel()
    buckets = {s[1]["le"]: s[2] for s in latencies.samples() if s[0].endswith("_bucket")}
    assert buckets["+Inf"] >= 2
    assert buckets["+Inf"] - buckets["0.25"] == 1, "one timer ran 0.25-0.4 s late"


class _Acked:
    """A delivery report's message: where Kafka put it (offset None: it did not say)."""

    def __init__(self, offset: int | None) -> None:
        self._offset = offset

    def partition(self) -> int:
        return 0

    def offset(self) -> int | None:
        return self._offset


async def test_a_write_acknowledged_without_an_offset_is_not_answered_as_stored() -> None:
    """On a broker started a moment before, a call answered errno 0 with offset null was
    not in the topic (tests/faults/test_fresh_broker.py): librdkafka reports a write the
    broker called a duplicate as done, with no offset. It must fail, retryably."""
    producer = Producer(
        parse_config({**EXAMPLE, "kafka.bootstrap.servers": f"127.0.0.1:{free_port()}"})
    )
    loop = asyncio.get_running_loop()
    unplaced, placed = loop.create_future(), loop.create_future()
    producer._pending += 2
    producer._acks.extend([(unplaced, None, _Acked(None)), (placed, None, _Acked(7))])
    producer._resolve_acks()
    with pytest.raises(ProduceFailed) as failure:
        await unplaced
    assert not failure.value.permanent, "a retry may store it: retry later"
    assert await placed == (0, 7)
    await producer.close(0)
