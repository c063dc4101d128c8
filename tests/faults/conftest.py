"""Fixtures for the fault tests: a 3-broker Kafka of their own, and a 1-broker one to stop.

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
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.harness import Sink
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: slow fault-injection tests on a 3-broker Kafka (tests/faults)"
    )


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

    def _start_args(self) -> tuple[str, ...]:
        return (
            "start",
            "--nodes",
            str(self.nodes),
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
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


@pytest.fixture(scope="session")
def fault_cluster_session() -> Iterator[Cluster]:
    cluster = Cluster(
        _bootstrap(CLUSTER_PORT, CLUSTER_NODES), CLUSTER_DIR, CLUSTER_PORT, CLUSTER_NODES
    )
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
