"""The benchmark suite: `python -m bench` runs every benchmark and prints one summary table.

    python -m bench [--workers N] [--rounds R] [--only NAME,...] [--quick] [--keep-kafka]
                    [--against REV] [--note TEXT]

Benchmarks, in order (each module's docstring says what it measures and how):

    ingest         bench/ingest.py         /rpc/call calls/s vs a bare aiohttp handler served
                                           as Bigpipe serves (wrk); CPU-s per 10,000 calls
                                           (target <= 0.50)
    kafka_ceiling  bench/kafka_ceiling.py  raw confluent-kafka produce rate, same records and acks
    batch_ingest   bench/batch_ingest.py   /rpc/calls calls/s into Kafka, 100 calls a request,
                                           vs the raw produce rate in the same rounds; CPU-s/10k
    delivery       bench/delivery.py       Kafka -> nginx deliveries/s vs a bare aiohttp client,
                                           in as many processes as Bigpipe has workers; CPU-s/10k
                                           (target <= 1.10)
    latency        bench/latency.py        ingest p99 at half the peak, reply -> downstream receipt;
                                           again with the node pinned apart from the rest
    memory         bench/memory.py         idle RSS per worker and of the whole node (RSS and
                                           PSS, status on and off), RSS and refusals under overload
    status         bench/status.py         calls/s and CPU with the call status on vs off (ingest,
                                           delivery); bytes per call of the results topic, view

Every figure sits next to a baseline measured in the same run, as a ratio:
the machines are shared and noisy, so ratios travel better than absolute
numbers. The suite uses its own Kafka (deploy/kafka/local-kafka, port 19492,
data in .local/kafka-bench); it stops that broker at the end unless it was
already running or --keep-kafka is given, and deletes the `bench-*` topics.

Each benchmark writes bench/results/workers-N/<name>.json (N: --workers);
the run writes summary.json beside them, and a full run (no --only, no
--quick) rewrites the N-worker section of bench/RESULTS.md. A --quick run
(shorter, one round: a smoke test) writes its JSON to .local/bench-run/results
instead, so it never replaces recorded figures. The configs and logs of the
processes a run starts stay in .local/bench-run until the next run. The broker
is warmed up first (30 s of small writes, read by a consumer group). A full run
takes about 10 minutes.

Exit status: 0 when every target is met, 1 when a target is missed, 2 when a
benchmark could not produce a valid figure (wrong replies, a crash, a timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from bench import batch_ingest, delivery, ingest, kafka_ceiling, latency, memory, status
from bench.common import (
    BENCH_KAFKA_PORT,
    RESULTS,
    Context,
    Row,
    delete_bench_topics,
    error_row,
    kafka_running,
    load_average,
    machine,
    now,
    reference_tree,
    save,
    start_kafka,
    stop_kafka,
    warm_up_broker,
)
from tests.support import REPO

Benchmark = Callable[[Context], Awaitable[list[Row]]]
BENCHMARKS: dict[str, Benchmark] = {
    "ingest": ingest.run,
    "kafka_ceiling": kafka_ceiling.run,
    "batch_ingest": batch_ingest.run,
    "delivery": delivery.run,
    "latency": latency.run,
    "memory": memory.run,
    "status": status.run,
}
RESULTS_MD = REPO / "bench" / "RESULTS.md"
WARMUP_SECONDS = 30  # of small acks=all writes before the first benchmark (see warm_up_broker)
WORKDIR = REPO / ".local" / "bench-run"  # configs and logs of the last run, kept for post-mortems
QUICK_SCALE = 0.3
COLUMNS = ("benchmark", "figure", "baseline", "ratio", "target", "result")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0].strip('"` ')
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Bigpipe worker processes, and the bare baseline's (default: 1)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per median (default: 3)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter runs, one round: a smoke test"
    )
    parser.add_argument(
        "--peak",
        type=float,
        default=None,
        help="ingest calls/s to scale latency and memory from when ingest is not run "
        "(default: bench/results/workers-N/ingest.json)",
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        default=None,
        help="also run the delivery benchmark on Bigpipe at git revision REV, in the same "
        "rounds, and print this tree against it (say: --against main~5)",
    )
    parser.add_argument(
        "--keep-kafka", action="store_true", help="leave the bench broker running afterwards"
    )
    parser.add_argument(
        "--note",
        default="",
        help="a line for this run's RESULTS.md section, e.g. what else loaded the machine",
    )
    args = parser.parse_args(argv)
    args.selected = [name.strip() for name in args.only.split(",") if name.strip()] or list(
        BENCHMARKS
    )
    unknown = [name for name in args.selected if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.workers < 1 or args.rounds < 1:
        parser.error("--workers and --rounds must be at least 1")
    if args.quick:
        args.rounds = 1
    return args


def previous_peak(results: Path) -> float | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return float(json.loads((results / "ingest.json").read_text())["bigpipe_per_s"])
    return None


async def run_all(ctx: Context, selected: list[str]) -> list[Row]:
    rows: list[Row] = []
    started = time.monotonic()
    for name in selected:
        print(f"== {name} (at {time.monotonic() - started:.0f} s)", flush=True)
        try:
            rows.extend(await BENCHMARKS[name](ctx))
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            rows.append(error_row(name, exc))
    return rows


def table(rows: list[Row]) -> list[list[str]]:
    return [
        [
            row.name,
            row.figure,
            row.baseline,
            "-" if row.ratio is None else f"{row.ratio:.2f}",
            row.target,
            row.verdict,
        ]
        for row in rows
    ]


def print_summary(rows: list[Row], header: str) -> None:
    cells = [list(COLUMNS), *table(rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    rule = "  ".join("-" * width for width in widths)
    print(f"\n{header}")
    for index, line in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
        if index == 0:
            print(rule)
    print()
    for row in rows:
        for detail in row.details:
            print(f"  {row.name}: {detail}")


SECTION = re.compile(r"<!-- bench:workers=(\d+) -->\n.*?<!-- bench:end -->\n", re.DOTALL)


def write_results_md(rows: list[Row], info: dict[str, str]) -> None:
    """Rewrite this worker count's section of bench/RESULTS.md; keep the other counts'."""
    workers = int(info["workers"])
    sections = {}
    if RESULTS_MD.exists():
        for match in SECTION.finditer(RESULTS_MD.read_text()):
            sections[int(match.group(1))] = match.group(0)
    lines = [
        f"<!-- bench:workers={workers} -->",
        f"## {workers} worker{'s' if workers != 1 else ''}",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['machine']}",
        f"- Command: `{info['command']}`",
        f"- Load average (1/5/15 min) at start: {info['load_start']}; at end: {info['load_end']}",
        f"- Runtime: {info['runtime']}",
        *([f"- Note: {info['note']}"] if info.get("note") else []),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(line) + " |" for line in table(rows)),
        "",
        "Details:",
        "",
    ]
    for row in rows:
        lines.extend(f"- **{row.name}**: {detail}" for detail in row.details)
    lines += ["", f"Raw figures: `bench/results/workers-{workers}/*.json`."]
    lines += ["<!-- bench:end -->", ""]
    sections[workers] = "\n".join(lines)
    preamble = [
        "# Benchmark results",
        "",
        "Written by `python -m bench` (`./build.sh bench`) at the end of every full run,",
        "one section per worker count (`--workers N`): a run rewrites its own section.",
        "bench/suite.py and each benchmark's docstring say what is measured and how.",
        "The machines are shared: other engineers' test suites run beside the benchmarks,",
        "so absolute figures are noisy. Each figure is compared with a baseline measured",
        "in the same run, and the ratio is the number to follow.",
        "",
    ]
    body = "\n".join(sections[n] for n in sorted(sections))
    RESULTS_MD.write_text("\n".join(preamble) + "\n" + body)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # SIGTERM as Ctrl-C: the event loop then cancels its tasks, whose `async with` blocks
    # stop the nodes, servers and generators they started, and the broker is stopped below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found; install it: apt-get install -y {tool}")
    started = time.monotonic()
    info = {
        "date": now(),
        "machine": machine(),
        "command": shlex.join([".venv/bin/python", "-m", "bench", *argv]),
        "workers": str(args.workers),
        "load_start": load_average(),
        "note": args.note,
    }
    results = RESULTS / f"workers-{args.workers}"  # figures of one worker count apart
    peak = args.peak or (None if "ingest" in args.selected else previous_peak(results))
    was_running = kafka_running()
    print(
        f"bench: starting the bench Kafka (deploy/kafka/local-kafka, port {BENCH_KAFKA_PORT})",
        flush=True,
    )
    bootstrap = start_kafka()
    try:
        shutil.rmtree(WORKDIR, ignore_errors=True)
        WORKDIR.mkdir(parents=True)
        ctx = Context(bootstrap, WORKDIR, args.workers, args.rounds, results, peak=peak)
        ctx.reference = reference_tree(args.against) if args.against else None
        if args.quick:  # a smoke test: its figures must not replace the recorded ones
            ctx.scale, ctx.results = QUICK_SCALE, WORKDIR / "results"
        print(f"bench: warming the broker up for {WARMUP_SECONDS * ctx.scale:g} s", flush=True)
        uvloop.run(warm_up_broker(bootstrap, WARMUP_SECONDS * ctx.scale))
        rows = uvloop.run(run_all(ctx, args.selected))
    finally:
        with contextlib.suppress(Exception):
            delete_bench_topics(bootstrap)
        if not was_running and not args.keep_kafka:
            stop_kafka()
    runtime = time.monotonic() - started
    info["runtime"] = f"{runtime // 60:.0f} min {runtime % 60:.0f} s"
    info["load_end"] = load_average()
    print_summary(
        rows,
        f"Bigpipe benchmarks, {args.workers} worker(s), {info['date']}, {info['runtime']} "
        f"(load average {info['load_start']} -> {info['load_end']}; shared machine)",
    )
    save(
        ctx.results,
        "summary",
        {
            **info,
            "rows": [
                {
                    "name": r.name,
                    "figure": r.figure,
                    "baseline": r.baseline,
                    "ratio": r.ratio,
                    "target": r.target,
                    "result": r.verdict,
                    "details": r.details,
                }
                for r in rows
            ],
        },
    )
    if args.only == "" and not args.quick:
        write_results_md(rows, info)
        print(f"\nwrote {RESULTS_MD.relative_to(REPO)} and {results.relative_to(REPO)}/*.json")
    if any(row.figure == "ERROR" for row in rows):
        sys.exit(2)
    if any(row.passed is False for row in rows):
        sys.exit(1)
