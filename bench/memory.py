"""Memory: RSS of an idle Bigpipe worker, and how it holds under overload.

Idle: a fresh node with one consumer group (delivering to nginx, as in
bench/latency.py) takes 1,000 calls from 8 clients, delivers them,
rests until every worker has handed freed heap back once (its trim interval,
bigpipe.node.memory, and 2 s): an idle node is one idle for that long; then
VmRSS (/proc/PID/status) of each worker process is read: the supervisor's
children, or the process itself when it runs alone. Figure: the largest worker.
Baseline: bench/bare_ingest.py after the same traffic, read the same way.
Target: <= 80 MiB per idle worker.

Idle node: the same node's whole process tree (supervisor, workers, and the status
view's builder that worker 0 runs), summed.
Target: <= 110 MiB of RSS. RSS counts the pages of the shared libraries (libpython,
librdkafka, OpenSSL, ...) once per process, so the sum overstates what the node
takes; PSS (/proc/PID/smaps_rollup: each shared page split between the processes
that map it) is shown beside it, as the honest total. The node runs with every
default, call status included, on a status topic of its own (bench/common.py's
bigpipe_node: a shared one would make the figure depend on what earlier runs
left in it); the same node with
`status.enabled` false is measured too, after the same traffic.

Idle CPU (informational): the CPU time the same node's processes use over that rest,
as a share of one CPU, beside the bare handler's over its own rest: what a node
costs the machine while no call comes (its timers, polls and Kafka clients).

Overload: a fresh node with a small `http.server.handler.channel.size` (64)
is hit by wrk with 512 connections for 20 s, far more than it can take to
Kafka, so most calls are refused at once with 503. The RSS of the node's
whole process tree is sampled every second. Figure: the largest growth over
the RSS measured just before the load started (so whatever the load costs
counts, its first seconds included), and the share of 503 replies; any
status other than 200 or 503 fails. Afterwards the node must accept a normal call (200, errno 0)
within 10 s. Target: growth <= 16 MiB, and that call accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

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
    cpu_seconds,
    descendants,
    nginx_204,
    save,
    worker_pids,
)
from bench.latency import wait_delivered
from bench.wrk import run_wrk
from bigpipe.node.memory import TRIM_INTERVAL_SECONDS
from tests.support import consumer_entry, eventually, rss_mib, unique

IDLE_CALLS, IDLE_CLIENTS = 1000, 8
REST_SECONDS = TRIM_INTERVAL_SECONDS + 2
TARGET_IDLE_MIB = 80
TARGET_NODE_MIB = 110  # supervisor and workers together, RSS
CHANNEL_SIZE, CONNECTIONS, OVERLOAD_SECONDS = 64, 512, 20
TARGET_GROWTH_MIB = 16


async def little_traffic(url: str, body: bytes, calls: int, clients: int) -> list[str]:
    """Post `calls` calls from `clients` clients; every one must be accepted. Returns ids."""
    ids: list[str] = []
    remaining = calls

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with session.post(f"{url}/rpc/call", data=body) as response:
                raw = await response.read()
            if response.status != 200:
                raise BenchError(f"idle traffic: {response.status} {raw[:200]!r}")
            ids.append(orjson.loads(raw)["data"]["id"])

    async with aiohttp.ClientSession() as session:
        await asyncio.wait_for(asyncio.gather(*(client(session) for _ in range(clients))), 60)
    return ids


def worker_rss(pid: int) -> float:
    return max(rss_mib(worker) for worker in worker_pids(pid))


def pss_mib(pid: int) -> float:
    """Proportional set size: RSS with each shared page split between its processes."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no Pss for pid {pid}")


async def idle_node(
    ctx: Context, downstream_url: str, receipts: Path, body: bytes, status: bool
) -> dict[str, Any]:
    """A fresh node after a little traffic and a rest: its largest worker's RSS, the
    supervisor's (None without one), and the whole tree's RSS and PSS."""
    topic = unique("bench-memory")
    consumer = consumer_entry(topic, unique("g"), concurrency=64, rateLimit=1e9)
    config = bigpipe_config(
        ctx.bootstrap,
        topic,
        workers=ctx.workers,
        consumers=[consumer],
        **{"status.enabled": status},
    )
    async with bigpipe_node(config, ctx.workdir) as node:
        assert node.process is not None
        ids = await little_traffic(node.url, body, IDLE_CALLS, IDLE_CLIENTS)
        await wait_delivered(receipts, set(ids), 90, node)
        pid = node.process.pid
        idle_cpu = await cpu_share_at_rest(pid)
        tree = [pid, *descendants(pid)]
        return {
            "idle_cpu_share": idle_cpu,
            "worker_mib": worker_rss(pid),
            "supervisor_mib": rss_mib(pid) if worker_pids(pid) != [pid] else None,
            "node_rss_mib": sum(rss_mib(member) for member in tree),
            "node_pss_mib": sum(pss_mib(member) for member in tree),
        }


