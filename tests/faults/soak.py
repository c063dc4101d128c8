"""The soak: mixed calls through two Bigpipe nodes for 30 minutes, with a fault every 2 minutes.

    ./build.sh soak [--minutes 30] [--fault-every 120] [--rate 40]

It runs on the fault suite's 3-broker cluster and Toxiproxy (same ports, same
BIGPIPE_FAULTS_PORT and BIGPIPE_TOXIPROXY_PORT). Node a reaches Kafka through link 0,
node b through link 1. The calls are of several kinds (tests/faults/mix.py): plain ones to
a downstream behind a proxy, keyed and delayed ones and ones with idempotency keys (some
sent twice) to a steady downstream, and ones with callbacks and ttls to a flaky
downstream that answers 503 for 45 s every 5 minutes. The faults come in turn: Kafka
latency on node a's link, a downstream (the proxied one) that stalls, node a killed
(kill -9) and restarted, node b cut off from Kafka, the downstream resetting half its
connections, a reload of both nodes, a broker killed for 10 s, the downstream lagging 2 s.

Every 10 s it counts each Bigpipe process's open file descriptors by kind
(tests/faults/fds.py) into fds.jsonl in its log directory. At the end it prints one
table: calls, what became of each kind, lost, duplicated, ingest p99, and each process's
RSS and descriptors (by kind) before the first fault and at the end. Exit status 0 when
no call was lost, every dead letter is explained by its call's kind, no delayed call came
early, every callback arrived, and RSS and descriptors stayed flat; 1 otherwise; 2 for
bad options.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.faults.conftest import (
    CLUSTER_NODES,
    CLUSTER_PORT,
    KAFKA_LINKS,
    TOXIPROXY_PORT,
    Cluster,
    Network,
    fault_cluster,
    link_ports,
)
from tests.faults.fds import fd_kinds
from tests.faults.harness import (
    Accounting,
    Sink,
    dead_letter_reasons,
    dead_letter_topic,
    fault_config,
    percentile,
)
from tests.faults.harness import settle_and_account as settle
from tests.faults.mix import (
    CallbackSink,
    KindReport,
    Mix,
    MixedLoad,
    account,
    callbacks_missing,
)
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
FLAKY_EVERY, FLAKY_FOR = 300.0, 45.0  # the flaky downstream answers 503 45 s in every 300
FD_SAMPLE_EVERY = 10.0
CALLBACK_WAIT = 120.0  # s after the calls are settled, for their callbacks
SENDERS = 256  # the load's cap on calls in flight
# "Flat": a process that lives through the whole soak may grow this much from before the
# first fault to the end. Caches and allocator arenas settle in the first minutes.
RSS_GROWTH_LIMIT_MIB = 24.0
# Descriptors are judged by kind (tests/faults/fds.py). Two kinds are pools that fill up
# to a bound and stay there, since aiohttp reuses its idle kept-alive connections in turn
# (oldest first), so none is idle for its 15 s keep-alive while calls keep coming:
# - the callers' connections (the soak's own client pool): at most one per call in
#   flight, which a Kafka fault drives up (accepts wait for Kafka), so at most SENDERS;
# - Bigpipe's connections to the downstreams and the callback receiver: at most the
#   group's concurrency to each.
# Everything else (Kafka's sockets and librdkafka's wake-up pipes, the event loop, files)
# must stay where it was, give or take a reconnecting broker or two.
POOLS = {
    "callers": SENDERS,
    "downstreams": 4 * GROUP["concurrency"],  # proxied, steady, flaky, callback receiver
}
FD_GROWTH_LIMIT = 12  # the rest


def fd_group(kind: str) -> str:
    """The line of the table a descriptor kind is counted on."""
    if kind.startswith("from callers"):
        return "callers"
    if kind.startswith(("to downstream", "to callback")):
        return "downstreams"
    if kind.startswith("to kafka"):
        return "kafka"
    return "pipe" if kind == "pipe" else "other"


def fd_groups(kinds: Counter[str]) -> Counter[str]:
    groups: Counter[str] = Counter()
    for kind, count in kinds.items():
        groups[fd_group(kind)] += count
    return groups


@dataclass
class Labels:
    """Port -> name, for telling a process's sockets apart (see fds.fd_kinds)."""

    peers: dict[int, str] = field(default_factory=dict)  # remote ports
    served: dict[int, str] = field(default_factory=dict)  # the nodes' own HTTP ports


