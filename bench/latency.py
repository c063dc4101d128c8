"""Latency at half load: ingest p99, and end to end from the caller's reply to the downstream.

bench/openloop.py offers a fixed load of half the node's end-to-end peak for
10 s (open loop: calls go out at fixed intervals from a few pacing tasks in
two processes, whatever the replies do). The node's consumer group delivers
every call to nginx (answering 204), which logs when each `X-Bigpipe-Call-Id`
arrives: the downstream takes almost no CPU from the node on these two cores.
The generators stamp with CLOCK_MONOTONIC; nginx logs wall-clock time with
millisecond precision, converted with the offset between the two clocks.

- Ingest latency: from sending `/rpc/call` to its reply; p50, p99, p99.9.
  Baseline: the same load against the bare aiohttp handler
  (bench/bare_ingest.py). Target: Bigpipe's p99 <= 10 ms, and no call
  failed. Percentiles cover the accepted calls; failures (another status, a
  lost connection, ...) are counted by kind and reported beside them.
- Event-loop lag: how late the node's loops ran their 100 ms timer over each
  round (`bigpipe_loop_lag_seconds`, scraped before and after), at p99, as the
  bound of its bucket. Near the ingest p99, the tail is the workers' own
  stalls; far below it, the tail is elsewhere (the broker, the shared cores).
- Kafka's own write latency: bench/kafka_probe.py writes PROBE_RATE records a
  second to a topic of its own during every round, acks=all, and the p99 of its
  acknowledgements is reported beside each side's: beside Bigpipe, what the
  broker and the shared cores put into any writer's tail under that load;
  beside the bare handler, which leaves Kafka idle, the broker's own.
- Scheduling: over each round, from every thread's /proc/PID/task/TID/schedstat,
  the node's CPU time as a share of the CPUs it may run on, and how long its
  event loops (the serving processes' main threads) were runnable but waited
  for a CPU, per second they ran. A loop that waits as long as it runs answers
  late because the cores are busy, not because it stalls; both sides get it.
- The broker, over each round: the same two figures of the bench broker's JVM
  (every thread's CPU time, and its threads' wait for a CPU per second they
  ran), and how long it stood still at safepoints, GC pauses among them
  (bench/jvm.py reads its hsperfdata counters). Bigpipe answers a call only
  once Kafka has it, so a broker starved of CPU or paused puts its wait into
  Bigpipe's tail; the row also gives these for the round with Kafka's worst p99.
- End to end: downstream receipt minus the caller's reply, per call; p50 and
  p99, to the millisecond. It can be slightly negative: the call is in Kafka
  before the reply reaches the caller. Informational.

Each side gets the same 2 s warm-up at the same rate first (Bigpipe's is
waited for until delivered, so the consumer group has joined and its
connections are open; the node writes call status to a results topic of its
own, so its status view has nothing earlier to catch up on), then `rounds`
runs of 10 s; the figures are the medians over the rounds of each
percentile. Bigpipe's node delivers every call as it goes (its own background
load); the bare handler runs alone, with no background load: the node is
stopped before the bare rounds.

Pinned: on these two shared cores the node competes with the broker, nginx
and the generators, and the tail grows with how busy the machine is (at a
quarter of the peak, unpinned, the p99 is about 7 ms). So every round is run
again with the node (or the bare handler) alone on all CPUs but the last, and
everything else on the last one (sched_setaffinity), at the rate scaled to the
node's share of the CPUs: its cores are as busy as in the unpinned rounds,
and nothing else runs on them. The row "ingest p99 @ half peak, pinned"
reports it; both rows have the same target.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    BenchError,
    BrokerScheduling,
    Context,
    Row,
    Scheduling,
    bare_ingest,
    bigpipe_config,
    bigpipe_node,
    broker_pids,
    call_body,
    cpu_split,
    create_topic,
    median,
    nginx_204,
    others_pinned,
    percentile,
    pin,
    process_tree,
    save,
    stop_process,
)
from tests.support import REPO, Bigpipe, consumer_entry, unique

# Of the end-to-end peak: the node ingests and delivers every call, so its peak is
# 1 / (1/ingest peak + 1/delivery peak) when both ran; the ingest peak alone otherwise.
LOAD_SHARE = 0.5
SECONDS, WARMUP_SECONDS = 10, 2
GENERATORS = 2  # processes of bench/openloop.py sharing one schedule
PROBE_RATE = 200  # records/s of bench/kafka_probe.py: a few % of the load, a p99 of 2,000
START_DELAY = 2.0  # s for the generators to start before the first call is due
TARGET_P99_MS = 10.0
LAG_WARNING_MS = 5.0
# The figures of Scheduling.since and BrokerScheduling.since, as medians of the rounds.
SCHEDULING_KEYS = (
    "cpu_share",
    "loop_wait_per_run",
    "broker_cpu_share",
    "broker_wait_per_run",
    "broker_stopped_ms",
    "broker_stops",
)
FAILURE_KINDS = (
    "HTTP status, or -1 connection lost, -2 no free connection, -3 connect failed, "
    "0 no reply within 30 s"
)


async def open_loop(
    ctx: Context, url: str, body: bytes, rate: float, seconds: float
) -> dict[str, list]:
    """Post `body` to `url`/rpc/call from the generators; return their merged columns."""
    body_file = ctx.workdir / "latency-call.json"
    body_file.write_bytes(body)
    start = time.monotonic() + START_DELAY
    processes, outs = [], []
    for offset in range(GENERATORS):
        out = ctx.workdir / f"openloop-{offset}.json"
        out.unlink(missing_ok=True)
        outs.append(out)
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.openloop",
                f"--url={url}/rpc/call",
                f"--body-file={body_file}",
                f"--rate={rate}",
                f"--seconds={seconds}",
                f"--out={out}",
                f"--start={start}",
                f"--offset={offset}",
                f"--stride={GENERATORS}",
                cwd=REPO,
            )
        )
    try:
        codes = await asyncio.wait_for(
            asyncio.gather(*(p.wait() for p in processes)), START_DELAY + seconds + 60
        )
    except TimeoutError:
        raise BenchError("the open-loop generators did not finish in time") from None
    finally:
        for process in processes:
            await stop_process(process)
    if any(codes):
        raise BenchError(f"an open-loop generator failed: exit codes {codes}")
    columns: dict[str, list] = {}
    for out in outs:
        for name, values in orjson.loads(out.read_bytes()).items():
            columns.setdefault(name, []).extend(values)
    return columns


T = TypeVar("T")


async def beside_kafka_probe(
    ctx: Context, topic: str, seconds: float, load: Awaitable[T]
) -> tuple[T, float]:
    """`load`'s result, and the p99 (ms) of Kafka's acknowledgements to a probe writing
    beside it, from when the generators start (START_DELAY from now) for `seconds`."""
    out = ctx.workdir / "kafka-probe.json"
    out.unlink(missing_ok=True)
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.kafka_probe",
        f"--bootstrap={ctx.bootstrap}",
        f"--topic={topic}",
        f"--rate={PROBE_RATE}",
        f"--seconds={seconds}",
        f"--start={time.monotonic() + START_DELAY}",
        f"--out={out}",
        cwd=REPO,
    )
    try:
        result = await load
        code = await asyncio.wait_for(probe.wait(), 60)
    finally:
        await stop_process(probe)
    if code != 0 or not out.exists():
        raise BenchError(f"the Kafka probe failed: exit code {code}")
    return result, percentile(orjson.loads(out.read_bytes()), 99)


async def probe_topic(ctx: Context) -> str:
    topic = unique("bench-probe")
    await asyncio.to_thread(create_topic, ctx.bootstrap, topic, 1)
    return topic


def ingest_figures(columns: dict[str, list], what: str) -> dict[str, Any]:
    """Latency percentiles (ms) of the accepted calls (200, errno 0), and the failures."""
    statuses = columns["status"]
    accepted = [i for i, status in enumerate(statuses) if status == 200]
    if not accepted:
        raise BenchError(f"{what}: no call was accepted: {Counter(statuses)}")
    latency = [(columns["replied"][i] - columns["sent"][i]) * 1000 for i in accepted]
    lag = [(s - d) * 1000 for s, d in zip(columns["sent"], columns["due"], strict=True)]
    failed = Counter(status for status in statuses if status != 200)
    return {
        "calls": len(statuses),
        "failed": {str(status): count for status, count in sorted(failed.items())},
        "failed_total": sum(failed.values()),
        "p50_ms": percentile(latency, 50),
        "p99_ms": percentile(latency, 99),
        "p99.9_ms": percentile(latency, 99.9),
        "max_ms": max(latency),
        "generator_lag_p99_ms": percentile(lag, 99),
    }


def read_receipts(log: Path) -> dict[str, list[float]]:
    """Call id -> every arrival nginx logged for it (wall-clock s), in log order."""
    receipts: dict[str, list[float]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            at, _, call_id = line.partition(" ")
            if call_id and call_id != "-":
                receipts.setdefault(call_id, []).append(float(at))
    return receipts


async def wait_delivered(log: Path, ids: set[str], timeout: float, node: Bigpipe) -> None:
    """Wait until every call in `ids` reached the downstream; fail after `timeout` s.

    The failure names a few missing ids and the node's consumer stats, and its
    log stays in the work directory (see bench/suite.py).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        missing = ids - set(read_receipts(log))
        if not missing:
            return
        if loop.time() > deadline:
            async with aiohttp.ClientSession() as session:
                stats = (await node.stats(session))["consumerStats"]
            raise BenchError(
                f"{len(missing)} of {len(ids)} accepted calls not delivered in {timeout} s, "
                f"e.g. {sorted(missing)[:3]}; consumerStats {stats}; log {node.log_path}"
            )
        await asyncio.sleep(0.5)


