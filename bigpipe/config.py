"""The config, the original bigpipe's flat JSON object: every key declared once.

Each key is declared below (bigpipe.declare.key): its JSON name, type, default,
bounds, one line of documentation and what a SIGUSR1 reload does with it.
pydantic validates a file against the declarations, and bigpipe.config_docs
renders them as the JSON Schema (config/bigpipe.schema.json) and as the README's
key tables. A rule within one entry is a validator of its model. Rules across
entries read the document itself, so that they are reported together with every
other problem: one line each, naming the key path, what is wrong and how to fix
it, the whole file at once.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import orjson
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError
from yarl import URL

from bigpipe.calls.signing import Signer, key_of
from bigpipe.config_error import ConfigError
from bigpipe.declare import (
    READING_A_FILE,
    Flag,
    Int,
    Invalid,
    Maybe,
    NonEmpty,
    Number,
    Reload,
    Section,
    Text,
    check,
    json_type,
    key,
    problem,
    rule,
)
from bigpipe.ingest.destinations import AllowRule, parse_rule

DAY_MS = 86_400_000
MAX_IDEMPOTENCY_WINDOW_MS = 7 * DAY_MS
DEFAULT_MAX_DELAY_MS = 7 * DAY_MS
DEFAULT_STATUS_RETENTION_MS = 7 * DAY_MS
TOPIC_NAME = r"^(?!\.\.?$)[A-Za-z0-9._-]{1,249}$"  # Kafka's rule; "." and ".." are no names
# librdkafka settings Bigpipe sets itself: letting them through would break its guarantees.
# (message.max.bytes follows http.server.body.limit: kafka.record_size_limit.)
# The others Bigpipe sets (bigpipe.kafka) are its defaults: an operator's value wins.
OWNED_KAFKA_SETTINGS = frozenset(
    """bootstrap.servers group.id client.id enable.auto.commit enable.auto.offset.store acks
    enable.idempotence auto.offset.reset partition.assignment.strategy message.timeout.ms
    message.send.max.retries message.max.bytes isolation.level transactional.id group.protocol
    delivery.report.only.error enable.partition.eof max.poll.interval.ms
    """.split()  # noqa: SIM905
)


# ---------------------------------------------------------------- Bigpipe's own types
def _digest(value: Any) -> bytes:
    if isinstance(value, bytes):  # built in Python: a digest already (b"" matches no secret)
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise PydanticCustomError("invalid", "must be 64 hex digits (sha256sum of the secret)")
    return bytes.fromhex(value)


def _signing_key(value: Any) -> bytes:
    """The key bytes of a `whsec_…` secret; the reason it is none never quotes it."""
    key = key_of(value) if isinstance(value, str) else None
    if key is None:
        raise PydanticCustomError("string_type", "")
    if isinstance(key, str):
        raise PydanticCustomError("invalid", "{reason}", {"reason": key})
    return key


def _origin(value: Any) -> AllowRule:
    rule = _destination(value)
    if rule.scheme is not None and rule.path not in ("", "/"):
        reason = (
            f"{rule.text!r} has a path; a destination is scheme, host and port, so give an origin"
            " like https://api.example.com:8443 or a host pattern"
        )
        raise PydanticCustomError("invalid", "{reason}", {"reason": reason})
    return rule


def _destination(value: Any) -> AllowRule:
    if not isinstance(value, str | AllowRule):
        raise PydanticCustomError("string_type", "")
    rule = value if isinstance(value, AllowRule) else parse_rule(value)
    if isinstance(rule, str):
        raise PydanticCustomError("invalid", "{reason}", {"reason": rule})
    return rule


TopicName = Annotated[
    Text,
    Field(pattern=TOPIC_NAME),
    Invalid("{value} is not a valid Kafka topic name; use 1-249 of [A-Za-z0-9._-]"),
]
Status = Annotated[Int, Field(ge=400, le=499)]
Digest = Annotated[
    bytes,
    PlainValidator(_digest),
    WithJsonSchema({"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}),
]
SigningKey = Annotated[
    bytes, PlainValidator(_signing_key), WithJsonSchema({"type": "string", "pattern": "^whsec_"})
]
Destination = Annotated[AllowRule, PlainValidator(_destination), WithJsonSchema({"type": "string"})]
Origin = Annotated[AllowRule, PlainValidator(_origin), WithJsonSchema({"type": "string"})]
OWNED = "is set by Bigpipe itself; remove it"
Setting = Annotated[
    str,
    BeforeValidator(
        check(lambda name: None if name in OWNED_KAFKA_SETTINGS else name, "invalid", OWNED)
    ),
    WithJsonSchema({"type": "string", "not": {"enum": sorted(OWNED_KAFKA_SETTINGS)}}),
]
SCALAR = "must be a string, number or boolean"
SettingValue = Annotated[
    str | int | float | bool,  # bool is an int
    PlainValidator(
        check(
            lambda value: value if isinstance(value, str | int | float) else None, "invalid", SCALAR
        )
    ),
    WithJsonSchema({"type": ["string", "number", "boolean"]}),
]


# ---------------------------------------------------------------- the declarations
RESTART, REFUSED = Reload.RESTART, Reload.REFUSED


class TopicConfig(Section):
    name: TopicName = key("name", doc="topic name: 1-249 of `[A-Za-z0-9._-]`")
    partitions: Int = key("partitions", gt=0, doc="partitions, used when Bigpipe creates the topic")
    replication_factor: Int = key(
        "replicationFactor", 1, gt=0, doc="replicas, used when Bigpipe creates the topic"
    )
    min_insync_replicas: Maybe[Int] = key(
        "minInsyncReplicas",
        None,
        gt=0,
        default_doc="broker default",
        doc="`min.insync.replicas` of a topic Bigpipe creates; at most `replicationFactor`",
    )

    @model_validator(mode="after")
    def _writable(self) -> TopicConfig:
        # Kafka 4.3 creates such a topic, and even took acks=all writes on it here: the
        # promise of minInsyncReplicas would be silently broken, so refuse it up front.
        if (self.min_insync_replicas or 0) > self.replication_factor:
            raise rule(
                "minInsyncReplicas",
                f"must be at most replicationFactor ({self.replication_factor})",
            )
        return self


class SigningConfig(Section):
    secrets: tuple[SigningKey, ...] = key(
        "secrets",
        min_length=1,
        hint=', a list of "whsec_…" secrets',
        invalid="is empty; list at least one secret",
        doc="`whsec_` and the base64 of 24 to 64 random bytes each; one signature per secret",
    )


class AclEntry(Section):
    model_config = Section.model_config | ConfigDict(  # one of the two, for editors too
        json_schema_extra={"oneOf": [{"required": ["secret"]}, {"required": ["secret_sha256"]}]}
    )
    name: NonEmpty = key("name", doc="the caller's name, unique")
    secret: Maybe[Text] = key("secret", None, default_doc="one of the two", doc="its secret")
    secret_sha256: Maybe[Digest] = key(  # only the digest is kept: no secret sits in memory twice
        "secret_sha256",
        None,
        kind="hex string",
        default_doc="one of the two",
        doc='the secret\'s SHA-256 (`printf %s "$SECRET" | sha256sum`): the file need not hold it',
    )
    topic: Text = key("topic", doc="the topic this caller writes to; must be in `kafka.topics`")
    allow: tuple[Destination, ...] = key(
        "allow",
        (),
        default_doc="`[]` (any)",
        doc="destinations it may call: URL prefixes or host patterns (see below); others get 403",
    )
    deny_private: Flag = key(
        "denyPrivate", False, doc="refuse destinations that are not public (see below)"
    )
    idempotency_window_ms: Int = key(
        "idempotencyWindow",
        DAY_MS,
        ge=1000,
        le=MAX_IDEMPOTENCY_WINDOW_MS,
        unit="ms",
        invalid=f"must be 1000 to {MAX_IDEMPOTENCY_WINDOW_MS} ms (1 s to 7 days), got {{value}}",
        doc="how long its idempotency keys hold; see [Idempotency keys](#idempotency-keys)",
    )
    signer: Maybe[Annotated[SigningConfig, AfterValidator(lambda s: Signer(s.secrets))]] = key(
        "signing",
        None,
        default_doc="none",
        doc="sign its calls' deliveries: see [Signed deliveries](#signed-deliveries)",
    )

    @model_validator(mode="after")
    def _only_the_digest(self) -> AclEntry:  # one of the two: see _rules_across_entries
        if self.secret is None:
            return self
        digest = hashlib.sha256(self.secret.encode()).digest()
        return self._derive(secret=None, secret_sha256=digest)


class BreakerConfig(Section):
    break_period: Number = key(
        "breakPeriod", gt=0, unit="seconds", doc="least time the breaker stays in BREAK"
    )
    recover_period: Number = key(
        "recoverPeriod", gt=0, unit="seconds", doc="length of the ramp-up after BREAK"
    )
    win_size: Int = key("winSize", gt=0, doc="the health window, in one-second buckets")
    min_stats: Int = key(
        "minStats", ge=0, doc="below this many attempts in the window, it counts as healthy"
    )
    health_rate: Number = key(
        "healthRate", ge=0, le=1, doc="the window is healthy when successes / attempts ≥ this"
    )


class DestinationCaps(Section):
    """A destination's own caps, under its group's; None: only the group's apply."""

    concurrency: Maybe[Int] = key(
        "concurrency",
        None,
        gt=0,
        default_doc="none: only the group's",
        doc="most requests open at once to any one destination; at most the group's `concurrency`",
    )
    rate_limit: Maybe[Number] = key(
        "rateLimit",
        None,
        gt=0,
        default_doc="none: only the group's",
        doc="attempts per second to any one destination; at most the group's `rateLimit`",
    )

    @property
    def caps(self) -> DestinationCaps:
        return DestinationCaps(concurrency=self.concurrency, rate_limit=self.rate_limit)

    def share(self, workers: int) -> Self:
        """One of `workers` workers' part of these caps."""
        concurrency = self.concurrency and math.ceil(self.concurrency / workers)
        rate_limit = self.rate_limit and self.rate_limit / workers
        return self.model_copy(update={"concurrency": concurrency, "rate_limit": rate_limit})


