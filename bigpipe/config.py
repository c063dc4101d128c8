"""Load and validate the flat JSON config of the original bigpipe.

The whole file is checked before anything starts. Every problem becomes one
line naming the key path, what is wrong and how to fix it, so an operator can
mend a file in one pass instead of one restart per mistake.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from yarl import URL

from bigpipe.calls.signing import Signer, key_of
from bigpipe.destinations import AllowRule, parse_rule

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
DEFAULT_RETRY_STATUS = (408, 429)
DEFAULT_MAX_DELAY_MS = 7 * 24 * 3600 * 1000  # 7 days
DAY_MS = 86_400_000
MAX_IDEMPOTENCY_WINDOW_MS = 7 * DAY_MS


def one_line(text: str) -> str:
    """Escape control characters (a key may hold a line break), so text stays on one line."""
    return CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class ConfigError(Exception):
    """The config is unusable; each entry of `problems` is one line for the operator."""

    def __init__(self, problems: list[str]) -> None:
        problems = [one_line(p) for p in problems]
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TopicConfig:
    name: str
    partitions: int
    replication_factor: int
    min_insync_replicas: int | None


@dataclass(frozen=True)
class AclEntry:
    name: str
    secret_sha256: bytes  # only the digest is kept, so a secret never sits in memory twice
    topic: str
    allow: tuple[AllowRule, ...] = ()  # destinations this caller may call; empty: any
    deny_private: bool = False  # refuse loopback, private and link-local destinations
    signer: Signer | None = None  # signs its deliveries and callbacks (Standard Webhooks)
    idempotency_window_ms: int = DAY_MS  # how long an idempotency key holds


@dataclass(frozen=True)
class BreakerConfig:
    break_period: float  # seconds
    recover_period: float  # seconds
    win_size: int  # one-second buckets
    min_stats: int
    health_rate: float


@dataclass(frozen=True)
class DestinationCaps:
    """A destination's own caps, under its group's; None: only the group's applies."""

    concurrency: int | None = None
    rate_limit: float | None = None  # calls per second

    def share(self, workers: int) -> DestinationCaps:
        return DestinationCaps(
            self.concurrency and math.ceil(self.concurrency / workers),
            self.rate_limit and self.rate_limit / workers,
        )


@dataclass(frozen=True)
class DestinationOverride:
    rule: AllowRule  # a host pattern, or an origin (scheme://host[:port]) with no path
    caps: DestinationCaps


# Calls a group holds in memory for destinations that may not be called yet (open
# breaker, Retry-After, their own caps), per node; past it the group pauses its partitions.
DEFAULT_MAX_HELD = 1000


@dataclass(frozen=True)
class DestinationConfig:
    """The per-destination shields of one group (`destination` in the config)."""

    caps: DestinationCaps = DestinationCaps()
    max_held: int = DEFAULT_MAX_HELD
    overrides: tuple[DestinationOverride, ...] = ()

    def share(self, workers: int) -> DestinationConfig:
        """One of `workers` workers' part, split as the group's own caps are."""
        return DestinationConfig(
            self.caps.share(workers),
            math.ceil(self.max_held / workers),
            tuple(DestinationOverride(o.rule, o.caps.share(workers)) for o in self.overrides),
        )

    def caps_for(self, url: URL) -> DestinationCaps:
        """The first override matching the destination of `url`, else the default caps."""
        for override in self.overrides:
            if override.rule.matches(url):
                return override.caps
        return self.caps


@dataclass(frozen=True)
class ConsumerConfig:
    topic: str
    group_id: str
    rate_limit: float  # calls per second
    timeout_ms: int  # per attempt
    retries: int  # extra attempts after the first
    concurrency: int
    breaker: BreakerConfig | None
    dead_letter_topic: str
    backoff_base_ms: int
    backoff_max_ms: int
    retry_status: frozenset[int]  # 4xx statuses that are retried; 5xx always are
    max_buffered: int
    destination: DestinationConfig = DestinationConfig()
    ttl_ms: int | None = None  # a call not delivered by then is dead-lettered `expired`
    delay_threshold_ms: int = 3_000  # longer waits go to the delay topics

    @property
    def key(self) -> tuple[str, str]:
        return (self.topic, self.group_id)


