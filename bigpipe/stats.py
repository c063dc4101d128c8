"""Counters behind `/stats`, in the original bigpipe's shape.

The counters live as long as the process, not as long as a config: a reload
keeps them, so a scraper never sees a counter go backwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bigpipe.config import Config


@dataclass(slots=True)
class ServerCounters:
    # Field names are the original /stats keys, camelCase included.
    receivedCall: int = 0  # names are the original /stats keys
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
    inFlight: int = 0  # a gauge: requests open to the downstream now
    circuitIsBreak: int = 0  # a gauge: 1 while the breaker holds calls


_CLIENT_KEYS = ("rpcTotal", "rpcSuccess", "rpcFail", "rpcRetries")


@dataclass(slots=True)
class NodeCounters:
    reloadSuccess: int = 0
    reloadFailure: int = 0  # a new config file was rejected; the old one kept running


class Stats:
    def __init__(self) -> None:
        self.server = ServerCounters()
        self.node = NodeCounters()
        self._producer: dict[str, ProducerCounters] = {}
        self._groups: dict[tuple[str, str], GroupCounters] = {}

    def producer(self, topic: str) -> ProducerCounters:
        return self._producer.setdefault(topic, ProducerCounters())

    def group(self, topic: str, group_id: str) -> GroupCounters:
        return self._groups.setdefault((topic, group_id), GroupCounters())

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
        }


def _empty_client() -> dict[str, int]:
    return dict.fromkeys((*_CLIENT_KEYS, "circuitIsBreak"), 0)


def _add_client(total: dict[str, int], counters: GroupCounters) -> None:
    """clientStats is per topic in the original; groups of one topic add up."""
    for key in _CLIENT_KEYS:
        total[key] += getattr(counters, key)
    total["circuitIsBreak"] = max(total["circuitIsBreak"], counters.circuitIsBreak)