class DestinationOverride(DestinationCaps):
    rule: Origin = key(
        "match", kind="string", doc="a host pattern or an origin (`https://host:8443`), no path"
    )


# Calls a group holds in memory for destinations that may not be called yet (an open
# breaker or Retry-After pause with at most delayThreshold left, their own caps), per node;
# past it the group pauses its partitions. Longer waits are parked in the delay topics.
DEFAULT_MAX_HELD = 1000


class DestinationConfig(DestinationCaps):
    """The per-destination shields of one group (`destination` in the config)."""

    max_held: Int = key(
        "maxHeld",
        DEFAULT_MAX_HELD,
        gt=0,
        doc="calls the group may hold in memory for their destination (short waits; longer"
        " ones wait in the delay topics) before it pauses",
    )
    overrides: tuple[DestinationOverride, ...] = key(
        "overrides", (), doc="caps of the destinations each matches, the first match applying"
    )

    def share(self, workers: int) -> Self:
        """One of `workers` workers' part, split as the group's own caps are."""
        max_held = math.ceil(self.max_held / workers)
        overrides = tuple(override.share(workers) for override in self.overrides)
        return (
            super().share(workers).model_copy(update={"max_held": max_held, "overrides": overrides})
        )

    def caps_for(self, url: URL) -> DestinationCaps:
        """The first override matching the destination of `url`, else the default caps."""
        return next((o.caps for o in self.overrides if o.rule.matches(url)), self.caps)


