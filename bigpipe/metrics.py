"""`/metrics`: the counters of `/stats` and more, in Prometheus' text format.

Counters are read at scrape time from the same Stats as `/stats`, so the two
never disagree. Latencies are histograms observed on the hot path; they are
exported as plain samples so that workers' histograms can be added up.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from bigpipe.config import Config
from bigpipe.stats import Stats

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
# A call may spend minutes in Bigpipe (a backlog, an open breaker, retries): longer buckets.
END_TO_END_BUCKETS = (*LATENCY_BUCKETS, 300.0, 900.0, 3600.0)
LOOP_LAG_INTERVAL_SECONDS = 0.1
# An event loop's lateness: a healthy one is well under a millisecond late.
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
HISTOGRAMS = {  # name: (help, labels, buckets)
    "bigpipe_ingest_seconds": (
        "From a /rpc/call request to Kafka's acknowledgement",
        ["topic"],
        LATENCY_BUCKETS,
    ),
    "bigpipe_attempt_seconds": (
        "One HTTP attempt: from sending the request to its status line, or its failure",
        ["topic", "group"],
        LATENCY_BUCKETS,
    ),
    "bigpipe_end_to_end_seconds": (
        "A call's time in Bigpipe: from its acceptance to delivered or dead-lettered",
        ["topic", "group"],
        END_TO_END_BUCKETS,
    ),
    "bigpipe_loop_lag_seconds": (
        "How late a worker's event loop ran a timer (checked every 100 ms): a stall that "
        "long held every request and call of that worker",
        [],
        LOOP_LAG_BUCKETS,
    ),
}
# (metric name, help, GroupCounters field) for the per-group counters.
GROUP_COUNTERS = (
    ("bigpipe_messages", "Records read from Kafka (handleMessage)", "handleMessage"),
    ("bigpipe_invalid_messages", "Records that are not a call envelope", "invalidMessage"),
    ("bigpipe_retries", "Attempts after the first (rpcRetries)", "rpcRetries"),
    ("bigpipe_attempts", "Requests sent to downstreams, retries included", "attempts"),
    ("bigpipe_dead_letters", "Calls written to the dead-letter topic", "deadLetter"),
    (
        "bigpipe_dead_letters_skipped",
        "Failed calls whose dead letter Kafka refused for good, even without its data",
        "deadLetterSkipped",
    ),
    ("bigpipe_expired", "Calls dead-lettered because their ttl ran out", "expired"),
    (
        "bigpipe_parked",
        "Calls sent to the delay topics because their destination may not be called for"
        " longer than delayThreshold, each time",
        "parked",
    ),
    (
        "bigpipe_duplicates_skipped",
        "Keyed calls not delivered: another call of the same idempotency key came first",
        "duplicateSkipped",
    ),
)
# (GroupCounters.destinations field, metric name, help) for the per-destination gauges.
DESTINATION_GAUGES = (
    ("breakerState", "bigpipe_destination_breaker_state", "0 NORMAL, 1 BREAK, 2 RECOVER"),
    ("inFlight", "bigpipe_destination_in_flight", "Requests open to this destination"),
    ("held", "bigpipe_destination_held", "Calls held until this destination may be called"),
)
# A histogram sample: [name with _bucket/_sum/_count, labels, value].
Sample = list[Any]


class LatencyHistogram:
    """One histogram series, observed on the event loop only, so without locks.

    prometheus_client's histograms take a lock for every observation: 1.45 against
    0.64 us here, and a delivered call makes two (its attempt and its whole stay).
    """

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: past the largest bound
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1  # le: bound included
        self._sum += seconds

    def samples(self, name: str, labels: dict[str, str]) -> list[Sample]:
        """As Prometheus writes a histogram: cumulative buckets, then count and sum."""
        samples = []
        for bound, total in zip(
            (*self._bounds, float("inf")), itertools.accumulate(self._counts), strict=True
        ):
            samples.append([f"{name}_bucket", {**labels, "le": floatToGoString(bound)}, total])
        samples.append([f"{name}_count", labels, sum(self._counts)])
        samples.append([f"{name}_sum", labels, self._sum])
        return samples


@dataclass(frozen=True, slots=True)
class GroupLatencies:
    """One consumer group's two delivery histograms, kept apart on purpose."""

    attempt: LatencyHistogram  # one HTTP attempt: what the downstream costs
    end_to_end: (
        LatencyHistogram  # acceptance to outcome: what the caller waits, Kafka and waits included
    )


