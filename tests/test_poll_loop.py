"""A consumer group's poll loop that dies must not leave a worker that looks ready and
delivers nothing: the worker stops taking calls, drains and exits 1, to be restarted."""

from __future__ import annotations

from pathlib import Path

from bigpipe.config import parse_config
from bigpipe.node.app import Node
from tests.support import base_config, consumer_entry, eventually, free_port, unique


async def test_a_dead_poll_loop_turns_readiness_off_and_ends_the_worker_with_1(
    kafka: str, tmp_path: Path
) -> None:
    topic = unique("calls")
    raw = base_config(kafka, topic, free_port(), consumers=[consumer_entry(topic, unique("g"))])
    node = Node(parse_config(raw))
    await node.start()
    try:
        await eventually(lambda: node.ready, 60, "the node to be ready")
        [group] = node.groups.values()
        # A real failure of the loop's consume(): its consumer closed beneath it.
        group._kafka.close()  # on the loop, as consume() runs: not beneath a call under way
        await eventually(lambda: not node.ready, 5, "readiness to go off")
        assert node.stop_requested.is_set() and node.exit_code == 1
    finally:
        await node.stop()
