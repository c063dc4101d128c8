"""Fixtures for the fault tests: a 3-broker Kafka of their own, a 1-broker one to stop, and
Toxiproxy between Bigpipe and Kafka (and its downstreams) for the network faults.

The 3-broker cluster (port 19592, or $BIGPIPE_FAULTS_PORT; `.local/kafka-faults`) is
started once per session and stopped at the end only if this session started it. Before each test
every broker is brought back up, so a test that failed mid-fault does not leave the
next one with a broker down.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.faults.harness import Sink
from tests.faults.toxiproxy import Link, Proxy, Toxiproxy, ToxiproxyServer
from tests.support import LOCAL_KAFKA, REPO

# BIGPIPE_FAULTS_PORT moves both brokers' ports, so two checkouts on one machine can run
# the fault suite at once (the lone broker sits 100 above the cluster).
CLUSTER_PORT = int(os.environ.get("BIGPIPE_FAULTS_PORT", "19592"))
CLUSTER_NODES = 3
CLUSTER_DIR = REPO / ".local" / "kafka-faults"
# A separate single broker that test_kafka_down_at_startup starts and stops itself.
LONE_PORT = CLUSTER_PORT + 100
LONE_DIR = REPO / ".local" / "kafka-faults-lone"
START_TIMEOUT = 180

# Toxiproxy: its API on TOXIPROXY_PORT ($BIGPIPE_TOXIPROXY_PORT, default 300 above the
# cluster), then, within 100 ports of it, KAFKA_LINKS independent paths to the brokers
# (link j: proxies at +10+10j+i, forwarding to the brokers' proxied listeners at
# +50+10j+i, see local-kafka's --proxied), and proxies to downstreams from +90.
TOXIPROXY_PORT = int(os.environ.get("BIGPIPE_TOXIPROXY_PORT", str(CLUSTER_PORT + 300)))
KAFKA_LINKS = 2
DOWNSTREAM_PROXY_PORT = TOXIPROXY_PORT + 90


def link_ports(link: int) -> tuple[int, int]:
    """(proxy port, proxied listener port) of broker 0 on Kafka link `link`."""
    return TOXIPROXY_PORT + 10 + 10 * link, TOXIPROXY_PORT + 50 + 10 * link


PROXIED = ",".join("{}:{}".format(*link_ports(link)) for link in range(KAFKA_LINKS))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: slow fault-injection tests on a 3-broker Kafka (tests/faults)"
    )
    config.addinivalue_line(
        "markers", "long: a fault test too long for ./build.sh test; run when -m is given"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a -m expression (the plain ./build.sh test), leave out the `long` tests;
    with one (./build.sh faults passes -m faults), the expression alone decides."""
    if config.option.markexpr:
        return
    keep = [item for item in items if item.get_closest_marker("long") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def _local_kafka(*args: str, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LOCAL_KAFKA), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def _local_kafka_async(*args: str, timeout: float = START_TIMEOUT) -> str:
    """Run local-kafka without blocking the event loop (load generators share it)."""
    process = await asyncio.create_subprocess_exec(
        str(LOCAL_KAFKA),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()  # by its own handle, i.e. its PID
        await process.wait()
        raise AssertionError(f"local-kafka {' '.join(args)}: no answer in {timeout} s") from None
    if process.returncode != 0:
        raise AssertionError(f"local-kafka {' '.join(args)} exited {process.returncode}: {err!r}")
    return out.decode()


@dataclass
class Cluster:
    """A local-kafka cluster: its bootstrap list, and broker-level faults by node index."""

    bootstrap: str
    directory: Path
    port: int
    nodes: int
    proxied: str = ""  # local-kafka's --proxied: listeners that a proxy stands in front of

    def _start_args(self) -> tuple[str, ...]:
        proxied = ("--proxied", self.proxied) if self.proxied else ()
        return (
            "start",
            "--nodes",
            str(self.nodes),
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            *proxied,
        )

    def start_all(self) -> None:
        """Start whatever broker is not running (a no-op when all are)."""
        done = _local_kafka(*self._start_args())
        if done.returncode != 0:
            raise RuntimeError(f"local-kafka start failed ({done.returncode}):\n{done.stderr}")

    def stop(self) -> None:
        _local_kafka("stop", "--dir", str(self.directory), timeout=120)

    async def kill_node(self, index: int) -> None:
        """SIGKILL one broker (local-kafka kills it by its PID)."""
        await _local_kafka_async("kill-node", str(index), "--dir", str(self.directory))

    async def start_node(self, index: int) -> None:
        await _local_kafka_async("start-node", str(index), "--dir", str(self.directory))

    async def start_async(self) -> None:
        await _local_kafka_async(*self._start_args())

    async def stop_async(self) -> None:
        await _local_kafka_async("stop", "--dir", str(self.directory), timeout=120)

    def running(self) -> bool:
        return _local_kafka("status", "--dir", str(self.directory), timeout=30).returncode == 0


def _bootstrap(port: int, nodes: int) -> str:
    return ",".join(f"127.0.0.1:{port + i}" for i in range(nodes))


def fault_cluster() -> Cluster:
    """The 3-broker cluster, with a proxied listener per Kafka link (not started)."""
    bootstrap = _bootstrap(CLUSTER_PORT, CLUSTER_NODES)
    return Cluster(bootstrap, CLUSTER_DIR, CLUSTER_PORT, CLUSTER_NODES, PROXIED)


@dataclass
class Network:
    """Toxiproxy's links: `kafka[j]` is a path to every broker (give each node its own),
    and `downstream()` puts a proxy in front of a downstream."""

    toxiproxy: Toxiproxy
    kafka: list[Link]
    _downstreams: dict[str, Proxy] = field(default_factory=dict)

    @classmethod
    async def create(cls, toxiproxy: Toxiproxy) -> Network:
        """Every proxy enabled and free of toxics, and the Kafka links in place."""
        await toxiproxy.reset()
        links = []
        for link in range(KAFKA_LINKS):
            proxy_port, listener_port = link_ports(link)
            links.append(
                Link(
                    [
                        await toxiproxy.proxy(f"kafka{link}-{i}", proxy_port + i, listener_port + i)
                        for i in range(CLUSTER_NODES)
                    ]
                )
            )
        return cls(toxiproxy, links)

    async def downstream(self, name: str, upstream_port: int) -> Proxy:
        if name not in self._downstreams:
            port = DOWNSTREAM_PROXY_PORT + len(self._downstreams)
            self._downstreams[name] = await self.toxiproxy.proxy(name, port, upstream_port)
        return self._downstreams[name]


@pytest.fixture(scope="session")
def fault_cluster_session() -> Iterator[Cluster]:
    cluster = fault_cluster()
    started_here = not cluster.running()  # "stopped" or "partial": we (re)start it
    cluster.start_all()
    yield cluster
    if started_here:
        cluster.stop()


@pytest.fixture
def cluster(fault_cluster_session: Cluster) -> Cluster:
    """The 3-broker cluster with every broker up at the start of the test."""
    fault_cluster_session.start_all()
    return fault_cluster_session


@pytest.fixture(scope="session")
def toxiproxy_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Toxiproxy]:
    log = tmp_path_factory.mktemp("toxiproxy") / "toxiproxy.log"
    server = ToxiproxyServer(TOXIPROXY_PORT, log).start()
    yield Toxiproxy(server.api)
    server.stop()


@pytest.fixture
async def network(toxiproxy_session: Toxiproxy) -> Network:
    """Toxiproxy with every link healthy at the start of the test."""
    return await Network.create(toxiproxy_session)


@pytest.fixture
def lone_kafka() -> Iterator[Cluster]:
    """A single broker of the test's own, stopped at the start and at the end of the test."""
    lone = Cluster(_bootstrap(LONE_PORT, 1), LONE_DIR, LONE_PORT, 1)
    lone.stop()
    yield lone
    lone.stop()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """The downstream every call goes to; closed at the end even if the test fails."""
    server = await Sink().start()
    yield server
    await server.stop()