async def loop_lag_buckets(node: Bigpipe) -> dict[float, float]:
    """The node's `bigpipe_loop_lag_seconds` buckets now: cumulative counts by bound (s)."""
    async with aiohttp.ClientSession() as session, session.get(f"{node.url}/metrics") as reply:
        text = await reply.text()
    return {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "bigpipe_loop_lag_seconds"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }


def loop_lag_p99_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """The bound (ms) under which 99 % of the loop's lateness fell between two scrapes:
    a bucket's bound, so "at most"; inf if the loop was more than 1 s late that often."""
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    total = counts.get(float("inf"), 0.0)
    if not total:
        return float("nan")
    return next(bound for bound, count in counts.items() if count >= 0.99 * total) * 1000


async def scheduled(pid: int, load: Awaitable[T]) -> tuple[T, dict[str, float]]:
    """`load`'s result, and what the scheduler gave the process tree `pid` meanwhile: its
    share of the CPUs it may run on, and how long its event loops waited for a CPU per
    second they ran (Scheduling); and the same of the bench broker, which runs for the
    whole suite, with how long it stood still at safepoints (BrokerScheduling)."""
    cpus = len(os.sched_getaffinity(pid))
    brokers = broker_pids()
    broker_cpus = len(os.sched_getaffinity(brokers[0]))  # one CPU when pinned
    before, broker_before = Scheduling.of(pid), BrokerScheduling.of(brokers)
    result = await load
    figures = Scheduling.of(pid).since(before, cpus)
    figures.update(BrokerScheduling.of(brokers).since(broker_before, broker_cpus))
    return result, figures


