"""Bigpipe's own topics for following calls, beside the call and dead-letter topics."""

from __future__ import annotations

from bigpipe.config import DAY_MS, MAX_IDEMPOTENCY_WINDOW_MS

# The idempotency index (bigpipe.calls.dedup): one partition, so every reader sees one order.
INDEX_TOPIC = "bigpipe.idempotency"
# Records outlive the longest window by a day, so a window never outlasts its record.
INDEX_RETENTION_MS = MAX_IDEMPOTENCY_WINDOW_MS + DAY_MS
