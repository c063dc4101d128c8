"""Node-wide numbers across worker processes: one shared-memory slot per worker.

Each worker publishes its counters and latency histograms into its own slot
several times a second; any worker answering `/stats` or `/metrics` adds up
all slots. A slot is written under a sequence lock (odd while a write is in
progress), so readers never see half a snapshot and writers never wait.

A worker that replaces a dead one starts from the dead one's last snapshot,
so node-wide counters never go backwards.

The supervisor's files in /dev/shm are named `bigpipe-<kind>-<its pid>-<random>`,
so an operator can tell whose they are. A supervisor killed by SIGKILL cannot
remove its own; the next one to start removes those whose owner is gone.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
import tempfile
from pathlib import Path

SLOT_BYTES = 1 << 20
HEADER = struct.Struct("<QI")  # sequence number, payload length
READ_TRIES = 100
SHARED_MEMORY = Path("/dev/shm")
NODE_FILE = re.compile(r"bigpipe-(?:board|config)-(\d+)-")
OWNER_NAME = "bigpipe"  # the supervisor's /proc/PID/comm (bigpipe.cli.PROCESS_NAME)


def node_directory() -> Path:
    """/dev/shm where there is one (memory, not disk), else the temporary directory."""
    return SHARED_MEMORY if SHARED_MEMORY.is_dir() else Path(tempfile.gettempdir())


def node_file(kind: str, suffix: str = "") -> Path:
    """A new empty file, readable by this user only, named for its kind and this process."""
    descriptor, name = tempfile.mkstemp(
        prefix=f"bigpipe-{kind}-{os.getpid()}-", suffix=suffix, dir=node_directory()
    )
    os.close(descriptor)
    return Path(name)


def remove_stale_node_files(directory: Path | None = None) -> list[Path]:
    """Remove the files of supervisors that are gone (killed by SIGKILL); return them."""
    removed = []
    for path in (directory or node_directory()).glob("bigpipe-*-*-*"):
        match = NODE_FILE.match(path.name)
        if match and not _owner_alive(int(match.group(1))):
            with contextlib.suppress(OSError):  # another user's, or removed meanwhile
                path.unlink()
                removed.append(path)
    return removed


def _owner_alive(pid: int) -> bool:
    """Is `pid` a running Bigpipe supervisor? A reused PID names another program."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == OWNER_NAME
    except OSError:
        return False


class Board:
    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        self.slots = slots
        with path.open("r+b") as file:
            self._memory = mmap.mmap(file.fileno(), slots * SLOT_BYTES)
        self._last_read: dict[int, bytes] = {}

    @classmethod
    def create(cls, slots: int) -> Board:
        """A new zeroed board (see node_file)."""
        path = node_file("board")
        os.truncate(path, slots * SLOT_BYTES)
        return cls(path, slots)

    def publish(self, slot: int, payload: bytes) -> None:
        if len(payload) > SLOT_BYTES - HEADER.size:
            raise ValueError(f"snapshot of {len(payload)} bytes does not fit a board slot")
        base = slot * SLOT_BYTES
        sequence, _ = HEADER.unpack_from(self._memory, base)
        HEADER.pack_into(self._memory, base, sequence + 1, 0)  # odd: being written
        start = base + HEADER.size
        self._memory[start : start + len(payload)] = payload
        HEADER.pack_into(self._memory, base, sequence + 2, len(payload))

    def read(self, slot: int) -> bytes | None:
        """The slot's last complete snapshot, or None if it was never written.

        Should a writer keep the slot busy through every try, the snapshot read last
        time stands in: older, but never a step back.
        """
        base = slot * SLOT_BYTES
        for _ in range(READ_TRIES):
            before, length = HEADER.unpack_from(self._memory, base)
            if before % 2:
                continue
            start = base + HEADER.size
            payload = self._memory[start : start + length]
            after, _ = HEADER.unpack_from(self._memory, base)
            if before == after:
                if before:
                    self._last_read[slot] = payload
                return payload if before else None
        return self._last_read.get(slot)

    def read_all(self) -> list[bytes]:
        return [p for p in map(self.read, range(self.slots)) if p is not None]

    def close(self) -> None:
        self._memory.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
