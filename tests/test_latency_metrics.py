"""Two delivery latencies, kept apart: one HTTP attempt, and a call's whole time in Bigpipe."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Bigpipe, Downstream, eventually, group_stats, start_node

CALLS = 40
RATE = 20  # calls/s: the backlog of 40 waits up to 2 s for its rate tokens


async def histograms(bigpipe: Bigpipe, http: aiohttp.ClientSession) -> dict[str, dict]:
    """Each histogram's cumulative buckets ({le: count}), summed over its label sets."""
    async with http.get(f"{bigpipe.url}/metrics") as response:
        text = await response.text()
    found: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets = found.setdefault(family.name, {})
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0) + sample.value
    return found


def quantile(buckets: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding the q-quantile."""
    total = buckets[float("inf")]
    return next(le for le, count in sorted(buckets.items()) if count >= q * total)


async def test_attempt_latency_excludes_the_waits_and_end_to_end_includes_them(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """Found by the audit: a 1 ms downstream showed a delivery p99 of 2.5 s, all of it
    the wait for rate and concurrency slots, in a histogram said to start at the attempt."""
    bigpipe, _ = await start_node(kafka, tmp_path, processes, rateLimit=RATE, concurrency=50)
    for index in range(CALLS):
        status, _ = await bigpipe.post_call(http, data=str(index), url=downstream.url())
        assert status == 200

    async def all_delivered() -> bool:
        return (await group_stats(bigpipe, http))["rpcSuccess"] == CALLS

    await eventually(all_delivered, 60, "every call delivered")
    found = await histograms(bigpipe, http)
    p99 = {name: quantile(buckets, 0.99) for name, buckets in found.items()}
    print(f"\nlatency p99 with a fast downstream at {RATE}/s: {p99}")
    attempt, end_to_end = found["bigpipe_attempt_seconds"], found["bigpipe_end_to_end_seconds"]
    assert attempt[float("inf")] == end_to_end[float("inf")] == CALLS
    assert p99["bigpipe_attempt_seconds"] <= 0.25, "one attempt to a fast local downstream"
    assert p99["bigpipe_end_to_end_seconds"] >= 1.0, "the backlog waited for its rate tokens"
