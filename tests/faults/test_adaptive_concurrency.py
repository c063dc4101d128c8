"""Adaptive concurrency end to end: a destination's concurrency found from its latency.

The downstream answers in 20 ms up to 8 requests at once and 40 ms slower for each request
beyond, so 8 at once is its best pace. With the cap at 64, the adaptive group must settle
at about 8 in flight and deliver within 15 % of the best fixed setting (concurrency 8),
measured just before it. Timing-sensitive: a machine whose load swings between the two
runs moves the ratio, so it runs with the fault suite, not the fast one.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import pytest
from aiohttp import web
from confluent_kafka import Producer

from bigpipe.calls.envelope import encode_call, new_call
from tests.faults.conftest import Cluster
from tests.support import (
    ACL_NAME,
    Bigpipe,
    Downstream,
    base_config,
    consumer_entry,
    create_topic,
    eventually,
    free_port,
    unique,
)

pytestmark = [pytest.mark.faults, pytest.mark.long, pytest.mark.timeout(300)]

KNEE = 8  # past this many requests at once, the downstream slows down steeply
BASE_SECONDS = 0.02
STEP_SECONDS = 0.04  # added per request beyond KNEE
CALLS = 2000


def steep(downstream: Downstream) -> object:
    async def behaviour(_request: web.Request, _number: int) -> web.Response:
        beyond = max(0, downstream.in_flight - KNEE)
        await asyncio.sleep(BASE_SECONDS + STEP_SECONDS * beyond)
        return web.Response(status=204)

    return behaviour


def preload(bootstrap: str, topic: str, url: str, calls: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for index in range(calls):
        producer.produce(topic, encode_call(new_call(url, "x", ACL_NAME, {})), str(index))
        producer.poll(0)
    assert producer.flush(30) == 0


async def deliver(
    kafka: str, tmp_path: Path, processes: list[Bigpipe], **entry: object
) -> tuple[float, list[int]]:
    """Deliver CALLS preloaded calls to the steep downstream; return calls/s from the first
    delivery to the last, and the requests in flight sampled over the second half."""
    downstream = Downstream()
    downstream.behaviour = steep(downstream)  # type: ignore[assignment]
    await downstream.start()
    topic = unique("adaptive")
    await asyncio.to_thread(create_topic, kafka, topic, 3)
    await asyncio.to_thread(preload, kafka, topic, downstream.url(), CALLS)
    group = consumer_entry(topic, unique("g"), rateLimit=100_000, retries=0, timeout=10_000)
    config = base_config(kafka, topic, free_port(), partitions=3, consumers=[{**group, **entry}])
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    samples: list[int] = []

    async def sample() -> None:
        while True:
            if len(downstream.requests) > CALLS // 2:
                samples.append(downstream.in_flight)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        await eventually(lambda: len(downstream.answered_ids()) >= CALLS, 120, "every call")
    finally:
        sampler.cancel()
        await bigpipe.stop()
        await downstream.stop()
    times = sorted(r.at for r in downstream.requests)
    return (CALLS - 1) / (times[-1] - times[0]), samples


async def test_adaptive_concurrency_finds_the_knee_and_keeps_the_pace(
    cluster: Cluster, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    kafka = cluster.bootstrap
    fixed_rate, fixed_samples = await deliver(kafka, tmp_path, processes, concurrency=KNEE)
    rate, samples = await deliver(
        kafka, tmp_path, processes, concurrency=64, adaptiveConcurrency=True
    )
    in_flight = statistics.median(samples)
    print(
        f"\nadaptive concurrency: {rate:.0f} calls/s (fixed {KNEE}: {fixed_rate:.0f}/s, "
        f"ratio {rate / fixed_rate:.2f}); in flight median {in_flight}, "
        f"p90 {statistics.quantiles(samples, n=10)[-1]:.0f}, most {max(samples)} "
        f"(fixed: median {statistics.median(fixed_samples)})"
    )
    assert in_flight <= KNEE + 1, "settles at about the knee, far below the cap of 64"
    assert rate >= 0.85 * fixed_rate, "within 15 % of the best fixed setting"
