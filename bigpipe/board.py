"""Node-wide numbers across worker processes: one shared-memory slot per worker.

Each worker publishes its counters and latency histograms into its own slot
several times a second; any worker answering `/stats` or `/metrics` adds up
all slots. A slot is written under a sequence lock (odd while a write is in
progress), so readers never see half a snapshot and writers never wait.

A worker that replaces a dead one starts from the dead one's last snapshot,
so node-wide counters never go backwards.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from pathlib import Path

SLOT_BYTES = 1 << 20
HEADER = struct.Struct("<QI")  # sequence number, payload length
READ_TRIES = 100


class Board:
    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        self.slots = slots
        with path.open("r+b") as file:
            self._memory = mmap.mmap(file.fileno(), slots * SLOT_BYTES)
        self._last_read: dict[int, bytes] = {}

    @classmethod
    def create(cls, slots: int) -> Board:
        """A new zeroed board, in /dev/shm where there is one (memory, not disk)."""
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        descriptor, name = tempfile.mkstemp(prefix="bigpipe-board-", dir=directory)
        os.ftruncate(descriptor, slots * SLOT_BYTES)
        os.close(descriptor)
        return cls(Path(name), slots)

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
