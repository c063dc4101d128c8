"""`bigpipe -config bigpipe.json`: parse arguments, load the config, run the node.

Exit codes: 0 after a clean drain, 1 when the node fails at run time (for
example the port is taken, or workers keep dying before they are up), 2 for a
bad command line or config.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from bigpipe import __version__
from bigpipe.config_error import ConfigError
from bigpipe.logs import Logging
from bigpipe.node.board import OWNER_NAME, Board
from bigpipe.node.signals import Wakeups
from bigpipe.node.workers import (
    WORKER_NAME,
    NodeFile,
    Supervisor,
    available_cpus,
    die_with_parent,
    load_apart,
    read_snapshot,
)
from bigpipe.stats import NodeCounters

if TYPE_CHECKING:
    from bigpipe.config import Config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# First words that make `bigpipe` an operator's command (bigpipe.operate.commands), not a node.
OPERATOR_COMMANDS = ("dlq", "replay", "top", "status", "config", "completion")
PROCESS_NAME = OWNER_NAME.encode()

log = logging.getLogger("bigpipe")


class Loaded(NamedTuple):
    file: NodeFile  # the operator's file, checked (in a worker: its settings, no JSON)
    config: Config | None  # None until a node that serves parses the file (see run)
    reloads: NodeCounters | None  # in a worker: the node's reload counters, from the snapshot


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bigpipe",
        description="Kafka-backed asynchronous HTTP RPC middleware.",
        epilog="operator commands (each with --help): "
        + ", ".join(f"bigpipe {name}" for name in OPERATOR_COMMANDS),
    )
    add_node_options(parser)
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 (one per core) or more")
    return args


def add_node_options(parser: argparse.ArgumentParser) -> None:
    """The options of `bigpipe` running a node (shell completion offers them too)."""
    # -config with one dash is the original bigpipe's spelling; keep it working.
    parser.add_argument(
        "-config",
        "--config",
        default="config/bigpipe.json",
        help="path of the JSON config (default: %(default)s)",
    )
    parser.add_argument(
        "--check", action="store_true", help="validate the config, print 'config ok' and exit"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes, overriding http.server.workers (0: one per usable CPU)",
    )
    parser.add_argument("--version", action="version", version=f"bigpipe {__version__}")
    # Set by the supervisor on the workers it starts: BOARD_PATH:INDEX:COUNT, and the
    # snapshot of its config that they run (bigpipe.node.workers). Their -config names the
    # node's file, for `ps` and the logs; they never read it.
    parser.add_argument("--worker-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", default=None, help=argparse.SUPPRESS)


def set_process_name(name: bytes = PROCESS_NAME) -> None:
    """Name the process `bigpipe`, so `killall -USR1 bigpipe` finds it however it was started."""
    with contextlib.suppress(OSError):  # not Linux: the name only helps killall
        Path("/proc/self/comm").write_bytes(name)


def worker_count(args: argparse.Namespace, file: NodeFile) -> int:
    wanted = args.workers if args.workers is not None else file.workers
    return wanted or available_cpus()


def run(
    args: argparse.Namespace,
    loaded: Loaded,
    workers: int,
    logs: Logging,
) -> int:
    """Run as a supervisor of workers, as one of its workers, or as a single process.

    Only a node that serves imports bigpipe.node.app, and with it aiohttp, the Kafka
    library, the config's models and an event loop: a supervisor never needs them
    (tests/test_supervisor_imports.py).
    """
    file, config, reloads = loaded
    if workers > 1 and args.worker_of is None:
        set_process_name()
        wakeups = Wakeups.of_signals(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        return Supervisor(file, workers, logs).run(wakeups)
    import uvloop

    from bigpipe.config import parse_config
    from bigpipe.node.app import WorkerSlot, serve

    if args.worker_of is not None:
        assert reloads is not None and config is not None
        path, index, count = args.worker_of.rsplit(":", 2)
        set_process_name(WORKER_NAME)
        if not die_with_parent():
            print("bigpipe: worker: its supervisor is gone already; exiting", file=sys.stderr)
            return EXIT_FAILED
        board = Board(Path(path), int(count))
        return uvloop.run(
            serve(config, logs, WorkerSlot(board, int(index), Path(args.snapshot), reloads))
        )
    set_process_name()
    # Checked in load, by a child: parsing it here again gives the Config to run.
    return uvloop.run(serve(parse_config(file.raw, Path(file.source)), logs))


def log_origin(args: argparse.Namespace, workers: int) -> str | None:
    """Who writes this process's log lines: `worker-N`, `supervisor`, or a lone node (None).

    Every worker logs the same events, so without it each line came N times, anonymous.
    """
    if args.worker_of is not None:
        return f"worker-{args.worker_of.rsplit(':', 2)[1]}"
    return "supervisor" if workers > 1 else None


def tune_gc() -> None:
    """Collect young garbage less often; most per-call objects die by refcount anyway.

    Every call allocates a task, futures and dicts, so CPython's default
    threshold (700) runs a collection every few calls. bench/delivery.py measured
    +14% deliveries/s with this setting. Freezing the start-up objects keeps them
    out of every later full collection.
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def load(args: argparse.Namespace) -> Loaded:
    """The operator's file, checked in a child process (bigpipe.node.workers.load_apart),
    or, in a worker, the supervisor's snapshot: its config and the node's reload
    counters, read once."""
    if args.worker_of is not None:
        config, reloads = read_snapshot(Path(args.snapshot), Path(args.config))
        return Loaded(NodeFile.of({}, config), config, reloads)
    return Loaded(load_apart(args.config), None, None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OPERATOR_COMMANDS:
        from bigpipe.operate.commands import main as operate  # a node never loads them

        return operate(argv)
    args = parse_args(argv)
    try:
        loaded = load(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"bigpipe: config error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.check:
        print("config ok")
        return EXIT_OK
    file = loaded.file
    workers = 1 if args.worker_of is not None else worker_count(args, file)
    logs = Logging(log_origin(args, workers))
    logs.apply(file.log_level, file.log_directory, file.log_format)
    try:
        tune_gc()
        return run(args, loaded, workers, logs)
    except OSError as exc:
        log.critical("cannot run: %s", exc)
        print(f"bigpipe: cannot run: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        logs.stop()