@dataclass
class Process:
    """One Bigpipe process's memory and descriptors, before the first fault and at its end."""

    pid: int
    rss: list[float] = field(default_factory=list)  # [start, end]
    kinds: list[Counter[str]] = field(default_factory=list)  # [start, end]: fds by kind
    note: str = ""

    @property
    def fds(self) -> list[int]:
        return [sum(kinds.values()) for kinds in self.kinds]

    def sample(self, labels: Labels) -> None:
        """The first call records the start, every later one the end."""
        rss, kinds = rss_mib(self.pid), fd_kinds(self.pid, labels.peers, labels.served)
        if not self.rss:
            self.rss, self.kinds = [rss, rss], [kinds, kinds]
        else:
            self.rss[1], self.kinds[1] = rss, kinds

    def flat(self) -> bool:
        """Judged only for a process that ran from before the first fault to the end; one
        killed, or started by a fault, is shown but not judged."""
        if self.note:
            return True
        start, end = fd_groups(self.kinds[0]), fd_groups(self.kinds[-1])
        rest = sum(n for group, n in end.items() if group not in POOLS)
        rest -= sum(n for group, n in start.items() if group not in POOLS)
        return (
            self.rss[-1] - self.rss[0] <= RSS_GROWTH_LIMIT_MIB
            and all(end[pool] <= bound for pool, bound in POOLS.items())
            and rest <= FD_GROWTH_LIMIT
        )


@dataclass
class Node:
    name: str
    config: dict[str, Any]
    workdir: Path
    labels: Labels
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
        self.processes[-1].sample(self.labels)


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


async def flaky_outages(sink: Sink, began: float, outages: list[tuple[float, float]]) -> None:
    """The flaky downstream answers 503 for FLAKY_FOR s in every FLAKY_EVERY, from 90 s in."""
    next_at = began + 90
    while True:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        sink.failing = True
        await asyncio.sleep(FLAKY_FOR)
        sink.failing = False
        outages.append((next_at - began, time.monotonic() - began))
        next_at += FLAKY_EVERY


async def sample_fds(nodes: list[Node], began: float, path: Path) -> None:
    """Each live process's descriptors by kind, every FD_SAMPLE_EVERY s, as JSON lines."""
    with path.open("ab") as out:
        while True:
            for node in nodes:
                pid = node.processes[-1].pid
                labels = node.labels
                kinds = fd_kinds(pid, labels.peers, labels.served)
                line = {"t": round(time.monotonic() - began, 1), "node": node.name, "pid": pid}
                out.write(orjson.dumps({**line, "total": sum(kinds.values()), "kinds": kinds}))
                out.write(b"\n")
            out.flush()
            await asyncio.sleep(FD_SAMPLE_EVERY)


def port_labels(sinks: dict[str, Sink], callbacks: Sink, node_ports: list[int]) -> Labels:
    labels = Labels()
    for link in range(KAFKA_LINKS):
        proxy_port, _ = link_ports(link)
        for broker in range(CLUSTER_NODES):
            labels.peers[proxy_port + broker] = "kafka"
    for broker in range(CLUSTER_NODES):
        labels.peers[CLUSTER_PORT + broker] = "kafka (not proxied)"
    for name, sink in sinks.items():
        labels.peers[getattr(sink, "proxy_port", 0) or sink.port] = f"downstream {name}"
    labels.peers[callbacks.port] = "callback receiver"
    labels.served = {port: "callers" for port in node_ports}
    return labels


async def run(
    args: argparse.Namespace, cluster: Cluster, toxiproxy: Toxiproxy, workdir: Path
) -> int:
    network = await Network.create(toxiproxy)
    proxied = await ProxiedSink().start()
    proxied.proxy_port = (await network.downstream("soak-downstream", proxied.port)).port
    sinks: dict[str, Sink] = {
        "proxied": proxied,
        "steady": await Sink().start(),
        "flaky": await Sink().start(),
    }
    mix = Mix(sinks, await CallbackSink().start())
    config, _ = fault_config(network.kafka[0].bootstrap, group=GROUP)
    other = {
        **config,
        "kafka.bootstrap.servers": network.kafka[1].bootstrap,
        "http.server.port": free_port(),
    }
    labels = port_labels(
        sinks, mix.callbacks, [config["http.server.port"], other["http.server.port"]]
    )
    nodes = [Node("a", config, workdir, labels), Node("b", other, workdir, labels)]
    try:
        for node in nodes:
            await node.start()
        return await soak(args, cluster, network, mix, nodes, workdir)
    finally:  # also when interrupted: no node is left running
        for node in nodes:
            if node.bigpipe is not None:
                await node.current.stop()
        for sink in [*sinks.values(), mix.callbacks]:
            await sink.stop()