async def idle(ctx: Context) -> dict[str, Any]:
    receipts = ctx.workdir / "nginx-memory" / "receipts.log"
    receipts.unlink(missing_ok=True)
    with nginx_204(receipts.parent, receipts) as downstream_url:
        body = call_body(f"{downstream_url}/hook")
        status_on = await idle_node(ctx, downstream_url, receipts, body, status=True)
        status_off = await idle_node(ctx, downstream_url, receipts, body, status=False)
    async with bare_ingest(ctx.workers, ctx.workdir) as (bare_url, bare_pid):
        await little_traffic(bare_url, body, IDLE_CALLS, IDLE_CLIENTS)
        bare_idle_cpu = await cpu_share_at_rest(bare_pid)
        bare = worker_rss(bare_pid)
    return {
        "bare_idle_cpu_share": bare_idle_cpu,
        "bigpipe_worker_mib": status_on["worker_mib"],
        "bare_worker_mib": bare,
        "supervisor_mib": status_on["supervisor_mib"],
        "node": status_on,
        "node_status_off": status_off,
    }


async def cpu_share_at_rest(pid: int) -> float:
    """Rest REST_SECONDS; the CPU time the process tree `pid` used meanwhile, as a share
    of one CPU: what an idle node costs the machine (timers, polls, Kafka's heartbeats)."""
    loop = asyncio.get_running_loop()
    started, cpu_before = loop.time(), cpu_seconds(pid)
    await asyncio.sleep(REST_SECONDS)
    return (cpu_seconds(pid) - cpu_before) / (loop.time() - started)


def tree_rss(pid: int) -> float:
    total = 0.0
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):  # a process that just exited
            total += rss_mib(member)
    return total


async def accepts_a_call(url: str, body: bytes, timeout: float = 10) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(f"{url}/rpc/call", data=body) as response:
                    raw = await response.read()
                if response.status == 200 and orjson.loads(raw).get("errno") == 0:
                    return True
            await asyncio.sleep(0.2)
    return False


async def every_process_up(url: str) -> None:
    """Wait until the status view's builder, the node's last process to start, has said
    how far behind it is: RSS measured before that would count its start-up as growth
    (a 1-worker run measured +30.8 MiB; +14.4 with this wait)."""
    async with aiohttp.ClientSession() as session:

        async def builder_reported() -> bool:
            async with session.get(f"{url}/stats") as response:
                status = (await response.json())["data"]["statusStats"]
            return status["viewLag"] >= 0

        await eventually(builder_reported, 30, "the status view's builder to report")


async def overload(ctx: Context) -> dict[str, Any]:
    seconds = ctx.seconds(OVERLOAD_SECONDS)
    body = call_body()
    body_file = ctx.workdir / "memory-call.json"
    body_file.write_bytes(body)
    config = bigpipe_config(
        ctx.bootstrap,
        unique("bench-overload"),
        workers=ctx.workers,
        **{"http.server.handler.channel.size": CHANNEL_SIZE},
    )
    loop = asyncio.get_running_loop()
    async with bigpipe_node(config, ctx.workdir) as node:
        assert node.process is not None
        pid = node.process.pid
        await every_process_up(node.url)
        before = tree_rss(pid)
        wrk = asyncio.create_task(
            run_wrk(
                f"{node.url}/rpc/call",
                body_file,
                connections=CONNECTIONS,
                seconds=seconds,
                count_statuses=True,
            )
        )
        started, samples = loop.time(), []
        while not wrk.done():
            samples.append((round(loop.time() - started, 2), round(tree_rss(pid), 2)))
            await asyncio.wait({wrk}, timeout=1.0)
        result = await wrk
        after_ok = await accepts_a_call(node.url, body)
        after = tree_rss(pid)
    unexpected = {s: n for s, n in result.statuses.items() if s not in (200, 503)}
    if unexpected:
        raise BenchError(f"overload: replies other than 200 and 503: {unexpected}")
    if not samples:
        raise BenchError("overload: no RSS sample during the load")
    peak = max(rss for _, rss in samples)
    replies = sum(result.statuses.values())
    return {
        "seconds": seconds,
        "offered_per_s": result.rate,
        "peak_multiple": result.rate / ctx.peak if ctx.peak else None,
        "refused_share": result.statuses.get(503, 0) / max(1, replies),
        "accepted_per_s": result.statuses.get(200, 0) / result.seconds,
        "statuses": result.statuses,
        "socket_errors": result.socket_errors,
        "rss_before_mib": before,
        "rss_max_mib": peak,
        "growth_mib": peak - before,
        "rss_after_mib": after,
        "accepts_call_after": after_ok,
        "samples": samples,
    }


