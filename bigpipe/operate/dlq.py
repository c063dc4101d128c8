"""Dead letters for operators: list them, show one, and redrive a selection.

A redrive writes each selected call back to its call topic, naming the group it
failed in (the envelope's `group`): every group of the topic reads it, and all
but that one skip it. The call keeps its id; its `redrive` count rises by one.

Each dead letter redriven is then recorded in the compacted topic REDRIVES_TOPIC
(key: `<dead-letter topic>/<partition>/<offset>`), only after Kafka has the call
back: a second run skips what is recorded (unless forced), and a run killed
between the two writes sends those calls again on the next run, never loses them.
Blocking code: the admin endpoints run it in a thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient, NewTopic

from bigpipe.config import Config
from bigpipe.kafka import client_settings
from bigpipe.operate.resend import Resender, paced
from bigpipe.operate.selection import Filters
from bigpipe.operate.topic_reader import TopicMissing, read_window

REDRIVES_TOPIC = "bigpipe.redrives"

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class DeadLetter:
    """One record of a dead-letter topic, where it sits, and what it says."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    record: dict[str, Any]

    @property
    def call(self) -> dict[str, Any] | None:
        return self.record.get("call")

    @property
    def id(self) -> str | None:
        return self.call["id"] if self.call else None

    @property
    def group(self) -> str:
        return self.record["source"]["group"]

    @property
    def source_topic(self) -> str:
        return self.record["source"]["topic"]

    @property
    def mark(self) -> str:
        """Its key in REDRIVES_TOPIC."""
        return f"{self.topic}/{self.partition}/{self.offset}"

    def why_not_redrivable(self) -> str | None:
        if self.call is None:
            return "not a call (an invalid record): nothing to send again"
        if self.record.get("cut") is not None:
            return "its data was cut to fit the dead-letter topic: sending it would lose data"
        return None

    def matches(self, filters: Filters) -> bool:
        failed_at = self.record.get("failedAt") or 0
        if filters.since_ms is not None and failed_at < filters.since_ms:
            return False
        if filters.until_ms is not None and failed_at >= filters.until_ms:
            return False
        if filters.status is not None and self.record.get("lastStatus") != filters.status:
            return False
        error = (self.record.get("lastError") or "").lower()
        if filters.error is not None and filters.error.lower() not in error:
            return False
        call = self.call
        if call is None:  # an invalid record: only the filters above apply to it
            return filters.url_prefix is None and filters.host is None and filters.caller is None
        return filters.matches_call(call)

    def summary(self) -> dict[str, Any]:
        """The fields a list shows, flat, for tables and scripts."""
        call = self.call or {}
        return {
            "id": self.id,
            "group": self.group,
            "topic": self.source_topic,
            "failedAt": self.record.get("failedAt"),
            "attempts": self.record.get("attempts"),
            "lastStatus": self.record.get("lastStatus"),
            "lastError": self.record.get("lastError"),
            "url": call.get("url"),
            "caller": call.get("caller"),
            "redrive": call.get("redrive", 0),
            "deadLetter": {"topic": self.topic, "partition": self.partition, "offset": self.offset},
        }

    def detail(self) -> dict[str, Any]:
        """The whole dead letter, and where it sits."""
        where = {"topic": self.topic, "partition": self.partition, "offset": self.offset}
        return {**self.record, "deadLetter": where}


def dead_letters(config: Config, filters: Filters) -> Iterator[DeadLetter]:
    """The dead letters of the chosen groups that match, topic by topic, oldest first
    within each partition. Groups sharing a dead-letter topic are told apart by
    `source.group`."""
    groups = filters.choose_groups(config)
    by_topic: dict[str, set[str]] = {}
    for group in groups:
        by_topic.setdefault(group.dead_letter_topic, set()).add(group.group_id)
    for topic, group_ids in by_topic.items():
        # A dead letter is written after its call's last attempt: its record's time is
        # never before its failedAt, so the window can start there.
        try:
            for message in read_window(config, topic, filters.since_ms):
                letter = _decode(message)
                if letter is not None and letter.group in group_ids and letter.matches(filters):
                    yield letter
        except TopicMissing:
            continue  # the group has never dead-lettered anything


def _decode(message: Message) -> DeadLetter | None:
    try:
        record = orjson.loads(message.value() or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("source"), dict):
        return None
    return DeadLetter(message.topic(), message.partition(), message.offset(), message.key(), record)


