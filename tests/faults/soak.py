"""The soak: calls through two Bigpipe nodes for 30 minutes, with a fault every 2 minutes.

    ./build.sh soak [--minutes 30] [--fault-every 120] [--rate 40]

It runs on the fault suite's 3-broker cluster and Toxiproxy (same ports, same
BIGPIPE_FAULTS_PORT and BIGPIPE_TOXIPROXY_PORT). Node a reaches Kafka through link 0,
node b through link 1; every call goes to one downstream, through a proxy. The faults
come in turn: Kafka latency on node a's link, node b cut off from Kafka, a downstream that
stalls, resets half its connections or lags 2 s, node a killed (kill -9) and restarted,
a reload of both nodes, a broker killed for 10 s.

At the end it prints one table: calls, lost, duplicated, ingest p99, and each Bigpipe
process's RSS and open file descriptors before the first fault and at the end. Exit
status 0 when no call was lost and RSS and descriptors stayed flat; 1 otherwise; 2 for
bad options.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.faults.conftest import TOXIPROXY_PORT, Cluster, Network, fault_cluster
from tests.faults.harness import (
    Accounting,
    Load,
    dead_letter_topic,
    fault_config,
    percentile,
)
from tests.faults.harness import settle_and_account as settle
from tests.faults.toxiproxy import (
    DOWNSTREAM_FAULTS,
    KAFKA_LATENCY,
    ProxiedSink,
    Toxiproxy,
    ToxiproxyServer,
)
from tests.support import REPO, Bigpipe, eventually, free_port, reload, rewrite, rss_mib

BREAKER = {"breakPeriod": 3, "recoverPeriod": 3, "winSize": 5, "minStats": 10, "healthRate": 0.5}
GROUP = {
    "timeout": 3000,
    "retries": 40,
    "backoffBase": 100,
    "backoffMax": 1000,
    "concurrency": 16,
    "circuitBreaker": BREAKER,
}
RECOVERY = 10.0  # seconds of calm after each fault, at least
# "Flat": a process that lives through the whole soak may grow this much from before the
# first fault to the end. Caches and allocator arenas settle in the first minutes, and the
# pool of kept-alive downstream connections may fill up to `concurrency`; a leak per call
# or per fault would not stop there.
RSS_GROWTH_LIMIT_MIB = 24.0
FD_GROWTH_LIMIT = GROUP["concurrency"] + 8


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Process:
    """One Bigpipe process's memory and descriptors, before the first fault and at its end."""

    pid: int
    rss: list[float] = field(default_factory=list)  # [start, end]
    fds: list[int] = field(default_factory=list)
    note: str = ""

    def sample(self) -> None:
        """The first call records the start, every later one the end."""
        rss, fds = rss_mib(self.pid), open_fds(self.pid)
        if not self.rss:
            self.rss, self.fds = [rss, rss], [fds, fds]
        else:
            self.rss[1], self.fds[1] = rss, fds

    def flat(self) -> bool:
        """Judged only for a process that ran from before the first fault to the end; one
        killed, or started by a fault, is shown but not judged."""
        return bool(self.note) or (
            self.rss[-1] - self.rss[0] <= RSS_GROWTH_LIMIT_MIB
            and self.fds[-1] - self.fds[0] <= FD_GROWTH_LIMIT
        )


@dataclass
class Node:
    name: str
    config: dict[str, Any]
    workdir: Path
    bigpipe: Bigpipe | None = None
    processes: list[Process] = field(default_factory=list)

    async def start(self) -> None:
        self.bigpipe = await Bigpipe(self.config, self.workdir).start()
        assert self.bigpipe.process is not None
        self.processes.append(Process(self.bigpipe.process.pid))

    @property
    def current(self) -> Bigpipe:
        assert self.bigpipe is not None
        return self.bigpipe

    def sample(self) -> None:
        self.processes[-1].sample()


@dataclass
class Soak:
    cluster: Cluster
    network: Network
    sink: ProxiedSink
    nodes: list[Node]
    http: aiohttp.ClientSession
    reloads: int = 0

    # ------------------------------------------------------------ the faults
    async def kafka_latency(self) -> str:
        await KAFKA_LATENCY.hold(self.network.kafka[0], 20)
        return "500 ms (+-100) on node a's Kafka link, 20 s"

    async def node_cut_off(self) -> str:
        await self.network.kafka[1].cut()
        await asyncio.sleep(30)
        await self.network.kafka[1].restore()
        await self.nodes[1].current.wait_ready(60)
        return "node b cut off from Kafka, 30 s"

    async def downstream(self, fault: str) -> str:
        proxy = await self.network.downstream("soak-downstream", self.sink.port)
        await DOWNSTREAM_FAULTS[fault].hold(proxy, 15)
        return f"downstream {fault}, 15 s"

    async def node_killed(self) -> str:
        node = self.nodes[0]
        node.sample()  # the end of this process
        node.processes[-1].note = "killed"
        await node.current.kill()
        await node.start()
        node.processes[-1].note = "started by that fault"
        node.sample()
        return "node a killed (kill -9) and restarted"

    async def reload(self) -> str:
        self.reloads += 1
        rate = 5_000 if self.reloads % 2 else 10_000
        for node in self.nodes:
            entries = [{**entry, "rateLimit": rate} for entry in node.config["kafka.consumer.list"]]
            rewrite(node.current, **{"kafka.consumer.list": entries})
            await reload(node.current, self.http)
        return f"both nodes reloaded (rateLimit {rate})"

    async def broker_killed(self) -> str:
        await self.cluster.kill_node(2)
        await asyncio.sleep(10)
        await self.cluster.start_node(2)
        return "broker 2 killed (kill -9) for 10 s"

    def rotation(self) -> list[Callable[[], Awaitable[str]]]:
        return [
            self.kafka_latency,
            lambda: self.downstream("stalls"),
            self.node_killed,
            self.node_cut_off,
            lambda: self.downstream("resets-half"),
            self.reload,
            self.broker_killed,
            lambda: self.downstream("latency-2s"),
        ]


