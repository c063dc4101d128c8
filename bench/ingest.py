"""Ingest: accepted `/rpc/call` calls/s of one Bigpipe node, against a bare aiohttp handler.

wrk (`-t2 -c64 -d10s`, keep-alive) posts the same valid call body to both, in
alternating runs: `rounds` runs each, medians reported. Bigpipe answers only
after Kafka has stored the call (acks=all, idempotent producer); the baseline
(bench/bare_ingest.py) parses the same JSON with orjson and sends a reply of
the same shape and size, with the same number of worker processes, and no
Kafka. Every reply must be 2xx, i.e. errno 0: one that is not fails the
benchmark. Latency percentiles (p50, p99, p99.9) come from wrk's histogram.
CPU cost: the user + system CPU seconds of every process of each side
(/proc/PID/stat: Bigpipe's supervisor and workers; the bare server's
processes) over each wrk run, per 10,000 calls answered.

Figure: Bigpipe calls/s; ratio: Bigpipe / bare; target >= 0.70. The median
Bigpipe rate is the "peak" that the latency and memory benchmarks scale from.
"""

from __future__ import annotations

import aiohttp
import orjson

from bench.common import (
    BenchError,
    Context,
    Row,
    bare_ingest,
    bigpipe_config,
    bigpipe_node,
    call_body,
    cpu_row,
    cpu_seconds,
    median,
    per_10k,
    save,
)
from bench.wrk import WrkResult, run_wrk
from tests.support import unique

THREADS, CONNECTIONS, SECONDS, WARMUP_SECONDS = 2, 64, 10, 2
TARGET_RATIO = 0.70
TARGET_CPU_PER_10K = 0.50  # CPU-seconds per 10,000 accepted calls, every process of the node
PERCENTILES = ("p50", "p99", "p99.9")


async def check_reply_shapes(bigpipe_url: str, bare_url: str, body: bytes) -> None:
    """One call to each: both must answer 200, errno 0, with replies of one shape and size."""
    replies = {}
    async with aiohttp.ClientSession() as session:
        for name, url in (("bigpipe", bigpipe_url), ("bare", bare_url)):
            async with session.post(f"{url}/rpc/call", data=body) as response:
                raw = await response.read()
            reply = orjson.loads(raw)
            if response.status != 200 or reply.get("errno") != 0:
                raise BenchError(f"{name}: a valid call got {response.status} {raw!r}")
            replies[name] = (len(raw), sorted(reply), sorted(reply["data"]))
    if replies["bigpipe"] != replies["bare"]:
        raise BenchError(f"replies differ in shape or size: {replies}")


def latencies(results: list[WrkResult]) -> dict[str, float]:
    """Median over runs of each latency percentile, in ms."""
    return {p: median([r.latency_ms[p] for r in results]) for p in PERCENTILES}


def fmt_latency(values: dict[str, float]) -> str:
    return "/".join(f"{values[p]:.1f}" for p in PERCENTILES) + " ms"


async def run(ctx: Context) -> list[Row]:
    seconds = ctx.seconds(SECONDS)
    body = call_body()
    body_file = ctx.workdir / "ingest-call.json"
    body_file.write_bytes(body)
    config = bigpipe_config(ctx.bootstrap, unique("bench-ingest"), workers=ctx.workers)

    async def wrk(url: str, duration: float) -> WrkResult:
        return await run_wrk(
            f"{url}/rpc/call",
            body_file,
            connections=CONNECTIONS,
            seconds=duration,
            threads=THREADS,
        )

    runs: dict[str, list[WrkResult]] = {"bare": [], "bigpipe": []}
    cpu: dict[str, list[float]] = {"bare": [], "bigpipe": []}  # CPU-s per 10,000 calls
    async with (
        bigpipe_node(config, ctx.workdir) as node,
        bare_ingest(ctx.workers, ctx.workdir) as (bare_url, bare_pid),
    ):
        assert node.process is not None
        await check_reply_shapes(node.url, bare_url, body)
        targets = {"bare": (bare_url, bare_pid), "bigpipe": (node.url, node.process.pid)}
        for name, (url, _) in targets.items():  # connections, the producer, caches
            (await wrk(url, WARMUP_SECONDS)).check_all_ok(f"ingest warm-up, {name}")
        for round_number in range(1, ctx.rounds + 1):
            for name, (url, pid) in targets.items():
                cpu_before = cpu_seconds(pid)
                result = await wrk(url, seconds)
                cpu[name].append(per_10k(cpu_seconds(pid) - cpu_before, result.requests))
                result.check_all_ok(f"ingest round {round_number}, {name}")
                runs[name].append(result)
            bare, bigpipe = runs["bare"][-1], runs["bigpipe"][-1]
            print(
                f"  ingest round {round_number}: bare {bare.rate:,.0f}/s "
                f"(p99 {bare.latency_ms['p99']:.1f} ms, {cpu['bare'][-1]:.2f} CPU-s/10k), "
                f"bigpipe {bigpipe.rate:,.0f}/s (p99 {bigpipe.latency_ms['p99']:.1f} ms, "
                f"{cpu['bigpipe'][-1]:.2f} CPU-s/10k)",
                flush=True,
            )
    bigpipe_rate = median([r.rate for r in runs["bigpipe"]])
    bare_rate = median([r.rate for r in runs["bare"]])
    ratio = bigpipe_rate / bare_rate
    ctx.peak = bigpipe_rate
    lat_bigpipe, lat_bare = latencies(runs["bigpipe"]), latencies(runs["bare"])
    how = f"wrk -t{THREADS} -c{CONNECTIONS} -d{seconds:g}s, median of {ctx.rounds}"
    save(
        ctx.results,
        "ingest",
        {
            "what": "accepted /rpc/call calls/s, Bigpipe (acks=all) vs bare aiohttp handler",
            "how": how,
            "workers": ctx.workers,
            "bigpipe_per_s": bigpipe_rate,
            "bare_per_s": bare_rate,
            "ratio": ratio,
            "target": TARGET_RATIO,
            "bigpipe_latency_ms": lat_bigpipe,
            "bare_latency_ms": lat_bare,
            "cpu_s_per_10k": cpu,
            "target_cpu_s_per_10k": TARGET_CPU_PER_10K,
            "runs": {name: [r.summary() for r in results] for name, results in runs.items()},
        },
    )
    return [
        Row(
            "ingest",
            f"{bigpipe_rate:,.0f} calls/s",
            f"{bare_rate:,.0f}/s bare aiohttp",
            ratio,
            f">= {TARGET_RATIO:.2f}",
            ratio >= TARGET_RATIO,
            [
                f"{how}; {ctx.workers} worker(s) each; every reply 200/errno 0",
                f"latency p50/p99/p99.9: bigpipe {fmt_latency(lat_bigpipe)}, "
                f"bare {fmt_latency(lat_bare)}",
            ],
        ),
        cpu_row("ingest CPU", cpu["bigpipe"], cpu["bare"], "bare aiohttp", TARGET_CPU_PER_10K),
    ]