async def soak(
    args: argparse.Namespace,
    cluster: Cluster,
    network: Network,
    mix: Mix,
    nodes: list[Node],
    workdir: Path,
) -> int:
    began = time.monotonic()
    end = began + args.minutes * 60
    done: list[tuple[float, str]] = []
    outages: list[tuple[float, float]] = []
    load = MixedLoad(lambda: [node.current for node in nodes], mix, rate=args.rate, senders=SENDERS)
    flaky = mix.sinks["flaky"]
    background = [
        asyncio.create_task(flaky_outages(flaky, began, outages)),
        asyncio.create_task(sample_fds(nodes, began, workdir / "fds.jsonl")),
    ]
    proxied = mix.sinks["proxied"]
    assert isinstance(proxied, ProxiedSink)
    async with aiohttp.ClientSession() as http, load:
        faults = Soak(cluster, network, proxied, nodes, http)
        await eventually(lambda: len(proxied.ok) >= 100, 60, "the first deliveries")
        rotation = faults.rotation()
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
    background[0].cancel()
    flaky.failing = False
    for node in nodes:
        node.sample()
    tally = load.tally
    topic = dead_letter_topic(nodes[0].config)
    accounting = await settle("soak", tally, mix, cluster.bootstrap, topic, 600, mix.excused)
    dead_letters = await asyncio.to_thread(dead_letter_reasons, cluster.bootstrap, topic)
    await eventually_or_not(lambda: callbacks_missing(mix, dead_letters) == 0, CALLBACK_WAIT)
    background[1].cancel()
    for node in nodes:
        node.sample()  # after the backlog: still flat?
    reports = account(mix, dead_letters)
    missing = callbacks_missing(mix, dead_letters)
    print_table(args, accounting, load, reports, mix, missing, nodes, done, outages)
    flat = all(process.flat() for node in nodes for process in node.processes)
    wrong = sum(r.lost + r.unexplained + r.early for r in reports.values()) + missing
    return 0 if accounting.lost == 0 and wrong == 0 and flat else 1


async def eventually_or_not(condition: Callable[[], bool], timeout: float) -> None:
    """Wait until `condition` holds or `timeout` passes; the table tells which."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)


def kind_rows(reports: dict[str, KindReport]) -> list[tuple[str, str]]:
    rows = []
    for name, report in sorted(reports.items()):
        dead = ", ".join(f"{reason} {n}" for reason, n in report.dead.items()) or "0"
        extra = ""
        if report.skipped_duplicate:
            extra += f"; skipped as a key's duplicate {report.skipped_duplicate}"
        if report.late:
            extra += (
                f"; early {report.early}, late p99 {percentile(report.late, 0.99) * 1000:.0f} ms"
                f", max {max(report.late) * 1000:.0f} ms"
            )
        if report.unexplained:
            extra += f"; **{report.unexplained} dead letters unexplained**"
        rows.append(
            (
                f"{name}: accepted / delivered / dead-lettered / lost",
                f"{report.accepted} / {report.delivered} / {dead} / {report.lost}{extra}",
            )
        )
    return rows


def fd_breakdown(process: Process) -> str:
    start, end = fd_groups(process.kinds[0]), fd_groups(process.kinds[-1])
    return ", ".join(
        f"{group} {start[group]} → {end[group]}"
        for group in ("callers", "downstreams", "kafka", "pipe", "other")
    )


def print_table(
    args: argparse.Namespace,
    accounting: Accounting,
    load: MixedLoad,
    reports: dict[str, KindReport],
    mix: Mix,
    missing_callbacks: int,
    nodes: list[Node],
    done: list[tuple[float, str]],
    outages: list[tuple[float, float]],
) -> None:
    tally = load.tally
    answers = ", ".join(f"{status}/{errno}: {n}" for (status, errno), n in tally.outcomes.items())
    resends = ", ".join(f"{verdict}: {n}" for verdict, n in mix.resends.items())
    told = sum(len(ids) for ids in mix.callbacks.told.values())
    rows = [
        ("duration", f"{args.minutes:g} min, {len(done)} faults, {args.rate:g} calls/s offered"),
        ("calls sent", str(accounting.sent)),
        ("answers", answers),
        ("accepted (errno 0)", str(accounting.accepted)),
        ("delivered", str(accounting.delivered)),
        ("dead-lettered", str(accounting.dead_lettered)),
        (
            "excused (a copy of an idempotency key; another copy was delivered)",
            str(accounting.excused),
        ),
        ("**lost**", f"**{accounting.lost}**"),
        ("duplicated", str(accounting.duplicated)),
        ("ingest p99 (accepted calls)", f"{percentile(tally.accept_latency, 0.99) * 1000:.0f} ms"),
        *kind_rows(reports),
        ("idempotency keys sent twice", resends or "none"),
        ("callbacks", f"{told} calls told, {missing_callbacks} owed and missing"),
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
            rows.append((f"{name}: fds by kind", fd_breakdown(process)))
    print("\n| soak | |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    print("\nfaults: " + "; ".join(f"{at / 60:.1f} min {what}" for at, what in done))
    print(
        "flaky downstream answering 503: "
        + "; ".join(f"{start / 60:.1f}-{stop / 60:.1f} min" for start, stop in outages)
    )


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
