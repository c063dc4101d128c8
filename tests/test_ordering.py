"""Per-key ordering (`ordering: "key"`): one call of a key at a time, in acceptance order,
with no head-of-line blocking of other keys; on a real broker and real HTTP servers."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
import zlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bigpipe.config import ConfigError, parse_config
from bigpipe.delivery.ordering import KeyChains
from bigpipe.stats import GroupCounters
from tests.support import (
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    group_stats,
    start_node,
)

KEYS = 20
CALLS_PER_KEY = 50
PARTITIONS = 2
FAILING_KEYS = ("k0", "k4")  # one per partition; 500 for FAIL_SECONDS from their first request
FAIL_SECONDS = 5.0
POST_INTERVAL = 0.06  # seconds between two calls of one key: 50 calls span 3 s
UNKEYED = "-"  # the key part of an unkeyed call's data
MAX_BUFFERED = 20  # the bound test's maxBuffered: the failing keys hold more behind them


# ---------------------------------------------------------------- units
def test_ordering_is_key_or_absent_and_a_bad_value_is_one_line_naming_it() -> None:
    entry = consumer_entry("t", "g", ordering="keys")
    with pytest.raises(ConfigError) as caught:
        parse_config(base_config("127.0.0.1:9092", "t", 8080, consumers=[entry]))
    assert caught.value.problems == ["kafka.consumer.list[0].ordering: must be 'key', got 'keys'"]
    entry["ordering"] = "key"
    config = parse_config(base_config("127.0.0.1:9092", "t", 8080, consumers=[entry]))
    assert config.consumers[0].ordering == "key"
    del entry["ordering"]
    assert (
        parse_config(base_config("127.0.0.1:9092", "t", 8080, consumers=[entry]))
        .consumers[0]
        .ordering
        is None
    )


async def test_a_key_runs_one_call_at_a_time_in_order_and_other_keys_do_not_wait() -> None:
    counters = GroupCounters()
    chains = KeyChains(counters)
    ran: list[str] = []
    release = {name: asyncio.Event() for name in ("a1", "a2", "a3", "b1")}

    async def call(name: str, turn: object) -> None:
        async with turn:  # type: ignore[attr-defined]
            ran.append(name)
            await release[name].wait()

    turns = [("a1", b"a"), ("a2", b"a"), ("b1", b"b"), ("a3", b"a")]
    tasks = [asyncio.create_task(call(name, chains.turn(key))) for name, key in turns]
    await eventually(lambda: ran == ["a1", "b1"], 5, "a1 and b1 to start, a2 and a3 to wait")
    assert counters.orderingHeld == 2
    release["a2"].set()  # a2 may not start before a1 has finished, whatever a2's own state
    release["a1"].set()
    await eventually(lambda: ran == ["a1", "b1", "a2", "a3"], 5, "a2, then a3")
    release["a3"].set()
    release["b1"].set()
    await asyncio.gather(*tasks)
    assert counters.orderingHeld == 0


# ---------------------------------------------------------------- end to end
@dataclass(frozen=True)
class Delivery:
    arrived: float  # when the request reached the downstream (monotonic)
    answered: float  # when the downstream answered it 200


def partition_of(key: str) -> int:
    """librdkafka's default partitioner: CRC32 of the key (see tests.support.key_for)."""
    return zlib.crc32(key.encode()) % PARTITIONS


class Flaky:
    """The downstream: FAILING_KEYS answer 500 for FAIL_SECONDS from their first request,
    everything else 200, each after a short random time so calls finish out of order.
    A call cut off by a kill -9 is never answered (Downstream cancels its handler)."""

    def __init__(self) -> None:
        self.failing_until: dict[str, float] = {}
        self.first_ok: dict[str, Delivery] = {}  # call id -> its first delivery

    async def __call__(self, request: web.Request, _number: int) -> web.Response:
        arrived = time.monotonic()
        key = (await request.read()).decode().split("/")[0]
        await asyncio.sleep(random.uniform(0, 0.02))
        if key in FAILING_KEYS:
            until = self.failing_until.setdefault(key, arrived + FAIL_SECONDS)
            if time.monotonic() < until:
                return web.Response(status=500, text="failing for a while")
        call_id = request.headers["X-Bigpipe-Call-Id"]
        self.first_ok.setdefault(call_id, Delivery(arrived, time.monotonic()))
        return web.Response(status=200)


