"""The soak's descriptor census (tests/faults/fds.py) names what it counts: a unit test on
this very process, with sockets and a pipe it opens itself. In ./build.sh test."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from tests.faults.fds import fd_kinds


@pytest.fixture
def connection() -> Iterator[tuple[int, int]]:
    """A listening socket and one connection to it, both ends in this process:
    (the listening port, the client's own port)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                yield port, client.getsockname()[1]


def test_sockets_are_named_by_peer_and_by_served_port(connection: tuple[int, int]) -> None:
    port, _ = connection
    before = fd_kinds(os.getpid(), {}, {})
    kinds = fd_kinds(os.getpid(), {port: "the server"}, {port: "callers"})
    assert kinds["listening: callers"] == 1
    assert kinds["from callers: callers"] == 1  # the accepted end
    assert kinds["to the server"] == 1  # the client's end, named by its peer
    assert sum(kinds.values()) == sum(before.values())


def test_pipes_and_unlabelled_peers(connection: tuple[int, int]) -> None:
    port, _ = connection
    before = fd_kinds(os.getpid(), {}, {})
    read_end, write_end = os.pipe()
    try:
        kinds = fd_kinds(os.getpid(), {}, {})
        assert kinds["pipe"] == before["pipe"] + 2
        assert kinds[f"to port {port}"] == 1
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_process_that_is_gone_has_none() -> None:
    assert fd_kinds(2**22 + 1, {}, {}) == {}  # above the kernel's pid_max limit
