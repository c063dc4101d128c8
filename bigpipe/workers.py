"""Every core: a supervising `bigpipe` process and N worker processes.

One Python process runs on one core, so a node runs `http.server.workers`
workers. Each is a whole Bigpipe node: it listens on the shared port
(SO_REUSEPORT, the kernel spreads connections) and joins every consumer group
(Kafka spreads the partitions). The supervisor, named `bigpipe` so that
`killall -USR1 bigpipe` reaches it, forwards SIGUSR1 and SIGTERM to the
workers (named `bigpipe-worker`, so they are not signalled twice), restarts a
worker that dies, and owns the shared board through which `/stats` and
`/metrics` report node-wide numbers.

`rateLimit` and `concurrency` stay node-wide: each worker takes its share
(see `share_of`), so N workers together never exceed the configured limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import math
import signal
import sys
import time

from bigpipe.board import Board
from bigpipe.config import Config, ConsumerConfig

log = logging.getLogger(__name__)

WORKER_NAME = b"bigpipe-worker"
RESTART_BACKOFF_SECONDS = (1, 2, 5, 10, 30)
STABLE_SECONDS = 30  # a worker that lived this long resets its restart backoff
PR_SET_PDEATHSIG = 1


def share_of(consumer: ConsumerConfig, workers: int) -> ConsumerConfig:
    """One worker's part of a group's node-wide limits.

    The rate divides exactly. Concurrency rounds up, so each worker keeps at least
    one slot; with more workers than `concurrency`, the node may then run up to
    one call per worker at once.
    """
    if workers == 1:
        return consumer
    return dataclasses.replace(
        consumer,
        rate_limit=consumer.rate_limit / workers,
        concurrency=math.ceil(consumer.concurrency / workers),
        max_buffered=math.ceil(consumer.max_buffered / workers),
    )


def die_with_parent() -> None:
    """Ask Linux to send this worker SIGTERM if its supervisor dies, even by kill -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclasses.dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0


class Supervisor:
    def __init__(self, config: Config, workers: int) -> None:
        assert config.source is not None
        self._config = config
        self._workers = [_Worker(i) for i in range(workers)]
        self._board = Board.create(workers)
        self._stopping = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, self._forward, signal.SIGUSR1)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop, signum, stopped)
        log.info("supervising %d workers on port %d", len(self._workers), self._config.http_port)
        try:
            keepers = [asyncio.create_task(self._keep_running(w)) for w in self._workers]
            await stopped.wait()
            results = await asyncio.gather(*keepers)
        finally:
            self._board.remove()
        return 0 if all(code == 0 for code in results) else 1

    def _command(self, worker: _Worker) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bigpipe",
            "-config",
            str(self._config.source),
            "--worker-of",
            f"{self._board.path}:{worker.index}:{len(self._workers)}",
        ]

    async def _keep_running(self, worker: _Worker) -> int:
        """Run one worker until the node stops; restart it whenever it dies before that."""
        while True:
            # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which
            # forwards one SIGTERM; a second signal would make the workers skip the drain.
            worker.process = await asyncio.create_subprocess_exec(
                *self._command(worker), start_new_session=True
            )
            worker.started = time.monotonic()
            code = await worker.process.wait()
            if self._stopping:
                return code
            worker.failures = (
                0 if time.monotonic() - worker.started > STABLE_SECONDS else worker.failures + 1
            )
            delay = (
                RESTART_BACKOFF_SECONDS[min(worker.failures, len(RESTART_BACKOFF_SECONDS)) - 1]
                if worker.failures
                else 0
            )
            log.error("worker %d exited with %d; restarting it in %d s", worker.index, code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return 0

    def _forward(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def _on_stop(self, signum: int, stopped: asyncio.Event) -> None:
        # A second signal is forwarded too: each worker then exits at once.
        log.info("%s: draining %d workers", signal.Signals(signum).name, len(self._workers))
        self._stopping = True
        self._forward(signal.SIGTERM)
        stopped.set()
