"""Toxiproxy (Shopify's TCP fault proxy) for the network fault tests: its server process,
and a small client of its HTTP API (https://github.com/Shopify/toxiproxy#http-api).

`./build.sh` builds toxiproxy-server into .local/bin. A proxy listens on a loopback port
and forwards to an upstream one; the tests break that link with toxics (latency, a stall,
resets) or by disabling the proxy, which closes its open connections and refuses new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.faults.harness import Sink
from tests.support import REPO

TOXIPROXY_SERVER = REPO / ".local" / "bin" / "toxiproxy-server"
START_TIMEOUT = 15.0


class ToxiproxyError(AssertionError):
    """Toxiproxy refused an API request (a bad toxic, a port in use, ...)."""


class ToxiproxyServer:
    """toxiproxy-server on 127.0.0.1:`port`, stopped by its PID."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ToxiproxyServer:
        if not TOXIPROXY_SERVER.exists():
            raise RuntimeError(f"{TOXIPROXY_SERVER} is missing; run ./build.sh to build it")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(TOXIPROXY_SERVER), "-host", "127.0.0.1", "-port", str(self.port)],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"toxiproxy-server did not come up on {self.api}:\n{tail}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _answers(self) -> bool:
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(f"{self.api}/version", timeout=1) as response,
        ):
            return response.status == 200
        return False


class Toxiproxy:
    """The HTTP API of a running toxiproxy-server."""

    def __init__(self, api: str) -> None:
        self.api = api

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.api}{path}", json=body) as response,
        ):
            if response.status >= 300:
                text = await response.text()
                raise ToxiproxyError(f"{method} {path} -> {response.status}: {text}")
            return await response.json(content_type=None) if response.status != 204 else None

    async def proxy(self, name: str, listen_port: int, upstream_port: int) -> Proxy:
        """Create (or re-point) the proxy `name`: 127.0.0.1:listen -> 127.0.0.1:upstream."""
        spec = {
            "name": name,
            "listen": f"127.0.0.1:{listen_port}",
            "upstream": f"127.0.0.1:{upstream_port}",
            "enabled": True,
        }
        existing = await self._request("GET", "/proxies")
        if name in existing:
            await self._request("POST", f"/proxies/{name}", spec)
        else:
            await self._request("POST", "/proxies", spec)
        return Proxy(self, name, listen_port)

    async def reset(self) -> None:
        """Every proxy enabled, every toxic removed."""
        await self._request("POST", "/reset")


@dataclass
class Proxy:
    client: Toxiproxy
    name: str
    port: int

    async def cut(self) -> None:
        """Close the open connections (the peers see them reset) and refuse new ones."""
        await self.client._request("POST", f"/proxies/{self.name}", {"enabled": False})

    async def restore(self) -> None:
        await self.client._request("POST", f"/proxies/{self.name}", {"enabled": True})

    async def add_toxic(
        self, kind: str, stream: str = "downstream", toxicity: float = 1.0, **attributes: Any
    ) -> str:
        """Add a toxic (latency, timeout, reset_peer, ...); returns its name.

        `stream` "downstream" acts on what the upstream sends back, "upstream" on what
        the client sends; `toxicity` is the share of connections it applies to.
        """
        name = f"{kind}_{stream}"
        body = {
            "name": name,
            "type": kind,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": attributes,
        }
        await self.client._request("POST", f"/proxies/{self.name}/toxics", body)
        return name

    async def remove_toxic(self, name: str) -> None:
        await self.client._request("DELETE", f"/proxies/{self.name}/toxics/{name}")


@dataclass
class Link:
    """The proxies of one client's path to every broker: a fault on the link hits them all."""

    proxies: list[Proxy]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{proxy.port}" for proxy in self.proxies)

    async def cut(self) -> None:
        for proxy in self.proxies:
            await proxy.cut()

    async def restore(self) -> None:
        for proxy in self.proxies:
            await proxy.restore()

    async def add_toxic(
        self, kind: str, stream: str = "downstream", toxicity: float = 1.0, **attributes: Any
    ) -> str:
        names = {
            await proxy.add_toxic(kind, stream, toxicity, **attributes) for proxy in self.proxies
        }
        return names.pop()

    async def remove_toxic(self, name: str) -> None:
        for proxy in self.proxies:
            await proxy.remove_toxic(name)


class ProxiedSink(Sink):
    """The fault tests' Sink, called through a proxy in front of it (set `proxy_port`)."""

    proxy_port: int = 0

    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/hook"


@dataclass(frozen=True)
class LinkFault:
    """A toxic to hold on a Proxy or a Link for a while (see `hold`)."""

    toxic: str
    stream: str  # "upstream" holds back what the client sends; "downstream", the answers
    toxicity: float  # the share of connections it hits, drawn when it is added
    attributes: dict[str, int]
    # Add it afresh every second: Toxiproxy draws each open connection's fate only when a
    # toxic is added, and a kept-alive connection that was spared would be spared for good.
    redraw: bool = False

    async def hold(
        self,
        target: Proxy | Link,
        seconds: float,
        tick: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Apply the toxic for `seconds`, calling `tick` about five times a second."""
        until = time.monotonic() + seconds
        toxic, drawn_at = await self._add(target), time.monotonic()
        try:
            while time.monotonic() < until:
                if tick is not None:
                    await tick()
                await asyncio.sleep(0.2)
                if self.redraw and time.monotonic() > drawn_at + 1:
                    await target.remove_toxic(toxic)
                    toxic, drawn_at = await self._add(target), time.monotonic()
        finally:
            await target.remove_toxic(toxic)

    async def _add(self, target: Proxy | Link) -> str:
        return await target.add_toxic(self.toxic, self.stream, self.toxicity, **self.attributes)


DOWNSTREAM_FAULTS = {
    "stalls": LinkFault("timeout", "upstream", 1.0, {"timeout": 0}),  # accepts, never answers
    "resets-half": LinkFault("reset_peer", "downstream", 0.5, {"timeout": 0}, redraw=True),
    "latency-2s": LinkFault("latency", "downstream", 1.0, {"latency": 2000}),
}

# 500 ms (+-100 ms) on everything Kafka sends back: a write waits at least the floor.
KAFKA_LATENCY = LinkFault("latency", "downstream", 1.0, {"latency": 500, "jitter": 100})
KAFKA_LATENCY_FLOOR = 0.4
