"""Each node's view of the results topic: an SQLite file that answers `GET /rpc/call/{id}`.

One process per node (the lone process, or worker 0) builds it: a thread reads every
partition of the results topic, without a consumer group, from the positions kept in
the file itself, and appends each record as a row, one transaction per batch. Every
worker reads the file (WAL mode: readers never wait for the writer). A node started
with no file, or whose file came from another cluster or topic, reads the topic from its
beginning; Kafka's retention bounds that, and rows older than the retention are
deleted every minute, so the file stays bounded too.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from bigpipe.calls.status import status_of
from bigpipe.config import Config
from bigpipe.kafka import client_settings
from bigpipe.stats import StatusCounters

log = logging.getLogger(__name__)

BATCH = 2000
POLL_SECONDS = 0.2
LAG_SECONDS = 1.0
PRUNE_SECONDS = 60.0
PRUNE_BATCH = 10_000
METADATA_TIMEOUT = 5.0

# A row holds the steps of one call that came in one batch, as JSON lines: steps of a call
# come close together, so grouping them saves rows. Rows are found by `h`, the first 64
# bits of the call id as an integer: cheaper to index than the text, and, as call ids
# start with their acceptance time, new rows land at the end of the index.
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS positions (partition INTEGER PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS steps (h INTEGER NOT NULL, id BLOB NOT NULL, at INTEGER NOT NULL,
                                  records BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS steps_by_h ON steps (h);
"""


def view_path(config: Config) -> Path:
    """One file per node: the port tells apart nodes that share a directory."""
    directory = Path(config.status_directory or Path(tempfile.gettempdir()) / "bigpipe-status")
    return directory / f"bigpipe-status-{config.http_port}.sqlite3"