def fmt_scheduling(figures: dict[str, Any]) -> str:
    return (
        f"its processes used {figures['cpu_share']:.0%} of their CPUs, and its event loops "
        f"waited {figures['loop_wait_per_run'] * 1000:.0f} ms for a CPU per second they ran; "
        + fmt_broker(figures)
    )


def fmt_broker(figures: dict[str, Any]) -> str:
    return (
        f"the broker used {figures['broker_cpu_share']:.0%} of its CPUs, its threads waited "
        f"{figures['broker_wait_per_run'] * 1000:.0f} ms for a CPU per second they ran, and "
        f"it stood still {figures['broker_stopped_ms']:.0f} ms at "
        f"{figures['broker_stops']:.0f} safepoints"
    )


def failures(figures: dict[str, Any]) -> str:
    return f", {figures['failed_total']:,} failed" if figures["failed_total"] else ""


def fmt(figures: dict[str, Any]) -> str:
    return f"{figures['p50_ms']:.1f}/{figures['p99_ms']:.1f}/{figures['p99.9_ms']:.1f} ms"


def end_to_end(receipts_log: Path, replies: dict[str, float]) -> dict[str, Any]:
    """Downstream receipt minus the caller's reply, per accepted call: percentiles (ms)."""
    wall_minus_monotonic = time.time() - time.monotonic()
    arrivals = read_receipts(receipts_log)
    e2e = [
        (arrivals[call_id][0] - wall_minus_monotonic - replied) * 1000
        for call_id, replied in replies.items()
    ]
    return {
        "calls": len(e2e),
        "p50_ms": percentile(e2e, 50),
        "p99_ms": percentile(e2e, 99),
        "p99.9_ms": percentile(e2e, 99.9),
        "duplicates": sum(len(arrivals[call_id]) - 1 for call_id in replies),
    }


