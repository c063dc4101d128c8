"""What a process's open file descriptors are, by kind, so that "flat" can be judged.

A count of /proc/PID/fd alone mixes what grows without bound (a leak) with pools that
fill up to a size and stay there (kept-alive connections per destination, a Kafka
client's connection and wake-up descriptors per broker) and with what comes and goes
with the load (callers' connections). `fd_kinds` names each descriptor: a TCP socket by
its peer (through a map of port -> label the caller gives, e.g. "kafka", "downstream
sink"), or by its own port when it is the server end of a caller's connection; else
pipe, anon_inode:[eventfd] and the like, or file.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

TCP_LISTEN = "0A"


def tcp_sockets(pid: int) -> dict[str, tuple[int, int, str]]:
    """Socket inode -> (local port, remote port, state) of every TCP socket in the
    process's network namespace (/proc/PID/net/tcp and tcp6)."""
    sockets: dict[str, tuple[int, int, str]] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            sockets[inode] = (
                int(local.rsplit(":", 1)[1], 16),
                int(remote.rsplit(":", 1)[1], 16),
                state,
            )
    return sockets


def fd_kinds(pid: int, peers: Mapping[int, str], served: Mapping[int, str]) -> Counter[str]:
    """The process's descriptors counted by kind.

    `peers` labels a remote port (a connection the process made: to Kafka, to a
    downstream); `served` labels a local port the process listens on (its own end of a
    connection a caller made to it, and the listening socket itself).
    """
    sockets = tcp_sockets(pid)
    kinds: Counter[str] = Counter()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return kinds  # the process is gone
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed between listdir and readlink
        kinds[_kind(target, sockets, peers, served)] += 1
    return kinds


def _kind(
    target: str,
    sockets: Mapping[str, tuple[int, int, str]],
    peers: Mapping[int, str],
    served: Mapping[int, str],
) -> str:
    if target.startswith("socket:["):
        found = sockets.get(target[len("socket:[") : -1])
        if found is None:
            return "socket (not TCP)"
        local, remote, state = found
        if state == TCP_LISTEN:
            return f"listening: {served.get(local, local)}"
        if local in served:
            return f"from callers: {served[local]}"
        return f"to {peers.get(remote, f'port {remote}')}"
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("anon_inode:"):
        return target  # anon_inode:[eventfd], anon_inode:[eventpoll], ...
    return "file"
