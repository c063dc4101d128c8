"""The process that builds a node's status view (bigpipe.calls.status_view) from the
results topic: `python -m bigpipe.calls.view_builder`, started by the worker that owns
the view.

It runs apart from the worker because the work is all its own: every step of every call
is fetched, sliced and written to SQLite, and in a thread of a worker that held the GIL
beside its calls (bench/status.py: a tenth of a 1-worker node's deliveries). It imports
only the Kafka client, SQLite and orjson, and takes its settings as one JSON object on
stdin (the Kafka client settings hold credentials: not on the command line). It tells
the worker what it would log, and the view's lag, as JSON lines on stdout, and exits
when its stdin closes, on SIGTERM, or when the worker dies (PR_SET_PDEATHSIG).

A thread reads every partition of the topic, without a consumer group, from the
positions kept in the file itself, and appends each record as a row, one transaction
per batch. A file made for another cluster or topic is built anew from the topic's
beginning; rows older than the retention are deleted every minute.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # confluent-kafka's package imports asyncio (for its asyncio clients), and asyncio loads
    # the ssl module when there is one: 5 MiB of RSS (libssl, libcrypto) for a process
    # that never opens a TLS socket from Python. librdkafka has its own OpenSSL, so Kafka
    # over TLS is unaffected; asyncio works without ssl. Only when run as the builder: a
    # worker imports this module too, and delivers over HTTPS.
    sys.modules.setdefault("ssl", None)  # type: ignore[assignment]

import contextlib
import ctypes
import logging
import os
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

log = logging.getLogger("bigpipe.calls.view_builder")

BATCH = 2000
POLL_SECONDS = 0.2
LAG_SECONDS = 1.0
PRUNE_SECONDS = 60.0
PRUNE_BATCH = 10_000
METADATA_TIMEOUT = 5.0
RETRY_SECONDS = 5.0
# SQLite's page cache (2 MiB by default). The builder only appends, so the pages it
# needs are the last few of the table and of its index: 2 MiB only filled up, under
# load, for good (3 MiB of a 2-worker node's growth under overload, bench/memory.py),
# and a 512 KiB cache appends 2,000-step batches as fast (2.8 us a row either way).
CACHE_KIB = 512
PR_SET_PDEATHSIG = 1
# Not `bigpipe`: `killall -USR1 bigpipe` reloads the node's main process, never this one.
PROCESS_NAME = b"bigpipe-view"
# Calls come first: on busy cores the view falls behind (viewLag) rather than slowing them.
NICENESS = 10

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
CALL_ID = re.compile(rb"[0-9a-f]{32}")


def call_key(call_id: bytes) -> int:
    """The first 64 bits of a call id, as SQLite's signed 64-bit integer."""
    return int(call_id[:16], 16) - (1 << 63)


