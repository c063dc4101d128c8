"""Forked benchmark processes that never outlive the benchmark (stdlib only: the bare
baselines import nothing of Bigpipe's)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, signum: int = signal.SIGTERM) -> None:
    """In a forked child: have Linux send `signum` when `parent` dies, even by kill -9, so
    a benchmark killed mid-run leaves nothing posting or serving; exit at once if the
    parent died before the request (the kernel would then never send it)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: best effort
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:
        os._exit(1)