@dataclass(frozen=True)
class Config:
    log_level: int
    log_directory: str
    log_format: str
    bootstrap_servers: str
    topics: tuple[TopicConfig, ...]
    producer_retries: int
    producer_ack_timeout_ms: int
    acl: tuple[AclEntry, ...]
    consumers: tuple[ConsumerConfig, ...]
    http_host: str
    http_port: int
    channel_size: int
    read_timeout_ms: int
    write_timeout_ms: int
    body_limit: int
    shutdown_timeout_ms: int
    tls_cert: str
    tls_key: str
    compat_replies: bool  # /rpc/call answers as the Go original did (bigpipe.compat)
    admin_token: str  # bearer token of the /admin/* endpoints; "" turns them off
    workers: int  # worker processes; 0 means one per usable CPU (bigpipe.workers)
    kafka_client_config: dict[str, str | int | float | bool]
    max_delay_ms: int = DEFAULT_MAX_DELAY_MS  # the largest delay_ms /rpc/call takes
    source: Path | None = field(default=None, compare=False)


# ---------------------------------------------------------------- checks
# A check returns None when the value is fine, else "what is wrong; how to fix".
Check = Callable[[Any], str | None]


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}; use a positive number"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}; use 0 or more"


def between(low: float, high: float) -> Check:
    def check(value: float) -> str | None:
        if low <= value <= high:
            return None
        return f"must be between {low} and {high}, got {value}"

    return check


def one_of(*choices: str) -> Check:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"

    return check


def non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def topic_name(value: str) -> str | None:
    if TOPIC_NAME.match(value) and value not in (".", ".."):
        return None
    return f"{value!r} is not a valid Kafka topic name; use 1-249 of [A-Za-z0-9._-]"


# ---------------------------------------------------------------- reader
_MISSING = object()
_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    bool: "true or false",
}


class _Section:
    """Reads the keys of one JSON object, recording problems instead of raising."""

    def __init__(self, obj: dict[str, Any], path: str, problems: list[str]) -> None:
        self.obj = obj
        self.path = path
        self.problems = problems
        self.known: list[str] = []

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(
        self,
        key: str,
        kind: type,
        *,
        default: Any = _MISSING,
        check: Check | None = None,
        hint: str = "",
    ) -> Any:
        self.known.append(key)
        if key not in self.obj:
            if default is _MISSING:
                self.problems.append(f"{self.where(key)}: is missing; add it{hint}")
            return default if default is not _MISSING else None
        value = self.obj[key]
        if not _is_kind(value, kind):
            self.problems.append(
                f"{self.where(key)}: must be {_TYPE_NAMES[kind]}, got {_json_type(value)}"
            )
            return None
        if check is not None and (reason := check(value)) is not None:
            self.problems.append(f"{self.where(key)}: {reason}")
            return None
        return float(value) if kind is float else value

    def objects(self, key: str, *, default: Any = _MISSING, hint: str = "") -> Iterator[_Section]:
        """Yield a section per element of a list of objects."""
        items = self.get(key, list, default=default, hint=hint)
        for index, item in enumerate(items or []):
            path = f"{self.where(key)}[{index}]"
            if isinstance(item, dict):
                yield _Section(item, path, self.problems)
            else:
                self.problems.append(f"{path}: must be an object, got {_json_type(item)}")

    def section(self, key: str) -> _Section | None:
        obj = self.get(key, dict, default=None)
        return None if obj is None else _Section(obj, self.where(key), self.problems)

    def reject_unknown(self) -> None:
        for key in self.obj:
            if key in self.known:
                continue
            close = difflib.get_close_matches(key, self.known, n=1, cutoff=0.6)
            fix = f"did you mean {close[0]!r}?" if close else "remove it"
            self.problems.append(f"{self.where(key)}: unknown key; {fix}")


