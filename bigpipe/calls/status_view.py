"""Each node's view of the results topic: an SQLite file that answers `GET /rpc/call/{id}`.

One process per node builds it (bigpipe.calls.view_builder), started by the lone
process or worker 0, which supervises it; every worker reads the file (WAL mode:
readers never wait for the writer).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson

from bigpipe.calls.status import status_of
from bigpipe.calls.view_builder import call_key
from bigpipe.config import Config
from bigpipe.kafka import CATCH_UP_DEFAULTS, client_settings
from bigpipe.stats import StatusCounters

log = logging.getLogger(__name__)

RESTART_SECONDS = 5.0  # after the builder died on its own
# Per partition and fetch (1 MiB by default; a larger batch still comes whole): the lz4
# batches of the results topic decompress to several times that. A builder catching up on
# 300,000 steps peaked at 79 MiB of RSS with a 4 MiB prefetch, 1 MiB fetches and a 1 s
# fetch backoff (70,000 steps/s); at 44 MiB with these (96,000 steps/s). Idle, it holds 31.
VIEW_READER_DEFAULTS = {**CATCH_UP_DEFAULTS, "max.partition.fetch.bytes": 64 * 1024}
STOP_SECONDS = 2.0  # how long a builder asked to stop may take before it is killed


def view_path(config: Config) -> Path:
    """One file per node: the port tells apart nodes that share a directory."""
    directory = Path(config.status_directory or Path(tempfile.gettempdir()) / "bigpipe-status")
    return directory / f"bigpipe-status-{config.http_port}.sqlite3"


def builder_kafka_settings(config: Config) -> dict[str, Any]:
    """The builder's Kafka client settings, but its logger (it has its own)."""
    settings = client_settings(config, VIEW_READER_DEFAULTS)
    return {key: value for key, value in settings.items() if key != "logger"}


class StatusView:
    """Lookups for every worker; the builder process in one of them."""

    def __init__(self, config: Config, counters: StatusCounters) -> None:
        self._config = config
        self.path = view_path(config)
        self._reader: sqlite3.Connection | None = None
        self._opening = threading.Lock()
        self._builder = BuilderProcess(self.builder_settings, counters)

    def start_building(self) -> None:
        """Start the builder; again (joining Kafka anew after a reload): no-op."""
        self._builder.start()

    def renew(self, config: Config) -> None:
        """New client settings (rotated credentials, say): a new builder, which resumes
        where the file left off (its positions are stored)."""
        self._config = config
        self._builder.restart()

    def close(self) -> None:
        """Blocking (it waits for the builder to stop): call it on a thread."""
        self._builder.stop()
        if self._reader is not None:
            self._reader.close()

    def builder_settings(self) -> dict[str, Any]:
        """What the builder process is told on its stdin."""
        config = self._config
        return {
            "kafka": builder_kafka_settings(config),
            "topic": config.status_topic,
            "path": str(self.path),
            "retention_ms": config.status_retention_ms,
            "level": logging.getLogger().getEffectiveLevel(),
        }

    def lookup(self, call_id: str, caller: str) -> dict[str, Any] | None:
        """The call's status if `caller` posted it and it is within the retention.

        Raises sqlite3.Error while the view does not exist yet. Blocking (a disk read):
        call it on a thread, not on the event loop.
        """
        key = call_id.encode()
        rows = (
            self._connection()
            .execute(
                "SELECT records FROM steps WHERE h = ? AND id = ? ORDER BY rowid",
                (call_key(key), key),
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


class BuilderProcess:
    """Runs bigpipe.calls.view_builder and keeps it running: a thread starts it, feeds it
    its settings, reads its reports (log lines, the view's lag) and starts it again if
    it dies. The thread lives as long as the process: Linux signals the process when the
    thread that started it ends (PR_SET_PDEATHSIG), so a worker that dies, even by
    kill -9, takes its builder with it."""

    def __init__(self, settings: Callable[[], dict[str, Any]], counters: StatusCounters) -> None:
        self._settings = settings  # read at each start: a reload may have changed them
        self._counters = counters
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._restarting = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="status-view", daemon=True)
            self._thread.start()

    def restart(self) -> None:
        """Stop the builder; the thread starts one with the view's new settings. Never
        waits: a reload calls it on the event loop."""
        if self._thread is not None:
            self._restarting.set()
            self._close_stdin()

    def stop(self) -> None:
        """Stop the builder, killing it past STOP_SECONDS. Blocking: call it on a thread."""
        self._stopping.set()
        self._close_stdin()
        process = self._process
        if process is not None:
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
        if self._thread is not None:
            self._thread.join(STOP_SECONDS)

    def _close_stdin(self) -> None:
        """The builder stops when its stdin closes (within a poll of Kafka)."""
        process = self._process
        if process is not None and process.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                process.stdin.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._restarting.clear()
            code = self._run_once()
            self._counters.viewLag = -1  # not known again until a builder says so
            if self._stopping.is_set():
                return
            if not self._restarting.is_set():
                log.error(
                    "status view builder exited (%s); starting it again in %.0f s",
                    code,
                    RESTART_SECONDS,
                )
                self._stopping.wait(RESTART_SECONDS)

    def _run_once(self) -> int:
        """One builder process, from its start to its end; its exit status. Leaving the
        `with` closes both pipes: a builder started again leaks no descriptor."""
        with subprocess.Popen(
            [sys.executable, "-P", "-m", "bigpipe.calls.view_builder"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        ) as process:
            self._process = process
            assert process.stdin is not None and process.stdout is not None
            with contextlib.suppress(OSError, ValueError):  # it died at once, or was stopped
                process.stdin.write(orjson.dumps(self._settings()) + b"\n")
                process.stdin.flush()
            if self._stopping.is_set() or self._restarting.is_set():
                self._close_stdin()  # asked to stop while it was starting
            self._follow_reports(process.stdout)
        return process.returncode

    def _follow_reports(self, reports: IO[bytes]) -> None:
        for line in reports:
            try:
                report = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if "lag" in report:
                self._counters.viewLag = report["lag"]
            elif "log" in report:
                logging.getLogger(report.get("name", __name__)).log(report["log"], report["msg"])


def _now_ms() -> int:
    return int(time.time() * 1000)
