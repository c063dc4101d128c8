"""Batch ingest: calls/s into Kafka through `POST /rpc/calls`, 100 calls a request, against
the raw produce ceiling measured in the same rounds.

wrk (`-t2 -c16 -d10s`, keep-alive) posts one batch of 100 valid calls (the bench's call:
100 bytes of data, no partition key) to one Bigpipe node, in rounds that alternate with
a raw produce run (bench/kafka_ceiling.py's `produce_rate`: confluent-kafka alone, with
Bigpipe's producer settings, writing the same envelopes). Bigpipe answers a batch only
once Kafka has every accepted call (acks=all). Every call must be accepted: after each
round, /stats must show every call received as accepted, and the topic must hold at
least as many records as the calls answered; otherwise the benchmark fails. CPU cost:
user + system CPU seconds of every process of the node (/proc/PID/stat) over each wrk
run, per 10,000 calls answered.

Figure: batched calls/s into Kafka; baseline: the raw produce rate; ratio: the share of
the ceiling; target: at least 150,000 calls/s (issue 14).
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from bench.common import (
    DATA,
    BenchError,
    Context,
    Row,
    bigpipe_config,
    bigpipe_node,
    cpu_seconds,
    median,
    per_10k,
    save,
)
from bench.kafka_ceiling import PARTITIONS, ceiling_records, produce_rate
from bench.wrk import WrkResult, run_wrk
from bigpipe.config import parse_config
from bigpipe.ingest.producer import producer_settings
from tests.support import ACL_NAME, ACL_SECRET, eventually, topic_record_count, unique

CALLS_PER_BATCH = 100
THREADS, CONNECTIONS, SECONDS, WARMUP_SECONDS = 2, 16, 10, 2
CEILING_RECORDS = 200_000
TARGET = 150_000  # calls/s (issue 14)


def batch_body() -> bytes:
    call = {"url": "http://127.0.0.1:9/hook", "data": DATA}
    return orjson.dumps(
        {"acl": {"name": ACL_NAME, "secret": ACL_SECRET}, "calls": [call] * CALLS_PER_BATCH}
    )


async def server_counts(session: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    """(calls received, calls accepted) by every worker of the node, from /stats."""
    async with session.get(f"{url}/stats") as response:
        server = (await response.json())["data"]["serverStats"]
    return server["receivedCall"], server["acceptedCall"]


async def check_every_call_accepted(
    url: str, bootstrap: str, topic: str, before: tuple[int, int, int], answered: int
) -> None:
    """Every call answered was accepted, and Kafka holds it. Other workers' /stats
    figures lag a moment (the node's board), so wait for them to cover the calls."""
    received_before, accepted_before, records_before = before
    async with aiohttp.ClientSession() as session:

        async def caught_up() -> bool:
            received, _ = await server_counts(session, url)
            return received - received_before >= answered

        await eventually(caught_up, 30, "/stats to count every call answered")
        await asyncio.sleep(0.5)  # calls still in flight when wrk stopped: let them finish
        received, accepted = await server_counts(session, url)
    if received - received_before != accepted - accepted_before:
        refused = (received - received_before) - (accepted - accepted_before)
        raise BenchError(f"batch ingest: {refused} of {received - received_before} calls refused")
    stored = await asyncio.to_thread(topic_record_count, bootstrap, topic)
    if stored - records_before < answered:
        raise BenchError(
            f"batch ingest: {answered} calls answered, {stored - records_before} in Kafka"
        )


async def run(ctx: Context) -> list[Row]:
    seconds = ctx.seconds(SECONDS)
    body_file = ctx.workdir / "batch-calls.json"
    body_file.write_bytes(batch_body())
    topic = unique("bench-batch")
    config = bigpipe_config(ctx.bootstrap, topic, workers=ctx.workers, partitions=PARTITIONS)
    ceiling_topic = unique("bench-batch-ceiling")
    settings = producer_settings(parse_config(config))
    records = await ceiling_records(ctx.bootstrap, ceiling_topic)
    ceiling_count = ctx.count(CEILING_RECORDS)

    async def wrk(url: str, duration: float) -> WrkResult:
        return await run_wrk(
            f"{url}/rpc/calls",
            body_file,
            connections=CONNECTIONS,
            seconds=duration,
            threads=THREADS,
        )

    rates: list[float] = []  # calls/s
    ceilings: list[float] = []  # records/s
    cpu: list[float] = []  # CPU-s per 10,000 calls
    runs: list[WrkResult] = []
    async with bigpipe_node(config, ctx.workdir) as node, aiohttp.ClientSession() as session:
        assert node.process is not None
        (await wrk(node.url, WARMUP_SECONDS)).check_all_ok("batch ingest warm-up")
        for round_number in range(1, ctx.rounds + 1):
            ceilings.append(
                await asyncio.to_thread(
                    produce_rate, settings, ceiling_topic, records, ceiling_count
                )
            )
            counts = await server_counts(session, node.url)
            stored = await asyncio.to_thread(topic_record_count, ctx.bootstrap, topic)
            cpu_before = cpu_seconds(node.process.pid)
            result = await wrk(node.url, seconds)
            calls = result.requests * CALLS_PER_BATCH
            cpu.append(per_10k(cpu_seconds(node.process.pid) - cpu_before, calls))
            result.check_all_ok(f"batch ingest round {round_number}")
            await check_every_call_accepted(
                node.url, ctx.bootstrap, topic, (*counts, stored), calls
            )
            runs.append(result)
            rates.append(result.rate * CALLS_PER_BATCH)
            print(
                f"  batch ingest round {round_number}: raw produce {ceilings[-1]:,.0f}/s, "
                f"batched {rates[-1]:,.0f} calls/s (p99 {result.latency_ms['p99']:.1f} ms "
                f"a batch, {cpu[-1]:.2f} CPU-s/10k)",
                flush=True,
            )
    rate, ceiling = median(rates), median(ceilings)
    ratio = rate / ceiling
    how = (
        f"wrk -t{THREADS} -c{CONNECTIONS} -d{seconds:g}s posting {CALLS_PER_BATCH} calls a "
        f"request to /rpc/calls, {ctx.workers} worker(s); raw produce: {ceiling_count:,} "
        f"records, Bigpipe's producer settings; alternating, median of {ctx.rounds}"
    )
    save(
        ctx.results,
        "batch_ingest",
        {
            "what": "calls/s into Kafka through POST /rpc/calls (acks=all) vs raw produce",
            "how": how,
            "workers": ctx.workers,
            "calls_per_batch": CALLS_PER_BATCH,
            "calls_per_s": rates,
            "median_calls_per_s": rate,
            "raw_produce_per_s": ceilings,
            "median_raw_produce_per_s": ceiling,
            "ratio": ratio,
            "target_calls_per_s": TARGET,
            "cpu_s_per_10k": cpu,
            "runs": [r.summary() for r in runs],
        },
    )
    latency = median([r.latency_ms["p99"] for r in runs])
    return [
        Row(
            "batch ingest",
            f"{rate:,.0f} calls/s",
            f"{ceiling:,.0f}/s raw produce",
            ratio,
            f">= {TARGET:,}/s",
            rate >= TARGET,
            [
                f"{how}; every call accepted (/stats) and in Kafka (watermarks)",
                f"CPU-seconds per 10,000 calls (median, every process of the node, "
                f"/proc/PID/stat): {median(cpu):.2f}; p99 of a batch's reply {latency:.1f} ms",
            ],
        )
    ]
