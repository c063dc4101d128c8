"""Work done in a forked child, so that what it loads never stays in this process.

A supervisor checks the operator's config with pydantic and librdkafka, at start and
on every SIGUSR1. Loaded once, they would stay in its memory for good: about 23 MiB
of a supervisor that needs 17 without them (bigpipe.node.workers). A forked child
loads them, does the work, hands back its JSON result and its log records, and exits.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson


class ChildFailed(Exception):
    """The child died before it could answer (a crash in a C library, say)."""


@dataclass(frozen=True)
class Answer:
    """A child's result, and the log records it made, to be logged here (`log`)."""

    result: Any
    records: list[tuple[str, int, str]]  # logger name, level, message

    def log(self) -> None:
        """Log the child's records in this process, in order, as if made here: at the
        caller's moment, say once a reload has moved the log where the new file says."""
        for name, level, message in self.records:
            logging.getLogger(name).log(level, "%s", message)


def in_child(work: Callable[[], Any]) -> Answer:
    """work()'s result (anything orjson encodes), computed in a forked child.

    The child is born with every signal blocked, and exits with them pending: it shares
    this process's name and its signal wake-up socket, so a `killall bigpipe` that caught
    it would otherwise reach a supervisor a second time (and a second SIGTERM means "skip
    the drain").
    """
    read_end, write_end = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
        if pid == 0:
            _answer(work, read_end, write_end)
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # only the parent comes here
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    if (code := os.waitstatus_to_exitcode(status)) != 0 or not answer:
        raise ChildFailed(f"exit {code}")
    result, records = orjson.loads(answer)
    return Answer(result, [tuple(record) for record in records])


def _answer(work: Callable[[], Any], read_end: int, write_end: int) -> NoReturn:
    """The child: run the work, write [result, log records] to the pipe, and exit without
    returning into the parent's code or running its exit handlers."""
    code = 1
    try:
        os.close(read_end)
        records: list[tuple[str, int, str]] = []
        logging.root.handlers = [_Collector(records)]  # the parent's would queue them
        result = work()
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(orjson.dumps([result, records]))
        code = 0
    finally:
        os._exit(code)


class _Collector(logging.Handler):
    def __init__(self, records: list[tuple[str, int, str]]) -> None:
        super().__init__()
        self._records = records

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append((record.name, record.levelno, record.getMessage()))
