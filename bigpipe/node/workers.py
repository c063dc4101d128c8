"""Every core: a supervising `bigpipe` process and N worker processes.

One Python process runs on one core, so a node runs `http.server.workers`
workers. Each is a whole Bigpipe node: it listens on the shared port
(SO_REUSEPORT, the kernel spreads connections) and joins every consumer group
(Kafka spreads the partitions). The supervisor, named `bigpipe` so that
`killall -USR1 bigpipe` reaches it, restarts a worker that dies, forwards
SIGTERM, and owns two files in /dev/shm: the shared board through which
`/stats` and `/metrics` report node-wide numbers, and the config snapshot.

The snapshot is the config every worker runs: the one the supervisor last
loaded successfully. Only the supervisor reads the operator's file. On SIGUSR1
it validates the file, writes a new snapshot if the file is good, and then
signals the workers, which apply the snapshot. A worker restarted later starts
from the snapshot too, so an edited but unreloaded file, or a broken one, never
reaches one worker and not the others.

`rateLimit` and `concurrency` are the whole consumer group's, across workers and
nodes (bigpipe.delivery.budget). `maxBuffered` bounds a node's memory: each worker takes its
part (see `share_of`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import selectors
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

import bigpipe
from bigpipe.config_error import ConfigError
from bigpipe.logs import Logging
from bigpipe.node.board import Board, node_file, remove_stale_node_files
from bigpipe.node.forked import Answer, ChildFailed, in_child
from bigpipe.node.signals import Wakeups, notify_ready
from bigpipe.stats import NodeCounters

if TYPE_CHECKING:  # the supervisor never loads the config's models: see NodeFile
    from bigpipe.config import Config, ConsumerConfig

log = logging.getLogger(__name__)

WORKER_NAME = b"bigpipe-worker"
RESTART_BACKOFF_SECONDS = (1, 2, 5, 10, 30)
STABLE_SECONDS = 30  # a worker that lived this long resets its restart backoff
START_ATTEMPTS = 3  # a worker that dies this many times in a row before it is up: give up
PR_SET_PDEATHSIG = 1
SUPERVISOR_GONE = signal.SIGHUP  # a worker's drain signal when its supervisor dies
SUPERVISOR_PID_ENV = "BIGPIPE_SUPERVISOR_PID"  # set for its workers by the supervisor
EXIT_WORKERS_FAILED = 1
EXIT_SPAWN_FAILED = 127  # a worker that could not even be started, as a shell says it
CGROUP_ROOT = Path("/sys/fs/cgroup")


def share_of(consumer: ConsumerConfig, workers: int) -> ConsumerConfig:
    """One worker's part of a group's node-wide `maxBuffered`.

    Only that one is split here: `rateLimit` and `concurrency` are shared across the
    whole group by bigpipe.delivery.budget, by where the backlog is.
    """
    if workers == 1:
        return consumer
    return consumer.model_copy(
        update={
            "max_buffered": math.ceil(consumer.max_buffered / workers),
            "destination": consumer.destination.share(workers),
        }
    )


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota.

    os.cpu_count() counts the machine's CPUs; in a container or under `taskset` the
    process may run on fewer, and a worker per machine CPU would then only contend.
    """
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(cgroup_root, own_cgroup())
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def own_cgroup() -> str | None:
    """This process's cgroup v2 path ("/system.slice/bigpipe.service"), if it has one."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return line[3:].strip() if line.startswith("0::") else None  # else cgroup v1


def cgroup_cpu_quota(root: Path, cgroup: str | None) -> float | None:
    """The tightest `cpu.max` quota, in CPUs, of a cgroup v2 and its parents; None: no limit."""
    if cgroup is None:
        return None
    quotas = []
    directory = root / cgroup.lstrip("/")
    while True:
        with contextlib.suppress(OSError, ValueError):
            limit, period = (directory / "cpu.max").read_text().split()
            if limit != "max":
                quotas.append(int(limit) / int(period))
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    return min(quotas) if quotas else None


def die_with_parent() -> bool:
    """Ask Linux to send this worker SUPERVISOR_GONE if its supervisor dies, even by kill -9;
    False when the supervisor is gone already.

    Not SIGTERM: Linux sends the signal each time the worker's parent thread exits, and
    it is first reparented to another thread of the dying supervisor, so the signal may
    come twice; a second SIGTERM means "exit now, skip the drain".
    A supervisor that died while this worker was starting, before the request, never
    sends it: such a worker would run orphaned for ever (seen after tests killed a
    supervisor right after it restarted a worker). Its parent is no longer the
    supervisor that started it, which is what the last line checks.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, SUPERVISOR_GONE)
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    return supervisor is None or os.getppid() == int(supervisor)


