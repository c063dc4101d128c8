"""Shared pieces of the benchmark suite.

A dedicated local Kafka (port 19492, data in `.local/kafka-bench`), nginx as a
fast real downstream, Bigpipe nodes with a chosen worker count, the bare
aiohttp ingest baseline as a subprocess, process RSS from /proc, percentiles,
the summary row every benchmark returns, and the JSON results files.

Every process started here is stopped by its PID, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, ConsumerGroupState
from confluent_kafka.admin import AdminClient, NewTopic

from bench import jvm
from bigpipe.config import parse_config
from bigpipe.ingest.producer import Producer
from tests.support import (
    ACL_NAME,
    ACL_SECRET,
    LOCAL_KAFKA,
    REPO,
    Bigpipe,
    base_config,
    free_port,
    is_view_builder,
    start_local_kafka,
    unique,
)

# Another checkout's bench on the same machine takes another port (and its directory).
BENCH_KAFKA_PORT = os.environ.get("BIGPIPE_BENCH_KAFKA_PORT", "19492")
BENCH_KAFKA_DIR = REPO / ".local" / "kafka-bench"
RESULTS = REPO / "bench" / "results"
TOPIC_PREFIX = "bench-"  # every topic the suite creates; deleted at the end of a run
DATA = "x" * 100  # the `data` of every benchmark call

NGINX_CONF = """
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    log_format receipts '$msec $http_x_bigpipe_call_id';
    {access_log}
    keepalive_requests 1000000;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{port};
        location = /nginx_status {{ stub_status; }}
        location / {{ return 204; }}
    }}
}}
"""


class BenchError(Exception):
    """A benchmark could not produce a valid figure (wrong replies, a process died, ...)."""


# ---------------------------------------------------------------- summary rows
@dataclass
class Row:
    """One line of the summary table: a figure next to its same-run baseline."""

    name: str
    figure: str
    baseline: str
    ratio: float | None
    target: str
    passed: bool | None  # None: informational, no target
    details: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "info"}[self.passed]


def error_row(name: str, error: BaseException) -> Row:
    return Row(name, "ERROR", "-", None, "-", False, [f"{type(error).__name__}: {error}"])


# ---------------------------------------------------------------- kafka
def kafka_running() -> bool:
    result = subprocess.run(
        [str(LOCAL_KAFKA), "status", "--dir", str(BENCH_KAFKA_DIR)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=30,
    )
    return result.returncode == 0


# The dev broker starts fast with the C1 JIT only and the serial collector; the bench
# broker runs as a production one does, with the C2 JIT and G1. C1 code took about
# twice the broker CPU, which these two cores share with the node under test.
BENCH_KAFKA_JVM_OPTS = "-XX:TieredStopAtLevel=4 -XX:-UseSerialGC -XX:+UseG1GC"
# The dev broker's controller fences a broker that misses 6 s of heartbeats, so that
# fault tests see a killed broker go quickly. The bench runs one broker and kills none;
# fenced, it leads no partition until it registers again, and every write stalls for
# seconds. When the latency benchmark pins it to one core with the load generators, its
# heartbeats have come late: it fenced itself ("Fencing broker 0 ... because its session
# has timed out", 09:04 UTC on 2026-12-05) and a pinned round stalled for 10 s. So the
# bench broker heartbeats at Kafka's default interval and is fenced after 30 s.
BENCH_KAFKA_SERVER_PROPS = "broker.heartbeat.interval.ms=2000\nbroker.session.timeout.ms=30000"


def start_kafka() -> str:
    """Start (or find running) the bench broker; return its bootstrap address."""
    env = {
        **os.environ,
        "LOCAL_KAFKA_JVM_OPTS": BENCH_KAFKA_JVM_OPTS,
        "LOCAL_KAFKA_SERVER_PROPS": BENCH_KAFKA_SERVER_PROPS,
    }
    return start_local_kafka(BENCH_KAFKA_PORT, BENCH_KAFKA_DIR, env)


def stop_kafka() -> None:
    subprocess.run(
        [str(LOCAL_KAFKA), "stop", "--dir", str(BENCH_KAFKA_DIR)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=60,
    )


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    future = admin.create_topics([NewTopic(topic, partitions, 1)])[topic]
    future.result(timeout=30)


def wait_group_stable(bootstrap: str, group: str, members: int, timeout: float = 60) -> None:
    """Block until consumer group `group` is STABLE with `members` members, each assigned."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    deadline = time.monotonic() + timeout
    state = "not described yet"
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the group may not exist yet
            description = admin.describe_consumer_groups([group])[group].result(timeout=10)
            assigned = [m for m in description.members if m.assignment.topic_partitions]
            state = f"{description.state.name}, {len(assigned)} of {members} members assigned"
            if description.state == ConsumerGroupState.STABLE and len(assigned) == members:
                return
        time.sleep(0.2)
    raise BenchError(f"consumer group {group} not stable after {timeout} s: {state}")