async def ordered_node(
    kafka: str, tmp_path: Path, processes: list[Bigpipe], **entry: object
) -> tuple[Flaky, Downstream, Bigpipe]:
    """A Flaky downstream, and a node whose group orders by key on PARTITIONS partitions
    (`entry`: more keys of the group)."""
    flaky = Flaky()
    downstream = await Downstream(behaviour=flaky).start()
    # Backoffs of up to 2 s, past the 1 s delayThreshold: an unordered call would wait
    # them in the delay topics, an ordered one waits them in memory. Retries enough to
    # outlast FAIL_SECONDS.
    entry = {
        **entry,
        "ordering": "key",
        "retries": 30,
        "backoffBase": 300,
        "backoffMax": 2000,
        "delayThreshold": 1000,
        "concurrency": 40,
    }
    bigpipe, _ = await start_node(kafka, tmp_path, processes, PARTITIONS, **entry)
    return flaky, downstream, bigpipe


Accepted = dict[str, list[tuple[str, float]]]  # key -> [(call id, accepted at)], in order


async def post_keyed(
    bigpipe: Bigpipe,
    http: aiohttp.ClientSession,
    url: str,
    delivered: Mapping[str, object],
    interval: float = POST_INTERVAL,
) -> Accepted:
    """KEYS keys x CALLS_PER_KEY calls, the keys side by side, each key's calls one after
    another (so acceptance order is known), and 100 calls without a key at once; once the group
    delivers (`delivered` is the downstream's calls delivered)."""
    accepted: Accepted = defaultdict(list)

    async def post(key: str, count: int) -> None:
        start = time.monotonic()
        for number in range(count):
            # Paced, as a steady stream: faster than its key is delivered, a key's calls
            # would queue behind its own earlier calls, which is ordering, not blocking.
            await asyncio.sleep(max(0.0, start + number * interval - time.monotonic()))
            extra = {} if key == UNKEYED else {"partition_key": key}
            while True:  # a fresh topic may answer errno 1 at first
                status, reply = await bigpipe.post_call(
                    http, data=f"{key}/{number}", url=url, **extra
                )
                if reply["errno"] == 0:
                    break
                assert reply["errno"] == 1, (status, reply)
            accepted[key].append((reply["data"]["id"], time.monotonic()))

    await post("warm-up", 1)  # the group has joined once its call is delivered
    warm_up = accepted.pop("warm-up")[0][0]
    await eventually(lambda: warm_up in delivered, 30, "a first call to be delivered")
    keys = [f"k{n}" for n in range(KEYS)]
    await asyncio.gather(
        *(post(key, CALLS_PER_KEY) for key in keys), *(post(UNKEYED, 1) for _ in range(100))
    )
    return accepted


def assert_in_acceptance_order(accepted: Accepted, first: dict[str, Delivery]) -> None:
    for key, calls in accepted.items():
        if key == UNKEYED:
            continue
        times = [first[call_id].arrived for call_id, _ in calls]
        assert times == sorted(times), f"key {key}: first deliveries out of acceptance order"


async def test_each_key_is_delivered_in_order_and_a_failing_key_holds_back_only_itself(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    flaky, downstream, bigpipe = await ordered_node(kafka, tmp_path, processes)
    held_seen: list[int] = []

    async def watch_held() -> None:
        while True:
            held_seen.append((await group_stats(bigpipe, http))["orderingHeld"])
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch_held())
    accepted = await post_keyed(bigpipe, http, downstream.url(), flaky.first_ok)
    every = {call_id for calls in accepted.values() for call_id, _ in calls}
    await eventually(lambda: every <= flaky.first_ok.keys(), 60, "every call to be delivered")
    watcher.cancel()
    first = flaky.first_ok

    assert_in_acceptance_order(accepted, first)
    for key in FAILING_KEYS:  # one at a time: each call's first request after the last 200
        calls = [call_id for call_id, _ in accepted[key]]
        for before, after in itertools.pairwise(calls):
            started = min(r.at for r in downstream.requests if r.call_id == after)
            assert started >= first[before].answered, f"{key}: {after} overlapped {before}"
    assert max(held_seen) > 0, "calls behind a failing key's head show in orderingHeld"

    # Keys sharing a partition with a failing key flow on while it fails.
    blocked = {partition_of(key) for key in FAILING_KEYS}
    neighbours = [
        f"k{n}"
        for n in range(KEYS)
        if f"k{n}" not in FAILING_KEYS and partition_of(f"k{n}") in blocked
    ]
    failing_ends = min(flaky.failing_until.values())
    delays = [
        first[call_id].arrived - accepted_at
        for key in neighbours
        for call_id, accepted_at in accepted[key]
        if accepted_at < failing_ends  # accepted while both failing keys failed
    ]
    median = statistics.median(delays)
    spread = statistics.quantiles(delays, n=10)
    print(
        f"\nordering: {len(delays)} neighbours' calls, delay median {median:.3f} s,"
        f" p90 {spread[-1]:.3f} s, max {max(delays):.3f} s"
    )
    assert len(delays) >= 100, "the test must post while the failing keys fail"
    assert median < 1.0

    # Calls without a key are not ordered: several of them were in flight at once.
    unkeyed = sorted((first[c].arrived, first[c].answered) for c, _ in accepted[UNKEYED])
    overlapping = sum(1 for a, b in itertools.pairwise(unkeyed) if b[0] < a[1])
    assert overlapping > 0, "unkeyed calls ran one at a time"
    async with http.get(f"{bigpipe.url}/metrics") as response:
        assert "bigpipe_ordering_held{" in await response.text()
    assert await bigpipe.stop() == 0
    await downstream.stop()