def find(config: Config, call_id: str, filters: Filters) -> list[DeadLetter]:
    """Every dead letter of this call (a call redriven and failed again has several)."""
    return [letter for letter in dead_letters(config, filters) if letter.id == call_id]


# ---------------------------------------------------------------- redrive
@dataclass
class RedriveReport:
    selected: int = 0  # dead letters that matched the filters
    redriven: int = 0  # sent again by this run (or that would be, on a dry run)
    already: int = 0  # skipped: redriven before (use force to send them again)
    unredrivable: list[dict[str, Any]] = field(default_factory=list)  # id, why
    dry_run: bool = False
    ids: list[str] = field(default_factory=list)  # the calls sent again

    def as_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "redriven": self.redriven,
            "alreadyRedriven": self.already,
            "notRedrivable": self.unredrivable,
            "dryRun": self.dry_run,
            "ids": self.ids,
        }


@dataclass(frozen=True)
class RedriveOptions:
    to_url: str | None = None  # send to this URL instead of the call's own
    force: bool = False  # send again what an earlier redrive sent
    dry_run: bool = False
    rate: float | None = None  # calls per second, to spare a downstream; None: no cap


def redrive(
    config: Config,
    letters: Iterable[DeadLetter],
    options: RedriveOptions,
    progress: Progress | None = None,
) -> RedriveReport:
    report = RedriveReport(dry_run=options.dry_run)
    done = set() if options.force else redriven_marks(config)
    todo: list[DeadLetter] = []
    for letter in letters:
        report.selected += 1
        if (why := letter.why_not_redrivable()) is not None:
            report.unredrivable.append({"deadLetter": letter.mark, "id": letter.id, "why": why})
        elif letter.mark in done:
            report.already += 1
        else:
            todo.append(letter)
    if options.dry_run:
        report.redriven = len(todo)
        report.ids = [letter.id for letter in todo if letter.id]
        return report
    if todo:
        _ensure_marks_topic(config)
        _send(config, todo, options, report, progress)
    return report


def _send(
    config: Config,
    todo: list[DeadLetter],
    options: RedriveOptions,
    report: RedriveReport,
    progress: Progress | None,
) -> None:
    resender = Resender(config)
    for chunk in paced(todo, options.rate):
        resender.send(
            [(letter.source_topic, _again(letter, options), letter.key) for letter in chunk],
            f"{len(chunk)} calls",
        )
        # Only once Kafka has the calls: a mark says "sent", never "about to be".
        marks = [
            (REDRIVES_TOPIC, _mark_value(letter, options), letter.mark.encode()) for letter in chunk
        ]
        resender.send(marks, f"{len(chunk)} redrive marks")
        report.redriven += len(chunk)
        report.ids.extend(letter.id for letter in chunk if letter.id)
        if progress is not None:
            progress(report.redriven, len(todo))


def _again(letter: DeadLetter, options: RedriveOptions) -> bytes:
    """The call as it is sent again: same id, for its own group, counted as a redrive."""
    envelope = dict(letter.call or {})
    envelope["group"] = letter.group
    envelope["redrive"] = int(envelope.get("redrive", 0)) + 1
    # Due now, with a fresh set of attempts (its ttl does not apply to a resend: Expiry).
    envelope.update((name, 0) for name in ("due", "attempts") if name in envelope)
    if options.to_url is not None:
        envelope["url"] = options.to_url
    return orjson.dumps(envelope)


def _mark_value(letter: DeadLetter, options: RedriveOptions) -> bytes:
    return orjson.dumps(
        {
            "id": letter.id,
            "group": letter.group,
            "topic": letter.source_topic,
            "at": int(time.time() * 1000),
            "toUrl": options.to_url,
        }
    )


def redriven_marks(config: Config) -> set[str]:
    """The dead letters redriven so far: the keys of REDRIVES_TOPIC."""
    try:
        return {m.key().decode() for m in read_window(config, REDRIVES_TOPIC) if m.key()}
    except TopicMissing:
        return set()


def _ensure_marks_topic(config: Config) -> None:
    """The compacted topic of redrive marks, shaped like the most replicated call topic."""
    admin = AdminClient(client_settings(config))
    if REDRIVES_TOPIC in admin.list_topics(timeout=30).topics:
        return
    replicas = max((t.replication_factor for t in config.topics), default=1)
    topic = NewTopic(
        REDRIVES_TOPIC,
        num_partitions=1,
        replication_factor=replicas,
        config={"cleanup.policy": "compact"},
    )
    try:
        admin.create_topics([topic], operation_timeout=30)[REDRIVES_TOPIC].result()
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
