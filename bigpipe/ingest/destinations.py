"""Where a caller's calls may go: its allowlist, and the refusal of private addresses (SSRF).

An ACL entry's `allow` lists URL prefixes (`https://api.example.com/hooks/`)
or host patterns (`api.example.com`, `*.example.com`). A URL prefix is matched
against the path a server would see once it decodes it: percent-escapes decoded,
`\\` read as `/`, dot segments resolved, so `/hooks/..%2Fadmin` is `/admin`.

With `denyPrivate`, a call may not reach loopback, private, link-local (cloud
metadata lives at 169.254.169.254), or any other address that is not globally
routable. Literal addresses are judged in every form the resolver reads as one
(`127.1`, `0x7f000001`, `2130706433` are all 127.0.0.1). Names are judged
against the addresses they resolve to, at delivery, so DNS rebinding cannot
slip past it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import unquote

from yarl import URL

HOST_PATTERN = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?$|^[0-9a-fA-F:.\[\]]+$")
# Names that reach a cloud provider's metadata service without a private-looking address.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
# What inet_aton (and so the resolver) may read as an IPv4 address: 127.1, 0x7f000001, 2130706433.
IPV4_SHORTHAND = re.compile(r"^[0-9a-fA-FxX.]+$")
PERCENT_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


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
        if url.scheme != self.scheme or url.port != self.port:
            return False
        path = server_path(url.raw_path)
        return path is not None and path.startswith(self.path)


def server_path(raw_path: str) -> str | None:
    """The path a server reaches once it decodes `raw_path`; None when that is ambiguous.

    Escapes are decoded once, a backslash is read as a slash (some servers do), and
    `.`/`..` segments are resolved, a `;parameter` ignored (`..;` is `..` to some servers).
    A path still holding an escape after one decoding (`%252F`) is ambiguous: a server
    that decodes twice reaches another path, so no prefix matches it.
    """
    decoded = unquote(raw_path or "/", errors="replace").replace("\\", "/")
    if PERCENT_ESCAPE.search(decoded):
        return None
    kept: list[str] = []
    segments = decoded.split("/")[1:]
    for segment in segments:
        dots = segment.split(";", 1)[0]
        if dots == "..":
            if kept:
                kept.pop()
        elif dots != ".":
            kept.append(segment)
    if segments and segments[-1].split(";", 1)[0] in (".", ".."):
        kept.append("")  # "/a/b/.." is "/a/": the directory, as RFC 3986 resolves it
    return "/" + "/".join(kept)


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
    path = server_path(url.raw_path)
    if path is None:
        return f"{text!r} holds a double-encoded escape; write its path decoded"
    return AllowRule(text, url.host.lower().rstrip("."), url.scheme, url.port, path)


def allowed(rules: tuple[AllowRule, ...], url: URL) -> bool:
    """No rules means any destination, as in the original bigpipe."""
    return not rules or any(rule.matches(url) for rule in rules)


def refusal(caller: str, rules: tuple[AllowRule, ...], deny_private: bool, url: URL) -> str | None:
    """Why a caller with these `allow` rules and `denyPrivate` may not call `url`, or None.

    Judged at ingest, and again at each delivery attempt under the ACL then in force.
    """
    if not allowed(rules, url):
        return f"url not allowed for caller {caller!r}: not in its allow list"
    if deny_private and (reason := literal_refusal(url)) is not None:
        return f"url refused: {reason} (denyPrivate)"
    return None


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def address_literal(host: str) -> str | None:
    """The address `host` denotes by itself, in canonical form; None for a name.

    The resolver (getaddrinfo) reads IPv4 the way inet_aton does: `127.1`,
    `0x7f000001`, `2130706433` and `0177.0.0.1` all mean 127.0.0.1.
    """
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        pass
    if not IPV4_SHORTHAND.match(host):
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def literal_refusal(url: URL) -> str | None:
    """Why a URL is refused before any DNS lookup, or None if only resolution can tell."""
    host = (url.host or "").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost") or host in METADATA_HOSTS:
        return f"{host} is a local or metadata host"
    address = address_literal(host)
    if address is None or is_public(address):
        return None  # a name is judged when it resolves
    shown = host if address == host else f"{host} ({address})"
    return f"{shown} is not a public address"
