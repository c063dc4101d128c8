"""The supervisor carries only what it needs: no Kafka library, no aiohttp, no Prometheus,
no pydantic (it checks configs in a forked child: bigpipe.node.forked), and no event
loop: asyncio, uvloop and the ssl module they load cost it 8 MiB of RSS, for a process
that only waits for signals and for its workers to exit. The status view's builder
loads no ssl module either (confluent-kafka's asyncio would): librdkafka has its own.

It reads and checks the config and keeps its workers running; everything else is the
workers' (bigpipe.node.workers). Each of these libraries cost it megabytes of RSS for
its whole life, and a stray top-level import brings one back silently: these tests say so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.support import (
    REPO,
    Bigpipe,
    base_config,
    consumer_entry,
    eventually,
    free_port,
    reload,
    unique,
)
from tests.test_workers import children

# Modules (in sys.modules) and shared objects (in /proc/PID/maps) a supervisor must not load.
WORKER_ONLY_MODULES = (
    *("confluent_kafka", "aiohttp", "prometheus_client", "sqlite3", "pydantic"),
    *("asyncio", "uvloop", "ssl"),
)
WORKER_ONLY_LIBRARIES = (
    *("librdkafka", "/aiohttp/", "libsqlite3", "pydantic_core"),
    *("/uvloop/", "libssl", "_asyncio"),
)

# What a supervisor does before it supervises: import the CLI and the supervisor, read
# and check the config (librdkafka's check included), then list what it has loaded.
SUPERVISOR_START = """
import sys
import bigpipe.cli
from bigpipe.node.workers import load_apart
load_apart(sys.argv[1])
print(" ".join(sorted(sys.modules)))
"""


def test_a_supervisor_imports_and_checks_its_config_without_the_worker_libraries() -> None:
    """In a fresh interpreter, as a supervisor starts: none of them is imported."""
    done = subprocess.run(
        [sys.executable, "-c", SUPERVISOR_START, str(REPO / "config" / "bigpipe.json")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    loaded = set(done.stdout.split())
    assert "bigpipe.node.workers" in loaded  # the script did run
    assert [name for name in WORKER_ONLY_MODULES if name in loaded] == []


async def test_a_running_supervisor_maps_no_worker_library_even_after_a_reload(
    kafka: str, http: aiohttp.ClientSession, tmp_path: Path, processes: list[Bigpipe]
) -> None:
    """A 2-worker node with a consumer group and call status on, after a SIGUSR1 reload
    (the config checked again): the supervisor's memory maps hold none of them."""
    topic = unique("lean")
    config = base_config(
        kafka,
        topic,
        free_port(),
        consumers=[consumer_entry(topic, unique("g"))],
        **{"http.server.workers": 2, "status.enabled": True},
    )
    bigpipe = await Bigpipe(config, tmp_path).start()
    processes.append(bigpipe)
    await reload(bigpipe, http)
    assert bigpipe.process is not None
    maps = mapped_files(bigpipe.process.pid)
    assert [name for name in WORKER_ONLY_LIBRARIES if name in maps] == []
    # The workers, by contrast, do load them: the needle would find them.
    supervisor = bigpipe.process.pid
    worker = worker_of(supervisor)
    assert "librdkafka" in mapped_files(worker)
    assert "libssl" in mapped_files(worker), "a worker delivers over HTTPS"
    await eventually(lambda: view_builder_under(supervisor) is not None, 30, "the builder")
    builder = view_builder_under(supervisor)
    assert builder is not None
    builder_maps = mapped_files(builder)
    assert "librdkafka" in builder_maps, "the builder's maps were read"
    assert [name for name in ("libssl", "_ssl.") if name in builder_maps] == []


def view_builder_under(supervisor: int) -> int | None:
    """The status view's builder, a child of one of the supervisor's workers, once it runs."""
    for worker in children(supervisor):
        for builder in children(worker, view_builders=True):
            return builder
    return None


def worker_of(supervisor: int) -> int:
    """One of the supervisor's child processes."""
    path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    return int(path.read_text().split()[0])


def mapped_files(pid: int) -> str:
    """/proc/PID/maps: every file mapped into the process, one mapping a line."""
    return Path(f"/proc/{pid}/maps").read_text()
