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
from typing import Any

import aiohttp
import pytest

from tests.faults.conftest import Cluster, Network
from tests.faults.harness import (
    Load,
    Sink,
    Tally,
    assignments,
    dead_letter_topic,
    fault_config,
    outcome_summary,
    percentile,
    readyz_status,
    settle_and_account,
)
from tests.faults.toxiproxy import (
    DOWNSTREAM_FAULTS,
    KAFKA_LATENCY,
    KAFKA_LATENCY_FLOOR,
    ProxiedSink,
)
from tests.support import Bigpipe, eventually, free_port, group_stats

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


async def start_node(
    bootstrap: str, workdir: Path, processes: list[Bigpipe], group: dict[str, Any] | None = None
) -> tuple[Bigpipe, dict[str, Any]]:
    """A node on a fresh topic, reaching Kafka at `bootstrap`; returns it and its config."""
    config, _ = fault_config(bootstrap, group=group)
    node = await Bigpipe(config, workdir).start()
    processes.append(node)
    return node, config


LATENCY_SECONDS = 20


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
    node, config = await start_node(link.bootstrap, tmp_path, processes)
    started = time.monotonic()
    readiness: list[int | None] = []
    async with Load(lambda: [node], sink, senders=4, pause=0.01, tag="latency") as load:
        tally = load.tally
        await eventually(lambda: len(sink.ok) >= 200, 30, "deliveries before the latency")
        slow_at = time.monotonic()

        async def probe() -> None:
            readiness.append(await readyz_status(node, http))

        await KAFKA_LATENCY.hold(link, LATENCY_SECONDS, probe)
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
    assert percentile(slow, 0.5) >= KAFKA_LATENCY_FLOOR, slow[:20]
    # Still bounded by the write timeout, as documented.
    assert max(slow) < WRITE_TIMEOUT + ANSWER_SLACK, max(slow)
    # Kafka is reachable, only slow: the node stays ready.
    assert set(readiness) == {200}, readiness
    assert caught_up < 30, caught_up
    assert await node.stop() == 0


CUT_SECONDS = 30


