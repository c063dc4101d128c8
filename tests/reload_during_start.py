"""A node in this process alone, signalled with SIGUSR1 while Node.start() and then
Node.stop() are under way; prints what happened as one JSON object.

    python -m tests.reload_during_start CONFIG_PATH

Run by tests/test_signals.py in a process of its own: SIGUSR1 is blocked here before any
thread starts, as bigpipe/__main__.py does. Inside pytest, threads of earlier tests
(librdkafka's, executors') have it unblocked, and one of them took the signal with its
default action, which killed the test run.
"""

from __future__ import annotations

import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

import asyncio  # noqa: E402 (after the block, as in bigpipe/__main__.py)
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import orjson  # noqa: E402

from bigpipe.config import parse_config  # noqa: E402
from bigpipe.node.app import Node, serve  # noqa: E402
from tests.support import ACL_NAME  # noqa: E402

EDITED_SECRET = "the-edited-secret"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def edit_the_secret(path: Path, raw: dict[str, Any]) -> None:
    [entry] = raw["kafka.producer.acl"]
    edited = {**raw, "kafka.producer.acl": [{**entry, "secret": EDITED_SECRET}]}
    path.write_bytes(orjson.dumps(edited))


async def scenario(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    config = parse_config(raw, source=path)
    nodes: list[Node] = []
    groups_started: list[object] = []
    start, stop, start_groups = Node.start, Node.stop, Node._start_groups

    async def start_signalled(node: Node) -> None:
        nodes.append(node)
        edit_the_secret(path, raw)
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.sleep(0.2)  # a slow start: the loop would take the signal meanwhile
        await start(node)

    async def stop_signalled(node: Node) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.sleep(0.2)
        await stop(node)

    def counted_start_groups(node: Node, consumers: Any) -> None:
        groups_started.extend(consumers)
        start_groups(node, consumers)

    Node.start, Node.stop = start_signalled, stop_signalled  # type: ignore[method-assign]
    Node._start_groups = counted_start_groups  # type: ignore[method-assign]
    serving = asyncio.create_task(serve(config))
    deadline = asyncio.get_running_loop().time() + 60
    while not (nodes and nodes[0].ready and nodes[0].stats.node.reloadSuccess):
        if serving.done() or asyncio.get_running_loop().time() > deadline:
            break  # what happened is reported; the test says what is wrong
        await asyncio.sleep(0.05)
    node = nodes[0] if nodes else None
    reloaded_early = node.stats.node.reloadSuccess if node else 0
    edited_in_force = bool(node and node.acl.authenticate(ACL_NAME, EDITED_SECRET))
    os.kill(os.getpid(), signal.SIGTERM)
    code = await asyncio.wait_for(serving, 60)
    return {
        "exit": code,
        "reloads_after_start": reloaded_early,
        "edited_acl_in_force": edited_in_force,
        "groups_started": len(groups_started),
        "reloads_in_all": node.stats.node.reloadSuccess if node else 0,
    }


def main(path: Path) -> dict[str, Any]:
    lines = Lines()
    logging.getLogger("bigpipe").addHandler(lines)
    logging.getLogger("bigpipe").setLevel(logging.INFO)
    outcome = asyncio.run(scenario(path, orjson.loads(path.read_bytes())))
    return {**outcome, "log": lines.messages}


if __name__ == "__main__":
    print(orjson.dumps(main(Path(sys.argv[1]))).decode())
