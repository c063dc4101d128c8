"""Taking SIGUSR1 safely, and telling systemd when it is safe to send it.

bigpipe/__main__.py blocks SIGUSR1 as its first instruction; the supervisor
starts workers with it (and SIGTERM) blocked (bigpipe.node.workers). `take` installs
a handler and only then unblocks its signal, so one sent during start-up is
taken then instead of killing the process. `notify_ready` sends systemd READY=1
(Type=notify), after which `systemctl reload` may signal at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from typing import Any


def handle_reloads(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> None:
    take(loop, signal.SIGUSR1, handler)


def take(
    loop: asyncio.AbstractEventLoop, signum: int, handler: Callable[..., None], *args: Any
) -> None:
    """Handle a signal on the loop, then unblock it: one that came while blocked arrives now."""
    loop.add_signal_handler(signum, handler, *args)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})


def notify_ready() -> None:
    """sd_notify(READY=1) when systemd asked for it ($NOTIFY_SOCKET); otherwise nothing.

    The variable is dropped afterwards, so processes started later (workers) never
    speak for the service.
    """
    address = os.environ.pop("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
    ):
        sock.sendto(b"READY=1\nMAINPID=%d" % os.getpid(), address)
