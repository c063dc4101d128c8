"""The delivery engine against real downstreams: retries, dead letters, limits, the breaker."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from confluent_kafka import Producer

from bigpipe.calls.envelope import encode_call, new_call
from tests.support import (
    ACL_NAME,
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    create_topic,
    dead_letters,
    eventually,
    free_port,
    group_stats,
    start_node,
    unique,
)
from tests.test_metrics import scrape


async def send(
    bigpipe: Bigpipe,
    http: aiohttp.ClientSession,
    url: str,
    count: int = 1,
) -> list[str]:
    ids = []
    for index in range(count):
        status, reply = await bigpipe.post_call(
            http, data=f"call-{index}", url=url, partition_key=str(index)
        )
        assert (status, reply["errno"]) == (200, 0), reply
        ids.append(reply["data"]["id"])
    return ids


async def counted_delivered(bigpipe: Bigpipe, http: aiohttp.ClientSession, timeout: float) -> None:
    """Wait until the node's group counts one call delivered."""

    async def delivered() -> bool:
        return (await group_stats(bigpipe, http))["rpcSuccess"] == 1

    await eventually(delivered, timeout, "the call to count as delivered")


def status(code: int, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    async def behaviour(_request: web.Request, _number: int) -> web.Response:
        return web.Response(status=code, text=f"status {code}", headers=headers)

    return behaviour


async def test_failing_throughout_is_dead_lettered_after_exactly_retries_plus_one(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=status(500)).start()
    bigpipe, topic = await start_node(kafka, tmp_path, processes, retries=3)
    [call_id] = await send(bigpipe, http, downstream.url())
    [letter] = await dead_letters(kafka, bigpipe, 1)
    assert [r.attempt for r in downstream.requests] == [1, 2, 3, 4]
    assert letter["call"]["id"] == call_id
    assert (letter["attempts"], letter["lastStatus"]) == (4, 500)
    assert letter["lastError"] == "HTTP 500: status 500"
    assert letter["source"]["topic"] == topic
    stats = await group_stats(bigpipe, http)
    assert (stats["rpcFail"], stats["rpcRetries"], stats["deadLetter"]) == (1, 3, 1)
    await downstream.stop()


async def test_slower_than_the_timeout_is_retried_then_dead_lettered(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    async def too_slow(_request: web.Request, _number: int) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(status=200)

    downstream = await Downstream(behaviour=too_slow).start()
    bigpipe, _topic = await start_node(kafka, tmp_path, processes, timeout=300, retries=1)
    await send(bigpipe, http, downstream.url())
    [letter] = await dead_letters(kafka, bigpipe, 1)
    assert letter["attempts"] == 2 and letter["lastStatus"] is None
    assert letter["lastError"] == "timeout after 300 ms"
    assert len(downstream.requests) == 2
    await downstream.stop()


async def test_refused_connections_are_retried_then_dead_lettered(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    bigpipe, _topic = await start_node(kafka, tmp_path, processes, retries=2)
    await send(bigpipe, http, f"http://127.0.0.1:{free_port()}/nobody-home")
    [letter] = await dead_letters(kafka, bigpipe, 1)
    assert letter["attempts"] == 3
    assert "Connect" in letter["lastError"]


async def test_final_statuses_are_not_retried(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    downstream = await Downstream(behaviour=status(404)).start()
    redirect = await Downstream(behaviour=status(302, {"Location": downstream.url()})).start()
    bigpipe, _topic = await start_node(kafka, tmp_path, processes, retries=5)
    await send(bigpipe, http, downstream.url())
    await send(bigpipe, http, redirect.url())
    letters = await dead_letters(kafka, bigpipe, 2)
    assert sorted(letter["lastStatus"] for letter in letters) == [302, 404]
    assert all(letter["attempts"] == 1 for letter in letters)
    assert len(downstream.requests) == 1, "the 302 must not be followed"
    await downstream.stop()
    await redirect.stop()


async def test_retry_after_on_429_is_honoured(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    async def busy_once(_request: web.Request, number: int) -> web.Response:
        if number == 0:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=200)

    downstream = await Downstream(behaviour=busy_once).start()
    bigpipe, _ = await start_node(
        kafka, tmp_path, processes, retries=2, backoffBase=10, backoffMax=5000
    )
    await send(bigpipe, http, downstream.url())
    await eventually(lambda: len(downstream.requests) == 2, 15, "the retry")
    first, second = downstream.requests
    assert second.at - first.at >= 0.95, "Retry-After: 1 asks for a 1 s wait"

    await counted_delivered(bigpipe, http, 10)
    await downstream.stop()


async def test_concurrency_cap_holds(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    async def slowish(_request: web.Request, _number: int) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response(status=200)

    downstream = await Downstream(behaviour=slowish).start()
    bigpipe, _ = await start_node(kafka, tmp_path, processes, concurrency=7)
    ids = await send_many(bigpipe, http, downstream.url(), 300)
    await eventually(lambda: set(ids) <= downstream.call_ids(), 60, "all deliveries")
    print(f"\nconcurrency: cap=7 peak={downstream.peak_in_flight}")
    assert downstream.peak_in_flight == 7


async def send_many(
    bigpipe: Bigpipe, http: aiohttp.ClientSession, url: str, count: int
) -> list[str]:
    gate = asyncio.Semaphore(50)

    async def one(index: int) -> str:
        async with gate:
            status, reply = await bigpipe.post_call(
                http, data=str(index), url=url, partition_key=str(index)
            )
        assert (status, reply["errno"]) == (200, 0)
        return reply["data"]["id"]

    return await asyncio.gather(*(one(i) for i in range(count)))


async def test_rate_limit_holds_over_ten_seconds(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    rate = 100
    downstream = await Downstream().start()
    bigpipe, _ = await start_node(kafka, tmp_path, processes, rateLimit=rate, concurrency=50)
    await send_many(bigpipe, http, downstream.url(), rate * 13)
    await eventually(lambda: len(downstream.requests) >= rate * 12, 30, "12 s of deliveries")
    times = [r.at for r in downstream.requests]
    start = times[0] + 1  # skip the first second: the group may still be warming up
    in_window = sum(1 for t in times if start <= t < start + 10)
    print(f"\nrate: limit={rate}/s measured={in_window / 10:.1f}/s over 10 s")
    assert abs(in_window / 10 - rate) <= rate * 0.10


async def test_invalid_record_is_counted_dead_lettered_and_skipped(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    bigpipe, topic = await start_node(kafka, tmp_path, processes)
    producer = Producer({"bootstrap.servers": kafka})
    producer.produce(topic, b"\xffnot an envelope", b"k")
    producer.flush(10)
    [call_id] = await send(bigpipe, http, downstream.url())
    await eventually(lambda: call_id in downstream.call_ids(), 30, "the valid call")
    [letter] = await dead_letters(kafka, bigpipe, 1)
    assert letter["call"] is None and letter["raw"] == "/25vdCBhbiBlbnZlbG9wZQ=="
    assert letter["lastError"].startswith("invalid record: not JSON")
    stats = await group_stats(bigpipe, http)
    assert (stats["invalidMessage"], stats["deadLetter"]) == (1, 1)


async def test_outage_opens_the_breaker_and_the_backlog_drains_without_loss(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    outage_until = time.monotonic() + 15

    async def down_then_up(_request: web.Request, _number: int) -> web.Response:
        return web.Response(status=503 if time.monotonic() < outage_until else 200)

    downstream = await Downstream(behaviour=down_then_up).start()
    breaker = {"breakPeriod": 2, "recoverPeriod": 2, "winSize": 3, "minStats": 5, "healthRate": 0.5}
    bigpipe, _topic = await start_node(
        kafka, tmp_path, processes, retries=4, circuitBreaker=breaker, rateLimit=200
    )
    broke = False

    async def watch_breaker() -> None:
        nonlocal broke
        while True:
            broke = broke or (await group_stats(bigpipe, http))["circuitIsBreak"] == 1
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch_breaker())
    ids: list[str] = []
    while time.monotonic() < outage_until + 2:  # a steady trickle through the outage
        ids += await send(bigpipe, http, downstream.url(), 5)
        await asyncio.sleep(0.2)

    async def all_finished() -> bool:
        return (await group_stats(bigpipe, http))["rpcTotal"] == len(ids)

    await eventually(all_finished, 60, "every call to be delivered or dead-lettered")
    watcher.cancel()
    stats = await group_stats(bigpipe, http)
    delivered = {r.call_id for r in downstream.requests if r.at >= outage_until}
    letters = {
        letter["call"]["id"] for letter in await dead_letters(kafka, bigpipe, stats["deadLetter"])
    }
    lost = set(ids) - delivered - letters
    during_outage = sum(1 for r in downstream.requests if r.at < outage_until)
    print(
        f"\noutage: sent={len(ids)} delivered={len(delivered)} dead={len(letters)} "
        f"lost={len(lost)} attempts_during_15s_outage={during_outage}"
    )
    assert broke, "the breaker must open during the outage"
    assert not lost
    assert "lost partitions" not in bigpipe.log_tail(1000), "paused, never evicted"
    assert stats["circuitIsBreak"] == 0
    await downstream.stop()


async def test_a_response_body_is_read_to_64_kib_then_cut_off(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """A 200 whose body never ends: Bigpipe reads 64 KiB, drops the connection, and counts
    the call delivered, on its first attempt, well before the attempt's timeout."""
    ended: list[tuple[float, int]] = []  # (seconds streamed, bytes written)

    async def endless(request: web.Request, _number: int) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        started, sent = time.monotonic(), 0
        try:
            while time.monotonic() - started < 20:  # bounded, should the cut never come
                await response.write(b"x" * 8192)
                sent += 8192
                await asyncio.sleep(0.005)
        except (ConnectionError, RuntimeError):  # the client hung up
            pass
        finally:  # also when the server cancels the handler of a closed connection
            ended.append((time.monotonic() - started, sent))
        return response

    downstream = await Downstream(behaviour=endless).start()
    bigpipe, _ = await start_node(kafka, tmp_path, processes, timeout=15_000, retries=2)
    await send(bigpipe, http, downstream.url())

    await counted_delivered(bigpipe, http, 15)
    await eventually(lambda: bool(ended), 25, "the downstream's stream to end")
    [(streamed, written)] = ended
    print(f"\nresponse cap: {written:,} bytes written before the cut, after {streamed:.2f} s")
    assert streamed < 10, "the client must hang up, not wait for the end"
    assert written < 1 << 20, "what was written: 64 KiB read, plus socket buffers"
    assert [r.attempt for r in downstream.requests] == [1]
    await downstream.stop()


async def test_an_error_body_is_cut_and_its_start_goes_into_the_dead_letter(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    huge = "E" + "r" * (4 << 20)  # 4 MiB, far over the 64 KiB read

    async def long_error(_request: web.Request, _number: int) -> web.Response:
        return web.Response(status=500, text=huge)

    downstream = await Downstream(behaviour=long_error).start()
    bigpipe, _topic = await start_node(kafka, tmp_path, processes, retries=0)
    await send(bigpipe, http, downstream.url())
    [letter] = await dead_letters(kafka, bigpipe, 1)
    assert letter["lastStatus"] == 500
    assert letter["lastError"].startswith("HTTP 500: Er")
    assert len(letter["lastError"]) < 1024, "the start of the body, not the body"
    await downstream.stop()


async def test_retry_after_on_503_is_honoured_as_a_date_and_capped_at_backoff_max(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    async def unavailable_twice(_request: web.Request, number: int) -> web.Response:
        if number == 0:  # an HTTP date 2 s ahead (whole seconds: a wait of 1 to 2 s)
            return web.Response(status=503, headers={"Retry-After": http_date(time.time() + 2)})
        if number == 1:  # an hour: more than backoffMax allows
            return web.Response(status=503, headers={"Retry-After": "3600"})
        return web.Response(status=200)

    downstream = await Downstream(behaviour=unavailable_twice).start()
    bigpipe, _ = await start_node(
        kafka, tmp_path, processes, retries=3, backoffBase=10, backoffMax=1500
    )
    await send(bigpipe, http, downstream.url())
    await eventually(lambda: len(downstream.requests) == 3, 20, "two retries")
    first, second, third = (r.at for r in downstream.requests)
    print(f"\nRetry-After on 503: waited {second - first:.2f} s, then {third - second:.2f} s")
    assert second - first >= 0.9, "Retry-After as a date 2 s ahead"
    assert 1.4 <= third - second < 5, "Retry-After: 3600 capped at backoffMax (1.5 s)"

    await counted_delivered(bigpipe, http, 10)
    await downstream.stop()


def http_date(at: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(at))


async def test_a_backlog_never_bursts_past_a_tenth_of_a_second_of_tokens(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """The bucket holds 0.1 s of tokens: after an idle spell (a full bucket) a backlog of
    calls reaches the downstream at its rate, never as one burst of a second's worth."""
    rate, window = 50, 1.0
    downstream = await Downstream().start()
    bigpipe, _ = await start_node(kafka, tmp_path, processes, rateLimit=rate, concurrency=rate)
    ids = await send_many(bigpipe, http, downstream.url(), rate * 3)
    await eventually(lambda: set(ids) <= downstream.call_ids(), 30, "the backlog delivered")
    times = sorted(r.at for r in downstream.requests)
    busiest = max(sum(1 for t in times[i:] if t - start < window) for i, start in enumerate(times))
    # The window's tokens, a full bucket, and 0.3 s of slack: this test's own loop may stall
    # on a loaded machine and stamp requests that came over a longer span as one window.
    bound = rate * (window + 0.1 + 0.3)
    print(f"\nburst: at most {busiest} requests in {window} s (bound {bound:.0f}, rate {rate}/s)")
    assert busiest <= bound
    await downstream.stop()


async def test_a_full_buffer_stops_reading_from_kafka_until_calls_finish(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """maxBuffered bounds the calls read and unfinished: with the downstream stuck, the
    group reads no more than that, stays in its group, and reads on once calls finish."""
    max_buffered, calls = 10, 60
    release = asyncio.Event()

    async def stuck(_request: web.Request, _number: int) -> web.Response:
        await release.wait()
        return web.Response(status=200)

    downstream = await Downstream(behaviour=stuck).start()
    bigpipe, _ = await start_node(
        kafka, tmp_path, processes, concurrency=2, maxBuffered=max_buffered, timeout=60_000
    )
    ids = await send_many(bigpipe, http, downstream.url(), calls)
    await eventually(lambda: downstream.in_flight == 2, 30, "two calls stuck downstream")
    read: list[int] = []
    deadline = time.monotonic() + 3  # three times the stall after which the group pauses
    while time.monotonic() < deadline:
        read.append((await group_stats(bigpipe, http))["handleMessage"])
        await asyncio.sleep(0.1)
    print(f"\nmaxBuffered {max_buffered}: read {max(read)} of {calls} while stuck")
    assert max(read) == max_buffered, "the buffer fills, and no further"
    await eventually(
        lambda: partitions_in(bigpipe, http, "paused:buffer"), 10, "partitions paused, said why"
    )
    release.set()
    await eventually(lambda: set(ids) <= downstream.call_ids(), 60, "every call delivered")
    await eventually(lambda: partitions_in(bigpipe, http, "consuming"), 10, "partitions resumed")
    assert (await group_stats(bigpipe, http))["handleMessage"] == calls
    assert "lost partitions" not in bigpipe.log_tail(1000), "paused, never evicted"
    await downstream.stop()


async def partitions_in(bigpipe: Bigpipe, http: aiohttp.ClientSession, state: str) -> bool:
    """Does /metrics show every partition of the node's group (three) in `state`?"""
    shown = (await scrape(bigpipe, http)).get("bigpipe_partition_state", {})
    return {
        dict(labels)["partition"]
        for labels, on in shown.items()
        if on and (("state", state) in labels)
    } == {"0", "1", "2"}


async def test_a_backlog_larger_than_the_prefetch_is_delivered_without_pauses(
    kafka: str, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """librdkafka stops fetching while its prefetch (8 MiB) is full, then waits
    fetch.queue.backoff.ms (1 s by default) before it fetches again. With calls of a few
    KiB the group emptied its prefetch sooner and sat idle: a backlog of 2 KiB calls went
    at half the speed. Here 24 MiB of 32 KiB calls go out with no pause of half a second."""
    downstream = await Downstream().start()
    topic, calls = unique("calls"), 768
    await asyncio.to_thread(create_topic, kafka, topic, 3)
    data = "x" * (32 << 10)
    await asyncio.to_thread(preload, kafka, topic, downstream.url(), data, calls)
    config = base_config(
        kafka,
        topic,
        free_port(),
        consumers=[consumer_entry(topic, unique("g"), concurrency=20, rateLimit=1_000_000)],
    )
    processes.append(await Bigpipe(config, tmp_path).start())
    await eventually(lambda: len(downstream.call_ids()) == calls, 120, "every call delivered")
    arrivals = sorted(received.at for received in downstream.requests)
    pauses = sorted(later - earlier for earlier, later in itertools.pairwise(arrivals))[-3:]
    print(f"\n{calls} calls in {arrivals[-1] - arrivals[0]:.2f} s, longest pauses {pauses}")
    assert pauses[-1] < 0.5, "the group waited for librdkafka to fetch again"
    await downstream.stop()


def preload(kafka: str, topic: str, url: str, data: str, calls: int) -> None:
    """`calls` calls to `url` written straight to Kafka, before a node reads the topic."""
    producer = Producer({"bootstrap.servers": kafka, "linger.ms": 20})
    for index in range(calls):
        call = new_call(url, data, ACL_NAME, {})
        producer.produce(topic, encode_call(call), str(index).encode())
        producer.poll(0)
    assert producer.flush(30) == 0, "every call written"