async def warm_up_broker(bootstrap: str, seconds: float, senders: int = 64) -> None:
    """Write small acks=all batches, as ingest does, while a consumer group reads them, as
    delivery does, for `seconds`. A production broker is long past its JIT warm-up; a
    fresh one answered the latency benchmark several times slower (p99 71-235 ms against
    17 ms once warm, 1 worker). Uses Bigpipe's own producer."""
    topic = unique(f"{TOPIC_PREFIX}warmup")
    config = parse_config(base_config(bootstrap, topic, free_port(), partitions=6))
    await asyncio.to_thread(create_topic, bootstrap, topic, 6)
    producer = Producer(config)
    record = b'{"v": 1}' * 30
    deadline = time.monotonic() + seconds
    reading = asyncio.create_task(asyncio.to_thread(read_until, bootstrap, topic, deadline))

    async def sender() -> None:
        while time.monotonic() < deadline:
            await producer.send(topic, record, timeout=10)

    try:
        await asyncio.gather(*(sender() for _ in range(senders)))
    finally:
        await producer.close(10)
        await reading


def read_until(bootstrap: str, topic: str, deadline: float) -> None:
    """Consume `topic` in a consumer group of its own until `deadline` (time.monotonic)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": topic, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    try:
        while time.monotonic() < deadline:
            consumer.consume(1000, 0.1)
    finally:
        consumer.close()


def delete_bench_topics(bootstrap: str) -> int:
    """Delete every `bench-*` topic (this run's and leftovers), so the broker's disk stays small."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    topics = [t for t in admin.list_topics(timeout=15).topics if t.startswith(TOPIC_PREFIX)]
    if not topics:
        return 0
    for future in admin.delete_topics(topics, operation_timeout=30).values():
        with contextlib.suppress(Exception):  # already being deleted: fine
            future.result(timeout=30)
    return len(topics)


# ---------------------------------------------------------------- bigpipe
def bigpipe_config(
    bootstrap: str,
    topic: str,
    *,
    workers: int,
    partitions: int = 6,
    consumers: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A node config on a free port, logging warnings and worse, with `workers` workers
    (always set: the default, one per core, would change what is measured)."""
    config = base_config(
        bootstrap,
        topic,
        free_port(),
        partitions=partitions,
        consumers=consumers,
        **{"log.level": 3, **overrides},
    )
    config["http.server.workers"] = workers
    return config


@asynccontextmanager
async def bigpipe_node(
    config: dict[str, Any], workdir: Path, source: Path = REPO
) -> AsyncIterator[Bigpipe]:
    """A running Bigpipe node (`python -m bigpipe -config FILE`) of the tree `source`;
    stopped by PID on exit.

    A node of this tree writes call status to a results topic of its own (unless the
    config names one): a new node builds its status view from the whole topic, and on
    the bench broker a shared one would hold every earlier benchmark's steps, so each
    benchmark would pay for rebuilding its predecessors' (a one-time cost in
    production: the view is kept in status.directory) instead of its own steady state.
    So does a tree of --against that knows the key (an older one refuses it)."""
    if source == REPO or "status.topic" in (source / "bigpipe" / "config.py").read_text():
        config = {"status.topic": unique(f"{TOPIC_PREFIX}results"), **config}
    node = Bigpipe(config, workdir, source=source)
    try:
        await node.start()
        yield node
    finally:
        if node.process is not None and node.process.returncode is None:
            try:
                await node.stop(timeout=30)
            except AssertionError as exc:  # did not stop in time: it was SIGKILLed
                print(f"bench: {exc}", file=sys.stderr)


def call_body(url: str = "http://127.0.0.1:9/hook") -> bytes:
    """A valid /rpc/call body: the test caller, `url`, 100 bytes of data, no partition key."""
    return orjson.dumps({"acl": {"name": ACL_NAME, "secret": ACL_SECRET}, "url": url, "data": DATA})


# ---------------------------------------------------------------- bare ingest
@asynccontextmanager
async def bare_ingest(workers: int, workdir: Path) -> AsyncIterator[tuple[str, int]]:
    """bench/bare_ingest.py on a free port; yields (base URL, PID of its main process)."""
    port = free_port()
    log_path = workdir / f"bare-ingest-{port}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.bare_ingest",
            "--port",
            str(port),
            "--workers",
            str(workers),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            cwd=REPO,
        )
    try:
        assert process.stdout is not None
        for _ in range(workers):  # each worker prints one line once it listens
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            if not line:
                raise BenchError(f"bare_ingest exited early:\n{log_path.read_text()}")
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        await stop_process(process)


async def stop_process(process: asyncio.subprocess.Process, timeout: float = 15) -> None:
    """SIGTERM by PID, then SIGKILL if it has not exited after `timeout` s."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        await process.wait()


# ---------------------------------------------------------------- nginx
@contextmanager
def nginx_204(workdir: Path, receipts: Path | None = None) -> Iterator[str]:
    """nginx answering 204 on a loopback port; yields its base URL.

    `GET /nginx_status` is nginx's stub_status: its request counter tells how
    many requests reached the downstream, whoever sent them. With `receipts`,
    nginx logs a line per request there, `<wall-clock s, ms precision>
    <X-Bigpipe-Call-Id>`, flushed every second: a downstream that notes
    arrivals at no cost to the CPU the node under test needs.
    """
    if shutil.which("nginx") is None:
        raise BenchError("nginx not found; install it: apt-get install -y nginx-light")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    access_log = (
        f"access_log {receipts} receipts buffer=256k flush=1s;" if receipts else "access_log off;"
    )
    conf.write_text(NGINX_CONF.format(prefix=workdir, port=port, access_log=access_log))
    process = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} after {timeout} s")


