"""Counters behind `/stats` and `/metrics`, in the original bigpipe's shape.

The counters live as long as the process, not as long as a config: a reload
keeps them, so a scraper never sees a counter go backwards. With several
worker processes, each publishes its Stats as a plain dict (`to_dict`) and a
node-wide view is their merge (`merged`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a supervisor keeps NodeCounters, and never loads the config's models
    from bigpipe.config import Config

OTHER_DESTINATIONS = "other"  # the destinations /stats and /metrics do not name
# Destinations /stats and /metrics name, the busiest by attempts; the rest are `other`.
DESTINATIONS_SHOWN = 10
DESTINATION_GAUGES = ("breakerState", "inFlight", "held")


@dataclass(slots=True)
class ServerCounters:
    # Field names are the original /stats keys, camelCase included.
    receivedCall: int = 0
    acceptedCall: int = 0
    overloadCall: int = 0


@dataclass(slots=True)
class ProducerCounters:
    deliverySuccess: int = 0
    deliveryFail: int = 0


@dataclass(slots=True)
class GroupCounters:
    handleMessage: int = 0
    invalidMessage: int = 0
    rpcTotal: int = 0  # calls finished, success or fail
    rpcSuccess: int = 0
    rpcFail: int = 0
    rpcRetries: int = 0  # attempts after the first
    attempts: int = 0  # requests sent, retries included
    deadLetter: int = 0
    deadLetterSkipped: int = 0  # calls whose dead letter Kafka refused for good (logged)
    duplicateSkipped: int = 0  # keyed calls not delivered: not the first of their key
    inFlight: int = 0  # a gauge: requests open to the downstream now
    held: int = 0  # a gauge: calls held for destinations that may not be called yet
    orderingHeld: int = 0  # a gauge: calls held behind an earlier call of their key
    circuitIsBreak: int = 0  # a gauge: 1 while any destination's breaker is in BREAK
    breakerState: int = 0  # a gauge: the worst destination's, 0 NORMAL, 1 BREAK, 2 RECOVER
    # Gauges: this member's share of the group's rateLimit and concurrency (bigpipe.delivery.budget)
    budgetRate: float = 0.0
    budgetConcurrency: int = 0
    lag: dict[str, int] = field(default_factory=dict)  # partition -> calls not yet committed
    expired: int = 0  # calls dead-lettered because their ttl ran out
    # Calls sent to wait in the delay topics because their destination may not be called
    # for longer than delayThreshold (open breaker, Retry-After), each time; `held`: shorter
    parked: int = 0
    # rung of the delay topics ("1s" … "1h") -> calls waiting in it: the due-time spread
    waiting: dict[str, int] = field(default_factory=dict)
    # partition -> "consuming" or "paused:<reason>", for every partition assigned here
    partitions: dict[str, str] = field(default_factory=dict)
    # The busiest destinations by attempts, the rest as "other": breakerState, inFlight,
    # held, attempts, latency (counts per LATENCY_BUCKETS bucket, +Inf last), latencySum.
    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def absorb(self, other: GroupCounters) -> None:
        """Add another worker's view of the same group."""
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.circuitIsBreak = max(self.circuitIsBreak, other.circuitIsBreak)
        self.breakerState = worst_state(self.breakerState, other.breakerState)
        for name, numbers in other.destinations.items():
            mine = self.destinations.get(name)
            self.destinations[name] = numbers if mine is None else _add_destination(mine, numbers)
        for partition, lag in other.lag.items():  # one owner per partition, bar a rebalance
            self.lag[partition] = max(lag, self.lag.get(partition, 0))
        self.partitions.update(other.partitions)
        for rung, count in other.waiting.items():  # each worker reads its own partitions
            self.waiting[rung] = self.waiting.get(rung, 0) + count


def worst_state(a: int, b: int) -> int:
    """Of two breaker states (0 NORMAL, 1 BREAK, 2 RECOVER), the one holding more calls."""
    return 1 if 1 in (a, b) else max(a, b)