# ---------------------------------------------------------------- the config snapshot
def write_snapshot(path: Path, raw: dict[str, Any], reloads: NodeCounters) -> None:
    """Replace the snapshot atomically: a worker reads either the old one or the new one."""
    temporary = path.with_name(path.name + ".new")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(orjson.dumps({"config": raw, "nodeStats": dataclasses.asdict(reloads)}))
    os.replace(temporary, path)


def read_snapshot(path: Path, source: Path) -> tuple[Config, NodeCounters]:
    """The config a worker runs (read from `source` by the supervisor), and the node's
    reload counters, which the supervisor keeps."""
    from bigpipe.config import parse_config, read_config_file  # a worker's, not a supervisor's

    snapshot = read_config_file(path)
    config = parse_config(snapshot["config"], source=source)
    return config, NodeCounters(**snapshot["nodeStats"])


# ---------------------------------------------------------------- the operator's file
@dataclasses.dataclass(frozen=True)
class NodeFile:
    """What the supervisor keeps of the operator's file once it is checked: its JSON, for
    the snapshot, and the few settings the supervisor itself uses.

    The file is read and checked (pydantic, librdkafka) in a forked child
    (bigpipe.node.forked): a supervisor that loaded them would keep them for good, about
    23 MiB of its RSS (tests/test_supervisor_imports.py).
    """

    raw: dict[str, Any]
    source: str
    workers: int
    http_port: int
    log_level: int
    log_directory: str
    log_format: str

    @classmethod
    def of(cls, raw: dict[str, Any], config: Config) -> NodeFile:
        return cls(
            raw,
            str(config.source),
            config.workers,
            config.http_port,
            config.log_level,
            config.log_directory,
            config.log_format,
        )


def load_apart(path: str | Path) -> NodeFile:
    """The operator's file, read and checked in a child; ConfigError lists its problems."""

    def load() -> Any:
        from bigpipe.node.preflight import load_checked

        try:
            raw, config = load_checked(path)
        except ConfigError as exc:
            return {"problems": exc.problems}
        return {"file": dataclasses.asdict(NodeFile.of(raw, config))}

    answer = in_child(load)
    answer.log()
    if "problems" in answer.result:
        raise ConfigError(answer.result["problems"])
    return NodeFile(**answer.result["file"])


def reload_apart(running: NodeFile) -> tuple[NodeFile | None, Answer]:
    """The operator's file read anew for a reload and checked, in a child: the file to
    run, None if it is refused, and the child's answer with its log lines (what changed,
    or why the file is refused), which the caller logs."""

    def reload() -> Any:
        from bigpipe.config import parse_config
        from bigpipe.node.reload import (
            log_rejected,
            log_reloaded,
            plan_reload,
            read_reload,
            with_running_http,
        )

        source = Path(running.source)
        config = parse_config(running.raw, source)
        try:
            raw, loaded = read_reload(config, source)
        except ConfigError as exc:
            log_rejected(exc)
            return {"problems": exc.problems}
        plan = plan_reload(config, loaded)
        log_reloaded(source, config, loaded, plan)
        kept = with_running_http(raw, running.raw)
        return {"file": dataclasses.asdict(NodeFile.of(kept, plan.config))}

    answer = in_child(reload)
    file = answer.result.get("file")
    return (None if file is None else NodeFile(**file)), answer


