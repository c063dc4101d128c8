"""Delivery: calls/s one Bigpipe node delivers from Kafka, against a bare aiohttp client.

    python -m bench.delivery      (the same as: python -m bench --only delivery)

Each round starts one Bigpipe node (uvloop) with a consumer group on a fresh
topic, waits until the group is stable (every worker has its partitions, so
no rebalance falls inside the measurement), then preloads N calls (20,000)
into the topic in a burst; the node delivers them to nginx answering 204, at
concurrency 64. The baseline (bench/bare_delivery.py) posts the same requests (same body,
same headers) to the same nginx with a bare aiohttp client on uvloop, in as
many processes as Bigpipe has workers, splitting the concurrency as Bigpipe
splits it: like for like. Deliveries are counted where they land, in
nginx's stub_status request counter, for both sides alike. The rate runs
from the first delivery seen to the last; medians of `rounds`.

CPU cost: the user + system CPU seconds of every process of the node
(/proc/PID/stat), from just before the preload until the last delivery, per
10,000 calls; for the baseline, each client process's own CPU time while it
sends.

Figure: Bigpipe deliveries/s; ratio: Bigpipe / bare client; target >= 0.70.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from confluent_kafka import Producer

from bench.common import (
    DATA,
    BenchError,
    Context,
    Row,
    bigpipe_config,
    bigpipe_node,
    cpu_row,
    cpu_seconds,
    create_topic,
    median,
    nginx_204,
    per_10k,
    save,
    stop_process,
    wait_group_stable,
)
from bigpipe.calls.envelope import encode_call, new_call
from tests.support import ACL_NAME, REPO, Bigpipe, consumer_entry, unique

CALLS, CONCURRENCY, PARTITIONS = 20_000, 64, 4
TARGET_RATIO = 0.70
TARGET_CPU_PER_10K = 1.10  # CPU-seconds per 10,000 delivered calls, every process of the node


async def bare_client_rate(ctx: Context, nginx: str, calls: int) -> tuple[float, float]:
    """Calls/s of bench/bare_delivery.py, in as many processes as Bigpipe has workers, and
    their CPU seconds per 10,000 calls; counted at nginx, as Bigpipe's deliveries are."""
    async with aiohttp.ClientSession() as session:
        counter = NginxCounter(session, nginx)
        await counter.reset()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.bare_delivery",
            f"--url={nginx}/hook",
            f"--calls={calls}",
            f"--concurrency={CONCURRENCY}",
            f"--processes={ctx.workers}",
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        try:
            rate = await _drain_rate(counter, calls, timeout=60 + calls / 1000)
            out, _ = await asyncio.wait_for(process.communicate(), 60)
        finally:
            await stop_process(process)
    if process.returncode != 0:
        raise BenchError(f"bare_delivery exited {process.returncode}")
    cpu = sum(
        float(line.split()[1]) for line in out.decode().splitlines() if line.startswith("cpu ")
    )
    return rate, per_10k(cpu, calls)


class Preload:
    """N call envelopes, encoded in advance, and a connected producer to write them at once.

    Encoding and connecting happen before the measurement, so the burst itself
    costs little CPU beside the node being measured.
    """

    def __init__(self, bootstrap: str, topic: str, url: str, calls: int) -> None:
        self._topic = topic
        self._records = [
            (encode_call(new_call(url, DATA, ACL_NAME, {})), str(index).encode())
            for index in range(calls)
        ]
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 4})
        self._producer.list_topics(topic, timeout=10)

    def burst(self) -> None:
        for value, key in self._records:
            while True:
                try:
                    self._producer.produce(self._topic, value, key)
                    break
                except BufferError:
                    self._producer.poll(0.005)
        if self._producer.flush(60):
            raise BenchError("delivery: preloading did not finish in 60 s")