async def run(
    args: argparse.Namespace, cluster: Cluster, toxiproxy: Toxiproxy, workdir: Path
) -> int:
    network = await Network.create(toxiproxy)
    sink = await ProxiedSink().start()
    sink.proxy_port = (await network.downstream("soak-downstream", sink.port)).port
    config, _ = fault_config(network.kafka[0].bootstrap, group=GROUP)
    other = {
        **config,
        "kafka.bootstrap.servers": network.kafka[1].bootstrap,
        "http.server.port": free_port(),
    }
    nodes = [Node("a", config, workdir), Node("b", other, workdir)]
    for node in nodes:
        await node.start()
    began = time.monotonic()
    end = began + args.minutes * 60
    done: list[tuple[float, str]] = []
    load = Load(lambda: [node.current for node in nodes], sink, senders=256, rate=args.rate)
    async with aiohttp.ClientSession() as http, load:
        soak = Soak(cluster, network, sink, nodes, http)
        await eventually(lambda: len(sink.ok) >= 100, 60, "the first deliveries")
        rotation = soak.rotation()
        next_at = began + args.fault_every
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if not done:
                for node in nodes:
                    node.sample()  # the start: warmed up, before any fault
            what = await rotation[len(done) % len(rotation)]()
            done.append((time.monotonic() - began, what))
            print(f"soak: {done[-1][0] / 60:5.1f} min  {what}", flush=True)
            next_at = max(next_at + args.fault_every, time.monotonic() + RECOVERY)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
    for node in nodes:
        node.sample()
    tally = load.tally
    dead_letters = dead_letter_topic(config)
    accounting = await settle("soak", tally, sink, cluster.bootstrap, dead_letters, 600)
    for node in nodes:
        node.sample()  # after the backlog: still flat?
        await node.current.stop()
    await sink.stop()
    print_table(args, accounting, tally.outcomes, tally.accept_latency, nodes, done)
    flat = all(process.flat() for node in nodes for process in node.processes)
    return 0 if accounting.lost == 0 and flat else 1


def print_table(
    args: argparse.Namespace,
    accounting: Accounting,
    outcomes: Counter[tuple[Any, Any]],
    accept_latency: list[float],
    nodes: list[Node],
    done: list[tuple[float, str]],
) -> None:
    answers = ", ".join(f"{status}/{errno}: {n}" for (status, errno), n in outcomes.items())
    rows = [
        ("duration", f"{args.minutes:g} min, {len(done)} faults, {args.rate:g} calls/s offered"),
        ("calls sent", str(accounting.sent)),
        ("answers", answers),
        ("accepted (errno 0)", str(accounting.accepted)),
        ("delivered", str(accounting.delivered)),
        ("dead-lettered", str(accounting.dead_lettered)),
        ("**lost**", f"**{accounting.lost}**"),
        ("duplicated", str(accounting.duplicated)),
        ("ingest p99 (accepted calls)", f"{percentile(accept_latency, 0.99) * 1000:.0f} ms"),
    ]
    for node in nodes:
        for process in node.processes:
            name = f"node {node.name}, pid {process.pid}" + (
                f" ({process.note})" if process.note else ""
            )
            rows.append(
                (
                    f"{name}: RSS, open fds",
                    f"{process.rss[0]:.1f} → {process.rss[-1]:.1f} MiB, "
                    f"{process.fds[0]} → {process.fds[-1]}"
                    + ("" if process.flat() else "  **not flat**"),
                )
            )
    print("\n| soak | |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    print("\nfaults: " + "; ".join(f"{at / 60:.1f} min {what}" for at, what in done))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./build.sh soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length (default 30)")
    parser.add_argument(
        "--fault-every", type=float, default=120.0, help="seconds between faults (default 120)"
    )
    parser.add_argument("--rate", type=float, default=40.0, help="calls offered per second")
    args = parser.parse_args(argv)
    for name in ("minutes", "fault_every", "rate"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    return args


async def main(argv: list[str]) -> int:
    args = parse(argv)
    workdir = REPO / ".local" / "soak" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    print(f"soak: logs in {workdir}", flush=True)
    cluster = fault_cluster()
    started_here = not cluster.running()
    await cluster.start_async()
    server = ToxiproxyServer(TOXIPROXY_PORT, workdir / "toxiproxy.log").start()
    try:
        return await run(args, cluster, Toxiproxy(server.api), workdir)
    finally:
        server.stop()
        if started_here:
            await cluster.stop_async()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
