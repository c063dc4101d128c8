"""Taking SIGUSR1 safely, and telling systemd when it is safe to send it.

bigpipe/__main__.py blocks SIGUSR1 as its first instruction; the supervisor
starts workers with it (and SIGTERM) blocked (bigpipe.node.workers). `take` installs
a handler and only then unblocks its signal, so one sent during start-up is
taken then instead of killing the process. `notify_ready` sends systemd READY=1
(Type=notify), after which `systemctl reload` may signal at any time.

A worker takes its signals on its event loop. The supervisor has none (it would cost
it asyncio, uvloop and ssl: tests/test_supervisor_imports.py): it reads them from
`Wakeups`, a socket pair its selector watches.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the supervisor imports this module, and never asyncio
    import asyncio


def handle_reloads(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> None:
    take(loop, signal.SIGUSR1, handler)


def take(
    loop: asyncio.AbstractEventLoop, signum: int, handler: Callable[..., None], *args: Any
) -> None:
    """Handle a signal on the loop, then unblock it: one that came while blocked arrives now."""
    loop.add_signal_handler(signum, handler, *args)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})


class Wakeups:
    """Signal numbers as bytes on a socket pair, for a loop that waits with a selector.

    `of_signals` makes Python's own signal handling write each signal's number to it
    (signal.set_wakeup_fd); `send` writes one from anywhere, a test's thread included.
    Nothing is lost: a signal that comes while the loop is busy waits on the socket.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        for end in (self._reader, self._writer):
            end.setblocking(False)

    @classmethod
    def of_signals(cls, *signums: int) -> Wakeups:
        """Wakeups for these signals, taken from now on: the ones that came while they were
        blocked (bigpipe/__main__.py blocks SIGUSR1) arrive now."""
        wakeups = cls()
        signal.set_wakeup_fd(wakeups._writer.fileno(), warn_on_full_buffer=False)
        for signum in signums:
            # The handler does nothing: installing one is what makes Python write the byte.
            signal.signal(signum, lambda *_: None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)
        return wakeups

    def fileno(self) -> int:
        return self._reader.fileno()

    def send(self, signum: int) -> None:
        self._writer.send(bytes([signum]))

    def take(self) -> bytes:
        """The signal numbers received since the last call, oldest first."""
        received = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := self._reader.recv(256):
                received += chunk
        return received

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


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