def accepted_replies(columns: dict[str, list]) -> dict[str, float]:
    """Call id -> when its errno 0 reply came (monotonic s)."""
    return {
        call_id: replied
        for call_id, replied, status in zip(
            columns["id"], columns["replied"], columns["status"], strict=True
        )
        if status == 200
    }


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round figures merged: the median of each percentile, failures summed."""
    merged: dict[str, Any] = {
        key: median([r[key] for r in rounds])
        for key in rounds[0]
        if key.endswith("_ms") or key in SCHEDULING_KEYS
    }
    failed: Counter[str] = Counter()
    for figures in rounds:
        failed.update(figures.get("failed", {}))
    merged["calls"] = sum(r["calls"] for r in rounds)
    merged["failed"] = dict(failed)
    merged["failed_total"] = sum(failed.values())
    merged["duplicates"] = sum(r.get("duplicates", 0) for r in rounds)
    merged["rounds"] = rounds
    return merged


async def bigpipe_rounds(
    ctx: Context, rate: float, seconds: float, cpus: frozenset[int] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Warm-up, then `rounds` runs against a node delivering to nginx: ingest and e2e.
    With `cpus`, the node runs on those only."""
    receipts_log = ctx.workdir / "nginx-latency" / "receipts.log"
    receipts_log.unlink(missing_ok=True)
    ingest, e2e = [], []
    with nginx_204(receipts_log.parent, receipts_log) as downstream_url:
        topic = unique("bench-latency")
        consumer = consumer_entry(topic, unique("g"), concurrency=64, rateLimit=1e9, timeout=5000)
        config = bigpipe_config(ctx.bootstrap, topic, workers=ctx.workers, consumers=[consumer])
        body = call_body(f"{downstream_url}/hook")
        probed = await probe_topic(ctx)
        async with bigpipe_node(config, ctx.workdir) as node:
            if cpus is not None:
                assert node.process is not None
                pin(process_tree(node.process.pid), cpus)
            # Warm-up replies may fail (a node's first seconds can stall): only wait for
            # the accepted calls to be delivered.
            warmup = await open_loop(ctx, node.url, body, rate, WARMUP_SECONDS)
            await wait_delivered(receipts_log, set(warmup["id"]) - {""}, 90, node)
            for round_number in range(1, ctx.rounds + 1):
                lag_before = await loop_lag_buckets(node)
                (columns, kafka_p99), scheduling = await scheduled(
                    node.process.pid,
                    beside_kafka_probe(
                        ctx, probed, seconds, open_loop(ctx, node.url, body, rate, seconds)
                    ),
                )
                ingest.append(ingest_figures(columns, f"latency round {round_number}, bigpipe"))
                lag_after = await loop_lag_buckets(node)
                ingest[-1]["loop_lag_p99_ms"] = loop_lag_p99_ms(lag_before, lag_after)
                ingest[-1]["kafka_p99_ms"] = kafka_p99
                ingest[-1].update(scheduling)
                replies = accepted_replies(columns)
                await wait_delivered(receipts_log, set(replies), 60, node)
                e2e.append(end_to_end(receipts_log, replies))
                print(
                    f"  latency round {round_number} at {rate:,.0f}/s: bigpipe ingest p99 "
                    f"{ingest[-1]['p99_ms']:.1f} ms, reply -> downstream p50 "
                    f"{e2e[-1]['p50_ms']:.1f} ms, p99 {e2e[-1]['p99_ms']:.1f} ms; event loop "
                    f"late by at most {ingest[-1]['loop_lag_p99_ms']:.1f} ms at p99; "
                    f"Kafka's own write p99 {kafka_p99:.1f} ms; {fmt_scheduling(ingest[-1])}",
                    flush=True,
                )
    return ingest, e2e