@pytest.mark.long
async def test_kafka_cut(
    cluster: Cluster,
    network: Network,
    sink: Sink,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """Bigpipe's link to Kafka is cut for 30 s (open connections reset, new ones refused)
    while its HTTP side keeps taking calls: ingest answers 503 / errno 1 within the write
    timeout, /readyz drops, the consumer loses its partitions and rejoins, nothing is lost."""
    link = network.kafka[0]
    node, config = await start_node(link.bootstrap, tmp_path, processes)
    started = time.monotonic()
    readiness: list[int | None] = []
    async with Load(lambda: [node], sink, senders=4, pause=0.01, tag="cut") as load:
        tally = load.tally
        await eventually(lambda: len(sink.ok) >= 200, 30, "deliveries before the cut")
        assigned_before = assignments(node)
        await link.cut()
        cut_at = time.monotonic()
        while time.monotonic() < cut_at + CUT_SECONDS:
            readiness.append(await readyz_status(node, http))
            await asyncio.sleep(0.5)
        lost_partitions = "lost partitions" in node.log_tail(100_000)
        await link.restore()
        restored_at = time.monotonic()
        await node.wait_ready(60)
        ready_after = time.monotonic() - restored_at
        await eventually(
            lambda: assignments(node) > assigned_before, 60, "the consumer to rejoin its group"
        )
        rejoined_after = time.monotonic() - restored_at
        mark = len(tally.accepted)
        await eventually(lambda: len(tally.accepted) >= mark + 200, 60, "calls accepted after")
    accounting = await settle_and_account(
        "kafka-cut", tally, sink, cluster.bootstrap, dead_letter_topic(config), 120
    )
    during = tally.outcomes_between(cut_at, restored_at)
    refusals = tally.refusal_latency
    print(
        f"[fault] kafka-cut: during the cut {outcome_summary(during)}; refusal p50 "
        f"{percentile(refusals, 0.5) * 1000:.0f} ms max {max(refusals, default=0) * 1000:.0f} ms; "
        f"readyz 503 in {readiness.count(503)} of {len(readiness)} samples; ready "
        f"{ready_after:.1f} s and partitions assigned again {rejoined_after:.1f} s after the "
        f"link came back; test {time.monotonic() - started:.0f} s"
    )
    assert set(tally.outcomes) <= {(200, 0), (503, 1)}, tally.outcomes
    assert during[(503, 1)] > 0, during
    assert max(refusals) < WRITE_TIMEOUT + ANSWER_SLACK, max(refusals)
    assert 503 in readiness, readiness
    # Past its session timeout the consumer gives its partitions up (they may have a new
    # owner), and takes them back once Kafka is reachable.
    assert lost_partitions, node.log_tail()
    assert accounting.lost == 0, (accounting.lost_ids, node.log_tail())
    assert await node.stop() == 0


SESSION_TIMEOUT = 10.0  # the consumers' session.timeout.ms, in seconds
RATE_PER_NODE = 25  # rateLimit: slow enough that the cut-off node holds a backlog
BACKLOG_SECONDS = 12  # of work buffered in the cut-off node at the cut: > SESSION_TIMEOUT
# How long after the cut the cut-off node may still deliver: its session timeout, the
# heartbeat interval (2 s) before it notices, and slack for a loaded machine.
DELIVERING_LIMIT = SESSION_TIMEOUT + 2 + 3


async def _buffered(node: Bigpipe, http: aiohttp.ClientSession) -> int:
    """Calls the node has read from Kafka and not finished."""
    stats = await group_stats(node, http)
    return stats["handleMessage"] - stats["rpcTotal"]


@pytest.mark.long
async def test_node_cut_off_from_kafka(
    cluster: Cluster,
    network: Network,
    sink: Sink,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """Two nodes in one group; one is cut off from Kafka but not from its callers. Its
    partitions move to the other node, and it stops delivering the calls it no longer owns
    within its session timeout, though it holds more than that much work. The duplicate
    window is how long both delivered the same partitions."""
    group = {"rateLimit": RATE_PER_NODE, "maxBuffered": 1000}
    config, _ = fault_config(network.kafka[0].bootstrap, group=group)
    cut_off = await Bigpipe(config, tmp_path).start()
    other_config = {
        **config,
        "kafka.bootstrap.servers": network.kafka[1].bootstrap,
        "http.server.port": free_port(),
    }
    other = await Bigpipe(other_config, tmp_path).start()
    processes.extend([cut_off, other])
    started = time.monotonic()
    before = Load(lambda: [cut_off, other], sink, senders=64, rate=8 * RATE_PER_NODE, tag="busy")
    async with before:
        await eventually(
            lambda: assignments(cut_off) and assignments(other), 60, "both nodes to own partitions"
        )

        async def backlog_built() -> bool:
            return await _buffered(cut_off, http) >= RATE_PER_NODE * BACKLOG_SECONDS

        await eventually(backlog_built, 60, "a backlog in the node to be cut off")
    held = await _buffered(cut_off, http)
    assigned_before = assignments(other)
    await network.kafka[0].cut()
    cut_at = time.monotonic()
    attempts = (await group_stats(cut_off, http))["attempts"]
    last_attempt_at = cut_at
    takeover = None
    # Callers keep calling both nodes, gently, through the cut.
    async with Load(lambda: [cut_off, other], sink, senders=32, rate=10, tag="cut") as after:
        while time.monotonic() < cut_at + SESSION_TIMEOUT + 15:
            now_attempts = (await group_stats(cut_off, http))["attempts"]
            if now_attempts > attempts:
                attempts, last_attempt_at = now_attempts, time.monotonic()
            if takeover is None and assignments(other) > assigned_before:
                takeover = time.monotonic() - cut_at
            await asyncio.sleep(0.2)
        await network.kafka[0].restore()
        await cut_off.wait_ready(60)
    tally = Tally(
        sent=before.tally.sent + after.tally.sent,
        accepted=before.tally.accepted | after.tally.accepted,
        outcomes=before.tally.outcomes + after.tally.outcomes,
    )
    accounting = await settle_and_account(
        "node-cut-off", tally, sink, cluster.bootstrap, dead_letter_topic(config), 180
    )
    # The duplicate window: from the cut, after which the cut-off node can commit nothing,
    # to its last attempt. The new owner delivers again what it delivered in that window.
    window = last_attempt_at - cut_at
    assert takeover is not None, other.log_tail()
    print(
        f"[fault] node-cut-off: it held {held} calls ({held / RATE_PER_NODE:.0f} s of work) at "
        f"the cut; duplicate window {window:.1f} s (its last attempt after the cut), the other "
        f"node took its partitions {takeover:.1f} s after the cut (overlap "
        f"{max(0.0, window - takeover):.1f} s); duplicated {accounting.duplicated}; answers "
        f"during the cut {outcome_summary(after.tally.outcomes)}; "
        f"test {time.monotonic() - started:.0f} s"
    )
    assert window < DELIVERING_LIMIT, (window, cut_off.log_tail())
    assert set(tally.outcomes) <= {(200, 0), (503, 1)}, tally.outcomes
    assert max(after.tally.refusal_latency, default=0) < WRITE_TIMEOUT + ANSWER_SLACK
    assert accounting.lost == 0, (accounting.lost_ids, other.log_tail())
    assert await cut_off.stop() == 0
    assert await other.stop() == 0


BREAKER = {"breakPeriod": 3, "recoverPeriod": 3, "winSize": 5, "minStats": 10, "healthRate": 0.5}
DOWNSTREAM_TIMEOUT_MS, CONCURRENCY = 3000, 8
DOWNSTREAM_FAULT_SECONDS = 15


@pytest.mark.long
@pytest.mark.parametrize("fault", list(DOWNSTREAM_FAULTS))
async def test_downstream_link(
    fault: str,
    cluster: Cluster,
    network: Network,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """A downstream link stalls, resets half its connections, or lags 2 s, for 15 s: the
    timeout bounds each attempt, retries and the breaker carry the calls through, the
    concurrency cap holds, and nothing is lost or dead-lettered."""
    spec = DOWNSTREAM_FAULTS[fault]
    sink = await ProxiedSink().start()
    proxy = await network.downstream("downstream", sink.port)
    sink.proxy_port = proxy.port
    group = {
        "timeout": DOWNSTREAM_TIMEOUT_MS,
        "retries": 40,
        "backoffBase": 100,
        "backoffMax": 1000,
        "concurrency": CONCURRENCY,
        "circuitBreaker": BREAKER,
    }
    node, config = await start_node(cluster.bootstrap, tmp_path, processes, group)
    started = time.monotonic()
    samples: list[dict[str, int]] = []
    try:
        async with Load(lambda: [node], sink, senders=4, pause=0.02, tag=fault) as load:
            tally = load.tally
            await eventually(lambda: len(sink.ok) >= 100, 30, "deliveries before the fault")
            delivered_at_fault = len(sink.ok)

            async def sample() -> None:
                samples.append(await group_stats(node, http))

            await spec.hold(proxy, DOWNSTREAM_FAULT_SECONDS, sample)
            delivered_in_fault = len(sink.ok) - delivered_at_fault
            healed_at = time.monotonic()
            owed = set(tally.accepted)
            mark = len(tally.accepted)
            await eventually(lambda: len(tally.accepted) >= mark + 100, 30, "calls after")
        accounting = await settle_and_account(
            f"downstream-{fault}", tally, sink, cluster.bootstrap, dead_letter_topic(config), 150
        )
    finally:
        await sink.stop()
    stats = await group_stats(node, http)
    in_flight = max(sample["inFlight"] for sample in samples)
    opened = any(sample["circuitIsBreak"] for sample in samples)
    print(
        f"[fault] downstream-{fault}: {delivered_in_fault} delivered during the fault; "
        f"in flight at most {in_flight} (cap {CONCURRENCY}); breaker "
        f"{'opened' if opened else 'stayed closed'}; attempts {stats['attempts']}, rpcRetries "
        f"{stats['rpcRetries']}; all delivered {caught_up_after(sink, owed, healed_at):.1f} s "
        f"after the fault; test {time.monotonic() - started:.0f} s"
    )
    assert set(tally.outcomes) == {(200, 0)}, tally.outcomes  # ingest does not care
    assert in_flight <= CONCURRENCY
    assert accounting.lost == 0, (accounting.lost_ids, node.log_tail())
    assert accounting.dead_lettered == 0  # retries and the breaker carried every call
    if fault == "stalls":
        assert opened, "the breaker never opened on a downstream that never answers"
        assert delivered_in_fault <= CONCURRENCY  # at most the requests already answered
    else:
        assert delivered_in_fault > 0
        assert stats["rpcRetries"] > 0 or fault == "latency-2s"
    assert await node.stop() == 0
