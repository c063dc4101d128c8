"""Real parts for integration tests: a recording downstream, a Bigpipe process, Kafka probes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import orjson
import pytest
from aiohttp import web
from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[1]
LOCAL_KAFKA = REPO / "deploy" / "kafka" / "local-kafka"
ACL_NAME, ACL_SECRET = "system-1", "s3cret-for-tests"


def start_local_kafka(port: str, directory: Path, env: dict[str, str] | None = None) -> str:
    """Start (or find running) a one-broker local Kafka; return its bootstrap address."""
    started = subprocess.run(
        [str(LOCAL_KAFKA), "start", "--port", port, "--dir", str(directory)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=180,
        env=env,
    )
    return started.stdout.strip().splitlines()[-1]


def warm_up(bootstrap: str, timeout: float = 120) -> None:
    """Wait until a fresh broker takes an idempotent write, as every Bigpipe producer makes.

    Its first producer id comes only once the broker has loaded its coordinator state
    ("Coordinator load in progress"): seconds on a loaded machine, during which the first
    test's calls were answered 503 and its assertions failed. Blocking."""
    from confluent_kafka import Producer

    topic = unique("warm-up")
    create_topic(bootstrap, topic)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    while time.monotonic() < deadline:  # a write a fresh broker failed is tried again
        reports: list[object] = []
        producer.produce(topic, b"", on_delivery=lambda err, _m, seen=reports: seen.append(err))
        producer.flush(max(0.0, deadline - time.monotonic()))
        if reports and reports[0] is None:
            return
        errors.append(str(reports[0]) if reports else "no report")
        time.sleep(0.5)
    raise AssertionError(f"the test broker took no write in {timeout} s: {errors[-3:]}")