class ConsumerConfig(Section):
    topic: Text = key("topic", doc="the topic to deliver from; must be in `kafka.topics`")
    group_id: NonEmpty = key("groupId", doc="Kafka consumer group id; (topic, groupId) is unique")
    rate_limit: Number = key(
        "rateLimit",
        gt=0,
        doc="calls per second to the downstreams, retries included, for the whole group: every"
        " worker of every node together (see [The group's budget](#the-groups-budget))",
    )
    timeout_ms: Int = key(
        "timeout",
        gt=0,
        unit="ms",
        doc="per attempt: connect, send, receive the status line; the body gets as long again",
    )
    retries: Int = key("retries", ge=0, doc="extra attempts after the first")
    concurrency: Int = key(
        "concurrency", gt=0, doc="most calls in flight at once, for the whole group (as rateLimit)"
    )
    breaker: Maybe[BreakerConfig] = key(
        "circuitBreaker", None, default_doc="none", doc="optional, see below; one per destination"
    )
    dead_letter_topic: Maybe[TopicName] = key(
        "deadLetterTopic",
        None,
        default_doc="`<topic>.<groupId>.dlq`",
        doc="where calls that failed every attempt go (see below)",
    )
    backoff_base_ms: Int = key(
        "backoffBase", 200, gt=0, unit="ms", doc="first retry waits up to this long"
    )
    backoff_max_ms: Int = key(
        "backoffMax",
        30_000,
        gt=0,
        unit="ms",
        doc="cap on one retry's wait, a `Retry-After` included; at least `backoffBase`",
    )
    retry_status: frozenset[Status] = key(
        "retryStatus",
        frozenset({408, 429}),
        kind="list of 4xx ints",
        invalid="must list 4xx status codes (integers 400-499) to retry; 5xx are always retried",
        doc="4xx statuses that are retried; every 5xx is",
    )
    destination: DestinationConfig = key(
        "destination",
        DestinationConfig(),
        default_doc="no caps of its own, `maxHeld` 1000",
        doc="per-destination caps and the bound on held calls, see [below](#destination)",
    )
    adaptive_concurrency: Flag = key(
        "adaptiveConcurrency",
        False,
        doc="find each destination's concurrency from its latency, up to its cap (see"
        " [Adaptive concurrency](#adaptive-concurrency))",
    )
    delay_threshold_ms: Int = key(
        "delayThreshold",
        3_000,
        ge=1_000,
        le=60_000,
        unit="ms",
        doc="longer waits go to the delay topics: see [Calls that wait](#calls-that-wait)",
    )
    ttl_ms: Maybe[Int] = key(
        "ttl",
        None,
        gt=0,
        unit="ms",
        default_doc="none",
        doc="time to live of its calls with no `ttl_ms` of their own (see below)",
    )
    ordering: Maybe[Literal["key"]] = key(
        "ordering",
        None,
        kind="string",
        default_doc="none: unordered",
        doc='`"key"`: calls with one `partition_key` are delivered one at a time, in acceptance'
        " order (see [Per-key ordering](#per-key-ordering))",
    )
    max_buffered: Maybe[Int] = key(
        "maxBuffered",
        None,
        gt=0,
        default_doc="max(100, 4 × concurrency)",
        doc="calls read from Kafka and not yet finished; past it the group pauses (see below)",
    )

    @property
    def key(self) -> tuple[str, str]:
        return (self.topic, self.group_id)

    @model_validator(mode="after")
    def _rules_and_defaults(self) -> ConsumerConfig:
        dead_letter = self.dead_letter_topic or default_dead_letter_topic(self.topic, self.group_id)
        if dead_letter == self.topic:
            raise rule("deadLetterTopic", f"must differ from topic {self.topic!r}")
        if self.backoff_max_ms < self.backoff_base_ms:
            raise rule("backoffMax", f"must be >= backoffBase ({self.backoff_base_ms})")
        buffered = self.max_buffered or max(100, 4 * self.concurrency)
        return self._derive(dead_letter_topic=dead_letter, max_buffered=buffered)