class StatusView:
    """Lookups for every worker; the building thread in one of them."""

    def __init__(self, config: Config, counters: StatusCounters) -> None:
        self._config = config
        self._counters = counters
        self.path = view_path(config)
        self._reader: sqlite3.Connection | None = None
        self._opening = threading.Lock()
        self._stopping = threading.Event()
        self._renew = threading.Event()  # new client settings: follow with a new consumer
        self._builder: threading.Thread | None = None

    def start_building(self) -> None:
        """Start the building thread; again (joining Kafka anew after a reload): no-op."""
        if self._builder is not None:
            return
        self._builder = threading.Thread(target=self._build, name="status-view", daemon=True)
        self._builder.start()

    def renew(self, config: Config) -> None:
        """New client settings (rotated credentials, say): a new Kafka consumer, which
        resumes where the file left off (its positions are stored)."""
        self._config = config
        self._renew.set()

    def close(self) -> None:
        self._stopping.set()
        if self._builder is not None:
            self._builder.join(POLL_SECONDS * 10)
        if self._reader is not None:
            self._reader.close()

    def lookup(self, call_id: str, caller: str) -> dict[str, Any] | None:
        """The call's status if `caller` posted it and it is within the retention.

        Raises sqlite3.Error while the view does not exist yet. Blocking (a disk read):
        call it on a thread, not on the event loop.
        """
        key = call_id.encode()
        rows = (
            self._connection()
            .execute(
                "SELECT records FROM steps WHERE h = ? AND id = ? ORDER BY rowid", (_h(key), key)
            )
            .fetchall()
        )
        records = [orjson.loads(line) for row in rows for line in row[0].split(b"\n")]
        if any(record.get("caller") != caller for record in records):
            return None  # another caller's call: the same answer as an unknown one
        status = status_of(call_id, records)
        if status is None or status["accepted"] < _now_ms() - self._config.status_retention_ms:
            return None
        return status

    def _connection(self) -> sqlite3.Connection:
        """The read-only connection lookups share (sqlite3 serialises its use), opened by
        the first lookup that finds the view built; lookups run on threads, hence the lock."""
        with self._opening:
            if self._reader is None:
                if not self.path.exists():
                    raise sqlite3.OperationalError("the status view is not built yet")
                self._reader = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, check_same_thread=False
                )
            return self._reader

    # ------------------------------------------------------------ building
    def _build(self) -> None:
        """The building thread: never raises; a failure is logged and retried."""
        while not self._stopping.is_set():
            try:
                self._build_from_kafka()
                if not self._renew.is_set():
                    return
                self._renew.clear()
            except (sqlite3.Error, OSError, KafkaException) as exc:
                log.error("status view %s: %s; retrying in 5 s", self.path, exc)
                self._stopping.wait(5.0)

    def _build_from_kafka(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
        if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:  # an older file
            db.executescript("DROP TABLE IF EXISTS steps; DROP TABLE IF EXISTS positions;")
            db.executescript("DROP TABLE IF EXISTS meta;")
        db.executescript(SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        kafka = Consumer(
            {
                **client_settings(self._config),
                "group.id": "bigpipe-status-view",  # assigned, never joined or committed
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        try:
            partitions = self._assign(db, kafka)
            self._follow(db, kafka, partitions)
        finally:
            kafka.close()
            db.close()

    def _assign(self, db: sqlite3.Connection, kafka: Consumer) -> list[TopicPartition]:
        """Start each partition where the file left off; anew if the file is another's."""
        topic = self._config.status_topic
        while not self._stopping.is_set():
            metadata = kafka.list_topics(topic, timeout=METADATA_TIMEOUT)
            found = metadata.topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                break
            self._stopping.wait(1.0)  # the node creates it as it joins Kafka
        else:
            return []
        origin = f"{metadata.cluster_id}/{topic}"
        if _meta(db, "origin") != origin:
            log.info("status view %s: building it from %s", self.path, topic)
            db.executescript("DELETE FROM steps; DELETE FROM positions; DELETE FROM meta;")
            db.execute("INSERT INTO meta VALUES ('origin', ?)", (origin,))
        positions = dict(db.execute("SELECT partition, next FROM positions").fetchall())
        partitions = [
            TopicPartition(topic, number, positions.get(number, OFFSET_BEGINNING))
            for number in sorted(found.partitions)
        ]
        kafka.assign(partitions)
        return partitions

    def _follow(
        self, db: sqlite3.Connection, kafka: Consumer, partitions: list[TopicPartition]
    ) -> None:
        next_lag = next_prune = 0.0
        while not self._stopping.is_set() and not self._renew.is_set():
            messages = kafka.consume(BATCH, POLL_SECONDS)
            self._apply(db, [m for m in messages if m.error() is None])
            now = time.monotonic()
            if now >= next_lag:
                self._counters.viewLag = self._lag(db, kafka, partitions)
                next_lag = now + LAG_SECONDS
            if now >= next_prune:
                self._prune(db)
                next_prune = now + PRUNE_SECONDS

    def _apply(self, db: sqlite3.Connection, messages: list[Any]) -> None:
        """Append a batch's steps, grouped by call, and the positions they move to.

        No JSON is decoded here: the key is the call id, the time Kafka's timestamp."""
        if not messages:
            return
        calls: dict[bytes, list[bytes]] = {}
        times: dict[bytes, int] = {}
        positions = {}
        for message in messages:
            positions[message.partition()] = message.offset() + 1
            key, value = message.key(), message.value()
            if key is None or value is None or not CALL_ID.fullmatch(key):
                continue  # not a step Bigpipe wrote: nothing to show
            calls.setdefault(key, []).append(value)
            times[key] = message.timestamp()[1]
        rows = [(_h(key), key, times[key], b"\n".join(steps)) for key, steps in calls.items()]
        with db:  # one transaction: the rows and the positions they move to
            db.execute("BEGIN")
            db.executemany("INSERT INTO steps VALUES (?, ?, ?, ?)", rows)
            db.executemany("INSERT OR REPLACE INTO positions VALUES (?, ?)", positions.items())

    def _lag(
        self, db: sqlite3.Connection, kafka: Consumer, partitions: list[TopicPartition]
    ) -> int:
        """Records stored in the topic and not yet in the view, from the last fetches' ends."""
        positions = dict(db.execute("SELECT partition, next FROM positions").fetchall())
        lag = 0
        for tp in partitions:
            try:
                low, high = kafka.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                return self._counters.viewLag  # nothing fetched yet: keep what was known
            if high < 0:
                return self._counters.viewLag
            lag += max(0, high - max(positions.get(tp.partition, 0), low))
        return lag

    def _prune(self, db: sqlite3.Connection) -> None:
        """Delete the rows older than the retention, from the oldest (rows come in time order,
        near enough: a step late by a few seconds goes a minute later)."""
        cutoff = _now_ms() - self._config.status_retention_ms
        while not self._stopping.is_set():
            with db:
                db.execute("BEGIN")
                deleted = db.execute(
                    "DELETE FROM steps WHERE rowid IN (SELECT rowid FROM steps ORDER BY rowid"
                    " LIMIT ?) AND at < ?",
                    (PRUNE_BATCH, cutoff),
                ).rowcount
            if deleted < PRUNE_BATCH:
                return


CALL_ID = re.compile(rb"[0-9a-f]{32}")


def _h(call_id: bytes) -> int:
    """The first 64 bits of a call id, as SQLite's signed 64-bit integer."""
    return int(call_id[:16], 16) - (1 << 63)


def _meta(db: sqlite3.Connection, name: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def _now_ms() -> int:
    return int(time.time() * 1000)