class Builder:
    """Follows the results topic into the SQLite file at `path` until `stopping` is set."""

    def __init__(
        self, kafka: dict[str, Any], topic: str, path: Path, retention_ms: int, report: Report
    ) -> None:
        self._kafka_settings = kafka
        self._topic = topic
        self._path = path
        self._retention_ms = retention_ms
        self._report = report
        self.stopping = threading.Event()

    def run(self) -> None:
        """Never raises; a failure is logged and retried."""
        while not self.stopping.is_set():
            try:
                self._build_from_kafka()
            except (sqlite3.Error, OSError, KafkaException) as exc:
                log.error("status view %s: %s; retrying in 5 s", self._path, exc)
                self.stopping.wait(RETRY_SECONDS)

    def _build_from_kafka(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None)
        db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
        db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:  # an older file
            db.executescript("DROP TABLE IF EXISTS steps; DROP TABLE IF EXISTS positions;")
            db.executescript("DROP TABLE IF EXISTS meta;")
        db.executescript(SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        kafka = Consumer(
            {
                # The worker's, with the bounds on its prefetch (status_view.VIEW_READER_DEFAULTS):
                # a builder behind a backlog (at nice 10, on busy cores) fills it.
                **self._kafka_settings,
                "logger": logging.getLogger("librdkafka"),
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
        topic = self._topic
        while not self.stopping.is_set():
            metadata = kafka.list_topics(topic, timeout=METADATA_TIMEOUT)
            found = metadata.topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                break
            self.stopping.wait(1.0)  # the node creates it as it joins Kafka
        else:
            return []
        origin = f"{metadata.cluster_id}/{topic}"
        if _meta(db, "origin") != origin:
            log.info("status view %s: building it from %s", self._path, topic)
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
        lag = -1
        while not self.stopping.is_set():
            messages = kafka.consume(BATCH, POLL_SECONDS)
            self._apply(db, [m for m in messages if m.error() is None])
            now = time.monotonic()
            if now >= next_lag:
                lag = self._lag(db, kafka, partitions, lag)
                self._report({"lag": lag})
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
        rows = [(call_key(key), key, times[key], b"\n".join(steps)) for key, steps in calls.items()]
        with db:  # one transaction: the rows and the positions they move to
            db.execute("BEGIN")
            db.executemany("INSERT INTO steps VALUES (?, ?, ?, ?)", rows)
            db.executemany("INSERT OR REPLACE INTO positions VALUES (?, ?)", positions.items())

    def _lag(
        self,
        db: sqlite3.Connection,
        kafka: Consumer,
        partitions: list[TopicPartition],
        known: int,
    ) -> int:
        """Records stored in the topic and not yet in the view, from the last fetches' ends;
        `known` while nothing has been fetched yet."""
        positions = dict(db.execute("SELECT partition, next FROM positions").fetchall())
        lag = 0
        for tp in partitions:
            try:
                low, high = kafka.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                return known
            if high < 0:
                return known
            lag += max(0, high - max(positions.get(tp.partition, 0), low))
        return lag

    def _prune(self, db: sqlite3.Connection) -> None:
        """Delete the rows older than the retention, from the oldest (rows come in time order,
        near enough: a step late by a few seconds goes a minute later)."""
        cutoff = int(time.time() * 1000) - self._retention_ms
        while not self.stopping.is_set():
            with db:
                db.execute("BEGIN")
                deleted = db.execute(
                    "DELETE FROM steps WHERE rowid IN (SELECT rowid FROM steps ORDER BY rowid"
                    " LIMIT ?) AND at < ?",
                    (PRUNE_BATCH, cutoff),
                ).rowcount
            if deleted < PRUNE_BATCH:
                return


def _meta(db: sqlite3.Connection, name: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


# ---------------------------------------------------------------- talking to the worker
class Report:
    """Writes one JSON object a line to stdout, the worker's pipe; from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, line: dict[str, Any]) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):  # the worker is gone
            sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
            sys.stdout.buffer.flush()


class ReportHandler(logging.Handler):
    """Log records go to the worker, which logs them as its own (its format, its files)."""

    def __init__(self, report: Report) -> None:
        super().__init__()
        self._report = report

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self._report({"log": record.levelno, "name": record.name, "msg": message})


def main() -> int:
    with contextlib.suppress(OSError, AttributeError):  # die with the worker, even by kill -9
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_bytes(PROCESS_NAME)
    os.nice(NICENESS)
    # Ctrl-C reaches the whole process group: the worker stops it, by closing its stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # SIGTERM is taken by a thread of its own (sigwait), never by a handler: a handler runs
    # inside whatever the main thread was doing, and one that set the stop event while the
    # main thread held that event's lock (waiting on it, or in a first handler: the worker's
    # SIGTERM and PR_SET_PDEATHSIG's come together) deadlocked, and the builder outlived its
    # worker. Blocked before any thread starts, so that every thread inherits the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    line = sys.stdin.buffer.readline()
    if not line:  # the worker stopped before it said what to build
        return 0
    settings = orjson.loads(line)
    report = Report()
    logging.basicConfig(level=settings["level"], handlers=[ReportHandler(report)], force=True)
    builder = Builder(
        settings["kafka"],
        settings["topic"],
        Path(settings["path"]),
        settings["retention_ms"],
        report,
    )
    threading.Thread(target=_stop_at_sigterm, args=(builder.stopping,), daemon=True).start()
    # The worker closing the pipe (it stops, or follows new settings) stops the builder too.
    threading.Thread(target=_stop_at_eof, args=(builder.stopping,), daemon=True).start()
    builder.run()
    return 0


def _stop_at_sigterm(stopping: threading.Event) -> None:
    signal.sigwait({signal.SIGTERM})
    stopping.set()


def _stop_at_eof(stopping: threading.Event) -> None:
    # The file descriptor, not sys.stdin: a read blocked in sys.stdin holds its buffer's
    # lock, and the interpreter aborted at exit (SIGABRT) when a SIGTERM stopped the builder.
    with contextlib.suppress(OSError):
        while os.read(sys.stdin.fileno(), 4096):
            pass
    stopping.set()


if __name__ == "__main__":
    sys.exit(main())
