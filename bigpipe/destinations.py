"""Where a caller's calls may go: its allowlist, and the refusal of private addresses (SSRF).

An ACL entry's `allow` lists URL prefixes (`https://api.example.com/hooks/`)
or host patterns (`api.example.com`, `*.example.com`). With `denyPrivate`, a
call may not reach loopback, private, link-local (cloud metadata lives at
169.254.169.254), or any other address that is not globally routable. That is
checked at ingest for literal addresses, and again at delivery against the
addresses the host name resolves to, so DNS rebinding cannot slip past it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

HOST_PATTERN = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?$|^[0-9a-fA-F:.\[\]]+$")
# Names that reach a cloud provider's metadata service without a private-looking address.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})


class DestinationRefused(OSError):
    """The destination resolves to an address the caller may not reach."""


@dataclass(frozen=True, slots=True)
class AllowRule:
    text: str
    host: str  # lower case; "*.example.com" matches any subdomain of example.com
    scheme: str | None = None  # set for URL prefixes only
    port: int | None = None
    path: str = ""

    def matches(self, url: URL) -> bool:
        host = (url.host or "").lower().rstrip(".")
        wildcard = self.host.startswith("*.")
        host_ok = host.endswith(self.host[1:]) if wildcard else host == self.host
        if not host_ok or self.scheme is None:
            return host_ok
        return (
            url.scheme == self.scheme and url.port == self.port and url.path.startswith(self.path)
        )


def parse_rule(text: str) -> AllowRule | str:
    """An AllowRule, or what is wrong with `text`."""
    if "://" not in text:
        if not HOST_PATTERN.match(text):
            return f"{text!r} is neither a URL prefix nor a host pattern like *.example.com"
        return AllowRule(text, text.lower().rstrip("."))
    try:
        url = URL(text)
    except ValueError:
        return f"{text!r} is not a valid URL prefix"
    if url.scheme not in ("http", "https") or not url.host:
        return f"{text!r} must be an absolute http:// or https:// URL prefix"
    return AllowRule(text, url.host.lower().rstrip("."), url.scheme, url.port, url.path)


def allowed(rules: tuple[AllowRule, ...], url: URL) -> bool:
    """No rules means any destination, as in the original bigpipe."""
    return not rules or any(rule.matches(url) for rule in rules)


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def literal_refusal(url: URL) -> str | None:
    """Why a URL is refused before any DNS lookup, or None if only resolution can tell."""
    host = (url.host or "").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost") or host in METADATA_HOSTS:
        return f"{host} is a local or metadata host"
    try:
        public = is_public(host)
    except ValueError:
        return None  # a name: judged when it resolves
    return None if public else f"{host} is not a public address"


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, but refuses non-public addresses."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if (reason := literal_refusal(URL.build(scheme="http", host=host))) is not None:
            raise DestinationRefused(reason)
        results = await self._inner.resolve(host, port, family)
        private = [r["host"] for r in results if not is_public(r["host"])]
        if private:
            raise DestinationRefused(f"{host} resolves to non-public {', '.join(private)}")
        return results

    async def close(self) -> None:
        await self._inner.close()