def process_name(pid: int) -> str:
    """What `killall` matches: /proc/PID/comm."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


def is_view_builder(pid: int) -> bool:
    """Is `pid` a status view's builder (bigpipe.calls.view_builder)? Told by its command
    line, which it has from its start; it names itself `bigpipe-view` a moment later."""
    return b"bigpipe.calls.view_builder" in Path(f"/proc/{pid}/cmdline").read_bytes()


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc/PID/status (VmRSS, in kB), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def missing_tool(reason: str) -> NoReturn:
    """A test's tool is missing: skip on a developer's machine, fail in CI.

    build.sh installs every test tool (or fails) when it runs in CI or as root, so there a
    missing tool is a broken set-up that a skip would hide.
    """
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must have every test tool (build.sh installs them)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> None:
    """Wait until `predicate()` (sync or async) holds; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not await _holds(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def _holds(predicate: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = predicate()
    return bool(await result) if inspect.isawaitable(result) else bool(result)


# ---------------------------------------------------------------- downstream
@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    call_id: str
    attempt: int
    at: float
    answered: float | None = None  # when the downstream answered; None while working or cut off


Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


async def answer_200(_request: web.Request, _number: int) -> web.StreamResponse:
    return web.Response(status=200, text="ok")


@dataclass
class Downstream:
    """A real HTTP server on loopback that records every request it gets."""

    behaviour: Behaviour = answer_200
    requests: list[Received] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> Downstream:
        app = web.Application(client_max_size=4 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A caller that goes away (kill -9, a cancelled attempt) cancels the handler, so
        # a request it never saw answered is never counted as answered.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def call_ids(self) -> set[str]:
        """Calls that arrived, answered or not."""
        return {r.call_id for r in self.requests}

    def answered_ids(self) -> set[str]:
        """Calls the downstream answered: delivered, as far as it can tell."""
        return {r.call_id for r in self.requests if r.answered is not None}

    def unanswered_ids(self) -> set[str]:
        """Calls that arrived and have no answer yet (in flight, or cut off by the caller)."""
        return self.call_ids() - self.answered_ids()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            body = await request.read()
            number = len(self.requests)
            received = Received(
                body,
                dict(request.headers),
                request.headers.get("X-Bigpipe-Call-Id", ""),
                int(request.headers.get("X-Bigpipe-Attempt", "0")),
                time.monotonic(),
            )
            self.requests.append(received)
            response = await self.behaviour(request, number)
            received.answered = time.monotonic()
            return response
        finally:
            self.in_flight -= 1


# ---------------------------------------------------------------- bigpipe
def base_config(
    bootstrap: str,
    topic: str,
    port: int,
    *,
    partitions: int = 3,
    consumers: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "log.level": 4,
        "log.directory": "",
        "kafka.bootstrap.servers": bootstrap,
        "kafka.topics": [{"name": topic, "partitions": partitions}],
        "kafka.producer.acl": [{"name": ACL_NAME, "secret": ACL_SECRET, "topic": topic}],
        "kafka.consumer.list": consumers or [],
        "http.server.host": "127.0.0.1",
        "http.server.port": port,
        "http.server.workers": 1,
        "http.server.shutdown.timeout": 5000,
    }
    config.update(overrides)
    return config


def consumer_entry(topic: str, group: str, **overrides: Any) -> dict[str, Any]:
    entry = {
        "topic": topic,
        "groupId": group,
        "rateLimit": 10_000,
        "timeout": 2000,
        "retries": 2,
        "concurrency": 20,
        "backoffBase": 20,
        "backoffMax": 200,
    }
    entry.update(overrides)
    return entry


async def start_node(
    kafka: str,
    workdir: Path,
    processes: list[Bigpipe],
    partitions: int = 3,
    node: dict[str, Any] | None = None,
    **entry: Any,
) -> tuple[Bigpipe, str]:
    """A Bigpipe with a fresh topic and one consumer group on it; returns it and the topic.

    `node` holds top-level keys to set (say `http.server.shutdown.timeout`); `entry`, the
    group's keys.
    """
    topic = unique("calls")
    config = base_config(
        kafka,
        topic,
        free_port(),
        partitions=partitions,
        consumers=[consumer_entry(topic, unique("g"), **entry)],
        **(node or {}),
    )
    bigpipe = await Bigpipe(config, workdir).start()
    processes.append(bigpipe)
    return bigpipe, topic


class Bigpipe:
    """A Bigpipe process started from a config dict; stopped by its PID."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        args: tuple[str, ...] = (),
        source: Path = REPO,
    ) -> None:
        self.source = source  # the tree it runs from: `python -m bigpipe` imports from its cwd
        if source == REPO:  # an older tree (bench --against) may not know the key
            # Each node's status view (SQLite) in the test's own directory, not the system's.
            config.setdefault("status.directory", str(workdir / "status"))
        self.config = config
        self.args = args  # command-line options after -config PATH, say ("--workers", "2")
        self.port = config["http.server.port"]
        self.config_path = workdir / f"bigpipe-{self.port}.json"
        self.log_path = workdir / f"bigpipe-{self.port}.log"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, wait_ready: bool = True) -> Bigpipe:
        self.config_path.write_bytes(orjson.dumps(self.config))
        log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bigpipe",
            "-config",
            str(self.config_path),
            *self.args,
            stdout=log,
            stderr=log,
            cwd=self.source,
        )
        log.close()
        if wait_ready:
            await self.wait_ready()
        return self

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise AssertionError(
                        f"bigpipe exited {self.process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise AssertionError(f"bigpipe not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM, and wait for the exit code; SIGKILL if it does not come."""
        if self.process is None or self.process.returncode is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.process.wait()
            raise AssertionError(
                f"bigpipe did not stop in {timeout} s:\n{self.log_tail()}"
            ) from None

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.process is not None
        await self.process.wait()

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.url}/stats") as response:
            return (await response.json())["data"]

    async def post_call(
        self,
        session: aiohttp.ClientSession,
        data: str = "hello",
        url: str = "http://127.0.0.1:1/hook",
        **extra: Any,
    ) -> tuple[int, dict[str, Any]]:
        payload = {
            "acl": {"name": ACL_NAME, "secret": ACL_SECRET},
            "url": url,
            "data": data,
            **extra,
        }
        return await self.post_raw(session, orjson.dumps(payload))

    async def post_accepted(
        self, session: aiohttp.ClientSession, timeout: float = 30, **call: Any
    ) -> dict[str, Any]:
        """Post a call until the node takes it, as a caller told "retry later" (503) does
        (a producer new to a fresh broker waits for its producer id); the reply's data."""
        deadline = time.monotonic() + timeout
        while True:
            status, reply = await self.post_call(session, **call)
            if status != 503 or time.monotonic() > deadline:
                assert (status, reply["errno"]) == (200, 0), reply
                return reply["data"]
            await asyncio.sleep(0.1)

    async def post_raw(
        self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        async with session.post(
            f"{self.url}/rpc/call", data=body, headers=headers or {}
        ) as response:
            return response.status, await response.json(content_type=None)


# ---------------------------------------------------------------- kafka
def topic_record_count(bootstrap: str, topic: str) -> int:
    """Records ever written to a topic: the sum of its partitions' high watermarks."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("probe")})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """A group's committed offset per partition of a topic (negative: nothing committed)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in committed}
    finally:
        consumer.close()


def key_for(partition: int, partitions: int) -> str:
    """A record key that librdkafka's default partitioner (CRC32 of the key) puts there."""
    return next(
        key
        for key in (f"k{n}" for n in itertools.count())
        if zlib.crc32(key.encode()) % partitions == partition
    )


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 30) -> list[Any]:
    """Read `count` records from the start of a topic (blocking; for dead-letter checks).

    Fewer within `timeout` s is a failure that says so: returning what came would let a
    wrong topic name (nothing to read) pass as "no dead letters".
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                records.append(message)
    finally:
        consumer.close()
    if len(records) < count:
        raise AssertionError(f"read {len(records)} of {count} records of {topic} in {timeout} s")
    return records


def read_whole_topic(bootstrap: str, topic: str, timeout: float = 120) -> list[Message]:
    """Every record of a topic now, from its start to its end (blocking): no consumer group."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("reader")})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1] for p in partitions]
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        records: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(records) < sum(ends) and time.monotonic() < deadline:
            records += [m for m in consumer.consume(10_000, 1.0) if m.error() is None]
        return records
    finally:
        consumer.close()


async def group_stats(bigpipe: Bigpipe, http: aiohttp.ClientSession) -> dict[str, Any]:
    """The node's first consumer group's counters, from `/stats`."""
    return (await bigpipe.stats(http))["consumerStats"][0]


def rewrite(bigpipe: Bigpipe, **changes: Any) -> None:
    """Write the node's config file anew, atomically, as an operator's tooling would."""
    bigpipe.config.update(changes)
    temporary = bigpipe.config_path.with_suffix(".tmp")
    temporary.write_bytes(orjson.dumps(bigpipe.config))
    os.replace(temporary, bigpipe.config_path)


async def reload(bigpipe: Bigpipe, http: aiohttp.ClientSession, *, ok: bool = True) -> None:
    """SIGUSR1, then wait for the node-wide reloadSuccess (or reloadFailure) to rise by one."""
    node = (await bigpipe.stats(http))["nodeStats"]
    key = "reloadSuccess" if ok else "reloadFailure"
    bigpipe.signal(signal.SIGUSR1)

    async def counted() -> bool:
        return (await bigpipe.stats(http))["nodeStats"][key] == node[key] + 1

    await eventually(counted, 30, f"{key} to rise")


def free_broker_port() -> int:
    """A port P with P + 1000 free too: local-kafka puts the broker's controller there."""
    while True:
        port = free_port()
        with socket.socket() as sock:
            if port + 1000 < 65536 and sock.connect_ex(("127.0.0.1", port + 1000)) != 0:
                return port


@contextlib.asynccontextmanager
async def own_kafka(directory: Path) -> AsyncIterator[tuple[str, int]]:
    """A one-broker Kafka of the caller's own, which it may freeze with SIGSTOP (its
    connections stay open and nothing answers): yields (bootstrap, broker PID)."""
    bootstrap = await asyncio.to_thread(start_local_kafka, str(free_broker_port()), directory)
    pid = int((directory / "node-0" / "pid").read_text())
    try:
        yield bootstrap, pid
    finally:
        os.kill(pid, signal.SIGCONT)  # a stopped JVM cannot act on SIGTERM
        await asyncio.to_thread(
            subprocess.run,
            [str(LOCAL_KAFKA), "stop", "--dir", str(directory)],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )


def create_topic(bootstrap: str, name: str, partitions: int = 1, **settings: str) -> None:
    """Create a topic as an operator would, before Bigpipe starts (which never alters it),
    e.g. `create_topic(kafka, "t", **{"max.message.bytes": "2000"})`. Blocking."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1, config=settings)
    admin.create_topics([topic])[name].result(timeout=30)


async def dead_letters(kafka: str, bigpipe: Bigpipe, count: int) -> list[dict[str, Any]]:
    """The first `count` dead letters of the node's first group, decoded (read_topic fails
    when fewer come)."""
    records = await asyncio.to_thread(read_topic, kafka, dead_letter_topic(bigpipe), count)
    return [orjson.loads(r.value()) for r in records]


def dead_letter_topic(bigpipe: Bigpipe, index: int = 0) -> str:
    """Where the node's group `index` writes dead letters: its deadLetterTopic, or the
    default, one per group."""
    entry = bigpipe.config["kafka.consumer.list"][index]
    return entry.get("deadLetterTopic", f"{entry['topic']}.{entry['groupId']}.dlq")


def group_members(admin: AdminClient, group: str) -> tuple[bool, list[list[int]]]:
    """Is the group stable, and the partitions each member holds. Blocking."""
    description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    held = [[tp.partition for tp in m.assignment.topic_partitions] for m in description.members]
    return description.state == ConsumerGroupState.STABLE, held


async def group_settled(kafka: str, group: str, members: int, partitions: int) -> None:
    """Wait until the group is stable with `members` members holding all `partitions`
    between them: no partition moves after that unless a member comes or goes."""
    admin = AdminClient({"bootstrap.servers": kafka, "log_level": 3})

    async def settled() -> bool:
        try:
            stable, held = await asyncio.to_thread(group_members, admin, group)
        except KafkaException:  # say, the group's coordinator not known yet
            return False
        return stable and len(held) == members and sum(map(len, held)) == partitions

    await eventually(settled, 60, f"{members} members holding {partitions} partitions")