async def test_a_kill_9_mid_run_loses_nothing_and_keeps_each_keys_first_deliveries_in_order(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    flaky, downstream, first = await ordered_node(kafka, tmp_path, processes)
    # All at once: each key's calls queue behind one another, the failing keys' for seconds.
    accepted = await post_keyed(first, http, downstream.url(), flaky.first_ok, interval=0)
    every = {call_id for calls in accepted.values() for call_id, _ in calls}
    await eventually(lambda: len(flaky.first_ok) >= len(every) // 3, 30, "a third delivered")
    held_at_kill = (await group_stats(first, http))["orderingHeld"]
    await first.kill()
    killed_at = time.monotonic()
    delivered_at_kill = len(flaky.first_ok.keys() & every)

    second = await Bigpipe(first.config, tmp_path).start()
    processes.append(second)
    await eventually(lambda: every <= flaky.first_ok.keys(), 60, "every call delivered")
    again = {r.call_id for r in downstream.requests if r.at > killed_at} & {
        call_id for call_id, delivery in flaky.first_ok.items() if delivery.answered < killed_at
    }
    print(
        f"\nordering kill -9: {len(every)} calls, {delivered_at_kill} delivered and"
        f" {held_at_kill} held at the kill, {len(again)} delivered again after it"
    )
    assert delivered_at_kill < len(every), "the kill must land mid-run"
    assert held_at_kill > 0, "the kill must land while calls wait behind their key"
    assert_in_acceptance_order(accepted, flaky.first_ok)
    assert await second.stop() == 0
    await downstream.stop()


async def test_a_node_joining_mid_run_keeps_each_keys_first_deliveries_in_order(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """A rebalance hands partitions over while keys wait behind their heads: the old owner
    stops their calls, the new one reads them again from the commit point, in order."""
    flaky, downstream, first = await ordered_node(kafka, tmp_path, processes)
    # Slower: 50 calls of a key span 7.5 s, so the second node joins while calls still come.
    posting = asyncio.create_task(
        post_keyed(first, http, downstream.url(), flaky.first_ok, interval=0.15)
    )
    await eventually(lambda: len(flaky.first_ok) >= 100, 30, "deliveries to be under way")
    second = Bigpipe({**first.config, "http.server.port": free_port()}, tmp_path)
    processes.append(await second.start())

    async def shared() -> bool:
        return len((await group_stats(first, http))["partitions"]) < PARTITIONS

    await eventually(shared, 30, "the second node to take a partition")
    assert not posting.done(), "the second node must join mid-run"
    accepted = await posting
    every = {call_id for calls in accepted.values() for call_id, _ in calls}
    await eventually(lambda: every <= flaky.first_ok.keys(), 60, "every call delivered")
    assert_in_acceptance_order(accepted, flaky.first_ok)
    assert (await group_stats(second, http))["rpcSuccess"] > 0, "the second node delivered"
    assert await second.stop() == 0
    assert await first.stop() == 0
    await downstream.stop()


async def test_calls_held_behind_their_key_are_bounded_and_stats_say_why_the_group_pauses(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    flaky, downstream, bigpipe = await ordered_node(
        kafka, tmp_path, processes, maxBuffered=MAX_BUFFERED
    )
    held: list[int] = []

    async def partition_states() -> set[str]:
        stats = await group_stats(bigpipe, http)
        held.append(stats["orderingHeld"])
        return set(stats["partitions"].values())

    async def paused_for_ordering() -> bool:
        return "paused:ordering" in await partition_states()

    async def consuming() -> bool:
        return await partition_states() == {"consuming"}

    posting = asyncio.create_task(
        post_keyed(bigpipe, http, downstream.url(), flaky.first_ok, interval=0)
    )
    await eventually(paused_for_ordering, 30, "the group to pause for ordering")
    accepted = await posting
    every = {call_id for calls in accepted.values() for call_id, _ in calls}
    await eventually(lambda: every <= flaky.first_ok.keys(), 60, "every call delivered")
    await eventually(consuming, 10, "the group to resume")
    print(f"\nordering bound: maxBuffered {MAX_BUFFERED}, at most {max(held)} held")
    assert max(held) <= 2 * MAX_BUFFERED, "held calls stay near the bound"
    assert_in_acceptance_order(accepted, flaky.first_ok)
    assert await bigpipe.stop() == 0
    await downstream.stop()