async def bare_rounds(
    ctx: Context, rate: float, seconds: float, cpus: frozenset[int] | None = None
) -> list[dict[str, Any]]:
    """The same warm-up and rounds against the bare handler, with no background load."""
    rounds = []
    body = call_body()
    probed = await probe_topic(ctx)
    async with bare_ingest(ctx.workers, ctx.workdir) as (bare_url, pid):
        if cpus is not None:
            pin(process_tree(pid), cpus)
        await open_loop(ctx, bare_url, body, rate, WARMUP_SECONDS)
        for round_number in range(1, ctx.rounds + 1):
            (columns, kafka_p99), scheduling = await scheduled(
                pid,
                beside_kafka_probe(
                    ctx, probed, seconds, open_loop(ctx, bare_url, body, rate, seconds)
                ),
            )
            rounds.append(ingest_figures(columns, f"latency round {round_number}, bare"))
            rounds[-1]["kafka_p99_ms"] = kafka_p99
            rounds[-1].update(scheduling)
            print(
                f"  latency round {round_number} at {rate:,.0f}/s: bare ingest p99 "
                f"{rounds[-1]['p99_ms']:.1f} ms; Kafka's own write p99 {kafka_p99:.1f} ms; "
                f"{fmt_scheduling(rounds[-1])}",
                flush=True,
            )
    return rounds