class Latencies:
    """The histograms one process observes, by metric name and label values."""

    def __init__(self) -> None:
        self._series: dict[str, dict[tuple[str, ...], LatencyHistogram]] = {
            name: {} for name in HISTOGRAMS
        }

    def _child(self, name: str, *values: str) -> LatencyHistogram:
        series = self._series[name]
        child = series.get(values)
        if child is None:
            child = series[values] = LatencyHistogram(HISTOGRAMS[name][2])
        return child

    def group(self, topic: str, group_id: str) -> GroupLatencies:
        return GroupLatencies(
            self._child("bigpipe_attempt_seconds", topic, group_id),
            self._child("bigpipe_end_to_end_seconds", topic, group_id),
        )

    def ingest_child(self, topic: str) -> LatencyHistogram:
        return self._child("bigpipe_ingest_seconds", topic)

    async def measure_loop_lag(self) -> None:
        """Forever: how late the loop runs a timer. A blocking call, a GC pause or a
        burst of callbacks delays every request of the process by as much; this is the
        figure that tells such stalls from a slow broker in the ingest latency's tail."""
        loop = asyncio.get_running_loop()
        lag = self._child("bigpipe_loop_lag_seconds")
        while True:
            due = loop.time() + LOOP_LAG_INTERVAL_SECONDS
            await asyncio.sleep(LOOP_LAG_INTERVAL_SECONDS)
            lag.observe(max(0.0, loop.time() - due))

    def samples(self) -> list[Sample]:
        return [
            sample
            for name, series in self._series.items()
            for values, child in series.items()
            for sample in child.samples(name, dict(zip(HISTOGRAMS[name][1], values, strict=True)))
        ]


def merge_samples(parts: Iterable[list[Sample]]) -> list[Sample]:
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for name, labels, value in (sample for part in parts for sample in part):
        key = (name, tuple(sorted(labels.items())))
        totals[key] = totals.get(key, 0.0) + value
    return [[name, dict(labels), value] for (name, labels), value in totals.items()]


def render(config: Config, stats: Stats, ready: bool, latencies: list[Sample]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(config, stats, ready))
    registry.register(_HistogramCollector(latencies))
    return generate_latest(registry)


class _HistogramCollector(Collector):
    def __init__(self, samples: list[Sample]) -> None:
        self._samples = samples

    def collect(self) -> Iterator[Metric]:
        for name, (help_text, label_names, _) in HISTOGRAMS.items():
            series: dict[tuple[str, ...], dict[str, Any]] = {}
            for sample_name, labels, value in self._samples:
                if not sample_name.startswith(name):
                    continue
                key = tuple(labels[label] for label in label_names)
                entry = series.setdefault(key, {"buckets": {}, "sum": 0.0})
                if sample_name.endswith("_bucket"):
                    entry["buckets"][labels["le"]] = value
                elif sample_name.endswith("_sum"):
                    entry["sum"] = value
            family = HistogramMetricFamily(name, help_text, labels=label_names)
            for key, entry in series.items():
                buckets = sorted(entry["buckets"].items(), key=lambda b: float(b[0]))
                family.add_metric(list(key), buckets, entry["sum"])
            yield family


