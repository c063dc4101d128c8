"""Logging with the original's levels 1-5, written off the event loop.

Records go through a queue to a listener thread, so a slow disk never stalls
ingest or delivery. Files are named bigpipe.YYYYMMDD_HH.log, one per hour, as
the original names them.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import time
from pathlib import Path

import orjson

LEVELS = {
    1: logging.CRITICAL,
    2: logging.ERROR,
    3: logging.WARNING,
    4: logging.INFO,
    5: logging.DEBUG,
}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
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
        hour = time.strftime("%Y%m%d_%H", time.localtime(record.created))
        if hour != self._hour:
            self._open(hour)
        assert self._stream is not None
        self._stream.emit(record)

    def _open(self, hour: str) -> None:
        if self._stream is not None:
            self._stream.close()
        self._hour = hour
        self._stream = logging.FileHandler(
            self._directory / f"bigpipe.{hour}.log", encoding="utf-8"
        )
        self._stream.setFormatter(self.formatter)
        self._prune()

    def _prune(self) -> None:
        cutoff = time.time() - self._retention_seconds
        for path in self._directory.glob("bigpipe.*.log"):
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        super().close()


class Logging:
    """Owns the queue listener; `apply` switches level and destination, e.g. on reload."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener: logging.handlers.QueueListener | None = None
        self._sink_settings: tuple[str, str] | None = None
        root = logging.getLogger()
        root.handlers[:] = [logging.handlers.QueueHandler(self._queue)]

    def apply(self, level: int, directory: str, style: str = "text") -> None:
        logging.getLogger().setLevel(LEVELS[level])
        if self._listener is not None and self._sink_settings == (directory, style):
            return
        self.stop()
        handler = _sink(directory)
        handler.setFormatter(JsonFormatter() if style == "json" else logging.Formatter(FORMAT))
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._listener.start()
        self._sink_settings = (directory, style)

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            for handler in self._listener.handlers:
                handler.close()
            self._listener = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def _sink(directory: str) -> logging.Handler:
    if directory in ("", "-"):
        return logging.StreamHandler(sys.stderr)
    return HourlyFileHandler(Path(directory))
