"""`/metrics`: the counters of `/stats` and more, in Prometheus' text format.

Counters are read from the same Stats object as `/stats` at scrape time, so
the two never disagree. Latencies are histograms observed on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bigpipe.breaker import BREAK, RECOVER

if TYPE_CHECKING:
    from bigpipe.app import Node

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BREAKER_VALUES = {BREAK: 1, RECOVER: 2}  # NORMAL, and no breaker at all, are 0

# (metric name, help, GroupCounters field) for the per-group counters.
GROUP_COUNTERS = (
    ("bigpipe_messages", "Records read from Kafka (handleMessage)", "handleMessage"),
    ("bigpipe_invalid_messages", "Records that are not a call envelope", "invalidMessage"),
    ("bigpipe_retries", "Attempts after the first (rpcRetries)", "rpcRetries"),
    ("bigpipe_attempts", "Requests sent to downstreams, retries included", "attempts"),
    ("bigpipe_dead_letters", "Calls written to the dead-letter topic", "deadLetter"),
)


class Metrics:
    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.ingest_seconds = Histogram(
            "bigpipe_ingest_seconds",
            "From a /rpc/call request to Kafka's acknowledgement",
            ["topic"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.delivery_seconds = Histogram(
            "bigpipe_delivery_seconds",
            "From a call's first attempt to its end: delivered or dead-lettered",
            ["topic", "group"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.registry.register(_NodeCollector(node))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        yield from self._server()
        yield from self._groups()

    def _server(self) -> Iterator[Metric]:
        node, stats = self._node, self._node.stats
        for name, help_text, value in (
            ("bigpipe_calls_received", "Requests to /rpc/call", stats.server.receivedCall),
            ("bigpipe_calls_accepted", "Calls answered errno 0", stats.server.acceptedCall),
            ("bigpipe_calls_overloaded", "Calls refused as overloaded", stats.server.overloadCall),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        writes = CounterMetricFamily(
            "bigpipe_kafka_writes", "Call writes to Kafka", labels=["topic", "result"]
        )
        for topic in node.config.topics:
            counters = stats.producer(topic.name)
            writes.add_metric([topic.name, "success"], counters.deliverySuccess)
            writes.add_metric([topic.name, "fail"], counters.deliveryFail)
        yield writes
        reloads = CounterMetricFamily("bigpipe_reloads", "Config reloads", labels=["result"])
        reloads.add_metric(["success"], stats.node.reloadSuccess)
        reloads.add_metric(["failure"], stats.node.reloadFailure)
        yield reloads
        yield GaugeMetricFamily(
            "bigpipe_ready", "1 when the node takes calls", value=int(node.ready)
        )

    def _groups(self) -> Iterator[Metric]:
        node = self._node
        labels = ["topic", "group"]
        counters = {
            name: CounterMetricFamily(name, help_text, labels=labels)
            for name, help_text, _ in GROUP_COUNTERS
        }
        finished = CounterMetricFamily(
            "bigpipe_calls_finished",
            "Calls delivered (success) or dead-lettered (fail)",
            labels=[*labels, "result"],
        )
        in_flight = GaugeMetricFamily(
            "bigpipe_in_flight", "Requests open to downstreams", labels=labels
        )
        breaker = GaugeMetricFamily(
            "bigpipe_breaker_state", "Circuit breaker: 0 NORMAL, 1 BREAK, 2 RECOVER", labels=labels
        )
        lag = GaugeMetricFamily(
            "bigpipe_consumer_lag",
            "Calls in Kafka not yet committed",
            labels=[*labels, "partition"],
        )
        for consumer in node.config.consumers:
            key = [consumer.topic, consumer.group_id]
            group_stats = node.stats.group(consumer.topic, consumer.group_id)
            for name, _, field in GROUP_COUNTERS:
                counters[name].add_metric(key, getattr(group_stats, field))
            finished.add_metric([*key, "success"], group_stats.rpcSuccess)
            finished.add_metric([*key, "fail"], group_stats.rpcFail)
            in_flight.add_metric(key, group_stats.inFlight)
            group = node.groups.get(consumer.key)
            state = group.breaker_state if group is not None else None
            breaker.add_metric(key, BREAKER_VALUES.get(state, 0))
            for partition, value in sorted(group.lag.items() if group is not None else []):
                lag.add_metric([*key, str(partition)], value)
        yield from counters.values()
        yield from (finished, in_flight, breaker, lag)
