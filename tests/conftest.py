"""Fixtures: one real Kafka for the session, real HTTP servers, real Bigpipe processes.

`./build.sh test` starts a Kafka of its own and passes its address in
BIGPIPE_TEST_BOOTSTRAP. Run bare, pytest starts (and leaves running, for the
next run) the test broker on port 19092 itself.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from hypothesis import settings

from tests.support import REPO, Bigpipe, Downstream, start_local_kafka, warm_up

# In CI the property tests draw the same examples every run, so a submission lands or fails
# on its own merits; run locally, they explore afresh each time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

TEST_KAFKA_PORT = "19092"
TEST_KAFKA_DIR = REPO / ".local" / "kafka-test"


@pytest.fixture(scope="session")
def kafka() -> str:
    """The bootstrap address of a real Kafka broker."""
    bootstrap = os.environ.get("BIGPIPE_TEST_BOOTSTRAP") or start_local_kafka(
        TEST_KAFKA_PORT, TEST_KAFKA_DIR
    )
    warm_up(bootstrap)
    return bootstrap


IDLE_CONNECTION_SECONDS = 4.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # A node closes a keep-alive connection idle for http.server.read.timeout (5 s by
    # default); a client that keeps it longer (aiohttp: 15 s) may send a call on it just
    # as the node closes it, and get "Server disconnected". Retire them first.
    connector = aiohttp.TCPConnector(keepalive_timeout=IDLE_CONNECTION_SECONDS)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


@pytest.fixture
async def downstream() -> AsyncIterator[Downstream]:
    server = await Downstream().start()
    yield server
    await server.stop()


@pytest.fixture
def processes() -> Iterator[list[Bigpipe]]:
    """Bigpipe processes a test starts; any still running at the end are killed by PID."""
    started: list[Bigpipe] = []
    yield started
    for bigpipe in started:
        if bigpipe.process is not None and bigpipe.process.returncode is None:
            bigpipe.process.kill()
