"""What a new config means for a running node: may a SIGUSR1 reload take it, and the plan.

Like the original, `log.*` and `kafka.*` keys reload and `http.server.*` keys
need a restart; unlike it, `kafka.bootstrap.servers` needs one too (see
`refusals`). A reload changes only what changed: a group whose limits changed
keeps its Kafka consumer (no rebalance), and untouched groups are not touched
at all. The log says which keys changed, never their values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigpipe.config import (
    AclEntry,
    Config,
    ConfigError,
    ConsumerConfig,
    TopicConfig,
    read_config_file,
)
from bigpipe.declare import Reload, keys_of
from bigpipe.kafka import wanted_topics
from bigpipe.node.preflight import parse_checked

log = logging.getLogger(__name__)
# Config fields that need a restart (http.server.*), by the key an operator knows them by.
RESTART_FIELDS = keys_of(Config, Reload.RESTART)
# Not bootstrap_servers: a reload that changes it is refused (see refusals).
PRODUCER_FIELDS = (
    "kafka_client_config",
    "producer_retries",
    "producer_ack_timeout_ms",
)


@dataclass
class ReloadPlan:
    config: Config  # the config to run: the new one, with the running http.server.* values
    needs_restart: list[str] = field(default_factory=list)  # http.server.* keys that changed
    new_producer: bool = False
    regroup_all: bool = False  # client settings changed: every group leaves and joins anew
    new_topics: list[str] = field(default_factory=list)  # call, dead-letter, delay topics to create
    removed: list[tuple[str, str]] = field(default_factory=list)
    added: list[ConsumerConfig] = field(default_factory=list)
    changed: list[ConsumerConfig] = field(default_factory=list)


def plan_reload(running: Config, loaded: Config) -> ReloadPlan:
    http_changes = [
        key
        for name, key in RESTART_FIELDS.items()
        if getattr(running, name) != getattr(loaded, name)
    ]
    config = loaded.model_copy(update={name: getattr(running, name) for name in RESTART_FIELDS})
    plan = ReloadPlan(config, needs_restart=http_changes)
    plan.new_producer = any(getattr(running, f) != getattr(config, f) for f in PRODUCER_FIELDS)
    # New client settings (credentials, say) on the same cluster: every group rejoins.
    # (A new cluster is refused: see refusals.)
    plan.regroup_all = running.kafka_client_config != config.kafka_client_config
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


# ---------------------------------------------------------------- checking a new file
def refusals(running: Config, loaded: Config) -> list[str]:
    """Changes a reload cannot make: the whole file is then refused, the old config kept."""
    if loaded.bootstrap_servers != running.bootstrap_servers:
        # Consumers on a new cluster would leave the old one's undelivered calls behind.
        return [
            f"kafka.bootstrap.servers: changed from {running.bootstrap_servers!r} to "
            f"{loaded.bootstrap_servers!r}; another Kafka cluster needs a restart, once the "
            "old one's calls are delivered"
        ]
    return []


def check_reload(running: Config, raw: Any, source: Path) -> Config:
    """Validate a new file's JSON for a running node; ConfigError lists every problem."""
    loaded = parse_checked(raw, source)
    if problems := refusals(running, loaded):
        raise ConfigError(problems)
    return loaded


def read_reload(running: Config, source: Path) -> tuple[Any, Config]:
    """The operator's file, read anew and checked for a running node: its JSON and its
    Config. ConfigError lists every problem; see log_rejected."""
    raw = read_config_file(source)
    return raw, check_reload(running, raw, source)


def log_rejected(exc: ConfigError) -> None:
    for problem in exc.problems:
        log.error("reload rejected, old config kept: %s", problem)


def with_running_http(raw: dict[str, Any], running_raw: dict[str, Any]) -> dict[str, Any]:
    """A new file's JSON with the running http.server.* values, which need a restart."""
    restart = set(RESTART_FIELDS.values())
    kept = {key: value for key, value in raw.items() if key not in restart}
    kept.update((k, v) for k, v in running_raw.items() if k in restart)
    return kept


def log_reloaded(source: Path, running: Config, loaded: Config, plan: ReloadPlan) -> None:
    for key in plan.needs_restart:
        log.warning("reload: %s changed; it takes effect after a restart", key)
    changed = changed_keys(running, loaded)
    log.info("reloaded %s: %s", source, "changed " + ", ".join(changed) if changed else "no change")


# ---------------------------------------------------------------- what changed, by key
# Config fields by the key an operator knows them by. Only key names are logged, never
# values: a changed secret shows as `kafka.producer.acl[name].secret`, and nothing more.
LISTS = ("topics", "acl", "consumers", "kafka_client_config")  # logged entry by entry
TOP_KEYS = {name: key for name, key in keys_of(Config).items() if name not in LISTS}
TOPIC_KEYS = keys_of(TopicConfig)
ACL_KEYS = {**keys_of(AclEntry), "secret_sha256": "secret"}  # the digest of either key
CONSUMER_KEYS = keys_of(ConsumerConfig)


def changed_keys(running: Config, loaded: Config) -> list[str]:
    """The keys whose values differ: `key`, `list[id].field`, `+list[id]` or `-list[id]`."""
    keys = [
        key for name, key in TOP_KEYS.items() if getattr(running, name) != getattr(loaded, name)
    ]
    before, after = running.kafka_client_config, loaded.kafka_client_config
    keys += [
        f"kafka.client.config.{name}"
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    ]
    keys += _changed_entries("kafka.topics", running.topics, loaded.topics, _topic_id, TOPIC_KEYS)
    keys += _changed_entries("kafka.producer.acl", running.acl, loaded.acl, _acl_id, ACL_KEYS)
    keys += _changed_entries(
        "kafka.consumer.list", running.consumers, loaded.consumers, _consumer_id, CONSUMER_KEYS
    )
    return keys


def _topic_id(topic: TopicConfig) -> str:
    return topic.name


def _acl_id(entry: AclEntry) -> str:
    return entry.name


def _consumer_id(consumer: ConsumerConfig) -> str:
    return f"{consumer.topic}/{consumer.group_id}"


def _changed_entries(
    key: str,
    running: Sequence[Any],
    loaded: Sequence[Any],
    identify: Callable[[Any], str],
    fields: dict[str, str],
) -> list[str]:
    before = {identify(entry): entry for entry in running}
    after = {identify(entry): entry for entry in loaded}
    keys = [f"-{key}[{name}]" for name in before if name not in after]
    keys += [f"+{key}[{name}]" for name in after if name not in before]
    for name, entry in after.items():
        old = before.get(name)
        if old is not None and old != entry:
            keys += [
                f"{key}[{name}].{field}"
                for attribute, field in fields.items()
                if getattr(old, attribute) != getattr(entry, attribute)
            ]
    return keys