# ---------------------------------------------------------------- memory
def descendants(pid: int) -> list[int]:
    """PIDs of every living descendant of `pid`, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name may hold spaces and parentheses; the ppid follows the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and every living descendant (a node: its
    supervisor and workers), from utime and stime in /proc/PID/stat."""
    ticks = 0
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError, IndexError, ValueError):  # one that just exited
            # After the command name's last ')': field 3 (state) is index 0, so utime
            # (field 14) and stime (field 15) are indexes 11 and 12.
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def per_10k(cpu: float, calls: int) -> float:
    """CPU seconds per 10,000 calls: the cost of a call, readable across machines' speeds."""
    return cpu / calls * 10_000


def cpu_row(
    name: str, bigpipe: list[float], baseline: list[float], baseline_name: str, target: float
) -> Row:
    """The CPU cost of a call: median CPU-seconds per 10,000 calls of every process of
    the node (/proc/PID/stat), against the same-run baseline's and the target, a ceiling."""
    figure = median(bigpipe)
    return Row(
        name,
        f"{figure:.2f} CPU-s per 10,000 calls",
        f"{median(baseline):.2f} {baseline_name}",
        figure / median(baseline),
        f"<= {target:.2f}",
        figure <= target,
        [
            f"median of {len(bigpipe)}: every process of the node (supervisor and workers), "
            "user + system time from /proc/PID/stat; steadier on a shared machine than calls/s"
        ],
    )


