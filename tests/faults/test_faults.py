"""Fault injection on a real 3-broker Kafka: brokers, Bigpipe nodes and downstreams die.

Each test drives load through /rpc/call, injects one fault, and accounts for every
call answered errno 0: it must reach the downstream or the dead-letter topic
(lost == 0). Each prints one `[fault] ...` accounting line; run with -s to see it.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp
import pytest

from tests.faults.conftest import Cluster
from tests.faults.harness import (
    CONN_ERROR,
    Load,
    Sink,
    assignments,
    dead_letter_topic,
    fault_config,
    outcome_summary,
    percentile,
    readyz_status,
    settle_and_account,
)
from tests.support import Bigpipe, eventually, free_port, group_stats, rss_mib

# Each test takes 10-40 s; the limit covers its bounded waits should a fault not clear.
pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_broker_killed_under_load(
    cluster: Cluster,
    sink: Sink,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """SIGKILL one of three brokers for 10 s: callers get errno 0 or 1, never a false 0."""
    config, _ = fault_config(cluster.bootstrap)
    node = await Bigpipe(config, tmp_path).start()
    processes.append(node)
    started = time.monotonic()
    readiness: list[int | None] = []
    async with Load(lambda: [node], sink, senders=4, pause=0.01, tag="broker") as load:
        tally = load.tally
        await eventually(lambda: len(tally.accepted) >= 200, 30, "load to build up")
        killed_at = time.monotonic()
        await cluster.kill_node(1)
        while time.monotonic() < killed_at + 10:  # hold the fault 10 s; two brokers remain
            readiness.append(await readyz_status(node, http))
            await asyncio.sleep(0.5)
        await cluster.start_node(1)
        back_at = time.monotonic()
        mark = len(tally.accepted)
        await eventually(
            lambda: len(tally.accepted) >= mark + 200, 60, "calls accepted after the broker is back"
        )
    accounting = await settle_and_account(
        "broker-killed", tally, sink, cluster.bootstrap, dead_letter_topic(config), 120
    )
    during = tally.outcomes_between(killed_at, back_at)
    print(
        f"[fault] broker-killed: during the fault {outcome_summary(during)}; "
        f"whole run {outcome_summary(tally.outcomes)}; "
        f"accept p99 {percentile(tally.accept_latency, 0.99) * 1000:.0f} ms, "
        f"refusal max {max(tally.refusal_latency, default=0) * 1000:.0f} ms; "
        f"start-node took {back_at - killed_at - 10:.1f} s; "
        f"test {time.monotonic() - started:.0f} s"
    )
    assert set(tally.outcomes) <= {(200, 0), (503, 1)}, tally.outcomes
    assert accounting.lost == 0, (accounting.lost_ids, node.log_tail())
    # Two of three brokers still take writes: the node must not call itself unready.
    assert set(readiness) == {200}, readiness
    assert await node.stop() == 0


@pytest.mark.long  # 22 s; the normal suite's kill -9 runs: tests/test_crash.py
async def test_bigpipe_crash_loop(
    cluster: Cluster,
    sink: Sink,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """kill -9 Bigpipe five times under load, restarting it each time; then let it drain."""
    config, _ = fault_config(cluster.bootstrap)
    current = [await Bigpipe(config, tmp_path).start()]
    processes.append(current[0])
    started = time.monotonic()
    restarts: list[float] = []
    async with Load(lambda: current, sink, senders=4, pause=0.01, tag="crash") as load:
        tally = load.tally
        for _ in range(5):
            mark = len(tally.accepted)
            await eventually(
                lambda mark=mark: len(tally.accepted) >= mark + 100, 30, "calls accepted"
            )
            await current[0].kill()
            began = time.monotonic()
            restarted = Bigpipe(config, tmp_path)
            processes.append(restarted)
            await restarted.start()
            restarts.append(time.monotonic() - began)
            current[0] = restarted
        mark = len(tally.accepted)
        await eventually(lambda: len(tally.accepted) >= mark + 100, 30, "calls accepted")
    accounting = await settle_and_account(
        "crash-loop", tally, sink, cluster.bootstrap, dead_letter_topic(config), 150
    )
    print(
        f"[fault] crash-loop: answers {outcome_summary(tally.outcomes)}; "
        f"restart to ready {', '.join(f'{r:.1f}' for r in restarts)} s; "
        f"test {time.monotonic() - started:.0f} s"
    )
    assert set(tally.outcomes) <= {(200, 0), (503, 1), CONN_ERROR}, tally.outcomes
    assert accounting.lost == 0, (accounting.lost_ids, current[0].log_tail())
    assert await current[0].stop() == 0


async def test_node_killed_its_partitions_move(
    cluster: Cluster,
    sink: Sink,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """Two nodes in one group; kill -9 one; the survivor takes its partitions."""
    config, _ = fault_config(cluster.bootstrap)
    victim = await Bigpipe(config, tmp_path).start()
    survivor = await Bigpipe({**config, "http.server.port": free_port()}, tmp_path).start()
    processes.extend([victim, survivor])
    started = time.monotonic()
    alive = [victim, survivor]

    async def both_deliver() -> bool:
        a, b = await group_stats(victim, http), await group_stats(survivor, http)
        return a["handleMessage"] > 0 and b["handleMessage"] > 0

    async with Load(lambda: alive, sink, senders=4, pause=0.01, tag="node") as load:
        tally = load.tally
        await eventually(both_deliver, 60, "both nodes to deliver from their partitions")
        await eventually(lambda: len(tally.accepted) >= 300, 30, "load to build up")
        assigned_before = assignments(survivor)
        await victim.kill()
        killed_at = time.monotonic()
        alive.remove(victim)  # like a load balancer: callers move to the survivor
        at_kill = (await group_stats(survivor, http))["handleMessage"]

        def survivor_took_over() -> bool:
            return assignments(survivor) > assigned_before

        await eventually(survivor_took_over, 60, "the survivor to be assigned the victim's share")
        takeover = time.monotonic() - killed_at
        mark = len(tally.accepted)
        await eventually(lambda: len(tally.accepted) >= mark + 200, 30, "calls after takeover")
    accounting = await settle_and_account(
        "node-killed", tally, sink, cluster.bootstrap, dead_letter_topic(config), 120
    )
    after = (await group_stats(survivor, http))["handleMessage"]
    print(
        f"[fault] node-killed: survivor handleMessage {at_kill} at the kill -> {after}; "
        f"takeover after {takeover:.1f} s; answers {outcome_summary(tally.outcomes)}; "
        f"test {time.monotonic() - started:.0f} s"
    )
    assert after > at_kill
    assert accounting.lost == 0, (accounting.lost_ids, survivor.log_tail())
    assert "lost partitions" not in survivor.log_tail(10_000)
    assert await survivor.stop() == 0


BREAKER = {"breakPeriod": 3, "recoverPeriod": 3, "winSize": 5, "minStats": 10, "healthRate": 0.5}


# Long: 40 s, and ./build.sh test has the same path on one broker in test_delivery
# (test_outage_opens_the_breaker_and_the_backlog_drains_without_loss).
@pytest.mark.long
async def test_downstream_outage_breaker_opens_and_backlog_drains(
    cluster: Cluster,
    sink: Sink,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """The downstream is down 30 s (15 s closed port, then 15 s of 503); then back."""
    config, _ = fault_config(
        cluster.bootstrap,
        group={
            "circuitBreaker": BREAKER,
            "retries": 40,
            "backoffBase": 200,
            "backoffMax": 2000,
            "timeout": 1000,
        },
    )
    node = await Bigpipe(config, tmp_path).start()
    processes.append(node)
    started = time.monotonic()
    breaks: list[int] = []
    watching = True

    async def watch_breaker() -> None:
        while watching:
            try:
                breaks.append((await group_stats(node, http))["circuitIsBreak"])
            except aiohttp.ClientError:
                return  # the node is gone: the test failed and is being torn down
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_breaker())
    async with Load(lambda: [node], sink, senders=2, pause=0.02, tag="outage") as load:
        tally = load.tally
        await eventually(lambda: len(sink.ok) >= 100, 30, "deliveries before the outage")
        down_at = time.monotonic()
        await sink.stop()  # closed port: connection refused
        await asyncio.sleep(15)
        await sink.start()
        sink.failing = True  # the port answers again, with 503
        await asyncio.sleep(15)
        sink.failing = False
        back_at = time.monotonic()
        owed = set(tally.accepted)  # accepted before the recovery
        backlog = len(owed - sink.delivered())
        mark = len(tally.accepted)
        await eventually(  # some load after the recovery too
            lambda: len(tally.accepted) >= mark + 200, 30, "calls accepted after the recovery"
        )
    accounting = await settle_and_account(
        "downstream-outage", tally, sink, cluster.bootstrap, dead_letter_topic(config), 150
    )
    drained = max(sink.first_ok_at[i] for i in owed & sink.delivered()) - back_at

    async def breaker_closed() -> bool:
        return (await group_stats(node, http))["circuitIsBreak"] == 0

    await eventually(breaker_closed, 30, "the breaker to close again")
    watching = False
    await watcher
    stats = await group_stats(node, http)
    print(
        f"[fault] downstream-outage: outage {back_at - down_at:.0f} s, backlog of {backlog} "
        f"calls drained {drained:.1f} s after it; breaker seen open {breaks.count(1)} of "
        f"{len(breaks)} samples; attempts {stats['attempts']} "
        f"(refused by the sink {sink.refused_attempts}), "
        f"rpcRetries {stats['rpcRetries']}, deadLetter {stats['deadLetter']}; "
        f"test {time.monotonic() - started:.0f} s"
    )
    assert 1 in breaks, "the breaker never opened"
    assert accounting.lost == 0, (accounting.lost_ids, node.log_tail())
    # The breaker holds calls instead of spending their retries: none ran out of them.
    assert accounting.dead_lettered == 0
    log = node.log_tail(100_000)
    assert "lost partitions" not in log
    assert await node.stop() == 0


async def test_kafka_down_at_startup(
    lone_kafka: Cluster,
    sink: Sink,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """Bigpipe starts with Kafka stopped: 503 errno 1 fast; it recovers once Kafka is up.

    This one has its own single broker (so it can be stopped), hence replicationFactor 1.
    """
    config, _ = fault_config(lone_kafka.bootstrap)
    config["kafka.topics"][0].update(replicationFactor=1, minInsyncReplicas=1)
    node = await Bigpipe(config, tmp_path).start(wait_ready=False)
    processes.append(node)
    started = time.monotonic()

    async def listening() -> bool:
        return await readyz_status(node, http) is not None

    await eventually(listening, 30, "the listener to come up")
    latencies: list[float] = []
    for _ in range(10):
        assert await readyz_status(node, http) == 503
        began = time.perf_counter()
        status, reply = await node.post_call(http, url=sink.url())
        latencies.append(time.perf_counter() - began)
        assert (status, reply["errno"]) == (503, 1), reply
        await asyncio.sleep(0.2)
    kafka_up_began = time.monotonic()
    await lone_kafka.start_async()
    kafka_up = time.monotonic()
    await node.wait_ready(90)
    ready_after = time.monotonic() - kafka_up
    status, reply = await node.post_call(http, url=sink.url())
    assert (status, reply["errno"]) == (200, 0), reply
    call_id = reply["data"]["id"]
    await eventually(lambda: call_id in sink.ok, 30, "the call to be delivered")
    sent = len(latencies) + 1
    print(
        f"\n[fault] kafka-down-at-startup: sent={sent} accepted=1 delivered=1 "
        f"dead-lettered=0 lost=0 duplicated={int(sink.ok[call_id] > 1)}"
    )
    print(
        f"[fault] kafka-down-at-startup: 503 latency max {max(latencies) * 1000:.1f} ms "
        f"(p50 {percentile(latencies, 0.5) * 1000:.1f} ms) over {len(latencies)} calls; "
        f"kafka start {kafka_up - kafka_up_began:.1f} s; ready {ready_after:.1f} s after kafka; "
        f"test {time.monotonic() - started:.0f} s"
    )
    assert max(latencies) < 0.1, latencies
    assert await node.stop() == 0


# Bigpipe's own warnings from librdkafka's error callbacks (producer and consumer group).
_KAFKA_WARNING = re.compile(r"WARNING bigpipe\.(producer: kafka producer|consumer: \S+: kafka): ")
MAX_KAFKA_WARNINGS = 20


async def test_kafka_lost_after_startup(
    lone_kafka: Cluster,
    sink: Sink,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """Kafka stops under load after start-up: readiness drops, calls are refused fast (503
    errno 1, not after the whole write timeout), and the node recovers when it is back.
    """
    await lone_kafka.start_async()
    config, _ = fault_config(lone_kafka.bootstrap)
    config["kafka.topics"][0].update(replicationFactor=1, minInsyncReplicas=1)
    node = await Bigpipe(config, tmp_path).start()
    processes.append(node)
    started = time.monotonic()
    async with Load(lambda: [node], sink, senders=2, pause=0.02, tag="lost") as load:
        tally = load.tally
        await eventually(lambda: len(tally.accepted) >= 100, 30, "load to build up")
        await lone_kafka.stop_async()
        stopped_at = time.monotonic()

        async def unready() -> bool:
            return await readyz_status(node, http) == 503

        await eventually(unready, 20, "readiness to drop once Kafka is gone")
        unready_after = time.monotonic() - stopped_at
        latencies = []
        for _ in range(10):
            began = time.perf_counter()
            status, reply = await node.post_call(http, url=sink.url())
            latencies.append(time.perf_counter() - began)
            assert (status, reply["errno"]) == (503, 1), reply
        await asyncio.sleep(3)  # hold the outage under load
        restart_began = time.monotonic()
        await lone_kafka.start_async()
        kafka_back = time.monotonic()
        await node.wait_ready(60)
        ready_after = time.monotonic() - kafka_back
        mark = len(tally.accepted)
        await eventually(lambda: len(tally.accepted) >= mark + 100, 60, "calls accepted again")
    accounting = await settle_and_account(
        "kafka-lost-after-startup", tally, sink, lone_kafka.bootstrap, dead_letter_topic(config), 90
    )
    during = tally.outcomes_between(stopped_at, kafka_back)
    print(
        f"[fault] kafka-lost-after-startup: readyz 503 {unready_after:.1f} s after Kafka "
        f"stopped; then 503 latency max {max(latencies) * 1000:.1f} ms over {len(latencies)} "
        f"calls; during the outage {outcome_summary(during)}, refusal max "
        f"{max(tally.refusal_latency, default=0) * 1000:.0f} ms; kafka restart "
        f"{kafka_back - restart_began:.1f} s; ready {ready_after:.1f} s after; "
        f"test {time.monotonic() - started:.0f} s"
    )
    lines = node.log_tail(100_000).splitlines()
    own = [line for line in lines if _KAFKA_WARNING.search(line)]
    print(
        f"[fault] kafka-lost-after-startup: log {len(lines)} lines, of which librdkafka's own "
        f"{sum(' librdkafka: ' in line for line in lines)} and Bigpipe's Kafka warnings "
        f"{len(own)}"
    )
    assert set(tally.outcomes) <= {(200, 0), (503, 1)}, tally.outcomes
    assert max(latencies) < 0.1, latencies
    assert accounting.lost == 0, (accounting.lost_ids, node.log_tail())
    # Each kind of Kafka error is logged once, not on every reconnect attempt.
    assert len(own) <= MAX_KAFKA_WARNINGS, "\n".join(own[:40])
    assert await node.stop() == 0


# Calls that may wait for Kafka at once: small, so that the node's peak accept rate
# (about channel size / Kafka's acknowledgement time) is well within what this test's
# own client can offer three times over.
OVERLOAD_CHANNEL = 8
PEAK_SENDERS, PEAK_SECONDS = OVERLOAD_CHANNEL, 3.0  # keeps the channel full, unrefused
OVERLOAD_FACTOR, OVERLOAD_SECONDS, OVERLOAD_IN_FLIGHT = 3.0, 15.0, 512
# A refusal must not wait for Kafka: a call that did would take up to the write timeout
# (5 s). 1 s leaves room for a 2-core box shared with three brokers and other test runs.
REFUSAL_P99_LIMIT = 1.0
# Memory that may legitimately grow under overload: up to OVERLOAD_IN_FLIGHT (512) open
# connections at some tens of KiB each (transport, parser, request objects), ~25 MiB,
# plus allocator slack. Nothing else may grow: the producer holds at most channel.size
# calls. A leak of even 3 KiB per refused call (thousands of them) would exceed this.
RSS_GROWTH_LIMIT_MIB = 48
# Once the connections are open, RSS must level off: the second half of the overload
# may not grow more than this over the first (a leak grows with time).
RSS_PLATEAU_LIMIT_MIB = 8


async def _sample_rss(pid: int, samples: list[float], running: list[bool]) -> None:
    while running[0]:
        samples.append(rss_mib(pid))
        await asyncio.sleep(0.25)


async def test_overload_refuses_fast_and_memory_stays_bounded(
    cluster: Cluster,
    sink: Sink,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
) -> None:
    """Measure the peak accept rate, then offer about 3x that for 15 s."""
    config, _ = fault_config(
        cluster.bootstrap, **{"http.server.handler.channel.size": OVERLOAD_CHANNEL}
    )
    node = await Bigpipe(config, tmp_path).start()
    processes.append(node)
    assert node.process is not None
    pid = node.process.pid
    started = time.monotonic()
    start_rss = rss_mib(pid)
    async with Load(lambda: [node], sink, senders=PEAK_SENDERS, pause=0, tag="peak") as peak:
        await asyncio.sleep(PEAK_SECONDS)
    peak_rate = len(peak.tally.accepted) / PEAK_SECONDS
    warm_rss = rss_mib(pid)

    samples: list[float] = []
    running = [True]
    sampler = asyncio.create_task(_sample_rss(pid, samples, running))
    began = time.monotonic()
    over = Load(
        lambda: [node],
        sink,
        senders=OVERLOAD_IN_FLIGHT,
        rate=OVERLOAD_FACTOR * peak_rate,
        tag="over",
    )
    async with over:
        await asyncio.sleep(OVERLOAD_SECONDS)
    took = time.monotonic() - began
    running[0] = False
    await sampler
    tally = over.tally
    offered, accepted_rate = tally.sent / took, len(tally.accepted) / took
    first_half, second_half = samples[: len(samples) // 2], samples[len(samples) // 2 :]
    refusals = [(status, errno) for status, errno in tally.outcomes if status != 200]
    print(
        f"\n[fault] overload: peak {peak_rate:.0f} accepted/s ({PEAK_SENDERS} senders, "
        f"peak-phase answers {outcome_summary(peak.tally.outcomes)}); overload offered "
        f"{offered:.0f}/s = {offered / peak_rate:.1f}x peak (open loop, {over.skipped} skipped "
        f"at {OVERLOAD_IN_FLIGHT} in flight), "
        f"accepted {accepted_rate:.0f}/s; answers {outcome_summary(tally.outcomes)}; "
        f"refusal latency p50 {percentile(tally.refusal_latency, 0.5) * 1000:.1f} ms "
        f"p99 {percentile(tally.refusal_latency, 0.99) * 1000:.1f} ms, "
        f"accept p99 {percentile(tally.accept_latency, 0.99) * 1000:.1f} ms; "
        f"RSS start {start_rss:.1f} MiB, after warm-up {warm_rss:.1f}, "
        f"max under overload {max(samples):.1f} (first half {max(first_half):.1f}, "
        f"second half {max(second_half):.1f}), end {samples[-1]:.1f}"
    )

    # Recovery: a normal call is accepted and delivered.
    status, reply = await node.post_call(http, url=sink.url(), data="after-overload")
    assert (status, reply["errno"]) == (200, 0), reply
    recovery_call = reply["data"]["id"]
    tally.accepted.add(recovery_call)
    tally.sent += 1
    tally.accepted |= peak.tally.accepted
    tally.sent += peak.tally.sent
    accounting = await settle_and_account(
        "overload", tally, sink, cluster.bootstrap, dead_letter_topic(config), 120
    )
    print(f"[fault] overload: test {time.monotonic() - started:.0f} s")
    assert accounting.lost == 0, (accounting.lost_ids, node.log_tail())
    assert recovery_call in sink.ok
    assert set(refusals) <= {(503, -1), (503, 1)}, tally.outcomes
    assert (503, -1) in tally.outcomes, "the overload never reached the channel limit"
    assert percentile(tally.refusal_latency, 0.99) < REFUSAL_P99_LIMIT
    assert max(samples) - warm_rss < RSS_GROWTH_LIMIT_MIB
    assert max(second_half) - max(first_half) < RSS_PLATEAU_LIMIT_MIB
    assert await node.stop() == 0