class _StatsCollector(Collector):
    def __init__(self, config: Config, stats: Stats, ready: bool) -> None:
        self._config = config
        self._stats = stats
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        yield from self._server()
        yield from self._groups()

    def _server(self) -> Iterator[Metric]:
        stats = self._stats
        for name, help_text, value in (
            ("bigpipe_calls_received", "Requests to /rpc/call", stats.server.receivedCall),
            ("bigpipe_calls_accepted", "Calls answered errno 0", stats.server.acceptedCall),
            ("bigpipe_calls_overloaded", "Calls refused as overloaded", stats.server.overloadCall),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        writes = CounterMetricFamily(
            "bigpipe_kafka_writes", "Call writes to Kafka", labels=["topic", "result"]
        )
        for topic in self._config.topics:
            counters = stats.producer(topic.name)
            writes.add_metric([topic.name, "success"], counters.deliverySuccess)
            writes.add_metric([topic.name, "fail"], counters.deliveryFail)
        yield writes
        reloads = CounterMetricFamily("bigpipe_reloads", "Config reloads", labels=["result"])
        reloads.add_metric(["success"], stats.node.reloadSuccess)
        reloads.add_metric(["failure"], stats.node.reloadFailure)
        yield reloads
        yield GaugeMetricFamily(
            "bigpipe_ready", "1 when the node takes calls", value=int(self._ready)
        )
        yield CounterMetricFamily(
            "bigpipe_status_dropped",
            "Steps of calls not written to the results topic (the calls went on)",
            value=stats.status.statusDropped,
        )
        yield GaugeMetricFamily(
            "bigpipe_status_view_lag",
            "Results-topic records this node's status view has not applied yet (-1: unknown)",
            value=stats.status.viewLag,
        )

    def _groups(self) -> Iterator[Metric]:
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
        held = GaugeMetricFamily(
            "bigpipe_held",
            "Calls held in memory until their destination may be called",
            labels=labels,
        )
        ordering_held = GaugeMetricFamily(
            "bigpipe_ordering_held",
            "Calls held in memory behind an earlier call of their key (ordering: key)",
            labels=labels,
        )
        breaker = GaugeMetricFamily(
            "bigpipe_breaker_state",
            "The worst destination's breaker: 0 NORMAL, 1 BREAK, 2 RECOVER",
            labels=labels,
        )
        budget = {
            limit: GaugeMetricFamily(
                f"bigpipe_budget_{limit}",
                f"This node's share of the group's {key} (the group's budget)",
                labels=labels,
            )
            for limit, key in (("rate", "rateLimit"), ("concurrency", "concurrency"))
        }
        lag = GaugeMetricFamily(
            "bigpipe_consumer_lag",
            "Calls in Kafka not yet committed",
            labels=[*labels, "partition"],
        )
        waiting = GaugeMetricFamily(
            "bigpipe_waiting",
            "Calls waiting in the group's delay topics, by rung: the spread of their due times",
            labels=[*labels, "rung"],
        )
        states = GaugeMetricFamily(
            "bigpipe_partition_state",
            "1 for each assigned partition's state: consuming, paused:held, paused:ordering,"
            " paused:buffer",
            labels=[*labels, "partition", "state"],
        )
        for consumer in self._config.consumers:
            key = [consumer.topic, consumer.group_id]
            group = self._stats.group(consumer.topic, consumer.group_id)
            for name, _, field in GROUP_COUNTERS:
                counters[name].add_metric(key, getattr(group, field))
            finished.add_metric([*key, "success"], group.rpcSuccess)
            finished.add_metric([*key, "fail"], group.rpcFail)
            in_flight.add_metric(key, group.inFlight)
            held.add_metric(key, group.held)
            ordering_held.add_metric(key, group.orderingHeld)
            breaker.add_metric(key, group.breakerState)
            budget["rate"].add_metric(key, group.budgetRate)
            budget["concurrency"].add_metric(key, group.budgetConcurrency)
            for partition, value in sorted(group.lag.items(), key=lambda item: int(item[0])):
                lag.add_metric([*key, partition], value)
            for partition, state in group.partitions.items():
                states.add_metric([*key, partition, state], 1)
            for rung, count in group.waiting.items():
                waiting.add_metric([*key, rung], count)
        yield from counters.values()
        yield from (finished, in_flight, held, ordering_held, breaker, *budget.values())
        yield from (lag, waiting, states)
        yield from self._destinations()

    def _destinations(self) -> Iterator[Metric]:
        """Per destination: the busiest DESTINATIONS_SHOWN by name, the rest as `other`."""
        labels = ["topic", "group", "destination"]
        gauges = {
            key: GaugeMetricFamily(name, help_text, labels=labels)
            for key, name, help_text in DESTINATION_GAUGES
        }
        latency = HistogramMetricFamily(
            "bigpipe_destination_attempt_seconds",
            "One HTTP attempt to this destination, as bigpipe_attempt_seconds",
            labels=labels,
        )
        for consumer in self._config.consumers:
            group = self._stats.group(consumer.topic, consumer.group_id)
            for name, numbers in group.destinations.items():
                key = [consumer.topic, consumer.group_id, name]
                for field, family in gauges.items():
                    family.add_metric(key, numbers[field])
                latency.add_metric(key, _cumulative(numbers["latency"]), numbers["latencySum"])
        yield from gauges.values()
        yield latency


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (LATENCY_BUCKETS, then +Inf) as Prometheus' cumulative buckets."""
    bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
    return list(zip(bounds, itertools.accumulate(counts), strict=True))
