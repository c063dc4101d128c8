"""The listening socket: TLS when configured, and a deadline on request headers.

aiohttp bounds a request's line and header sizes but not the time they take,
so a client could hold a connection open by sending headers a byte at a time
(slowloris). Each connection here must deliver complete headers within
`http.server.read.timeout`, measured from its first byte; the body is bounded
by the same timeout in the ingest handler.
"""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

from bigpipe.config import Config

HEADERS_END = b"\r\n\r\n"
# Connections the kernel completes before the node accepts them. aiohttp's default, 128,
# overflows when a few hundred clients reconnect at once (after a deploy, a blip): each
# SYN dropped is sent again only a second later. The kernel caps it at
# net.core.somaxconn, as it does for Go's net.Listen, which asks for that much.
LISTEN_BACKLOG = 4096
# Explicit, documented bounds on a request's head (aiohttp's defaults, but for max_headers).
HTTP_LIMITS = {"max_line_size": 8190, "max_field_size": 8190, "max_headers": 100}


class HeaderDeadline(asyncio.Protocol):
    """Wraps aiohttp's protocol and closes connections whose headers arrive too slowly."""

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._tail = b""  # the last bytes seen, for a header end split across reads
        self._in_request = False  # headers complete, reply not yet handed back

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        # Hot path: most requests arrive whole in one read, and then no timer is made at all
        # (arming and cancelling one per request cost ~10% of ingest throughput).
        if not self._in_request:
            if HEADERS_END in data or (self._tail and HEADERS_END in self._tail + data[:3]):
                self._disarm()
                self._in_request = True  # the body and the handler have their own bounds
                self._tail = b""
            else:
                if self._timer is None:
                    self._arm()  # a request's first bytes without its header end: start its clock
                self._tail = data[-3:]
        self._inner.data_received(data)

    def request_done(self) -> None:
        """The handler replied: bytes that come next belong to the next request."""
        self._in_request = False
        self._tail = b""

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.close()


def request_done(transport: asyncio.BaseTransport) -> None:
    protocol = transport.get_protocol()
    if isinstance(protocol, HeaderDeadline):
        protocol.request_done()


def tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through HeaderDeadline."""

    def __init__(self, runner: web.BaseRunner, config: Config, reuse_port: bool = False) -> None:
        super().__init__(runner, ssl_context=tls_context(config), backlog=LISTEN_BACKLOG)
        self._config = config
        self._reuse_port = reuse_port  # workers share one port; the kernel spreads connections

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._config.http_host}:{self._config.http_port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        timeout = self._config.read_timeout_ms / 1000
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HeaderDeadline(server(), timeout),
            self._config.http_host,
            self._config.http_port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port,
        )