def default_dead_letter_topic(topic: str, group_id: str) -> str:
    """One dead-letter topic per group, so one group's failures never mix with another's."""
    return f"{topic}.{group_id}.dlq"


class Config(Section):
    schema_ref: Maybe[Text] = key(
        "$schema",
        None,
        default_doc="none",
        doc='this file\'s JSON Schema, for editors (`"./bigpipe.schema.json"`); Bigpipe ignores it',
    )
    log_level: Int = key(
        "log.level", 4, ge=1, le=5, doc="1 FATAL, 2 ERROR, 3 WARNING, 4 INFO, 5 DEBUG"
    )
    log_directory: Text = key(
        "log.directory",
        "",
        doc='directory of hourly `bigpipe.YYYYMMDD_HH.log` files, kept 7 days; `""`, `"-"`: stderr',
    )
    log_format: Literal["text", "json"] = key(
        "log.format",
        "text",
        doc="`json`: one JSON object per line (see [Operating it](#operating-it))",
    )
    bootstrap_servers: NonEmpty = key(
        "kafka.bootstrap.servers",
        reload=REFUSED,
        hint=', e.g. "127.0.0.1:9092"',
        doc="comma-separated `host:port` list",
    )
    topics: tuple[TopicConfig, ...] = key(
        "kafka.topics",
        min_length=1,
        hint=", a list of {name, partitions}",
        invalid="is empty; list at least one {name, partitions}",
        doc="call topics: see below",
    )
    producer_retries: Int = key(
        "kafka.producer.retries",
        2,
        ge=0,
        doc="librdkafka's `message.send.max.retries` (at least 1: the producer is idempotent)",
    )
    producer_ack_timeout_ms: Int = key(
        "kafka.producer.ack.timeout",
        5000,
        gt=0,
        unit="ms",
        doc="how long Kafka has to acknowledge a write; after it the caller gets errno 1",
    )
    max_delay_ms: Int = key(
        "kafka.delay.max",
        DEFAULT_MAX_DELAY_MS,
        gt=0,
        unit="ms",
        doc="the largest `delay_ms` a `/rpc/call` may ask for; more is a 400 naming the field",
    )
    acl: tuple[AclEntry, ...] = key(
        "kafka.producer.acl", hint=", a list of {name, secret, topic}", doc="callers: see below"
    )
    consumers: tuple[ConsumerConfig, ...] = key(
        "kafka.consumer.list",
        hint=", a list of {topic, groupId, rateLimit, timeout, retries, concurrency}",
        doc="consumer groups: see below (may be empty)",
    )
    http_host: NonEmpty = key("http.server.host", "0.0.0.0", reload=RESTART, doc="listen address")
    http_port: Int = key(
        "http.server.port",
        ge=1,
        le=65535,
        reload=RESTART,
        doc="listen port (10086 in the examples)",
    )
    channel_size: Int = key(
        "http.server.handler.channel.size",
        10_000,
        gt=0,
        reload=RESTART,
        doc="calls that may wait for Kafka's acknowledgement at once (a keyed call from its"
        ' idempotency-index lookup on); beyond it, "overloaded"',
    )
    read_timeout_ms: Int = key(
        "http.server.read.timeout",
        5000,
        gt=0,
        unit="ms",
        reload=RESTART,
        doc="time to receive a request body; also the keep-alive idle timeout",
    )
    write_timeout_ms: Int = key(
        "http.server.write.timeout",
        5000,
        gt=0,
        unit="ms",
        reload=RESTART,
        doc="longest a `/rpc/call` waits for Kafka before it answers errno 1",
    )
    body_limit: Int = key(
        "http.server.body.limit",
        1 << 20,
        gt=0,
        unit="bytes",
        reload=RESTART,
        doc="largest `/rpc/call` body; larger ones get 413",
    )
    batch_max_calls: Int = key(
        "http.server.batch.calls",
        1000,
        gt=0,
        reload=RESTART,
        doc="most calls one `/rpc/calls` batch may hold; more is a 413 for the whole batch",
    )
    batch_body_limit: Int = key(
        "http.server.batch.body.limit",
        8 << 20,
        gt=0,
        unit="bytes",
        reload=RESTART,
        doc="largest `/rpc/calls` body; larger ones get 413 (each call in it is still held to"
        " `http.server.body.limit`)",
    )
    shutdown_timeout_ms: Int = key(
        "http.server.shutdown.timeout",
        10_000,
        gt=0,
        unit="ms",
        reload=RESTART,
        doc="on SIGTERM, how long the whole drain may take (see below)",
    )
    workers: Int = key(
        "http.server.workers",
        0,
        ge=0,
        reload=RESTART,
        doc="worker processes; 0: one per usable CPU (see [Every core](#every-core))",
    )
    admin_token: Text = key(  # never repeated in a problem: it is a secret
        "http.admin.token",
        "",
        pattern=r"^([!-~]{24,})?$",
        invalid='must be "" (admin endpoints off) or at least 24 printable ASCII characters'
        " without spaces; make one with `openssl rand -hex 32`",
        doc='bearer token of the [admin endpoints](#admin-endpoints); `""` turns them off',
    )
    compat_replies: Flag = key(  # bigpipe.ingest.compat
        "http.server.compat.replies",
        False,
        reload=RESTART,
        doc="`/rpc/call` answers exactly as the Go original did: see [Replies as the"
        " original's](#replies-as-the-originals)",
    )
    tls_cert: Text = key(
        "http.server.tls.cert",
        "",
        reload=RESTART,
        kind="PEM file path",
        doc="serve HTTPS with this certificate chain; set both TLS keys, or neither",
    )
    tls_key: Text = key(
        "http.server.tls.key",
        "",
        reload=RESTART,
        kind="PEM file path",
        doc="the chain's private key",
    )
    status_enabled: Flag = key(  # bigpipe.calls.status
        "status.enabled",
        True,
        reload=RESTART,
        doc="write each call's steps to `status.topic` and answer `GET /rpc/call/{id}` (see"
        " [Call status](#call-status)); `false` turns both off",
    )
    status_topic: TopicName = key(
        "status.topic",
        "bigpipe.results",
        reload=RESTART,
        doc="the results topic: every call's steps, keyed by call id",
    )
    status_retention_ms: Int = key(
        "status.retention",
        DEFAULT_STATUS_RETENTION_MS,
        ge=3_600_000,
        unit="ms",
        reload=RESTART,
        invalid="must be at least 3600000 ms (1 h), got {value}",
        doc="how long a call can be looked up: the results topic's `retention.ms` when Bigpipe"
        " creates it, and the views'",
    )
    status_directory: Text = key(
        "status.directory",
        "",
        reload=RESTART,
        default_doc='`""`: the system\'s temporary directory',
        doc="where the node keeps its status view (SQLite), rebuilt from the results topic"
        " when missing",
    )
    kafka_client_config: dict[Setting, SettingValue] = key(
        "kafka.client.config", {}, doc="librdkafka settings for every Kafka client (see below)"
    )
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The file this config was read from; None when it was built in Python."""
        return self._source


# ---------------------------------------------------------------- rules across entries
def _entries(raw: dict[str, Any], list_key: str) -> list[tuple[str, dict[str, Any]]]:
    """The objects listed under `list_key`, each with its path."""
    items = raw.get(list_key)
    items = items if isinstance(items, list) else []
    return [(f"{list_key}[{i}]", item) for i, item in enumerate(items) if isinstance(item, dict)]


def _text(entry: dict[str, Any], name: str) -> str | None:
    return value if isinstance(value := entry.get(name), str) else None


def _rules_across_entries(raw: dict[str, Any]) -> Iterator[str]:
    """Topics listed once and referred to by name; unique callers and groups; one secret each
    (said even when the entry has other problems); dead-letter topics that are no call topic."""
    names: set[str] = set()
    for path, topic in _entries(raw, "kafka.topics"):
        if (name := _text(topic, "name")) in names:
            yield f"{path}.name: duplicate topic {name!r}; list it once"
        names |= {name} - {None}
    listed = names if isinstance(raw.get("kafka.topics"), list) else None
    callers: set[str] = set()
    for path, caller in _entries(raw, "kafka.producer.acl"):
        if "secret" in caller and "secret_sha256" in caller:
            yield f"{path}: has both secret and secret_sha256; keep one"
        elif "secret" not in caller and "secret_sha256" not in caller:
            yield f"{path}.secret: is missing; add it (or secret_sha256)"
        yield from _listed_topic(path, caller, listed)
        if (name := _text(caller, "name")) in callers:
            yield f"{path}.name: duplicate ACL name {name!r}; names must be unique"
        callers |= {name} - {None}
    groups: set[tuple[str, str]] = set()
    for path, group in _entries(raw, "kafka.consumer.list"):
        yield from _listed_topic(path, group, listed)
        topic, group_id = _text(group, "topic"), _text(group, "groupId")
        if topic is None or group_id is None:
            continue
        yield from _dead_letter_topic(path, group, topic, group_id, listed)
        yield from _destination_caps(path, group)
        if (topic, group_id) in groups:
            yield (
                f"{path}: duplicate (topic, groupId) {(topic, group_id)}; "
                "each consumer group may be listed once per topic"
            )
        groups.add((topic, group_id))
    status_topic = raw.get("status.topic", "bigpipe.results")
    if isinstance(status_topic, str) and status_topic in (listed or ()):
        yield (
            f"status.topic: {status_topic!r} is a call topic in kafka.topics; "
            "pick a topic used only for call status"
        )


def _listed_topic(path: str, entry: dict[str, Any], listed: set[str] | None) -> Iterator[str]:
    topic = _text(entry, "topic")
    if listed is not None and topic is not None and topic not in listed:
        yield f"{path}.topic: {topic!r} is not in kafka.topics; add it there or fix the name"


def _dead_letter_topic(
    path: str, group: dict[str, Any], topic: str, group_id: str, listed: set[str] | None
) -> Iterator[str]:
    dead_letter = group.get("deadLetterTopic", default_dead_letter_topic(topic, group_id))
    if "deadLetterTopic" not in group and not re.match(TOPIC_NAME, dead_letter):
        yield (
            f"{path}.deadLetterTopic: the default {dead_letter!r} is not a valid Kafka topic name"
            " (groupId has characters other than [A-Za-z0-9._-], or is too long); set it"
        )
    elif isinstance(dead_letter, str) and dead_letter != topic and dead_letter in (listed or ()):
        yield (  # (its own topic: ConsumerConfig says so)
            f"{path}.deadLetterTopic: {dead_letter!r} is a call topic in kafka.topics; "
            "pick a topic only used for dead letters"
        )


def _destination_caps(path: str, group: dict[str, Any]) -> Iterator[str]:
    """A destination's caps are at most its group's: its calls share the group's budget.
    Each override matches other destinations than the others."""
    destination = group.get("destination")
    if not isinstance(destination, dict):
        return
    overrides = [(f"{path}.destination.{at}", o) for at, o in _entries(destination, "overrides")]
    for where, caps in [(f"{path}.destination", destination), *overrides]:
        for name in ("concurrency", "rateLimit"):
            limit, value = group.get(name), caps.get(name)
            numbers = all(
                isinstance(n, int | float) and not isinstance(n, bool) for n in (limit, value)
            )
            if numbers and 0 < limit < value:
                yield (
                    f"{where}.{name}: must be <= the group's {name} ({limit:g}), got {value:g}; "
                    "a destination's calls share the group's budget"
                )
    matches: set[str] = set()
    for where, override in overrides:
        if (match := _text(override, "match")) in matches:
            yield f"{where}.match: {match!r} is listed twice; keep one"
        matches |= {match} - {None}


def _tls_files(raw: dict[str, Any]) -> Iterator[str]:
    """Both files or neither: TLS needs the certificate chain and its key."""
    cert, key = _text(raw, "http.server.tls.cert"), _text(raw, "http.server.tls.key")
    if bool(cert) != bool(key):
        given, missing = ("cert", "key") if cert else ("key", "cert")
        yield (
            f"http.server.tls.{given}: is set but http.server.tls.{missing} is "
            "not; set both, or neither"
        )
    for name, path in (("http.server.tls.cert", cert), ("http.server.tls.key", key)):
        if path and not Path(path).is_file():
            yield f"{name}: no file at {path!r}; give the PEM file's path"


# ---------------------------------------------------------------- reading a file
def parse_config(raw: Any, source: Path | None = None) -> Config:
    """Validate a decoded JSON document; raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([f"config: must be a JSON object, got {json_type(raw)}"])
    problems: list[str] = []
    try:
        config = Config.model_validate(raw, by_alias=True, by_name=False, context=READING_A_FILE)
    except ValidationError as exc:
        problems += filter(None, (problem(Config, error) for error in exc.errors()))
    problems += [*_rules_across_entries(raw), *_tls_files(raw)]
    if problems:
        raise ConfigError(problems)
    config._source = source
    return config


def read_config_file(path: str | Path) -> Any:
    """The decoded JSON of a config file, not yet validated; ConfigError if unreadable."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"config {path}: cannot read it ({exc.strerror})"]) from None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError([f"config {path}: invalid JSON ({exc})"]) from None
