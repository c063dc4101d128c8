"""One Bigpipe node: wires ingest, Kafka and delivery together and runs their lifecycle.

Start-up never waits for Kafka: the HTTP server comes up at once and answers
503 until the topics exist, then the consumer groups join. Shutdown goes in the
order a call travels: stop taking calls, finish writes, finish deliveries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from confluent_kafka import KafkaException

from bigpipe.calls.dedup import IdempotencyIndex
from bigpipe.calls.envelope import Call
from bigpipe.calls.status import NO_TRAIL, StatusLog
from bigpipe.calls.status_view import StatusView
from bigpipe.config import AclEntry, Config, ConfigError, ConsumerConfig
from bigpipe.delivery.consumer import ConsumerGroup
from bigpipe.ingest.acl import Acl
from bigpipe.ingest.listener import HTTP_LIMITS, GuardedSite
from bigpipe.ingest.producer import Producer
from bigpipe.ingest.server import Ingest, build_server
from bigpipe.kafka_client import ensure_topics
from bigpipe.logs import Logging
from bigpipe.metrics import Latencies, Sample, merge_samples
from bigpipe.node.board import Board
from bigpipe.node.memory import trim_forever
from bigpipe.node.reload import ReloadPlan, log_rejected, log_reloaded, plan_reload, read_reload
from bigpipe.node.signals import handle_reloads, notify_ready, take
from bigpipe.node.workers import SUPERVISOR_GONE, read_snapshot, share_of
from bigpipe.operate.admin import admin_routes
from bigpipe.stats import NodeCounters, Stats

log = logging.getLogger(__name__)

EXIT_FORCED = 1
EXIT_FAILED = 1  # a part of the node died: the supervisor (or systemd) starts it afresh
PUBLISH_SECONDS = 0.1  # how stale another worker's figures in /stats may be
TOPIC_CHECK_TIMEOUT = 10.0
TOPIC_RETRY_SECONDS = 2.0
KAFKA_WATCH_SECONDS = 1.0
KAFKA_PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class WorkerSlot:
    """Where a worker process stands: its board (one slot per worker), its slot on it, and
    the supervisor's config snapshot (bigpipe.node.workers), which it runs instead of the file."""

    board: Board
    index: int
    snapshot: Path
    reloads: NodeCounters  # the node's reload counters, as the snapshot had them at start