# ---------------------------------------------------------------- worker processes
class WorkerProcess:
    """A worker started with SIGUSR1 and SIGTERM blocked, watched and signalled through a
    pidfd.

    The signal mask is set by posix_spawn, so a reload forwarded while the worker imports
    its libraries waits until it can take it. The pidfd becomes readable when the worker
    exits, which is how the supervisor's selector learns of it, and it makes a signal
    reach this process, never a later one that reused its PID.
    """

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which
        # forwards one SIGTERM; a second signal would make the workers skip the drain.
        # SIGTERM too: the supervisor stopping while a worker starts must not kill it
        # mid-import (exit -15); the worker takes it once it can drain.
        self.pid = os.posix_spawn(
            argv[0], argv, env, setsid=True, setsigmask={signal.SIGUSR1, signal.SIGTERM}
        )
        self._pidfd = os.pidfd_open(self.pid)
        self.returncode: int | None = None

    def fileno(self) -> int:
        return self._pidfd

    def reap(self) -> int:
        """The exit code of a worker whose pidfd is readable (it has exited)."""
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._pidfd)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)


@dataclasses.dataclass
class _Worker:
    index: int
    process: WorkerProcess | None = None  # None while it waits to be restarted, or is done
    started: float = 0.0
    failures: int = 0
    start_failures: int = 0  # deaths in a row before the worker was up
    restart_at: float | None = None  # monotonic time of its next start
    final_code: int | None = None  # set once it will not run again


