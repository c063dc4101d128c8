"""Who may write calls, and to which topic: the `kafka.producer.acl` list."""

from __future__ import annotations

import hashlib
import hmac

from bigpipe.config import AclEntry
from bigpipe.ingest.compat import GO_CALLER, go_caller_entry

# Compared against when the name is unknown, so a refusal takes the same time either way.
_NO_SECRET = hashlib.sha256(b"\x00bigpipe: no such caller").digest()


class Acl:
    def __init__(self, entries: tuple[AclEntry, ...]) -> None:
        self._entries = entries
        self._by_name = {entry.name: entry for entry in entries}
        self._go_callers: dict[str, AclEntry | None] = {}  # by topic

    def entry(self, name: str, topic: str) -> AclEntry | None:
        """The caller's entry by name, for delivery (which has no secret to check).

        A call the Go original wrote names no caller: it gets its topic's callers' rules.
        """
        if name != GO_CALLER:
            return self._by_name.get(name)
        if topic not in self._go_callers:
            self._go_callers[topic] = go_caller_entry(self._entries, topic)
        return self._go_callers[topic]

    def authenticate(self, name: str, secret: str) -> AclEntry | None:
        """The caller's entry when the name exists and the secret matches, else None.

        Both sides are SHA-256 digests of equal length, compared in constant time,
        so neither the secret's content nor its length leaks through timing.
        """
        entry = self._by_name.get(name)
        offered = hashlib.sha256(secret.encode()).digest()
        expected = entry.secret_sha256 if entry is not None else _NO_SECRET
        matches = hmac.compare_digest(offered, expected)
        return entry if entry is not None and matches else None
