"""Commits: a refused commit is sent again, and a drain is never long enough to get the
consumer evicted before its final commit."""

from __future__ import annotations

from bigpipe.config import parse_config
from bigpipe.delivery.offsets import PartitionOffsets
from bigpipe.kafka import consumer_settings
from tests.test_config import EXAMPLE


def test_a_refused_commit_is_offered_again_even_when_the_partition_stays_idle() -> None:
    offsets = PartitionOffsets()
    for offset in (10, 11):
        offsets.track(offset)
        offsets.finish(offset)
    assert offsets.to_commit() == 12
    offsets.committed(12)  # sent, asynchronously...
    offsets.commit_failed(12)  # ...and refused, say mid-rebalance
    assert offsets.to_commit() == 12, "nothing new finishes on an idle partition: resend it"
    offsets.committed(12)
    offsets.commit_failed(11)  # a late refusal of an older commit changes nothing
    assert offsets.to_commit() is None


def test_max_poll_interval_outlasts_the_longest_drain() -> None:
    """The poll loop stops while a drain lets calls finish, for up to the shutdown timeout."""
    config = parse_config({**EXAMPLE, "http.server.shutdown.timeout": 120_000})
    settings = consumer_settings(config, config.consumers[0])
    assert settings["max.poll.interval.ms"] > 120_000 + 10_000
    default = parse_config(EXAMPLE)
    assert consumer_settings(default, default.consumers[0])["max.poll.interval.ms"] == 60_000
