"""How long a running JVM stood still: its safepoint counters, read from its hsperfdata.

A HotSpot JVM keeps its performance counters in a memory-mapped file,
/tmp/hsperfdata_USER/PID (unless started with -XX:-UsePerfData), which `jstat`
reads. Reading the file here needs no JDK tool (the broker runs on a JRE) and
never attaches to the JVM. Its layout is HotSpot's PerfDataPrologue followed by
PerfDataEntry records (perfMemory.hpp, perfData.hpp).

Every stop-the-world pause (a GC pause among them) is a safepoint, so the
change in `sun.rt.safepointTime` over a span is how long the JVM's threads
were all held in it: a broker stalled that long answers nobody.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

HSPERFDATA = Path("/tmp")  # HotSpot's own choice on Linux, whatever TMPDIR says
MAGIC = 0xCAFEC0C0
# After the magic (big-endian) and the byte order of the rest: versions, accessible, used,
# overflow, modified at, where the entries start, how many there are.
PROLOGUE = "BBBiiqii"
ENTRY = "iiibbbbi"  # length, name at, vector length, type, flags, units, variability, data at
LONG = ord("J")


def counters(pid: int) -> dict[str, int]:
    """The JVM's scalar long counters by name; empty when its file cannot be read."""
    for path in HSPERFDATA.glob(f"hsperfdata_*/{pid}"):
        with contextlib.suppress(OSError, struct.error, ValueError):
            return _parse(path.read_bytes())
    return {}


def _parse(data: bytes) -> dict[str, int]:
    magic, byte_order = struct.unpack_from(">IB", data)
    if magic != MAGIC:
        raise ValueError("not an hsperfdata file")
    order = "<" if byte_order == 1 else ">"
    *_, entries_at, count = struct.unpack_from(order + PROLOGUE, data, 5)
    entry, long = struct.Struct(order + ENTRY), struct.Struct(order + "q")
    found: dict[str, int] = {}
    at = entries_at
    for _ in range(count):
        length, name_at, vector, kind, _flags, _units, _variability, data_at = entry.unpack_from(
            data, at
        )
        if vector == 0 and kind == LONG:
            name_start = at + name_at
            name = data[name_start : data.index(b"\0", name_start)].decode()
            found[name] = long.unpack_from(data, at + data_at)[0]
        at += length
    return found


def stopped(pid: int) -> tuple[float, int] | None:
    """(seconds spent at safepoints since the JVM started, how many), or None if unknown."""
    found = counters(pid)
    ticks, frequency = found.get("sun.rt.safepointTime"), found.get("sun.os.hrt.frequency")
    if ticks is None or not frequency:
        return None
    return ticks / frequency, found.get("sun.rt.safepoints", 0)