class Node:
    def __init__(
        self, config: Config, logs: Logging | None = None, worker: WorkerSlot | None = None
    ) -> None:
        self.config = config
        self.worker = worker
        self.stats = Stats()
        self.latencies = Latencies()
        self._inherited: list[Sample] = []  # histograms of the dead worker this one replaces
        self.acl = Acl(config.acl)
        self.producer: Producer | None = None
        self.status_log: StatusLog | None = None  # the results topic's writer, when tracking
        self.status_view: StatusView | None = None  # answers GET /rpc/call/{id}
        self.groups: dict[tuple[str, str], ConsumerGroup] = {}
        self._joined = False  # topics exist and the groups started
        self.kafka_lost = False  # every broker unreachable, after start-up (_watch_kafka)
        self.draining = False
        self.broken = False  # a consumer group's poll loop died (_group_died)
        self.stop_requested = asyncio.Event()  # a signal, or a part of the node died
        self.exit_code = 0
        self._logs = logs
        self._runner: web.ServerRunner | None = None
        self._bring_up: asyncio.Task[None] | None = None
        self._kafka_watch: asyncio.Task[None] | None = None
        self._loop_lag: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        self.ingest = Ingest(self)
        self._publisher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # idempotency indexes a reload replaced
        if worker is not None:
            self._take_over_slot(worker)
            self.stats.node = worker.reloads  # the supervisor counts them: bigpipe.node.workers

    def _take_over_slot(self, worker: WorkerSlot) -> None:
        """Continue the counters of a dead predecessor, so node-wide totals never drop."""
        previous = worker.board.read(worker.index)
        if previous is not None:
            snapshot = orjson.loads(previous)
            self.stats = Stats.from_dict(snapshot["stats"], counters_only=True)
            self._inherited = snapshot["latencies"]

    def _snapshot(self) -> bytes:
        latencies = merge_samples([self._inherited, self.latencies.samples()])
        # The pid tells the supervisor that this process got as far as listening.
        return orjson.dumps(
            {
                "stats": self.stats.to_dict(),
                "latencies": latencies,
                "ready": self.ready,
                "pid": os.getpid(),
            }
        )

    def view(self) -> tuple[Stats, list[Sample], bool]:
        """Node-wide counters, latencies and readiness: this process's, or all workers'."""
        if self.worker is None:
            return self.stats, self.latencies.samples(), self.ready
        self.worker.board.publish(self.worker.index, self._snapshot())
        parts = self._board_parts()
        return (
            Stats.merged([p["stats"] for p in parts]),
            merge_samples(p["latencies"] for p in parts),
            self.node_ready(parts),
        )

    def node_ready(self, parts: list[dict[str, Any]] | None = None) -> bool:
        """Every worker takes calls: the kernel may hand the next connection to any of them.

        `parts` are the board's slots when the caller has read them already; this
        worker's own slot may be up to PUBLISH_SECONDS old, so its live state counts too.
        """
        if self.worker is None or not self.ready:
            return self.ready
        parts = self._board_parts() if parts is None else parts
        return len(parts) == self.worker.board.slots and all(p["ready"] for p in parts)

    def _board_parts(self) -> list[dict[str, Any]]:
        assert self.worker is not None
        return [orjson.loads(p) for p in self.worker.board.read_all()]

    async def _publish_forever(self) -> None:
        assert self.worker is not None
        while True:
            self.worker.board.publish(self.worker.index, self._snapshot())
            await asyncio.sleep(PUBLISH_SECONDS)

    def caller(self, name: str, topic: str) -> AclEntry | None:
        """The caller's ACL entry in force now: a reload replaces self.acl, and delivery
        judges each attempt by the entry of that moment."""
        return self.acl.entry(name, topic)

    def _local(self, consumer: ConsumerConfig) -> ConsumerConfig:
        """This process's part of a group's node-wide maxBuffered (see share_of)."""
        return share_of(consumer, self.worker.board.slots if self.worker else 1)

    @property
    def ready(self) -> bool:
        """Taking calls: joined Kafka, Kafka still reachable, not draining, not broken."""
        return self._joined and not self.kafka_lost and not self.draining and not self.broken

    def not_ready_reason(self) -> str:
        if self.draining or self.broken:
            return "shutting down; send the call to another node"
        return "kafka not reachable; retry later"

    async def start(self) -> None:
        """Listen first, so the node answers (503) even while Kafka is away."""
        self.producer = Producer(self.config)
        self.index = IdempotencyIndex(self.config)
        if self.config.status_enabled:
            self.status_log = StatusLog(self.config, self.stats.status)
            self.status_view = StatusView(self.config, self.stats.status)
        keepalive = self.config.read_timeout_ms / 1000
        server = build_server(
            self,
            admin_routes(self),
            access_log=None,
            keepalive_timeout=keepalive,
            **HTTP_LIMITS,
        )
        self._runner = web.ServerRunner(
            server, shutdown_timeout=self.config.shutdown_timeout_ms / 1000
        )
        await self._runner.setup()
        await GuardedSite(self._runner, self.config, reuse_port=self.worker is not None).start()
        if self.worker is not None:
            self._publisher = asyncio.create_task(self._publish_forever())
        log.info("listening on %s:%d", self.config.http_host, self.config.http_port)
        self._bring_up = asyncio.create_task(self._join_kafka())
        self._kafka_watch = asyncio.create_task(self._watch_kafka())
        self._loop_lag = asyncio.create_task(self.latencies.measure_loop_lag())
        self._trimmer = asyncio.create_task(trim_forever())

    async def _join_kafka(self) -> None:
        await self._ensure_topics(self.config)
        # One process per node builds the view; every worker reads it.
        if self.status_view is not None and (self.worker is None or self.worker.index == 0):
            self.status_view.start_building()
        self._start_groups(self.config.consumers)
        self._joined = True
        log.info("ready: %d consumer groups", len(self.groups))

    async def _watch_kafka(self) -> None:
        """Refuse calls at once while every broker is gone after start-up; resume when back.

        Found by tests/faults: with Kafka stopped after start-up, /readyz kept saying 200
        and every /rpc/call waited the whole write timeout for its errno 1. librdkafka
        reports "all brokers down"; a metadata request then tells a real outage from
        connections that merely idled out, so an idle node is not marked down.
        """
        while True:
            await asyncio.sleep(KAFKA_WATCH_SECONDS)
            producer = self.producer
            down_at = producer.all_brokers_down_at if producer is not None else None
            if producer is None or down_at is None or not self._joined:
                continue
            if await asyncio.to_thread(producer.probe, KAFKA_PROBE_TIMEOUT):
                if producer.all_brokers_down_at == down_at:  # else it went down again since
                    producer.all_brokers_down_at = None
                if self.kafka_lost:
                    log.warning(
                        "kafka at %s reachable again: taking calls", self.config.bootstrap_servers
                    )
                self.kafka_lost = False
            elif not self.kafka_lost:
                self.kafka_lost = True
                log.error(
                    "kafka at %s not reachable: refusing calls until it is back",
                    self.config.bootstrap_servers,
                )

    async def _ensure_topics(self, config: Config, attempts: int | None = None) -> bool:
        """Create missing topics, retrying while Kafka is unreachable; say if it worked."""
        attempt = 0
        while True:
            attempt += 1
            try:
                created = await asyncio.to_thread(ensure_topics, config, TOPIC_CHECK_TIMEOUT)
            except KafkaException as exc:
                log.error("kafka at %s: %s", config.bootstrap_servers, exc.args[0].str())
                if attempts is not None and attempt >= attempts:
                    return False
                await asyncio.sleep(TOPIC_RETRY_SECONDS)
                continue
            if created:
                log.info("created topics %s", ", ".join(created))
            return True

    def _start_groups(self, consumers: tuple[ConsumerConfig, ...] | list[ConsumerConfig]) -> None:
        assert self.producer is not None
        for consumer in consumers:
            counters = self.stats.group(consumer.topic, consumer.group_id)
            latencies = self.latencies.group(consumer.topic, consumer.group_id)
            group = ConsumerGroup(
                self.config,
                self._local(consumer),
                self.producer,
                counters,
                latencies,
                self.caller,
                self._is_first,
                self.status_log.group(consumer.group_id) if self.status_log else NO_TRAIL,
            )
            group.start(self._group_died)
            self.groups[consumer.key] = group

    async def _is_first(self, call: Call) -> bool:
        # A keyed call's index record is written within the ack timeout of the call's own.
        return await self.index.is_first(call, self.config.producer_ack_timeout_ms / 1000 + 1)

    async def reload(self) -> bool:
        """Apply a new config; a bad file changes nothing.

        A single process reads its file itself. A worker applies the supervisor's
        snapshot, which the supervisor has checked, and takes its reload counters.
        """
        async with self._reloading:
            source = self.config.source
            assert source is not None
            try:
                if self.worker is None:
                    _, loaded = read_reload(self.config, source)
                else:
                    loaded, counters = read_snapshot(self.worker.snapshot, source)
            except ConfigError as exc:
                log_rejected(exc)
                self.stats.node.reloadFailure += 1
                return False
            running, plan = self.config, plan_reload(self.config, loaded)
            if plan.config != running:
                try:
                    await self._apply(plan)
                except Exception:  # a bug: say so, rather than "Task exception never retrieved"
                    log.exception("reload failed while applying %s", source)
                    self.stats.node.reloadFailure += 1
                    return False
            if self.worker is None:
                log_reloaded(source, running, loaded, plan)  # at the new log level
                self.stats.node.reloadSuccess += 1
            else:
                self.stats.node = counters
            return True

    async def _apply(self, plan: ReloadPlan) -> None:
        config = plan.config
        if self._logs is not None:
            self._logs.apply(config.log_level, config.log_directory, config.log_format)
        self.acl = Acl(config.acl)
        if self.status_log is not None:
            self.status_log.update(config)
        if plan.regroup_all:
            self._renew_clients(config)
        if not self._joined:  # still joining Kafka: join again, with the new config
            if plan.new_producer:  # the groups to come take self.producer as it is then
                await self._swap_producer(config)
            self.config = config
            await self._restart_bring_up()
            return
        timeout = config.shutdown_timeout_ms / 1000
        await asyncio.gather(*(self.groups.pop(key).stop(timeout) for key in plan.removed))
        if plan.new_producer:
            await self._swap_producer(config)
        self.config = config
        if plan.new_topics and not await self._ensure_topics(config, attempts=3):
            log.error(
                "reload: topics %s not confirmed; groups on them wait for them",
                ", ".join(plan.new_topics),
            )
        for consumer in plan.changed:
            self.groups[consumer.key].update(self._local(consumer))
        self._start_groups(plan.added)

    def _renew_clients(self, config: Config) -> None:
        """New client settings (rotated credentials, say) for the Kafka clients beside the
        groups and the producer: the results writer, the status view, and a new
        idempotency index, read afresh. The old index serves the lookups already waiting
        on it (each waits at most the ack timeout and 1 s) before it is closed: closing a
        client a lookup is using from another thread is not safe."""
        if self.status_log is not None:
            self.status_log.renew(config)
        if self.status_view is not None:
            self.status_view.renew(config)
        old, self.index = self.index, IdempotencyIndex(config)
        grace = config.producer_ack_timeout_ms / 1000 + 1
        retiring = asyncio.create_task(self._retire_index(old, grace))
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire_index(index: IdempotencyIndex, grace: float) -> None:
        try:
            await asyncio.sleep(grace)
        finally:  # at shutdown too, once cancelled: no lookup waits any more by then
            await index.close()

    def _group_died(self) -> None:
        """A group's poll loop died: this process would take calls it never delivers.
        Stop taking them, drain, and exit 1, so that it is started afresh."""
        log.error("a consumer group failed: draining, then exiting %d to start afresh", EXIT_FAILED)
        self.broken = True
        self.exit_code = EXIT_FAILED
        self.stop_requested.set()

    async def _swap_producer(self, config: Config) -> None:
        old, self.producer = self.producer, Producer(config)
        for group in self.groups.values():
            group.producer = self.producer
        if old is not None:
            await old.close(config.shutdown_timeout_ms / 1000)

    async def _restart_bring_up(self) -> None:
        if self._bring_up is not None and not self._bring_up.done():
            self._bring_up.cancel()
            await asyncio.gather(self._bring_up, return_exceptions=True)
        self._bring_up = asyncio.create_task(self._join_kafka())

    async def stop(self) -> None:
        """Drain in the order a call travels, all within one shutdown timeout.

        The listener stays open till the end: load balancers keep getting a 503 from
        /readyz and callers a clear errno 1, instead of refused connections.
        """
        timeout = self.config.shutdown_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def left() -> float:  # every step shares one deadline, so the stop time is bounded
            return max(0.0, deadline - loop.time())

        self.draining = True
        for task in (self._bring_up, self._kafka_watch, self._loop_lag, self._trimmer):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            await asyncio.wait_for(self.ingest.wait_idle(), left())
        except TimeoutError:
            log.error("shutdown: calls still waiting for Kafka after %.0f s", timeout)
        # Groups stop before the producer: a call failing now still needs its dead letter.
        await asyncio.gather(*(group.stop(left()) for group in self.groups.values()))
        if self.status_log is not None:
            await self.status_log.close(left())
        if self.producer is not None:
            await self.producer.close(left())
        for retiring in list(self._retiring):
            retiring.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.index.close()
        if self.status_view is not None:
            await asyncio.to_thread(self.status_view.close)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._publisher is not None:
            self._publisher.cancel()
            self.worker.board.publish(self.worker.index, self._snapshot())  # final figures
        log.info("stopped")


