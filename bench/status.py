"""Call status: what the results topic and the status view cost, against tracking off.

    python -m bench.status      (the same as: python -m bench --only status)

The same build, in the same run, with `status.enabled` true and false, rounds
alternating (`rounds` each, medians reported):

- ingest: wrk (as bench/ingest.py) against two nodes, one tracking, one not, each
  with a topic and no consumer group. Tracking adds a `queued` step per call, and
  the view (the node's own thread) applies it.
- delivery: a fresh node per round drains the same preloaded calls to nginx 204 (as
  bench/delivery.py). Tracking adds an `in_flight` and an `attempt` step per call,
  and the view applies both.

CPU: user + system CPU seconds of every process of the node, per 10,000 calls (the
broker's own work, on the same cores here, shows only in the rates). Bytes: the
results topic's records (key + value, uncompressed, read back; the topic holds
them in lz4 batches) and the view's SQLite file, per call, measured on the
tracking side of the last round of each.

Figure: tracking-on calls/s; ratio: on / off; target >= 0.85 (the issue's 15 %).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from bench import delivery
from bench.common import (
    Context,
    Row,
    bigpipe_config,
    bigpipe_node,
    call_body,
    cpu_seconds,
    median,
    nginx_204,
    per_10k,
    save,
)
from bench.ingest import CONNECTIONS, SECONDS, THREADS, WARMUP_SECONDS
from bench.wrk import run_wrk
from tests.support import Bigpipe, read_whole_topic, unique

TARGET_RATIO = 0.85
SIDES = ("off", "on")


def tracking(on: bool, results_topic: str) -> dict[str, Any]:
    return {"status.enabled": on, "status.topic": results_topic}


async def run(ctx: Context) -> list[Row]:
    ingest = await _ingest(ctx)
    with nginx_204(ctx.workdir / "nginx") as nginx:
        deliveries = await _delivery(ctx, nginx)
    rows = []
    for name, result in (("status ingest", ingest), ("status delivery", deliveries)):
        on, off = median(result["per_s"]["on"]), median(result["per_s"]["off"])
        ratio = on / off
        result["ratio"] = ratio
        cpu_on, cpu_off = (median(result["cpu_s_per_10k"][side]) for side in ("on", "off"))
        bytes_line = ", ".join(f"{k} {v:,.0f}" for k, v in result["bytes_per_call"].items())
        rows.append(
            Row(
                name,
                f"{on:,.0f} calls/s",
                f"{off:,.0f}/s tracking off",
                ratio,
                f">= {TARGET_RATIO:.2f}",
                ratio >= TARGET_RATIO,
                [
                    result["how"],
                    f"CPU-seconds per 10,000 calls (median): on {cpu_on:.2f}, off {cpu_off:.2f}",
                    f"bytes per call: {bytes_line}",
                ],
            )
        )
    save(
        ctx.results,
        "status",
        {
            "what": "calls/s with the call status (results topic + view) on vs off",
            "workers": ctx.workers,
            "target": TARGET_RATIO,
            "ingest": ingest,
            "delivery": deliveries,
        },
    )
    return rows


async def _ingest(ctx: Context) -> dict[str, Any]:
    seconds = ctx.seconds(SECONDS)
    body_file = ctx.workdir / "status-call.json"
    body_file.write_bytes(call_body())
    results_topic = unique("bench-results")
    configs = {
        side: bigpipe_config(
            ctx.bootstrap,
            unique("bench-status"),
            workers=ctx.workers,
            **tracking(side == "on", results_topic),
        )
        for side in SIDES
    }
    per_s: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    accepted = 0
    async with (
        bigpipe_node(configs["off"], ctx.workdir) as off,
        bigpipe_node(configs["on"], ctx.workdir) as on,
    ):
        nodes = {"off": off, "on": on}
        for side, node in nodes.items():
            warm = await run_wrk(
                f"{node.url}/rpc/call", body_file, connections=CONNECTIONS, seconds=WARMUP_SECONDS
            )
            warm.check_all_ok(f"status ingest warm-up, {side}")
            accepted += warm.requests if side == "on" else 0
        for round_number in range(1, ctx.rounds + 1):
            for side, node in nodes.items():
                assert node.process is not None
                before = cpu_seconds(node.process.pid)
                result = await run_wrk(
                    f"{node.url}/rpc/call",
                    body_file,
                    connections=CONNECTIONS,
                    seconds=seconds,
                    threads=THREADS,
                )
                result.check_all_ok(f"status ingest round {round_number}, {side}")
                cpu[side].append(per_10k(cpu_seconds(node.process.pid) - before, result.requests))
                per_s[side].append(result.rate)
                accepted += result.requests if side == "on" else 0
            print(
                f"  status ingest round {round_number}: off {per_s['off'][-1]:,.0f}/s "
                f"({cpu['off'][-1]:.2f} CPU-s/10k), on {per_s['on'][-1]:,.0f}/s "
                f"({cpu['on'][-1]:.2f} CPU-s/10k)",
                flush=True,
            )
        sizes = await _bytes_per_call(ctx, results_topic, on, accepted)
    return {
        "how": f"wrk -t{THREADS} -c{CONNECTIONS} -d{seconds:g}s per side, median of {ctx.rounds}",
        "per_s": per_s,
        "cpu_s_per_10k": cpu,
        "bytes_per_call": sizes,
    }


async def _delivery(ctx: Context, nginx: str) -> dict[str, Any]:
    calls = ctx.count(delivery.CALLS)
    per_s: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    sizes: dict[str, float] = {}
    for round_number in range(1, ctx.rounds + 1):
        for side in SIDES:
            results_topic = unique("bench-results")

            async def measure(node: Bigpipe, topic: str = results_topic) -> None:
                sizes.update(await _bytes_per_call(ctx, topic, node, calls))

            rate, cpu_10k = await delivery.bigpipe_rate(
                ctx,
                nginx,
                calls,
                after=measure if side == "on" else None,
                **tracking(side == "on", results_topic),
            )
            per_s[side].append(rate)
            cpu[side].append(cpu_10k)
        print(
            f"  status delivery round {round_number}: off {per_s['off'][-1]:,.0f}/s "
            f"({cpu['off'][-1]:.2f} CPU-s/10k), on {per_s['on'][-1]:,.0f}/s "
            f"({cpu['on'][-1]:.2f} CPU-s/10k)",
            flush=True,
        )
    return {
        "how": f"{calls:,} preloaded calls to nginx 204 per side (bench/delivery.py's round), "
        f"median of {ctx.rounds}",
        "per_s": per_s,
        "cpu_s_per_10k": cpu,
        "bytes_per_call": sizes,
    }


async def _bytes_per_call(ctx: Context, topic: str, node: Bigpipe, calls: int) -> dict[str, float]:
    """The results topic's records, its disk and the node's view file, per call, once the
    view has caught up with the topic (its lag 0)."""
    messages = await asyncio.to_thread(read_whole_topic, ctx.bootstrap, topic)
    records = len(messages)
    record_bytes = sum(len(m.key() or b"") + len(m.value() or b"") for m in messages)
    view = Path(node.config["status.directory"]) / f"bigpipe-status-{node.port}.sqlite3"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _view_steps(view) < records:
        await asyncio.sleep(0.5)
    view_bytes = sum(p.stat().st_size for p in view.parent.glob(view.name + "*"))
    return {
        "steps": records / calls,
        "record bytes": record_bytes / calls,
        "view bytes": view_bytes / calls,
    }


def _view_steps(path: Path) -> int:
    """Steps the view holds: each row holds a call's steps of one batch, one per line."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            query = (
                "SELECT sum(length(records) - length(replace(records, x'0a', '')) + 1) FROM steps"
            )
            return db.execute(query).fetchone()[0] or 0
    except sqlite3.Error:
        return 0


if __name__ == "__main__":
    from bench.suite import main

    main(["--only", "status"])
