"""Delivery throughput: Bigpipe against a bare aiohttp client, same concurrency, same nginx.

    python -m bench.delivery [--calls N] [--concurrency C] [--rounds R]

Bigpipe's figure is end to end from Kafka: N calls are preloaded into a topic,
then one Bigpipe node delivers them to nginx (204). The baseline posts the
same bodies to the same nginx with a bare aiohttp client at the same
concurrency. Both run in each round, alternating; the medians and their ratio
are printed and saved to bench/results/delivery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop
from confluent_kafka import Producer

from bench.common import median, nginx_204, save, start_kafka
from bigpipe.envelope import encode_call, new_call
from tests.support import Bigpipe, base_config, consumer_entry, free_port, unique

BODY = "x" * 100
TARGET_RATIO = 0.70


async def bare_client_rate(url: str, calls: int, concurrency: int) -> float:
    """Calls/s of a bare aiohttp client posting BODY to `url` with `concurrency` workers.

    It sends the request Bigpipe sends: the same body and the same headers.
    """
    remaining = calls
    body = BODY.encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Bigpipe-Call-Id": "0" * 32,
        "X-Bigpipe-Attempt": "1",
    }

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                assert response.status == 204

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return calls / (time.perf_counter() - started)


def preload(bootstrap: str, topic: str, url: str, calls: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for index in range(calls):
        call = new_call(url, BODY, "bench", {})
        producer.produce(topic, encode_call(call), str(index).encode())
        if index % 10_000 == 0:
            producer.poll(0)
    producer.flush(60)


async def bigpipe_rate(
    bootstrap: str, url: str, calls: int, concurrency: int, workdir: Path
) -> float:
    """Deliveries/s of one Bigpipe node draining `calls` preloaded calls to `url`."""
    topic = unique("bench-deliver")
    consumer = consumer_entry(
        topic, unique("g"), concurrency=concurrency, rateLimit=1e9, timeout=5000
    )
    config = base_config(
        bootstrap, topic, free_port(), partitions=4, consumers=[], **{"log.level": 3}
    )
    # First start without consumers creates the topic; then preload; then deliver.
    creator = await Bigpipe(config, workdir).start()
    await creator.stop()
    await asyncio.to_thread(preload, bootstrap, topic, url, calls)
    config["kafka.consumer.list"] = [consumer]
    bigpipe = await Bigpipe(config, workdir).start()
    try:
        return await _drain_rate(bigpipe, calls)
    finally:
        await bigpipe.stop()


async def _drain_rate(bigpipe: Bigpipe, calls: int) -> float:
    async with aiohttp.ClientSession() as session:
        first_seen = None
        while True:
            total = (await bigpipe.stats(session))["consumerStats"][0]["rpcTotal"]
            now = time.perf_counter()
            if total and first_seen is None:
                first_seen, first_total = now, total
            if total >= calls:
                return (total - first_total) / (now - first_seen)
            await asyncio.sleep(0.02)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bootstrap = start_kafka()
    with tempfile.TemporaryDirectory() as tmp, nginx_204(Path(tmp) / "nginx") as url:
        baseline, bigpipe = [], []
        for round_number in range(1, args.rounds + 1):
            baseline.append(await bare_client_rate(url, args.calls, args.concurrency))
            bigpipe.append(
                await bigpipe_rate(bootstrap, url, args.calls, args.concurrency, Path(tmp))
            )
            print(
                f"round {round_number}: bare client {baseline[-1]:,.0f}/s, "
                f"bigpipe {bigpipe[-1]:,.0f}/s"
            )
    ratio = median(bigpipe) / median(baseline)
    print(
        f"\ndelivery to nginx 204, concurrency {args.concurrency}, {args.calls:,} calls, "
        f"median of {args.rounds}"
    )
    print(f"  bare aiohttp client : {median(baseline):>9,.0f} calls/s")
    print(f"  bigpipe (from Kafka): {median(bigpipe):>9,.0f} calls/s")
    print(f"  ratio               : {ratio:>9.2f}   (target >= {TARGET_RATIO})")
    path = save(
        "delivery",
        {
            "calls": args.calls,
            "concurrency": args.concurrency,
            "baseline_per_s": baseline,
            "bigpipe_per_s": bigpipe,
            "ratio": ratio,
            "target": TARGET_RATIO,
        },
    )
    print(f"  saved {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    uvloop.run(main())  # the baseline gets the same event loop as Bigpipe
