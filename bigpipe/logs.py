"""Logging with the original's levels 1-5, written off the event loop.

Records go through a queue to a listener thread, so a slow disk never stalls
ingest or delivery. Files are named bigpipe.YYYYMMDD_HH.log, one per hour, as
the original names them. Every line carries its time in RFC 3339 UTC and, in
a node with workers, who wrote it (`supervisor`, `worker-0`, ...).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

LEVELS = {
    1: logging.CRITICAL,
    2: logging.ERROR,
    3: logging.WARNING,
    4: logging.INFO,
    5: logging.DEBUG,
}
FORMAT = "%(asctime)s %(levelname)s {origin}%(name)s: %(message)s"
RETENTION_HOURS = 7 * 24


class HourlyFileHandler(logging.Handler):
    """Writes to bigpipe.YYYYMMDD_HH.log, opening a new file each hour and pruning old ones."""

    def __init__(self, directory: Path, retention_hours: int = RETENTION_HOURS) -> None:
        super().__init__()
        self._directory = directory
        self._retention_seconds = retention_hours * 3600
        self._hour = ""
        self._stream: logging.StreamHandler | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def emit(self, record: logging.LogRecord) -> None:
        # An exception out of here would end the QueueListener's thread, and with it every
        # later line: a line that cannot be written is reported on stderr, and only it lost.
        try:
            hour = time.strftime("%Y%m%d_%H", time.localtime(record.created))
            if hour != self._hour:
                self._open(hour)
            assert self._stream is not None
            self._stream.emit(record)
        except Exception:
            self.handleError(record)

    def _open(self, hour: str) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._hour = ""  # until the file is open: if opening fails, the next line tries again
        self._stream = logging.FileHandler(
            self._directory / f"bigpipe.{hour}.log", encoding="utf-8"
        )
        self._stream.setFormatter(self.formatter)
        self._hour = hour
        self._prune()

    def _prune(self) -> None:
        cutoff = time.time() - self._retention_seconds
        for path in self._directory.glob("bigpipe.*.log"):
            # Another process (a second worker, logrotate) may remove it meanwhile.
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        super().close()


class Logging:
    """Owns the queue listener; `apply` switches level and destination, e.g. on reload.

    `origin` names the process in every line (`worker-1`), or is None for a lone node.
    """

    def __init__(self, origin: str | None = None) -> None:
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener: logging.handlers.QueueListener | None = None
        self._sink_settings: tuple[str, str] | None = None
        self._origin = origin
        root = logging.getLogger()
        root.handlers[:] = [logging.handlers.QueueHandler(self._queue)]

    @property
    def to_file(self) -> bool:
        """Do lines go to files? Then stderr does not see them."""
        return self._sink_settings is not None and self._sink_settings[0] not in ("", "-")

    def apply(self, level: int, directory: str, style: str = "text") -> None:
        logging.getLogger().setLevel(LEVELS[level])
        if self._listener is not None and self._sink_settings == (directory, style):
            return
        self.stop()
        handler = _sink(directory)
        formatter = JsonFormatter if style == "json" else TextFormatter
        handler.setFormatter(formatter(self._origin))
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._listener.start()
        self._sink_settings = (directory, style)

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            for handler in self._listener.handlers:
                handler.close()
            self._listener = None


def rfc3339(created: float) -> str:
    """2026-12-04T08:40:00.123Z: UTC, so lines of hosts in other zones sort together."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """`TIME LEVEL [ORIGIN ]LOGGER: MESSAGE`."""

    def __init__(self, origin: str | None = None) -> None:
        super().__init__(FORMAT.format(origin=f"{origin} " if origin else ""))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message, worker."""

    def __init__(self, origin: str | None = None) -> None:
        super().__init__()
        self._origin = origin

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._origin is not None:
            entry["origin"] = self._origin
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def _sink(directory: str) -> logging.Handler:
    if directory in ("", "-"):
        return logging.StreamHandler(sys.stderr)
    return HourlyFileHandler(Path(directory))
