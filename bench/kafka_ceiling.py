"""Kafka ceiling: how fast confluent-kafka alone writes the same records, at the same acks.

One confluent-kafka producer, built with Bigpipe's own producer settings
(`bigpipe.kafka.producer_settings`: acks=all, enable.idempotence=true,
linger.ms, queue size), writes 200,000 call envelopes, encoded as Bigpipe
encodes them, to a fresh topic with as many partitions as the ingest topic,
in a tight loop with a delivery callback per record. The rate runs from the
first write to the last acknowledgement; median of `rounds` runs.

Figure: Bigpipe's ingest rate (from the ingest benchmark); baseline: this raw
rate; the ratio shows how close ingest comes to the broker's limit here.
Informational: no target.
"""

from __future__ import annotations

import asyncio
import time

from confluent_kafka import Producer

from bench.common import (
    DATA,
    BenchError,
    Context,
    Row,
    bigpipe_config,
    create_topic,
    median,
    save,
)
from bigpipe.calls.envelope import encode_call, new_call
from bigpipe.config import parse_config
from bigpipe.kafka import producer_settings
from tests.support import ACL_NAME, unique

RECORDS = 200_000
DISTINCT = 10_000  # envelopes made in advance, each with its own id, written in turn
PARTITIONS = 6  # as the ingest topic (bigpipe_config's default)


def produce_rate(settings: dict, topic: str, records: list[bytes], count: int) -> float:
    """Write `count` records (cycling through `records`); return acknowledged records/s."""
    producer = Producer(settings)
    producer.produce(topic, records[0])  # metadata and the idempotent producer id first
    if producer.flush(30):
        raise BenchError("kafka ceiling: the first write was not acknowledged in 30 s")
    acked = failed = 0

    def on_delivery(error: object, _message: object) -> None:
        nonlocal acked, failed
        if error is None:
            acked += 1
        else:
            failed += 1

    started = time.perf_counter()
    for index in range(count):
        record = records[index % len(records)]
        while True:
            try:
                producer.produce(topic, record, on_delivery=on_delivery)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.005)
        if index % 1000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    elapsed = time.perf_counter() - started
    if left or failed or acked != count:
        raise BenchError(f"kafka ceiling: {acked} acked, {failed} failed, {left} unflushed")
    return count / elapsed


async def ceiling_records(bootstrap: str, topic: str) -> list[bytes]:
    """Create `topic` and make the envelopes to write to it, as Bigpipe encodes them."""
    await asyncio.to_thread(create_topic, bootstrap, topic, PARTITIONS)
    return [
        encode_call(new_call("http://127.0.0.1:9/hook", DATA, ACL_NAME, {}))
        for _ in range(DISTINCT)
    ]


async def run(ctx: Context) -> list[Row]:
    topic = unique("bench-ceiling")
    config = parse_config(bigpipe_config(ctx.bootstrap, topic, workers=1))
    settings = producer_settings(config)
    records = await ceiling_records(ctx.bootstrap, topic)
    count = ctx.count(RECORDS)
    rates = []
    for round_number in range(1, ctx.rounds + 1):
        rates.append(await asyncio.to_thread(produce_rate, settings, topic, records, count))
        print(f"  kafka ceiling round {round_number}: {rates[-1]:,.0f} records/s", flush=True)
    ceiling = median(rates)
    ratio = ctx.peak / ceiling if ctx.peak else None
    how = (
        f"{count:,} records of {len(records[0])} bytes, acks=all, idempotent, "
        f"linger.ms={settings['linger.ms']}, {PARTITIONS} partitions, median of {ctx.rounds}; "
        f"up to {settings['queue.buffering.max.messages']:,} records in flight, "
        "where ingest has at most one per client connection"
    )
    save(
        ctx.results,
        "kafka_ceiling",
        {
            "what": "raw confluent-kafka produce rate of Bigpipe's records with its settings",
            "how": how,
            "records_per_s": rates,
            "median_per_s": ceiling,
            "bigpipe_ingest_per_s": ctx.peak,
            "ingest_share": ratio,
        },
    )
    return [
        Row(
            "kafka ceiling",
            f"{ctx.peak:,.0f} calls/s ingest" if ctx.peak else "(no ingest run)",
            f"{ceiling:,.0f}/s raw produce",
            ratio,
            "-",
            None,
            [how],
        )
    ]