def worker_environment() -> dict[str, str]:
    """The supervisor's environment, importing the very package the supervisor runs.

    Workers start with `python -P`, so a `bigpipe/` folder in the current directory
    cannot shadow the package (it made every worker fail its imports, forever).
    """
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    root = str(Path(bigpipe.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    return env


class Supervisor:
    """Keeps the workers running until SIGTERM or SIGINT, and reloads them on SIGUSR1.

    It waits on a selector, not an event loop: its events are signals (`Wakeups`), its
    workers' exits (their pidfds) and the restarts it has scheduled.
    """

    def __init__(self, file: NodeFile, workers: int, logs: Logging | None = None) -> None:
        self._file = file  # the last config loaded successfully
        self._logs = logs
        self._reloads = NodeCounters()
        self._workers = [_Worker(i) for i in range(workers)]
        remove_stale_node_files()  # once, before this supervisor's own files exist
        self._board = Board.create(workers)
        self._snapshot = node_file("config", ".json")
        write_snapshot(self._snapshot, file.raw, self._reloads)
        self._env = worker_environment()
        self._selector = selectors.DefaultSelector()
        self._stopping = False
        self._failed = False

    def run(self, wakeups: Wakeups) -> int:
        """Supervise until every worker has exited after a stop; the node's exit code."""
        self._selector.register(wakeups, selectors.EVENT_READ)
        try:
            for worker in self._workers:
                self._start(worker)
            notify_ready()
            log.info("supervising %d workers on port %d", len(self._workers), self._file.http_port)
            while self._busy():
                for key, _ in self._selector.select(self._until_next_restart()):
                    if key.fileobj is wakeups:
                        self._on_signals(wakeups.take())
                    else:
                        self._on_exit(key.data)
                self._restart_due()
        finally:
            self._selector.close()
            self._board.remove()
            self._snapshot.unlink(missing_ok=True)
        if self._failed:
            return EXIT_WORKERS_FAILED
        return 0 if all(worker.final_code == 0 for worker in self._workers) else 1

    def _busy(self) -> bool:
        return any(worker.final_code is None for worker in self._workers)

    def _until_next_restart(self) -> float | None:
        """Seconds to the next scheduled restart; None (wait for an event) if there is none."""
        due = [worker.restart_at for worker in self._workers if worker.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            if worker.restart_at is not None and worker.restart_at <= now:
                worker.restart_at = None
                self._start(worker)

    def _on_signals(self, signums: bytes) -> None:
        for signum in signums:
            if signum == signal.SIGUSR1:
                self._reload()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self._on_stop(signum)

    def _command(self, worker: _Worker) -> list[str]:
        return [
            sys.executable,
            "-P",
            "-m",
            "bigpipe",
            "-config",
            self._file.source,
            "--worker-of",
            f"{self._board.path}:{worker.index}:{len(self._workers)}",
            "--snapshot",
            str(self._snapshot),
        ]

    def _start(self, worker: _Worker) -> None:
        """Start the worker; a spawn that fails (no such interpreter, out of PIDs or
        memory) counts as a death before it was up."""
        worker.started = time.monotonic()
        try:
            worker.process = WorkerProcess(self._command(worker), self._env)
        except OSError as exc:
            worker.process = None
            log.error("worker %d could not be started: %s", worker.index, exc)
            self._after_death(worker, EXIT_SPAWN_FAILED)
            return
        self._selector.register(worker.process, selectors.EVENT_READ, worker)

    def _on_exit(self, worker: _Worker) -> None:
        assert worker.process is not None
        self._selector.unregister(worker.process)
        code = worker.process.reap()
        self._mark_not_ready(worker)
        self._after_death(worker, code)
        worker.process = None

    def _after_death(self, worker: _Worker, code: int) -> None:
        """Schedule the worker's restart, after a back-off if it keeps dying; or, when the
        node stops or the worker never gets up, let it rest with its exit code."""
        if self._stopping:
            worker.final_code = code
            return
        if self._was_up(worker):
            worker.start_failures = 0
        else:
            worker.start_failures += 1
            if worker.start_failures >= START_ATTEMPTS:
                worker.final_code = code
                self._give_up(worker, code)
                return
        worker.failures = (
            0 if time.monotonic() - worker.started > STABLE_SECONDS else worker.failures + 1
        )
        delay = (
            RESTART_BACKOFF_SECONDS[min(worker.failures, len(RESTART_BACKOFF_SECONDS)) - 1]
            if worker.failures
            else 0
        )
        log.error("worker %d exited with %d; restarting it in %d s", worker.index, code, delay)
        worker.restart_at = time.monotonic() + delay

    def _mark_not_ready(self, worker: _Worker) -> None:
        """A dead worker's slot keeps its counters for the successor, but not its readiness:
        /readyz says 503 until the successor is ready."""
        published = self._board.read(worker.index)
        if published is not None:
            snapshot = orjson.loads(published)
            snapshot["ready"] = False
            self._board.publish(worker.index, orjson.dumps(snapshot))

    def _was_up(self, worker: _Worker) -> bool:
        """Did this worker process get as far as listening? It then published its pid."""
        published = self._board.read(worker.index)
        if worker.process is None or published is None:
            return False
        return orjson.loads(published).get("pid") == worker.process.pid

    def _give_up(self, worker: _Worker, code: int) -> None:
        message = (
            f"worker {worker.index} died {worker.start_failures} times in a row before it "
            f"was up (last exit code {code}); giving up: see its error above"
        )
        log.critical("%s", message)
        if self._logs is None or self._logs.to_file:
            print(f"bigpipe: {message}", file=sys.stderr, flush=True)
        self._failed = True
        self._stop()

    def _reload(self) -> None:
        """Validate the operator's file; hand a good one to the workers through the snapshot.

        The workers are signalled either way: they take the node's reload counters from
        the snapshot, so /stats counts a refused file too.
        """
        if self._stopping:  # the workers drain and ignore it too
            log.info("SIGUSR1 while draining: ignored")
            return
        try:
            file, answer = reload_apart(self._file)
        except (ChildFailed, OSError) as exc:  # no child, or it died: nothing was checked
            log.error("reload failed, old config kept: the check could not run: %s", exc)
            file, answer = None, Answer(None, [])
        if file is None:
            self._reloads.reloadFailure += 1
        else:
            if self._logs is not None:  # first: the reload's own lines go where it says
                self._logs.apply(file.log_level, file.log_directory, file.log_format)
            self._file = file
            self._reloads.reloadSuccess += 1
        answer.log()
        write_snapshot(self._snapshot, self._file.raw, self._reloads)
        self._forward(signal.SIGUSR1)

    def _forward(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None:
                worker.process.send_signal(signum)

    def _on_stop(self, signum: int) -> None:
        # A second signal is forwarded too: each worker then exits at once.
        log.info("%s: draining %d workers", signal.Signals(signum).name, len(self._workers))
        self._stop()

    def _stop(self) -> None:
        self._stopping = True
        self._forward(signal.SIGTERM)
        for worker in self._workers:  # a stop ends a restart back-off at once
            if worker.process is None and worker.final_code is None:
                worker.restart_at = None
                worker.final_code = 0
