"""What a new config means for a running node: the plan of a SIGUSR1 reload. Pure.

Like the original, every `log.*` and `kafka.*` key reloads and `http.server.*`
keys need a restart. Unlike it, a reload changes only what changed: a group
whose limits changed keeps its Kafka consumer (no rebalance), and untouched
groups are not touched at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bigpipe.config import Config, ConsumerConfig
from bigpipe.kafka import wanted_topics

# Config fields read from http.server.* keys, with the key an operator knows them by.
HTTP_FIELDS = {
    "http_host": "http.server.host",
    "http_port": "http.server.port",
    "channel_size": "http.server.handler.channel.size",
    "read_timeout_ms": "http.server.read.timeout",
    "write_timeout_ms": "http.server.write.timeout",
    "body_limit": "http.server.body.limit",
    "shutdown_timeout_ms": "http.server.shutdown.timeout",
    "tls_cert": "http.server.tls.cert",
    "tls_key": "http.server.tls.key",
    "workers": "http.server.workers",
}
PRODUCER_FIELDS = (
    "bootstrap_servers",
    "kafka_client_config",
    "producer_retries",
    "producer_ack_timeout_ms",
)


@dataclass
class ReloadPlan:
    config: Config  # the config to run: the new one, with the running http.server.* values
    needs_restart: list[str] = field(default_factory=list)  # http.server.* keys that changed
    new_producer: bool = False
    regroup_all: bool = False  # the cluster changed: every group leaves and joins anew
    new_topics: list[str] = field(default_factory=list)  # call or dead-letter topics to create
    removed: list[tuple[str, str]] = field(default_factory=list)
    added: list[ConsumerConfig] = field(default_factory=list)
    changed: list[ConsumerConfig] = field(default_factory=list)


def plan_reload(running: Config, loaded: Config) -> ReloadPlan:
    http_changes = [
        key for name, key in HTTP_FIELDS.items() if getattr(running, name) != getattr(loaded, name)
    ]
    config = dataclasses.replace(loaded, **{name: getattr(running, name) for name in HTTP_FIELDS})
    plan = ReloadPlan(config, needs_restart=http_changes)
    plan.new_producer = any(getattr(running, f) != getattr(config, f) for f in PRODUCER_FIELDS)
    plan.regroup_all = (running.bootstrap_servers, running.kafka_client_config) != (
        config.bootstrap_servers,
        config.kafka_client_config,
    )
    known = set() if plan.regroup_all else {t.name for t in wanted_topics(running)}
    plan.new_topics = [t.name for t in wanted_topics(config) if t.name not in known]
    before = {c.key: c for c in running.consumers}
    after = {c.key: c for c in config.consumers}
    if plan.regroup_all:
        plan.removed, plan.added = list(before), list(after.values())
        return plan
    plan.removed = [key for key in before if key not in after]
    plan.added = [c for key, c in after.items() if key not in before]
    plan.changed = [c for key, c in after.items() if key in before and before[key] != c]
    return plan
