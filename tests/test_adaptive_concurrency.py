"""Adaptive concurrency's AIMD rule, as a pure unit. The end-to-end check (a downstream
with a steep knee at 8 requests at once, cap 64) is timing-sensitive on a shared machine,
so it runs with the fault suite: tests/faults/test_adaptive_concurrency.py."""

from __future__ import annotations

from bigpipe.delivery.shields import AdaptiveLimit


def test_aimd_cuts_once_per_congestion_and_grows_only_at_its_limit() -> None:
    limit = AdaptiveLimit(cap=64)
    assert limit.concurrency == 4, "starts low"
    for _ in range(200):
        limit.observe(0.02, in_flight=limit.concurrency)  # fast, at the limit: grows
    assert limit.concurrency == 20, "additive: about sqrt(2 * 200) steps"
    limit.observe(0.02, in_flight=1)  # fast but the limit unused: no evidence, no growth
    assert limit.concurrency == 20
    for _ in range(10):
        limit.observe(0.5, in_flight=20)  # one congestion seen by ten attempts
    assert limit.concurrency == 18, "one multiplicative cut, not ten"
    for _ in range(40):
        limit.observe(0.02, in_flight=18)
    assert limit.concurrency == 18, "past a cut it probes upwards four times slower"
    capped = AdaptiveLimit(cap=3)
    for _ in range(100):
        capped.observe(0.02, in_flight=3)
    assert capped.concurrency == 3, "never above the configured cap"