class NginxCounter:
    """Requests nginx has received, less this counter's own stub_status requests."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._url = f"{base_url}/nginx_status"
        self._polls = 0
        self._start = 0

    async def _requests(self) -> int:
        async with self._session.get(self._url) as response:
            text = await response.text()
        self._polls += 1
        # "Active connections: 1\nserver accepts handled requests\n 5 5 9\n..."
        return int(text.splitlines()[2].split()[2])

    async def reset(self) -> None:
        self._start = await self._requests()
        self._polls = 0

    async def count(self) -> int:
        return await self._requests() - self._start - self._polls


# The shields on, as in production: a breaker (per destination where Bigpipe has them)
# that the healthy nginx never trips, so its bookkeeping is on every attempt's path.
BREAKER = {"breakPeriod": 5, "recoverPeriod": 5, "winSize": 10, "minStats": 100, "healthRate": 0.5}


async def bigpipe_rate(
    ctx: Context,
    nginx: str,
    calls: int,
    source: Path = REPO,
    after: Callable[[Bigpipe], Awaitable[None]] | None = None,
    **overrides: Any,
) -> tuple[float, float]:
    """Deliveries/s of one Bigpipe node (of the tree `source`) draining `calls` preloaded
    calls to nginx, and the CPU seconds per 10,000 calls of all its processes, from the
    preload to the last one.

    `overrides` are top-level config keys; `after` looks at the node once it is measured."""
    topic, group = unique("bench-deliver"), unique("g")
    await asyncio.to_thread(create_topic, ctx.bootstrap, topic, PARTITIONS)
    consumer = consumer_entry(
        topic, group, concurrency=CONCURRENCY, rateLimit=1e9, timeout=5000, circuitBreaker=BREAKER
    )
    config = bigpipe_config(
        ctx.bootstrap,
        topic,
        workers=ctx.workers,
        partitions=PARTITIONS,
        consumers=[consumer],
        **overrides,
    )
    preload = await asyncio.to_thread(Preload, ctx.bootstrap, topic, f"{nginx}/hook", calls)
    node_running = bigpipe_node(config, ctx.workdir, source)
    async with aiohttp.ClientSession() as session, node_running as node:
        assert node.process is not None
        counter = NginxCounter(session, nginx)
        await counter.reset()
        await asyncio.to_thread(wait_group_stable, ctx.bootstrap, group, ctx.workers)
        cpu_before = cpu_seconds(node.process.pid)
        drain = asyncio.create_task(_drain_rate(counter, calls, timeout=60 + calls / 1000))
        await asyncio.to_thread(preload.burst)
        rate = await drain
        cpu = per_10k(cpu_seconds(node.process.pid) - cpu_before, calls)
        if after is not None:
            await after(node)
        return rate, cpu


async def against_round(
    ctx: Context,
    nginx: str,
    calls: int,
    round_number: int,
    untracked: list[tuple[float, float]],
    earlier: list[tuple[float, float]],
) -> None:
    """This tree untracked and the --against tree, alternating which goes first."""
    assert ctx.reference is not None
    runs = [
        (untracked, bigpipe_rate(ctx, nginx, calls, **{"status.enabled": False})),
        (earlier, bigpipe_rate(ctx, nginx, calls, ctx.reference[1])),
    ]
    for figures, measuring in runs if round_number % 2 else reversed(runs):
        figures.append(await measuring)


def against_row(
    ctx: Context, untracked: list[tuple[float, float]], earlier: list[tuple[float, float]]
) -> Row:
    """This tree's deliveries (call tracking off) against the --against tree's."""
    assert ctx.reference is not None
    commit = ctx.reference[0]
    ours, theirs = median([r for r, _ in untracked]), median([r for r, _ in earlier])
    return Row(
        f"delivery vs {commit}",
        f"{ours:,.0f} calls/s",
        f"{theirs:,.0f}/s at {commit}",
        ours / theirs,
        "-",
        None,
        [
            f"this tree with status.enabled false (like for like with an earlier tree), in "
            f"the same rounds, alternating which goes first; CPU-seconds per 10,000 calls "
            f"(median): this tree {median([c for _, c in untracked]):.2f}, {commit} "
            f"{median([c for _, c in earlier]):.2f}"
        ],
    )


async def _drain_rate(counter: NginxCounter, calls: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    first_seen = first_total = None
    total = 0
    while time.monotonic() < deadline:
        total = await counter.count()
        now = time.perf_counter()
        if total and first_seen is None:
            first_seen, first_total = now, total
        if total >= calls:
            return (total - first_total) / (now - first_seen)
        await asyncio.sleep(0.02)
    raise BenchError(f"delivery: only {total:,} of {calls:,} calls delivered in {timeout:g} s")


async def run(ctx: Context) -> list[Row]:
    calls = ctx.count(CALLS)
    baseline, bigpipe, baseline_cpu, bigpipe_cpu = [], [], [], []
    # With --against: this tree with call tracking off (the earlier tree may predate it,
    # so like for like), and the earlier tree; (rate, CPU-s/10k) per round.
    untracked: list[tuple[float, float]] = []
    earlier: list[tuple[float, float]] = []
    with nginx_204(ctx.workdir / "nginx") as nginx:
        for round_number in range(1, ctx.rounds + 1):
            rate, cpu = await bare_client_rate(ctx, nginx, calls)
            baseline.append(rate)
            baseline_cpu.append(cpu)
            rate, cpu = await bigpipe_rate(ctx, nginx, calls)
            bigpipe.append(rate)
            bigpipe_cpu.append(cpu)
            line = (
                f"  delivery round {round_number}: bare client {baseline[-1]:,.0f}/s "
                f"({baseline_cpu[-1]:.2f} CPU-s/10k), bigpipe {rate:,.0f}/s ({cpu:.2f} CPU-s/10k)"
            )
            if ctx.reference:
                await against_round(ctx, nginx, calls, round_number, untracked, earlier)
                line += (
                    f", untracked {untracked[-1][0]:,.0f}/s ({untracked[-1][1]:.2f}), "
                    f"{ctx.reference[0]} {earlier[-1][0]:,.0f}/s ({earlier[-1][1]:.2f})"
                )
            print(line, flush=True)
    ratio = median(bigpipe) / median(baseline)
    ctx.delivery_peak = median(bigpipe)
    how = (
        f"{calls:,} preloaded calls to nginx 204, concurrency {CONCURRENCY}, "
        f"{PARTITIONS} partitions, median of {ctx.rounds}; the bare client runs in "
        f"{ctx.workers} process(es), as Bigpipe in {ctx.workers} worker(s)"
    )
    save(
        ctx.results,
        "delivery",
        {
            "what": "calls/s delivered from Kafka to nginx 204 vs a bare aiohttp client",
            "how": how,
            "workers": ctx.workers,
            "calls": calls,
            "concurrency": CONCURRENCY,
            "baseline_per_s": baseline,
            "bigpipe_per_s": bigpipe,
            "baseline_cpu_s_per_10k": baseline_cpu,
            "bigpipe_cpu_s_per_10k": bigpipe_cpu,
            "ratio": ratio,
            "target": TARGET_RATIO,
            "target_cpu_s_per_10k": TARGET_CPU_PER_10K,
        },
    )
    rows = [against_row(ctx, untracked, earlier)] if ctx.reference else []
    return [
        *rows,
        Row(
            "delivery",
            f"{median(bigpipe):,.0f} calls/s",
            f"{median(baseline):,.0f}/s bare client",
            ratio,
            f">= {TARGET_RATIO:.2f}",
            ratio >= TARGET_RATIO,
            [how],
        ),
        cpu_row("delivery CPU", bigpipe_cpu, baseline_cpu, "bare client", TARGET_CPU_PER_10K),
    ]


if __name__ == "__main__":
    from bench.suite import main

    main(["--only", "delivery"])
