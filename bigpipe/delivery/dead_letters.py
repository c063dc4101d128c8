"""A consumer group's dead letters: each one fits in Kafka, and none can stall its partition.

A dead letter larger than the producer accepts (say, a call accepted before
`http.server.body.limit` shrank) is cut to fit: `encode_dead_letter` keeps every
field but the call's data, and says what it cut. Kafka's refusals are of two kinds:
- transient (no acknowledgement in time, a lost connection, a producer closed by a
  reload): the same record is written again, with backoff, until Kafka takes it, as
  every partition waits while Kafka is away;
- permanent (too large for the topic, not authorised): the record is written again with
  its data cut away entirely, up to BARE_TRIES times (Kafka judges the size of a whole
  batch, so a small record batched with a large one is refused too; a jittered wait
  lets it go alone); if Kafka refuses that too, the call is skipped, with an ERROR
  line and `deadLetterSkipped` counted, since no retry can help.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from urllib.parse import urlsplit

from confluent_kafka import Message

from bigpipe.calls.envelope import Call, encode_dead_letter
from bigpipe.config import Config
from bigpipe.delivery.client import Outcome
from bigpipe.delivery.retry import Verdict, backoff_seconds
from bigpipe.ingest.producer import Placed, ProduceFailed, Producer, write_until_stored
from bigpipe.kafka import Throttle
from bigpipe.stats import GroupCounters

log = logging.getLogger(__name__)

# Room for any call accepted under the current body limit: the envelope (body, headers
# of at most 100 x 8 KiB, url) plus the metadata. The producer takes twice this.
METADATA_BYTES = 1 << 20
BARE_TRIES = 3
RETRY_BACKOFF_MS = (500, 10_000)  # between tries of a write Kafka did not take
LOG_INTERVAL_SECONDS = 1.0  # at most one dead-letter line a second per group and kind


def dead_letter_limit(config: Config) -> int:
    return config.body_limit + METADATA_BYTES


class DeadLetterWriter:
    def __init__(
        self, name: str, max_bytes: int, producer: Producer, counters: GroupCounters
    ) -> None:
        self.producer = producer  # replaced when a reload starts a new producer
        self._name = name
        self._max_bytes = max_bytes
        self._counters = counters
        self._throttle = Throttle(LOG_INTERVAL_SECONDS)

    async def write(
        self,
        topic: str,
        group_id: str,
        message: Message,
        call: Call | None,
        outcome: Outcome | None,
        reason: str,
    ) -> Placed | None:
        """Write the dead letter; return where, once Kafka has it; None if the call is skipped."""

        def encode(max_bytes: int) -> bytes:
            return encode_dead_letter(
                value=message.value(),
                call=call,
                topic=message.topic(),
                partition=message.partition(),
                offset=message.offset(),
                group_id=group_id,
                attempts=outcome.attempts if outcome else 0,
                last_status=outcome.last.status if outcome else None,
                last_error=reason,
                first_attempt_ms=outcome.first_attempt_ms if outcome else None,
                reason=dead_letter_reason(call, outcome),
                max_bytes=max_bytes,
            )

        what = _describe(message, call)

        def retrying(exc: ProduceFailed) -> None:
            text = f"dead letter of {what} not written ({exc}); retrying"
            self._log(logging.ERROR, "retry", text)

        record = encode(self._max_bytes)
        for bare_tries in itertools.count(1):
            try:
                placed = await write_until_stored(
                    lambda: self.producer, topic, record, message.key(), RETRY_BACKOFF_MS, retrying
                )
                break
            except ProduceFailed as refusal:
                if bare_tries > BARE_TRIES:
                    # Every one is logged, unthrottled: each is a call neither delivered
                    # nor kept, and its id must be on record.
                    self._counters.deadLetterSkipped += 1
                    log.error(
                        "%s: %s SKIPPED: Kafka refuses its dead letter for good (%s); "
                        "it failed with: %s",
                        self._name,
                        what,
                        refusal,
                        reason,
                    )
                    return None
                record = encode(0)
                self._log(
                    logging.ERROR,
                    "refused",
                    f"dead letter of {what} refused for good ({refusal}); writing it again "
                    "without its data",
                )
            await asyncio.sleep(backoff_seconds(bare_tries, 100, 1000))
        self._counters.deadLetter += 1
        self._counters.expired += outcome is not None and outcome.last.verdict is Verdict.EXPIRED
        self._log(logging.WARNING, "written", f"{what} dead-lettered to {topic}: {reason}")
        return placed

    def _log(self, level: int, kind: str, text: str) -> None:
        """One line a second per kind at most, saying how many were held back."""
        held = self._throttle.admit(kind)
        if held is not None:
            suffix = f" (and {held} more like it since)" if held else ""
            log.log(level, "%s: %s%s", self._name, text, suffix)


def dead_letter_reason(call: Call | None, outcome: Outcome | None) -> str:
    """The dead letter's `reason`: one word a tool can branch on."""
    if call is None:
        return "invalid"
    if outcome is not None and outcome.last.verdict is Verdict.EXPIRED:
        return "expired"
    return "failed"


def _describe(message: Message, call: Call | None) -> str:
    if call is None:
        return f"record {message.partition()}/{message.offset()}"
    return f"call {call.id} to {urlsplit(call.url).hostname}"