def _add_destination(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two workers' numbers for one destination: states take the worst, the rest add up."""
    return {
        "breakerState": worst_state(a["breakerState"], b["breakerState"]),
        "inFlight": a["inFlight"] + b["inFlight"],
        "held": a["held"] + b["held"],
        "attempts": a["attempts"] + b["attempts"],
        "latency": [x + y for x, y in zip(a["latency"], b["latency"], strict=True)],
        "latencySum": a["latencySum"] + b["latencySum"],
    }


def busiest_destinations(destinations: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The DESTINATIONS_SHOWN busiest by attempts by name; the rest added up as `other`."""
    named = [name for name in destinations if name != OTHER_DESTINATIONS]
    named.sort(key=lambda name: destinations[name]["attempts"], reverse=True)
    shown = {name: destinations[name] for name in named[:DESTINATIONS_SHOWN]}
    rest = [destinations[name] for name in named[DESTINATIONS_SHOWN:]]
    if OTHER_DESTINATIONS in destinations:
        rest.append(destinations[OTHER_DESTINATIONS])
    if rest:
        shown[OTHER_DESTINATIONS] = functools.reduce(_add_destination, rest)
    return shown


_CLIENT_KEYS = ("rpcTotal", "rpcSuccess", "rpcFail", "rpcRetries")
# Across workers, counters and inFlight add up; breaker gauges take the worst; lag merges.
_SUMMED = tuple(
    f.name
    for f in fields(GroupCounters)
    if f.name
    not in ("circuitIsBreak", "breakerState", "lag", "partitions", "destinations", "waiting")
)


@dataclass(slots=True)
class NodeCounters:
    reloadSuccess: int = 0
    reloadFailure: int = 0  # a new config file was rejected; the old one kept running


@dataclass(slots=True)
class StatusCounters:
    """The call status (bigpipe.calls.status): steps not written, and how far the view lags."""

    statusDropped: int = 0  # steps Kafka did not take (fire-and-forget: the calls went on)
    # A gauge of the one process per node that builds the view: records in the results
    # topic it has not applied yet; -1 before it first knew.
    viewLag: int = -1


class Stats:
    def __init__(self) -> None:
        self.server = ServerCounters()
        self.node = NodeCounters()
        self.status = StatusCounters()
        self._producer: dict[str, ProducerCounters] = {}
        self._groups: dict[tuple[str, str], GroupCounters] = {}

    def producer(self, topic: str) -> ProducerCounters:
        # get() first: setdefault() would build a throwaway ProducerCounters on every call.
        counters = self._producer.get(topic)
        if counters is None:
            counters = self._producer[topic] = ProducerCounters()
        return counters

    def group(self, topic: str, group_id: str) -> GroupCounters:
        return self._groups.setdefault((topic, group_id), GroupCounters())

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": asdict(self.server),
            "node": asdict(self.node),
            "status": asdict(self.status),
            "producer": {topic: asdict(c) for topic, c in self._producer.items()},
            "groups": {f"{t}\t{g}": asdict(c) for (t, g), c in self._groups.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], counters_only: bool = False) -> Stats:
        """Rebuild Stats; `counters_only` drops gauges, for a worker taking over a slot."""
        stats = cls()
        stats.server = ServerCounters(**data["server"])
        stats.node = NodeCounters(**data["node"])
        stats.status = StatusCounters(**data.get("status", {}))
        if counters_only:
            stats.status.viewLag = -1
        stats._producer = {t: ProducerCounters(**c) for t, c in data["producer"].items()}
        for key, values in data["groups"].items():
            topic, group_id = key.split("\t")
            counters = GroupCounters(**values)
            if counters_only:
                counters.inFlight = counters.held = counters.orderingHeld = 0
                counters.circuitIsBreak = counters.breakerState = 0
                counters.budgetRate = counters.budgetConcurrency = 0
                counters.lag = {}
                counters.partitions = {}
                for numbers in counters.destinations.values():
                    numbers.update(dict.fromkeys(DESTINATION_GAUGES, 0))
            stats._groups[(topic, group_id)] = counters
        return stats

    @classmethod
    def merged(cls, parts: list[dict[str, Any]]) -> Stats:
        """One node-wide Stats from each worker's `to_dict()`."""
        total = cls()
        for part in map(cls.from_dict, parts):
            for name in ("receivedCall", "acceptedCall", "overloadCall"):
                setattr(
                    total.server, name, getattr(total.server, name) + getattr(part.server, name)
                )
            # Every worker reloads on the same signal: the node reloaded once, not N times.
            total.node.reloadSuccess = max(total.node.reloadSuccess, part.node.reloadSuccess)
            total.node.reloadFailure = max(total.node.reloadFailure, part.node.reloadFailure)
            total.status.statusDropped += part.status.statusDropped
            total.status.viewLag = max(total.status.viewLag, part.status.viewLag)  # one builds it
            for topic, counters in part._producer.items():
                mine = total.producer(topic)
                mine.deliverySuccess += counters.deliverySuccess
                mine.deliveryFail += counters.deliveryFail
            for (topic, group_id), counters in part._groups.items():
                total.group(topic, group_id).absorb(counters)
        for counters in total._groups.values():
            counters.destinations = busiest_destinations(counters.destinations)
        return total

    def snapshot(self, config: Config) -> dict[str, Any]:
        """The `/stats` data object, ordered as the config lists topics and groups."""
        consumer_stats = []
        client_stats: dict[str, dict[str, int]] = {}
        for consumer in config.consumers:
            counters = self.group(consumer.topic, consumer.group_id)
            consumer_stats.append(
                {"topic": consumer.topic, "groupId": consumer.group_id, **asdict(counters)}
            )
            _add_client(client_stats.setdefault(consumer.topic, _empty_client()), counters)
        return {
            "serverStats": asdict(self.server),
            "producerStats": {t.name: asdict(self.producer(t.name)) for t in config.topics},
            "consumerStats": consumer_stats,
            "clientStats": client_stats,
            "nodeStats": asdict(self.node),
            "statusStats": asdict(self.status),
        }


def _empty_client() -> dict[str, int]:
    return dict.fromkeys((*_CLIENT_KEYS, "circuitIsBreak"), 0)


def _add_client(total: dict[str, int], counters: GroupCounters) -> None:
    """clientStats is per topic in the original; groups of one topic add up."""
    for key in _CLIENT_KEYS:
        total[key] += getattr(counters, key)
    total["circuitIsBreak"] = max(total["circuitIsBreak"], counters.circuitIsBreak)