@dataclass(frozen=True)
class Scheduling:
    """What the scheduler gave a process tree so far, from /proc/PID/task/TID/schedstat
    (nanosecond counters): `ran`, seconds on a CPU, summed over every thread; `loops_ran`
    and `loops_waited`, seconds on a CPU and seconds runnable but waiting for one, of the
    main threads of its serving processes (worker_pids): their event loops."""

    ran: float
    loops_ran: float
    loops_waited: float
    at: float  # time.monotonic() when read

    @classmethod
    def of(cls, pid: int) -> Scheduling:
        at = time.monotonic()
        ran, _ = _threads_schedstat(process_tree(pid))
        loops = [_schedstat(worker, worker) for worker in worker_pids(pid)]
        return cls(ran, sum(r for r, _ in loops), sum(w for _, w in loops), at)

    def since(self, earlier: Scheduling, cpus: int) -> dict[str, float]:
        """Over the span between the two readings: the tree's share of `cpus` CPUs, and
        the event loops' wait for a CPU per second they ran."""
        ran = self.loops_ran - earlier.loops_ran
        return {
            "cpu_share": (self.ran - earlier.ran) / ((self.at - earlier.at) * cpus),
            "loop_wait_per_run": (self.loops_waited - earlier.loops_waited) / ran if ran else 0.0,
        }


@dataclass(frozen=True)
class BrokerScheduling:
    """What the scheduler gave the bench broker's JVMs so far, and how long they stood still:
    `ran` and `waited`, seconds on a CPU and runnable without one, summed over every thread
    (schedstat); `stopped`, seconds at safepoints (GC pauses among them), and `stops`, how
    many (bench.jvm). The stopped figures are NaN where a JVM's counters cannot be read."""

    ran: float
    waited: float
    stopped: float
    stops: float
    at: float

    @classmethod
    def of(cls, pids: list[int]) -> BrokerScheduling:
        at = time.monotonic()
        ran, waited = _threads_schedstat(pids)
        safepoints = [jvm.stopped(pid) for pid in pids]
        known = [figures for figures in safepoints if figures is not None]
        unknown = len(known) < len(safepoints) or not known
        return cls(
            ran,
            waited,
            math.nan if unknown else sum(seconds for seconds, _ in known),
            math.nan if unknown else sum(count for _, count in known),
            at,
        )

    def since(self, earlier: BrokerScheduling, cpus: int) -> dict[str, float]:
        """Over the span: the JVMs' share of `cpus` CPUs, their threads' wait for a CPU per
        second they ran, and the milliseconds and number of their safepoints."""
        ran = self.ran - earlier.ran
        return {
            "broker_cpu_share": ran / ((self.at - earlier.at) * cpus),
            "broker_wait_per_run": (self.waited - earlier.waited) / ran if ran else 0.0,
            "broker_stopped_ms": (self.stopped - earlier.stopped) * 1000,
            "broker_stops": self.stops - earlier.stops,
        }


def _threads_schedstat(pids: list[int]) -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting for one), summed over every thread of `pids`."""
    threads = [_schedstat(pid, task) for pid in pids for task in _tasks(pid)]
    return sum(ran for ran, _ in threads), sum(waited for _, waited in threads)


def _tasks(pid: int) -> list[int]:
    with contextlib.suppress(OSError):  # it just exited
        return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    return []


def _schedstat(pid: int, task: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting for one) of one thread; zeros once it is gone."""
    with contextlib.suppress(OSError, ValueError):
        ran, waited, _ = Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()
        return int(ran) / 1e9, int(waited) / 1e9
    return 0.0, 0.0


def worker_pids(pid: int) -> list[int]:
    """The processes that serve calls: the children of a supervisor, or the process itself;
    not the status view's builder (bigpipe.calls.view_builder), which one of them runs."""
    workers = [child for child in descendants(pid) if not _view_builder(child)]
    return workers or [pid]


def _view_builder(pid: int) -> bool:
    with contextlib.suppress(OSError):  # it just exited
        return is_view_builder(pid)
    return False


