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

from aiohttp import web
from confluent_kafka import KafkaException

from bigpipe.acl import Acl
from bigpipe.config import Config
from bigpipe.consumer import ConsumerGroup
from bigpipe.kafka import ensure_topics
from bigpipe.producer import Producer
from bigpipe.server import build_app
from bigpipe.stats import Stats

log = logging.getLogger(__name__)

EXIT_FORCED = 1
TOPIC_CHECK_TIMEOUT = 10.0
TOPIC_RETRY_SECONDS = 2.0


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.acl = Acl(config.acl)
        self.producer: Producer | None = None
        self.groups: list[ConsumerGroup] = []
        self.ready = False
        self.draining = False
        self._runner: web.AppRunner | None = None
        self._bring_up: asyncio.Task[None] | None = None

    def not_ready_reason(self) -> str:
        if self.draining:
            return "shutting down; send the call to another node"
        return "kafka not reachable yet; retry later"

    async def start(self) -> None:
        """Listen first, so the node answers (503) even while Kafka is away."""
        self.producer = Producer(self.config)
        self._runner = web.AppRunner(
            build_app(self),
            access_log=None,
            keepalive_timeout=self.config.read_timeout_ms / 1000,
            shutdown_timeout=self.config.shutdown_timeout_ms / 1000,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.http_host, self.config.http_port, reuse_address=True
        )
        await site.start()
        log.info("listening on %s:%d", self.config.http_host, self.config.http_port)
        self._bring_up = asyncio.create_task(self._join_kafka())

    async def _join_kafka(self) -> None:
        while True:
            try:
                created = await asyncio.to_thread(ensure_topics, self.config, TOPIC_CHECK_TIMEOUT)
                break
            except KafkaException as exc:
                log.error(
                    "kafka at %s: %s; retrying in %.0f s",
                    self.config.bootstrap_servers,
                    exc.args[0].str(),
                    TOPIC_RETRY_SECONDS,
                )
                await asyncio.sleep(TOPIC_RETRY_SECONDS)
        if created:
            log.info("created topics %s", ", ".join(created))
        assert self.producer is not None
        for consumer in self.config.consumers:
            group = ConsumerGroup(
                self.config,
                consumer,
                self.producer,
                self.stats.group(consumer.topic, consumer.group_id),
            )
            group.start()
            self.groups.append(group)
        self.ready = True
        log.info("ready: %d consumer groups", len(self.groups))

    async def stop(self) -> None:
        """Drain in the order a call travels; bounded by http.server.shutdown.timeout."""
        timeout = self.config.shutdown_timeout_ms / 1000
        self.ready = False
        self.draining = True
        if self._bring_up is not None and not self._bring_up.done():
            self._bring_up.cancel()
            await asyncio.gather(self._bring_up, return_exceptions=True)
        if self._runner is not None:
            # Closes the listener, then lets requests waiting on Kafka finish.
            await self._runner.cleanup()
        # Groups stop before the producer: a call failing now still needs its dead letter.
        await asyncio.gather(*(group.stop(timeout) for group in self.groups))
        if self.producer is not None:
            await self.producer.close(timeout)
        log.info("stopped")


async def serve(config: Config) -> int:
    """Run a node until SIGTERM or SIGINT; a second signal exits at once."""
    node = Node(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
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

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await node.start()
    await stop.wait()
    await node.stop()
    return 0