async def run(ctx: Context) -> list[Row]:
    if not ctx.peak:
        raise BenchError("needs the ingest peak: run the ingest benchmark first, or --peak")
    rate = round(ctx.end_to_end_peak() * LOAD_SHARE)
    seconds = ctx.seconds(SECONDS)
    ingest_rounds, e2e_rounds = await bigpipe_rounds(ctx, rate, seconds)
    bigpipe, end_to_end_figures = medians(ingest_rounds), medians(e2e_rounds)
    bare = medians(await bare_rounds(ctx, rate, seconds))
    how = (
        f"open loop at {rate:,.0f} calls/s ({LOAD_SHARE:.0%} of the end-to-end peak) for "
        f"{seconds:g} s, {GENERATORS} generator processes, median of {ctx.rounds} rounds "
        f"after a {WARMUP_SECONDS} s warm-up on each side; Bigpipe delivers every call to "
        "nginx as it goes, the bare handler runs with no background load (the node is stopped)"
    )
    results: dict[str, Any] = {
        "what": "ingest latency at half the peak load, and reply -> downstream receipt",
        "how": how,
        "workers": ctx.workers,
        "rate_per_s": rate,
        "bigpipe_ingest": bigpipe,
        "bare_ingest": bare,
        "end_to_end": end_to_end_figures,
        "target_ingest_p99_ms": TARGET_P99_MS,
    }
    rows = [ingest_row("ingest p99 @ half peak", how, bigpipe, bare)]
    if (split := cpu_split()) is not None:
        pinned_rate = round(rate * split.node_share)
        with others_pinned(split):
            pinned = medians((await bigpipe_rounds(ctx, pinned_rate, seconds, split.node))[0])
            pinned_bare = medians(await bare_rounds(ctx, pinned_rate, seconds, split.node))
        pinned_how = (
            f"the same, with the node (or the bare handler) alone on CPU "
            f"{_cpus(split.node)} and the broker, nginx and the generators on CPU "
            f"{_cpus(split.others)}, at {pinned_rate:,.0f} calls/s: the rate scaled to the "
            f"node's {len(split.node)} of {len(split.node | split.others)} CPUs, so its cores "
            "are as busy as above, with nothing else competing for them"
        )
        results["pinned"] = {
            "how": pinned_how,
            "rate_per_s": pinned_rate,
            "bigpipe_ingest": pinned,
            "bare_ingest": pinned_bare,
        }
        rows.append(ingest_row("ingest p99 @ half peak, pinned", pinned_how, pinned, pinned_bare))
    save(ctx.results, "latency", results)
    rows.append(
        Row(
            "end-to-end latency",
            f"p50 {end_to_end_figures['p50_ms']:.1f} / p99 {end_to_end_figures['p99_ms']:.1f} ms",
            "-",
            None,
            "-",
            None,
            [
                f"downstream receipt - caller's reply, {end_to_end_figures['calls']:,} calls "
                f"at {rate:,.0f}/s, median of {ctx.rounds} rounds, p99.9 "
                f"{end_to_end_figures['p99.9_ms']:.1f} ms, "
                f"{end_to_end_figures['duplicates']} duplicate deliveries"
            ],
        )
    )
    return rows


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def ingest_row(name: str, how: str, bigpipe: dict[str, Any], bare: dict[str, Any]) -> Row:
    """The ingest p99 row of one set of rounds, against the bare handler's."""
    worst = max(bigpipe["rounds"], key=lambda figures: figures["kafka_p99_ms"])
    notes = [
        how,
        f"ingest p50/p99/p99.9: bigpipe {fmt(bigpipe)}, bare {fmt(bare)}",
        f"bigpipe's event loop was late by at most {bigpipe['loop_lag_p99_ms']:.1f} ms at p99 "
        "(bigpipe_loop_lag_seconds over the rounds): the share of the tail that is the "
        "workers' own stalls",
        f"Kafka's own write p99 (bench/kafka_probe.py, {PROBE_RATE} records/s, acks=all): "
        f"{bigpipe['kafka_p99_ms']:.1f} ms beside Bigpipe, the share of the tail that is the "
        f"broker and the shared cores under that load; {bare['kafka_p99_ms']:.1f} ms beside "
        "the bare handler, with Kafka otherwise idle",
        f"what the scheduler gave them (/proc/PID/task/TID/schedstat, medians of the rounds): "
        f"bigpipe's node used {bigpipe['cpu_share']:.0%} of its CPUs and its event loops "
        f"waited {bigpipe['loop_wait_per_run'] * 1000:.0f} ms for a CPU per second they ran; "
        f"the bare handler used {bare['cpu_share']:.0%} and waited "
        f"{bare['loop_wait_per_run'] * 1000:.0f} ms: the share of the tail that is the cores "
        "being busy, not the loops stalling",
        f"the broker beside bigpipe, medians of the rounds: {fmt_broker(bigpipe)}; in the round "
        f"with Kafka's worst own p99 ({worst['kafka_p99_ms']:.1f} ms), {fmt_broker(worst)}. "
        "A broker that stood still, or waited for a CPU, about as long as that p99 explains "
        "it; one that did neither points away from the JVM and the cores (bench.jvm)",
    ]
    for side, figures in (("bigpipe", bigpipe), ("bare", bare)):
        if figures["failed_total"]:
            notes.append(
                f"{side}: {figures['failed_total']:,} of {figures['calls']:,} calls failed "
                f"{figures['failed']} ({FAILURE_KINDS})"
            )
    lag = max(bigpipe["generator_lag_p99_ms"], bare["generator_lag_p99_ms"])
    if lag > LAG_WARNING_MS:
        notes.append(f"warning: the generator fell behind its schedule (lag p99 {lag:.1f} ms)")
    return Row(
        name,
        f"{bigpipe['p99_ms']:.1f} ms" + failures(bigpipe),
        f"{bare['p99_ms']:.1f} ms bare aiohttp" + failures(bare),
        bigpipe["p99_ms"] / bare["p99_ms"],
        f"<= {TARGET_P99_MS:g} ms, none failed",
        bigpipe["p99_ms"] <= TARGET_P99_MS and not bigpipe["failed_total"],
        notes,
    )
