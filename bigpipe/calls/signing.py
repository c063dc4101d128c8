"""Standard Webhooks signatures (https://www.standardwebhooks.com/) on every delivery.

Each attempt carries `webhook-id` (the call id, the same on every retry and
re-delivery), `webhook-timestamp` (the attempt's Unix seconds) and
`webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per
secret, space-separated, so a receiver that knows any one of them can verify
while the caller rotates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"
# The spec's bounds on a key's length, in bytes: shorter is guessable, longer buys nothing.
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64


class Signer:
    """The keys of one ACL entry. Its repr names no key: a config may be logged whole."""

    __slots__ = ("_keys",)

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self._keys = keys

    def __repr__(self) -> str:
        return f"Signer({len(self._keys)} secrets)"

    def __eq__(self, other: object) -> bool:  # reload compares configs
        return isinstance(other, Signer) and self._keys == other._keys

    def __hash__(self) -> int:
        return hash(self._keys)

    def headers(self, call_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        signed = b"%s.%d.%s" % (call_id.encode(), timestamp, body)
        signatures = " ".join(
            "v1," + base64.b64encode(hmac.digest(key, signed, hashlib.sha256)).decode()
            for key in self._keys
        )
        return {
            "webhook-id": call_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signatures,
        }


def key_of(secret: str) -> bytes | str:
    """The key bytes of a `whsec_…` secret, or why it is not one.

    The reason never quotes the secret: config errors are printed and logged.
    """
    if not secret.startswith(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX!r}; {_HOW_TO_MAKE}"
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return f"is not {SECRET_PREFIX} followed by base64; {_HOW_TO_MAKE}"
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        return (
            f"decodes to {len(key)} bytes, must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES}; "
            + _HOW_TO_MAKE
        )
    return key


_HOW_TO_MAKE = 'make one with: echo "whsec_$(head -c 32 /dev/urandom | base64)"'