async def run(ctx: Context) -> list[Row]:
    still = await idle(ctx)
    print(
        f"  memory idle: bigpipe worker {still['bigpipe_worker_mib']:.1f} MiB, "
        f"bare {still['bare_worker_mib']:.1f} MiB; the node {still['node']['node_rss_mib']:.1f} "
        f"MiB RSS, {still['node']['node_pss_mib']:.1f} MiB PSS "
        f"(status off: {still['node_status_off']['node_rss_mib']:.1f} MiB RSS)",
        flush=True,
    )
    hard = await overload(ctx)
    print(
        f"  memory overload: {hard['offered_per_s']:,.0f} replies/s, "
        f"{hard['refused_share']:.0%} refused, growth {hard['growth_mib']:+.1f} MiB",
        flush=True,
    )
    save(
        ctx.results,
        "memory",
        {
            "what": "VmRSS of an idle worker; RSS growth and refusals under overload",
            "workers": ctx.workers,
            "idle": still,
            "overload": hard,
            "target_idle_mib": TARGET_IDLE_MIB,
            "target_node_mib": TARGET_NODE_MIB,
            "target_growth_mib": TARGET_GROWTH_MIB,
        },
    )
    multiple = f", {hard['peak_multiple']:.1f}x the ingest peak" if hard["peak_multiple"] else ""
    supervisor = (
        f"; the supervisor {still['supervisor_mib']:.1f} MiB" if still["supervisor_mib"] else ""
    )
    grown_ok = hard["growth_mib"] <= TARGET_GROWTH_MIB
    node, off = still["node"], still["node_status_off"]
    return [
        Row(
            "idle RSS per worker",
            f"{still['bigpipe_worker_mib']:.1f} MiB",
            f"{still['bare_worker_mib']:.1f} MiB bare aiohttp",
            still["bigpipe_worker_mib"] / still["bare_worker_mib"],
            f"<= {TARGET_IDLE_MIB} MiB",
            still["bigpipe_worker_mib"] <= TARGET_IDLE_MIB,
            [
                f"after {IDLE_CALLS:,} calls ingested and delivered, {REST_SECONDS} s rest; "
                f"{ctx.workers} worker(s){supervisor}"
            ],
        ),
        Row(
            "idle RSS of the node",
            f"{node['node_rss_mib']:.1f} MiB",
            f"{ctx.workers} x {still['bare_worker_mib']:.1f} MiB bare aiohttp",
            node["node_rss_mib"] / (ctx.workers * still["bare_worker_mib"]),
            f"<= {TARGET_NODE_MIB} MiB",
            node["node_rss_mib"] <= TARGET_NODE_MIB,
            [
                f"supervisor, {ctx.workers} worker(s) and the view builder, VmRSS summed; "
                f"PSS (shared pages split between the processes) "
                f"{node['node_pss_mib']:.1f} MiB; with status.enabled false "
                f"{off['node_rss_mib']:.1f} MiB RSS, {off['node_pss_mib']:.1f} MiB PSS"
            ],
        ),
        Row(
            "idle CPU of the node",
            f"{node['idle_cpu_share']:.1%} of a CPU",
            f"{still['bare_idle_cpu_share']:.1%} bare aiohttp",
            None,
            "-",
            None,
            [
                f"the same idle node over its {REST_SECONDS} s rest: every process, user + "
                f"system time (/proc/PID/stat); with status.enabled false "
                f"{off['idle_cpu_share']:.1%}; the bare handler with {ctx.workers} worker(s)"
            ],
        ),
        Row(
            "overload RSS growth",
            f"{hard['growth_mib']:+.1f} MiB, {hard['refused_share']:.0%} refused",
            f"{hard['rss_before_mib']:.0f} MiB before the load",
            hard["rss_max_mib"] / hard["rss_before_mib"],
            f"<= +{TARGET_GROWTH_MIB} MiB, call ok after",
            grown_ok and hard["accepts_call_after"] and hard["refused_share"] > 0,
            [
                f"wrk -c{CONNECTIONS} for {hard['seconds']:g} s, channel.size {CHANNEL_SIZE}: "
                f"{hard['offered_per_s']:,.0f} replies/s{multiple} "
                f"(wrk is closed-loop: it offers what the node answers), "
                f"{hard['accepted_per_s']:,.0f}/s of them accepted; "
                f"RSS {hard['rss_before_mib']:.0f} MiB before, "
                f"max {hard['rss_max_mib']:.0f} MiB, {hard['rss_after_mib']:.0f} MiB after; "
                f"normal call afterwards: {'accepted' if hard['accepts_call_after'] else 'FAILED'}"
            ],
        ),
    ]