def _is_kind(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in _TYPE_NAMES.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


# ---------------------------------------------------------------- sections
def _read_topics(root: _Section) -> tuple[tuple[TopicConfig, ...], set[str] | None]:
    """The valid topics, and every name listed (so one bad field does not cascade).

    The names are None when the list itself is unusable: then references to topics
    cannot be checked, and are not reported.
    """
    topics: list[TopicConfig] = []
    names: set[str] = set()
    for item in root.objects("kafka.topics", hint=", a list of {name, partitions}"):
        name = item.get("name", str, check=topic_name)
        partitions = item.get("partitions", int, check=positive)
        replication = item.get("replicationFactor", int, default=1, check=positive)
        min_isr = item.get("minInsyncReplicas", int, default=None, check=positive)
        item.reject_unknown()
        if name in names:
            root.problems.append(f"{item.path}.name: duplicate topic {name!r}; list it once")
            continue
        names.add(name)
        if None not in (name, partitions, replication):
            topics.append(TopicConfig(name, partitions, replication, min_isr))
    if root.obj.get("kafka.topics") == []:
        root.problems.append("kafka.topics: is empty; list at least one {name, partitions}")
    return tuple(topics), names if isinstance(root.obj.get("kafka.topics"), list) else None


def _read_acl(root: _Section, topic_names: set[str] | None) -> tuple[AclEntry, ...]:
    entries: list[AclEntry] = []
    for item in root.objects("kafka.producer.acl", hint=", a list of {name, secret, topic}"):
        name = item.get("name", str, check=non_empty)
        topic = item.get("topic", str)
        digest = _read_secret(item)
        allow = _read_allow(item)
        deny_private = item.get("denyPrivate", bool, default=False)
        signer = _read_signing(item)
        window = item.get("idempotencyWindow", int, default=DAY_MS, check=_window)
        item.reject_unknown()
        if topic is not None and topic_names is not None and topic not in topic_names:
            root.problems.append(
                f"{item.path}.topic: {topic!r} is not in kafka.topics; add it there or fix the name"
            )
        if name is not None and name in {e.name for e in entries}:
            root.problems.append(
                f"{item.path}.name: duplicate ACL name {name!r}; names must be unique"
            )
        elif None not in (name, topic, digest, allow, deny_private, window) and signer is not False:
            entries.append(AclEntry(name, digest, topic, allow, deny_private, signer, window))
    return tuple(entries)


def _window(value: int) -> str | None:
    if 1000 <= value <= MAX_IDEMPOTENCY_WINDOW_MS:
        return None
    return f"must be 1000 to {MAX_IDEMPOTENCY_WINDOW_MS} ms (1 s to 7 days), got {value}"


def _read_signing(item: _Section) -> Signer | bool | None:
    """`signing: {"secrets": ["whsec_…", …]}`: None when absent, False when invalid."""
    section = item.section("signing")
    if section is None:
        return False if "signing" in item.obj else None
    secrets = section.get("secrets", list, hint=', a list of "whsec_…" secrets')
    section.reject_unknown()
    if secrets is None:
        return False
    if not secrets:
        item.problems.append(f"{section.where('secrets')}: is empty; list at least one secret")
        return False
    keys = []
    for index, secret in enumerate(secrets):
        key = key_of(secret) if isinstance(secret, str) else "must be a string"
        if isinstance(key, str):
            item.problems.append(f"{section.where('secrets')}[{index}]: {key}")
            return False
        keys.append(key)
    return Signer(tuple(keys))


def _read_allow(item: _Section) -> tuple[AllowRule, ...] | None:
    texts = item.get("allow", list, default=[])
    rules = []
    for index, text in enumerate(texts or []):
        rule = parse_rule(text) if isinstance(text, str) else "must be a string"
        if isinstance(rule, str):
            item.problems.append(f"{item.path}.allow[{index}]: {rule}")
            return None
        rules.append(rule)
    return None if texts is None else tuple(rules)


def _read_secret(item: _Section) -> bytes | None:
    """A secret is given in clear (`secret`) or as its hex SHA-256 (`secret_sha256`)."""
    secret = item.get("secret", str, default=None)
    hashed = item.get("secret_sha256", str, default=None)
    if (secret is None) == (hashed is None):
        if "secret" not in item.obj and "secret_sha256" not in item.obj:
            item.problems.append(f"{item.path}.secret: is missing; add it (or secret_sha256)")
        elif "secret" in item.obj and "secret_sha256" in item.obj:
            item.problems.append(f"{item.path}: has both secret and secret_sha256; keep one")
        return None
    if secret is not None:
        return hashlib.sha256(secret.encode()).digest()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", hashed):
        item.problems.append(
            f"{item.path}.secret_sha256: must be 64 hex digits (sha256sum of the secret)"
        )
        return None
    return bytes.fromhex(hashed)


def _read_breaker(item: _Section) -> BreakerConfig | None:
    section = item.section("circuitBreaker")
    if section is None:
        return None
    values = (
        section.get("breakPeriod", float, check=positive),
        section.get("recoverPeriod", float, check=positive),
        section.get("winSize", int, check=positive),
        section.get("minStats", int, check=non_negative),
        section.get("healthRate", float, check=between(0, 1)),
    )
    section.reject_unknown()
    return None if None in values else BreakerConfig(*values)


def _read_consumer(item: _Section, topic_names: set[str] | None) -> ConsumerConfig | None:
    topic = item.get("topic", str)
    if topic is not None and topic_names is not None and topic not in topic_names:
        item.problems.append(
            f"{item.path}.topic: {topic!r} is not in kafka.topics; add it there or fix the name"
        )
        topic = None
    group_id = item.get("groupId", str, check=non_empty)
    rate_limit = item.get("rateLimit", float, check=positive)
    timeout_ms = item.get("timeout", int, check=positive)
    retries = item.get("retries", int, check=non_negative)
    concurrency = item.get("concurrency", int, check=positive)
    breaker = _read_breaker(item)
    dead_letter = item.get("deadLetterTopic", str, default=None, check=topic_name)
    if dead_letter is None and "deadLetterTopic" not in item.obj:
        dead_letter = _default_dead_letter_topic(item, topic, group_id)
    backoff_base = item.get("backoffBase", int, default=200, check=positive)
    backoff_max = item.get("backoffMax", int, default=30_000, check=positive)
    retry_status = item.get(
        "retryStatus", list, default=list(DEFAULT_RETRY_STATUS), check=_status_list
    )
    max_buffered = item.get("maxBuffered", int, default=None, check=positive)
    destination = _read_destination(item, rate_limit, concurrency)
    ttl = item.get("ttl", int, default=None, check=positive)
    delay_threshold = item.get("delayThreshold", int, default=3_000, check=between(1_000, 60_000))
    item.reject_unknown()
    if "circuitBreaker" in item.obj and breaker is None:
        return None
    if destination is None:
        return None
    if None in (
        topic,
        group_id,
        rate_limit,
        timeout_ms,
        retries,
        concurrency,
        dead_letter,
        backoff_base,
        backoff_max,
        retry_status,
    ):
        return None
    if dead_letter == topic:
        item.problems.append(f"{item.path}.deadLetterTopic: must differ from topic {topic!r}")
        return None
    if backoff_max < backoff_base:
        item.problems.append(f"{item.path}.backoffMax: must be >= backoffBase ({backoff_base})")
        return None
    return ConsumerConfig(
        topic=topic,
        group_id=group_id,
        rate_limit=rate_limit,
        timeout_ms=timeout_ms,
        retries=retries,
        concurrency=concurrency,
        breaker=breaker,
        dead_letter_topic=dead_letter,
        backoff_base_ms=backoff_base,
        backoff_max_ms=backoff_max,
        retry_status=frozenset(retry_status),
        max_buffered=max_buffered or max(100, 4 * concurrency),
        destination=destination,
        ttl_ms=ttl,
        delay_threshold_ms=delay_threshold or 3_000,
    )


def _default_dead_letter_topic(
    item: _Section, topic: str | None, group_id: str | None
) -> str | None:
    """`<topic>.<groupId>.dlq`: one dead-letter topic per group, so one group's failures
    never mix with another's (a shared one, set by hand, tells them apart by source.group)."""
    if topic is None or group_id is None:
        return None
    name = f"{topic}.{group_id}.dlq"
    if topic_name(name) is not None:
        item.problems.append(
            f"{item.path}.deadLetterTopic: the default {name!r} is not a valid Kafka topic name "
            "(groupId has characters other than [A-Za-z0-9._-], or is too long); set it"
        )
        return None
    return name


def _read_destination(
    item: _Section, rate_limit: float | None, concurrency: int | None
) -> DestinationConfig | None:
    """The `destination` object: default caps, `maxHeld`, and `overrides` by host or origin."""
    section = item.section("destination")
    if section is None:
        return None if "destination" in item.obj else DestinationConfig()
    problems_before = len(section.problems)
    caps = _read_caps(section, rate_limit, concurrency)
    max_held = section.get("maxHeld", int, default=DEFAULT_MAX_HELD, check=positive)
    overrides: dict[str, DestinationOverride] = {}
    for entry in section.objects("overrides", default=[]):
        rule = _read_match(entry)
        entry_caps = _read_caps(entry, rate_limit, concurrency)
        entry.reject_unknown()
        if rule is not None and rule.text in overrides:
            entry.problems.append(f"{entry.path}.match: {rule.text!r} is listed twice; keep one")
        elif rule is not None:
            overrides[rule.text] = DestinationOverride(rule, entry_caps)
    section.reject_unknown()
    if len(section.problems) > problems_before:
        return None
    return DestinationConfig(caps, max_held, tuple(overrides.values()))


def _read_caps(
    section: _Section, rate_limit: float | None, concurrency: int | None
) -> DestinationCaps:
    """`concurrency` and `rateLimit` of one destination: each at most the group's."""
    return DestinationCaps(
        section.get("concurrency", int, default=None, check=at_most(concurrency, "concurrency")),
        section.get("rateLimit", float, default=None, check=at_most(rate_limit, "rateLimit")),
    )


def at_most(limit: float | None, group_key: str) -> Check:
    """Positive and no more than the group's own value (a destination shares its budget)."""

    def check(value: float) -> str | None:
        if value <= 0:
            return positive(value)
        if limit is not None and value > limit:
            return (
                f"must be <= the group's {group_key} ({limit:g}), got {value:g}; "
                "a destination's calls share the group's budget"
            )
        return None

    return check


def _read_match(entry: _Section) -> AllowRule | None:
    """A host pattern (`api.example.com`, `*.example.com`) or an origin (`https://host:8443`)."""
    text = entry.get("match", str)
    if text is None:
        return None
    rule = parse_rule(text)
    if isinstance(rule, str):
        entry.problems.append(f"{entry.where('match')}: {rule}")
        return None
    if rule.scheme is not None and rule.path not in ("", "/"):
        entry.problems.append(
            f"{entry.where('match')}: {text!r} has a path; a destination is scheme, host and "
            "port, so give an origin like https://api.example.com:8443 or a host pattern"
        )
        return None
    return rule


def _status_list(value: list[Any]) -> str | None:
    if all(isinstance(s, int) and not isinstance(s, bool) and 400 <= s <= 499 for s in value):
        return None
    return "must list 4xx status codes (integers 400-499) to retry; 5xx are always retried"


def _read_consumers(root: _Section, topic_names: set[str] | None) -> tuple[ConsumerConfig, ...]:
    consumers: list[ConsumerConfig] = []
    hint = ", a list of {topic, groupId, rateLimit, timeout, retries, concurrency}"
    for item in root.objects("kafka.consumer.list", hint=hint):
        consumer = _read_consumer(item, topic_names)
        if consumer is None:
            continue
        if consumer.key in {c.key for c in consumers}:
            root.problems.append(
                f"{item.path}: duplicate (topic, groupId) {consumer.key}; "
                "each consumer group may be listed once per topic"
            )
            continue
        consumers.append(consumer)
    return tuple(consumers)


def parse_config(raw: Any, source: Path | None = None) -> Config:
    """Validate a decoded JSON document; raise ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"config: must be a JSON object, got {_json_type(raw)}"])
    root = _Section(raw, "", problems)
    log_level = root.get("log.level", int, default=4, check=between(1, 5))
    log_directory = root.get("log.directory", str, default="")
    log_format = root.get("log.format", str, default="text", check=one_of("text", "json"))
    servers = root.get(
        "kafka.bootstrap.servers", str, check=non_empty, hint=', e.g. "127.0.0.1:9092"'
    )
    topics, topic_names = _read_topics(root)
    producer_retries = root.get("kafka.producer.retries", int, default=2, check=non_negative)
    ack_timeout = root.get("kafka.producer.ack.timeout", int, default=5000, check=positive)
    acl = _read_acl(root, topic_names)
    consumers = _read_consumers(root, topic_names)
    values = dict(
        http_host=root.get("http.server.host", str, default="0.0.0.0", check=non_empty),
        http_port=root.get("http.server.port", int, check=between(1, 65535)),
        channel_size=root.get(
            "http.server.handler.channel.size", int, default=10_000, check=positive
        ),
        read_timeout_ms=root.get("http.server.read.timeout", int, default=5000, check=positive),
        write_timeout_ms=root.get("http.server.write.timeout", int, default=5000, check=positive),
        body_limit=root.get("http.server.body.limit", int, default=1 << 20, check=positive),
        shutdown_timeout_ms=root.get(
            "http.server.shutdown.timeout", int, default=10_000, check=positive
        ),
    )
    values["workers"] = root.get("http.server.workers", int, default=0, check=non_negative)
    values["compat_replies"] = root.get("http.server.compat.replies", bool, default=False)
    values["admin_token"] = root.get("http.admin.token", str, default="", check=_admin_token)
    values["tls_cert"], values["tls_key"] = _read_tls(root)
    values["kafka_client_config"] = _read_client_config(root)
    values["max_delay_ms"] = root.get(
        "kafka.delay.max", int, default=DEFAULT_MAX_DELAY_MS, check=positive
    )
    root.reject_unknown()
    _check_topic_roles(topics, consumers, problems)
    if problems:
        raise ConfigError(problems)
    return Config(
        log_level=log_level,
        log_directory=log_directory,
        log_format=log_format,
        bootstrap_servers=servers,
        topics=topics,
        producer_retries=producer_retries,
        producer_ack_timeout_ms=ack_timeout,
        acl=acl,
        consumers=consumers,
        source=source,
        **values,
    )


ADMIN_TOKEN_MIN = 24


def _admin_token(value: str) -> str | None:
    """A bearer token: long enough not to be guessed, and sendable in a header.
    The message never repeats the value: it is a secret."""
    if value == "":
        return None
    if len(value) < ADMIN_TOKEN_MIN or not all("!" <= c <= "~" for c in value):
        return (
            f'must be "" (admin endpoints off) or at least {ADMIN_TOKEN_MIN} printable ASCII '
            "characters without spaces; make one with `openssl rand -hex 32`"
        )
    return None


def _read_tls(root: _Section) -> tuple[str, str]:
    """Both files or neither: TLS needs the certificate chain and its key."""
    cert = root.get("http.server.tls.cert", str, default="")
    key = root.get("http.server.tls.key", str, default="")
    if bool(cert) != bool(key):
        given, missing = ("cert", "key") if cert else ("key", "cert")
        root.problems.append(
            f"http.server.tls.{given}: is set but http.server.tls.{missing} is "
            "not; set both, or neither"
        )
    for name, path in (("http.server.tls.cert", cert), ("http.server.tls.key", key)):
        if path and not Path(path).is_file():
            root.problems.append(f"{name}: no file at {path!r}; give the PEM file's path")
    return cert or "", key or ""


# Settings Bigpipe owns: letting them through would break its guarantees or its config.
OWNED_KAFKA_SETTINGS = frozenset(
    {
        "bootstrap.servers",
        "group.id",
        "client.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "enable.idempotence",
        "acks",
        "auto.offset.reset",
        "partition.assignment.strategy",
        "message.timeout.ms",
        "message.send.max.retries",
        "message.max.bytes",  # sized from http.server.body.limit (kafka.record_size_limit)
        "isolation.level",
        "transactional.id",
        "group.protocol",
    }
)


def _read_client_config(root: _Section) -> dict[str, str | int | float | bool]:
    """librdkafka settings passed through to every client, e.g. SASL and SSL."""
    settings = root.get("kafka.client.config", dict, default={}) or {}
    for key, value in settings.items():
        where = f"kafka.client.config.{key}"
        if key in OWNED_KAFKA_SETTINGS:
            root.problems.append(f"{where}: is set by Bigpipe itself; remove it")
        elif not isinstance(value, str | int | float | bool):
            root.problems.append(f"{where}: must be a string, number or boolean")
    return settings


def _check_topic_roles(
    topics: tuple[TopicConfig, ...], consumers: tuple[ConsumerConfig, ...], problems: list[str]
) -> None:
    """A dead-letter topic must not also be a call topic, or calls would loop."""
    call_topics = {t.name for t in topics}
    for index, consumer in enumerate(consumers):
        if consumer.dead_letter_topic in call_topics:
            problems.append(
                f"kafka.consumer.list[{index}].deadLetterTopic: {consumer.dead_letter_topic!r} "
                "is a call topic in kafka.topics; pick a topic only used for dead letters"
            )


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


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError with one line per problem."""
    return parse_config(read_config_file(path), source=Path(path))
