"""Hand the heap a burst freed back to the system.

A burst (a backlog read at once, thousands of calls parked in the delay topics, a
flood of requests) makes Python and librdkafka allocate, then free, tens of MiB.
glibc keeps freed heap for reuse rather than returning it, so a worker's RSS stays
at the burst's high-water mark: 100,000 calls parked left a worker 24 MiB larger
though it held none of them, and a malloc_trim took it below its size before the
burst. So each worker trims every TRIM_INTERVAL_SECONDS, on a thread (ctypes
releases the GIL for the call; it takes milliseconds).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

TRIM_INTERVAL_SECONDS = 30.0


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


async def trim_forever(interval: float = TRIM_INTERVAL_SECONDS) -> None:
    trim = malloc_trim()
    if trim is None:
        return
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(trim, 0)