async def serve(
    config: Config, logs: Logging | None = None, worker: WorkerSlot | None = None
) -> int:
    """Run a node until SIGTERM or SIGINT; a second signal exits at once. SIGUSR1 reloads.

    A worker also drains when its supervisor dies (SUPERVISOR_GONE, however often it comes).
    """
    node = Node(config, logs, worker)
    loop = asyncio.get_running_loop()
    stop = node.stop_requested
    reloads: set[asyncio.Task[bool]] = set()

    def on_stop_signal(signum: int) -> None:
        if stop.is_set():
            # The log queue may never be flushed now, so say it on stderr directly.
            print(
                f"bigpipe: second {signal.Signals(signum).name}: exiting without draining",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_FORCED)
        log.info("%s: draining", signal.Signals(signum).name)
        stop.set()

    def on_reload_signal() -> None:
        if stop.is_set():  # a reload would race the drain, and the config ends with it
            log.info("SIGUSR1 while draining: ignored")
            return
        task = asyncio.create_task(node.reload())
        reloads.add(task)  # keep a reference until done, or the task may vanish
        task.add_done_callback(reloads.discard)

    def on_supervisor_gone() -> None:
        if not stop.is_set():
            log.warning("the supervisor is gone: draining")
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        take(loop, signum, on_stop_signal, signum)
    if worker is not None:  # see bigpipe.node.workers.die_with_parent
        loop.add_signal_handler(SUPERVISOR_GONE, on_supervisor_gone)
    await node.start()
    # Only now: a reload during start() began a second bring-up beside start()'s own.
    # SIGUSR1 stays blocked until then (bigpipe.node.signals), so one sent earlier waits.
    handle_reloads(loop, on_reload_signal)
    if worker is None:  # a worker's supervisor speaks for the node
        notify_ready()
    await stop.wait()
    await asyncio.gather(*reloads, return_exceptions=True)
    await node.stop()
    return node.exit_code
