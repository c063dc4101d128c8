"""Calls whose destination may not be called for long wait in Kafka, not in memory
(issue 11, item 1): a Retry-After pause or an open breaker longer than delayThreshold
parks the call in the group's delay topics, its source offset committed, until the
destination may be called again. On a real broker with real HTTP downstreams."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import (
    Bigpipe,
    Downstream,
    committed_offsets,
    dead_letters,
    eventually,
    group_stats,
    start_node,
    topic_record_count,
)
from tests.test_breaker_end_to_end import Outage
from tests.test_destination_shields import median_delays, send_through_outage, watch_stats


def rungs(bigpipe: Bigpipe) -> list[str]:
    entry = bigpipe.config["kafka.consumer.list"][0]
    return [f"{entry['topic']}.{entry['groupId']}.delay.{rung}" for rung in ("1s", "10s", "1m")]


async def parked_records(kafka: str, bigpipe: Bigpipe) -> int:
    counts = [await asyncio.to_thread(topic_record_count, kafka, t) for t in rungs(bigpipe)]
    return sum(counts)


async def all_committed_at_source(kafka: str, bigpipe: Bigpipe) -> bool:
    """Is every call of the source topic committed (delivered, dead-lettered or parked)?"""
    entry = bigpipe.config["kafka.consumer.list"][0]
    written = await asyncio.to_thread(topic_record_count, kafka, entry["topic"])
    committed = await asyncio.to_thread(committed_offsets, kafka, entry["groupId"], entry["topic"])
    return sum(max(0, offset) for offset in committed.values()) == written


async def run_retry_after_outage(
    kafka: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
    send_seconds: float,
    max_held: int,
    **entry: Any,
) -> None:
    """Calls to a host answering 503 with Retry-After: 30 interleaved with calls to a
    healthy host on the same partitions. The pause (Retry-After, capped at backoffMax) is
    longer than delayThreshold, so the broken host's calls are parked, not held: the
    partitions never pause for held calls, the healthy host's calls flow, and every
    parked call is delivered once the host recovers.

    Only the calls that reach the host in the last delayThreshold of a pause are held (a
    short wait stays in memory): call rate times delayThreshold. `max_held` is to be about
    twice that, and less than the calls of one pause, which the old in-memory hold held."""
    healthy = await Downstream().start()
    busy = Outage(retry_after=30)
    broken = await Downstream(behaviour=busy).start()
    bigpipe, _ = await start_node(
        kafka,
        tmp_path,
        processes,
        partitions=3,
        retries=5,
        backoffBase=100,
        destination={"maxHeld": max_held},
        **entry,
    )
    seen: list[dict[str, Any]] = []  # /stats of the group, sampled throughout
    watcher = watch_stats(bigpipe, http, seen, 0.25)
    try:
        accepted, to_broken = await send_through_outage(
            bigpipe, http, healthy, broken, send_seconds
        )
        # Still down: every call is committed at source, the broken host's parked.
        await eventually(
            lambda: all_committed_at_source(kafka, bigpipe), 30, "the source committed"
        )
        assert not busy.delivered
        parked = await parked_records(kafka, bigpipe)
        busy.down = False
        recovered = time.monotonic()
        await eventually(
            lambda: set(to_broken) <= busy.delivered, 90, "the broken host's calls delivered"
        )
        late = time.monotonic() - recovered

        async def all_finished() -> bool:
            stats = await group_stats(bigpipe, http)
            return stats["rpcTotal"] >= len(accepted) + len(to_broken)

        await eventually(all_finished, 30, "every call finished")
    finally:
        watcher.cancel()
        await healthy.stop()
        await broken.stop()
    medians = median_delays(accepted, healthy)
    states = {state for s in seen for state in s["partitions"].values()}
    stats = seen[-1]
    print(
        f"\nRetry-After outage: {len(accepted)} healthy calls, median delay per window "
        f"{[round(m, 3) for m in medians]}; {len(to_broken)} calls to the broken host, "
        f"{parked} records parked, most held {max(s['held'] for s in seen)}, "
        f"all delivered {late:.1f} s after recovery; partition states {sorted(states)}"
    )
    assert "paused:held" not in states, "the partitions paused for held calls"
    assert all(m < 1.0 for m in medians), medians
    assert parked >= len(to_broken), "the broken host's calls did not wait in the delay topics"
    assert any(sum(s["waiting"].values()) for s in seen), "/stats never showed them waiting"
    assert (stats["deadLetter"], stats["held"]) == (0, 0)
    assert set(accepted) <= healthy.answered_ids(), "every healthy call delivered"


async def test_a_long_retry_after_parks_its_calls_and_the_partitions_keep_flowing(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    # Retry-After 30 s, capped at backoffMax 6 s, over delayThreshold 1 s: 200 calls parked.
    # 20-30 are held at the end of each pause; the old hold held 120 (20 calls/s for 6 s).
    await run_retry_after_outage(
        kafka,
        http,
        tmp_path,
        processes,
        send_seconds=10,
        max_held=60,
        backoffMax=6000,
        delayThreshold=1000,
    )


# The breaker opens after 3 failures in 2 s and stays open at least 4 s: past delayThreshold.
LONG_BREAK = {"breakPeriod": 4, "recoverPeriod": 1, "winSize": 2, "minStats": 3, "healthRate": 0.5}


async def test_an_open_breaker_parks_its_calls_without_burning_attempts_and_honours_ttl(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """Calls parked for an open breaker come back when it may turn RECOVER; its probes
    fail and it opens again, so they are parked again: a hold is not an attempt, and a
    call whose ttl runs out meanwhile is dead-lettered `expired`."""
    outage = Outage()
    downstream = await Downstream(behaviour=outage).start()
    try:
        bigpipe, _ = await start_node(
            kafka,
            tmp_path,
            processes,
            retries=20,
            backoffBase=50,
            backoffMax=100,
            delayThreshold=1000,
            circuitBreaker=LONG_BREAK,
        )
        expiring, lasting = set(), set()
        for index in range(40):
            ttl = {"ttl_ms": 2500} if index % 4 == 0 else {}
            status, reply = await bigpipe.post_call(http, url=downstream.url(), **ttl)
            assert (status, reply["errno"]) == (200, 0), reply
            (expiring if ttl else lasting).add(reply["data"]["id"])
        await eventually(
            lambda: all_committed_at_source(kafka, bigpipe), 30, "the source committed"
        )
        opened = time.monotonic()
        # Past the first breakPeriod: the breaker let probes through, they failed, it
        # opened again, and the calls that came back for it were parked again.
        await eventually(
            lambda: any(r.at > opened + LONG_BREAK["breakPeriod"] for r in downstream.requests),
            30,
            "a probe after the break",
        )

        async def open_again() -> bool:
            return (await group_stats(bigpipe, http))["circuitIsBreak"] == 1

        await eventually(open_again, 10, "the breaker to open again")
        assert await parked_records(kafka, bigpipe) >= len(lasting)
        outage.down = False
        recovered = time.monotonic()
        await eventually(lambda: lasting <= outage.delivered, 60, "every call without a ttl")
        letters = await dead_letters(kafka, bigpipe, len(expiring))
    finally:
        await downstream.stop()
    assert {letter["call"]["id"] for letter in letters} == expiring
    assert {letter["reason"] for letter in letters} == {"expired"}
    numbers: dict[str, list[int]] = defaultdict(list)
    for request in downstream.requests:
        numbers[request.call_id].append(request.attempt)
    for call_id, attempts in numbers.items():
        assert sorted(attempts) == list(range(1, len(attempts) + 1)), (
            f"call {call_id}: attempts {attempts}: a hold was counted as an attempt"
        )
    for letter in letters:
        assert letter["attempts"] == len(numbers.get(letter["call"]["id"], []))
    late = [r for r in downstream.requests if r.call_id in expiring and r.at >= recovered]
    assert not late, "an expired call was attempted after recovery"
    stats = await group_stats(bigpipe, http)
    print(
        f"\nopen breaker: {len(lasting)} calls delivered after recovery with "
        f"{max(len(a) for a in numbers.values())} attempts at most, {len(expiring)} expired; "
        f"{sum(len(a) for a in numbers.values())} requests in all, "
        f"{stats['rpcRetries']} retries"
    )
    assert (stats["deadLetter"], stats["expired"], stats["held"]) == (
        len(expiring),
        len(expiring),
        0,
    )
    assert stats["parked"] > len(lasting), "each parked once, some again"


async def test_calls_parked_for_their_destination_survive_kill_9(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """Killed while its calls are parked for a 20 s Retry-After pause, committed at source
    long before it ends: the restarted node delivers them all."""
    busy = Outage(retry_after=30)
    downstream = await Downstream(behaviour=busy).start()
    try:
        bigpipe, _ = await start_node(
            kafka, tmp_path, processes, retries=5, backoffMax=20_000, delayThreshold=1000
        )
        sent = set()

        async def send() -> None:
            status, reply = await bigpipe.post_call(http, url=downstream.url())
            assert (status, reply["errno"]) == (200, 0), reply
            sent.add(reply["data"]["id"])

        await send()  # its 503 starts the pause: the calls after it find it paused
        await eventually(lambda: bool(downstream.requests), 30, "the first 503")
        for _ in range(60):
            await send()
        # Well within the pause: held in memory, they would pin the commit point to its end.
        await eventually(
            lambda: all_committed_at_source(kafka, bigpipe), 10, "the source committed"
        )
        assert await parked_records(kafka, bigpipe) >= len(sent)
        stats = await group_stats(bigpipe, http)
        assert stats["held"] == 0 and stats["parked"] >= len(sent) - 1, stats  # not the first
        async with http.get(f"{bigpipe.url}/metrics") as response:
            assert any(
                line.startswith("bigpipe_parked_total{") and float(line.rsplit(" ", 1)[1]) > 0
                for line in (await response.text()).splitlines()
            )
        await bigpipe.kill()
        busy.down = False
        again = await Bigpipe(bigpipe.config, tmp_path).start()
        processes.append(again)
        await eventually(lambda: sent <= busy.delivered, 60, "every parked call delivered")
    finally:
        await downstream.stop()


async def test_ordered_calls_are_held_for_their_destination_never_parked(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """With `ordering: "key"` a key's head waits for its destination in memory, however
    long, and its later calls behind it: parked, the head's offset would be committed,
    and after a crash its later calls, read again, would overtake it."""
    busy = Outage(retry_after=30)
    downstream = await Downstream(behaviour=busy).start()
    try:
        bigpipe, _ = await start_node(
            kafka,
            tmp_path,
            processes,
            ordering="key",
            retries=5,
            backoffBase=50,
            backoffMax=3000,  # the pause: 3 s, over delayThreshold
            delayThreshold=1000,
        )
        accepted: dict[str, list[str]] = {f"k{key}": [] for key in range(3)}

        async def send(index: int) -> None:
            key = f"k{index % 3}"
            status, reply = await bigpipe.post_call(
                http, data=str(index), url=downstream.url(), partition_key=key
            )
            assert (status, reply["errno"]) == (200, 0), reply
            accepted[key].append(reply["data"]["id"])

        await send(0)  # its 503 starts the pause: the other keys' heads find it paused
        await eventually(lambda: bool(downstream.requests), 30, "the first 503")
        for index in range(1, 30):
            await send(index)

        async def heads_held() -> bool:
            return (await group_stats(bigpipe, http))["held"] == 2

        await eventually(heads_held, 10, "k1's and k2's heads held for the destination")
        busy.down = False
        every = {call_id for ids in accepted.values() for call_id in ids}
        await eventually(lambda: every <= busy.delivered, 60, "every call delivered")
        stats = await group_stats(bigpipe, http)
    finally:
        await downstream.stop()
    first: dict[str, float] = {}
    for request in downstream.requests:
        if request.answered is not None and request.call_id not in first:
            first[request.call_id] = request.at
    for key, ids in accepted.items():
        assert sorted(ids, key=lambda call_id: first[call_id]) == ids, f"{key} out of order"
    assert stats["parked"] == 0 and await parked_records(kafka, bigpipe) == 0
