"""Network faults through Toxiproxy: a slow or cut link between Bigpipe and Kafka, one of
two nodes cut off from Kafka, and downstreams that stall, reset or crawl.

Bigpipe reaches Kafka only through a Toxiproxy link (the brokers advertise the proxy's
ports, see local-kafka's --proxied), so a fault on the link hits every connection it
makes. Each test accounts for every call answered errno 0, as the other fault tests do:
delivered, or dead-lettered, never lost. Run with -s to see the `[fault]` lines.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.faults.conftest import Cluster, Network
from tests.faults.harness import (
    Load,
    Sink,
    Tally,
    dead_letter_topic,
    fault_config,
    outcome_summary,
    percentile,
    readyz_status,
    settle_and_account,
)
from tests.support import Bigpipe, eventually

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

WRITE_TIMEOUT = 5.0  # http.server.write.timeout's default, in seconds
# An answer may come this much after the write timeout on a loaded 2-core machine.
ANSWER_SLACK = 1.5


def accept_latencies_between(tally: Tally, start: float, end: float) -> list[float]:
    """Accept latencies of the calls answered errno 0 between `start` and `end`."""
    accepted_at = [at for at, outcome in tally.timeline if outcome == (200, 0)]
    return [
        took
        for at, took in zip(accepted_at, tally.accept_latency, strict=True)
        if start <= at < end
    ]


def caught_up_after(sink: Sink, owed: set[str], since: float) -> float:
    """Seconds from `since` until the last of the calls `owed` was first delivered."""
    return max((sink.first_ok_at[i] for i in owed & sink.delivered()), default=since) - since


LATENCY_MS, JITTER_MS, LATENCY_SECONDS = 500, 100, 20


async def test_kafka_latency(
    cluster: Cluster,
    network: Network,
    sink: Sink,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """500 ms (+-100 ms) on everything Kafka sends Bigpipe, for 20 s, under steady ingest:
    callers get errno 0 only once Kafka has the call, a little later; /readyz stays 200
    (Kafka is slow, not gone); delivery catches up once the latency is gone."""
    link = network.kafka[0]
    config, _ = fault_config(link.bootstrap)
    node = await Bigpipe(config, tmp_path).start()
    processes.append(node)
    started = time.monotonic()
    readiness: list[int | None] = []
    async with Load(lambda: [node], sink, senders=4, pause=0.01, tag="latency") as load:
        tally = load.tally
        await eventually(lambda: len(sink.ok) >= 200, 30, "deliveries before the latency")
        toxic = await link.add_toxic("latency", latency=LATENCY_MS, jitter=JITTER_MS)
        slow_at = time.monotonic()
        while time.monotonic() < slow_at + LATENCY_SECONDS:
            readiness.append(await readyz_status(node, http))
            await asyncio.sleep(0.5)
        await link.remove_toxic(toxic)
        healed_at = time.monotonic()
        owed = set(tally.accepted)
        backlog = len(owed - sink.delivered())
        mark = len(tally.accepted)
        await eventually(
            lambda: len(tally.accepted) >= mark + 200, 30, "calls accepted after the latency"
        )
    accounting = await settle_and_account(
        "kafka-latency", tally, sink, cluster.bootstrap, dead_letter_topic(config), 120
    )
    # Calls sent in the first second may have been answered before the toxic bit.
    slow = accept_latencies_between(tally, slow_at + 1, healed_at)
    caught_up = caught_up_after(sink, owed, healed_at)
    during = tally.outcomes_between(slow_at, healed_at)
    print(
        f"[fault] kafka-latency: during the latency {outcome_summary(during)}, "
        f"accept p50 {percentile(slow, 0.5) * 1000:.0f} ms "
        f"p99 {percentile(slow, 0.99) * 1000:.0f} ms "
        f"max {max(slow, default=0) * 1000:.0f} ms; readyz {sorted(set(readiness), key=str)}; "
        f"backlog {backlog} at healing, all delivered {caught_up:.1f} s later; "
        f"test {time.monotonic() - started:.0f} s"
    )
    assert set(tally.outcomes) <= {(200, 0), (503, 1)}, tally.outcomes
    assert accounting.lost == 0, (accounting.lost_ids, node.log_tail())
    # The latency was really in the path: a write waits for at least one round trip.
    assert percentile(slow, 0.5) >= (LATENCY_MS - JITTER_MS) / 1000, slow[:20]
    # Still bounded by the write timeout, as documented.
    assert max(slow) < WRITE_TIMEOUT + ANSWER_SLACK, max(slow)
    # Kafka is reachable, only slow: the node stays ready.
    assert set(readiness) == {200}, readiness
    assert caught_up < 30, caught_up
    assert await node.stop() == 0