# ---------------------------------------------------------------- numbers
def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted values."""
    if not values:
        raise BenchError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# ---------------------------------------------------------------- results
def save(directory: Path, name: str, result: dict[str, Any]) -> Path:
    """Write <directory>/<name>.json (bench/results/workers-N/, or .local/bench-run/results
    with --quick), with machine and date."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    result = {"machine": machine(), "date": now(), **result}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB RAM"
    return (
        f"{platform.machine()} {os.cpu_count()} cores ({cpu}){memory}, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# ---------------------------------------------------------------- the run
def reference_tree(revision: str) -> tuple[str, Path]:
    """A checkout of `revision` (a commit, tag or branch) to run Bigpipe from, beside this
    one (a detached git worktree under .local/bench-ref, made once and kept); returns its
    short commit id and its path. It runs on this tree's venv: the revision must need no
    library this venv lacks."""
    commit = _git("rev-parse", "--short", f"{revision}^{{commit}}")
    path = REPO / ".local" / "bench-ref" / commit
    if not (path / "bigpipe").is_dir():
        _git("worktree", "add", "--force", "--detach", str(path), commit)
    return commit, path


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass
class Context:
    """What every benchmark of one suite run shares."""

    bootstrap: str
    workdir: Path
    workers: int  # Bigpipe worker processes, and the bare baseline's
    rounds: int  # runs per figure where a median is taken
    results: Path  # where <benchmark>.json goes: bench/results/workers-N/, or a scratch dir
    scale: float = 1.0  # < 1 with --quick: every duration shrinks
    peak: float | None = None  # Bigpipe's ingest calls/s, set by the ingest benchmark
    delivery_peak: float | None = None  # Bigpipe's deliveries/s, set by the delivery benchmark
    # --against REV: (short commit, tree) of an earlier Bigpipe, measured in the same rounds
    reference: tuple[str, Path] | None = None

    def end_to_end_peak(self) -> float | None:
        """Calls/s one node can both take in and deliver: its worker(s) do both jobs."""
        if not self.peak:
            return None
        if not self.delivery_peak:
            return self.peak
        return 1 / (1 / self.peak + 1 / self.delivery_peak)

    def seconds(self, seconds: float) -> float:
        return max(1.0, round(seconds * self.scale, 1))

    def count(self, count: int) -> int:
        return max(1000, int(count * self.scale))


# ---------------------------------------------------------------- pinning
@dataclass(frozen=True)
class CpuSplit:
    """The node under test on `node` CPUs; the broker, the downstream and the load
    generators on `others`: no process of the bench competes with the node for a core."""

    node: frozenset[int]
    others: frozenset[int]

    @property
    def node_share(self) -> float:
        return len(self.node) / (len(self.node) + len(self.others))


def cpu_split() -> CpuSplit | None:
    """The last CPU this process may use for everything else, the rest for the node;
    None with fewer than 2 CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return CpuSplit(frozenset(cpus[:-1]), frozenset(cpus[-1:]))


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants now alive."""
    tree, index = [pid], 0
    while index < len(tree):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{tree[index]}/task").iterdir():
                tree += [int(child) for child in (task / "children").read_text().split()]
        index += 1
    return tree


def pin(pids: list[int], cpus: frozenset[int]) -> None:
    """Run every thread of each process on `cpus`; threads and processes they start later
    inherit it."""
    for pid in pids:
        with contextlib.suppress(OSError):  # a process or thread that just ended
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


def broker_pids() -> list[int]:
    """The bench broker's JVMs (deploy/kafka/local-kafka writes node-I/pid)."""
    pids = []
    for pid_file in BENCH_KAFKA_DIR.glob("node-*/pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(pid_file.read_text()))
    return pids


@contextmanager
def others_pinned(split: CpuSplit) -> Iterator[None]:
    """This process (so the downstream and the generators it starts) and the broker on
    `split.others` for the block; all CPUs again after it."""
    everything = split.node | split.others
    others = [os.getpid(), *broker_pids()]
    pin(others, split.others)
    try:
        yield
    finally:
        pin(others, everything)
