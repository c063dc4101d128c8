"""The soak's traffic: calls of several kinds to several destinations, as users send them,
and the accounting that says, per kind, what became of each accepted call.

Call n is of kind KINDS[n % len(KINDS)]:

- plain: to the proxied downstream (the one the network faults hit), no key;
- keyed: to the steady downstream, with one of 32 partition keys;
- delayed: to the steady downstream, `delay_ms` 1-5 s and a `ttl_ms` 2 min past it;
  judged early if its first delivery came before it was sent + its delay;
- flaky: to the flaky downstream (it answers 503 for a while, now and then: its own
  breaker and shields hold its calls, the others flow), with `callback` and
  `failure_callback`: the callback receiver must hear of each one's end;
- flaky-ttl: the same, with `ttl_ms` 10 s: those caught by an outage expire;
- idempotent: to the steady downstream with an `idempotency_key`; every other one is
  sent again, to the other node, once answered: an errno 0 first answer must come back
  with the same id.

A dead letter is explained when its kind allows its `reason`: `expired` for a call with
a ttl, `failed` for a call to the flaky downstream. Anything else is unexplained.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.faults.harness import Load, Sink
from tests.support import ACL_NAME, ACL_SECRET, Bigpipe, unique

KEYS = 32
FLAKY_TTL_MS = 10_000
DELAYED_TTL_MS = 120_000  # past the delay
EARLY_TOLERANCE = 0.002  # s: the due time is whole Unix ms, on the node's wall clock


@dataclass(frozen=True)
class Kind:
    name: str
    destination: str  # a key of Mix.sinks
    reasons: frozenset[str] = frozenset()  # dead-letter reasons this kind explains
    callbacks: bool = False


PLAIN = Kind("plain", "proxied")
KEYED = Kind("keyed", "steady")
DELAYED = Kind("delayed", "steady", frozenset({"expired"}))
FLAKY = Kind("flaky", "flaky", frozenset({"failed"}), callbacks=True)
FLAKY_TTL = Kind("flaky-ttl", "flaky", frozenset({"failed", "expired"}), callbacks=True)
IDEMPOTENT = Kind("idempotent", "steady")
# Out of 20 calls: 6 plain, 3 keyed, 3 delayed, 3 flaky, 2 flaky-ttl, 3 idempotent.
KINDS = [PLAIN, KEYED, DELAYED, FLAKY, PLAIN, IDEMPOTENT, KEYED, FLAKY_TTL, PLAIN, DELAYED]
KINDS += [PLAIN, FLAKY, IDEMPOTENT, KEYED, PLAIN, DELAYED, FLAKY_TTL, PLAIN, FLAKY, IDEMPOTENT]


class CallbackSink(Sink):
    """The callback receiver: which call ids it was told of, on /ok and on /failed."""

    def __init__(self) -> None:
        super().__init__()
        self.told: dict[str, set[str]] = {"ok": set(), "failed": set()}

    async def _handle(self, request: web.Request) -> web.Response:
        report = orjson.loads(await request.read())
        self.told[request.path.strip("/")].add(report["id"])
        return web.Response(status=204)

    def url_for(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"


@dataclass
class Sent:
    """One accepted call, as its caller knows it."""

    kind: Kind
    sent_at: float  # monotonic, before the request
    delay: float = 0.0  # s


@dataclass
class Mix:
    """The destinations and what was accepted, by call id."""

    sinks: dict[str, Sink]  # proxied, steady, flaky
    callbacks: CallbackSink
    accepted: dict[str, Sent] = field(default_factory=dict)
    resends: Counter[str] = field(default_factory=Counter)  # what a second send got back
    keys: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # key -> ids

    @property
    def ok(self) -> Counter[str]:
        """2xx answers per call id, over every destination (harness.settle_and_account)."""
        total: Counter[str] = Counter()
        for sink in self.sinks.values():
            total.update(sink.ok)
        return total

    def delivered(self) -> set[str]:
        return set().union(*(sink.delivered() for sink in self.sinks.values()))

    def excused(self) -> set[str]:
        """Calls owed no delivery: a copy of an idempotency key that was answered as a
        call of its own (Bigpipe could not read its index in time) while another copy
        was delivered. Bigpipe delivers one copy of a key, and skips the others."""
        delivered = self.delivered()
        excused: set[str] = set()
        for ids in self.keys.values():
            if len(ids) > 1 and ids & delivered:
                excused |= ids - delivered
        return excused

    def first_delivery(self, call_id: str) -> float | None:
        times = [s.first_ok_at[call_id] for s in self.sinks.values() if call_id in s.first_ok_at]
        return min(times, default=None)


class MixedLoad(Load):
    """harness.Load, open loop, sending the kinds above."""

    def __init__(
        self, targets: Callable[[], Sequence[Bigpipe]], mix: Mix, rate: float, senders: int
    ) -> None:
        super().__init__(targets, mix.sinks["proxied"], senders=senders, rate=rate)
        self.mix = mix
        self._random = random.Random(15)
        self._run = unique("soak")
        self._keys = itertools.count()

    def _body(self, kind: Kind, number: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "acl": {"name": ACL_NAME, "secret": ACL_SECRET},
            "url": self.mix.sinks[kind.destination].url(),
            "data": f"{kind.name}-{number}",
        }
        if kind in (KEYED, DELAYED):
            body["partition_key"] = f"key-{self._random.randrange(KEYS)}"
        if kind is DELAYED:
            body["delay_ms"] = self._random.randint(1000, 5000)
            body["ttl_ms"] = body["delay_ms"] + DELAYED_TTL_MS
        if kind is FLAKY_TTL:
            body["ttl_ms"] = FLAKY_TTL_MS
        if kind.callbacks:
            body["callback"] = self.mix.callbacks.url_for("ok")
            body["failure_callback"] = self.mix.callbacks.url_for("failed")
        if kind is IDEMPOTENT:
            # Unique to this run: bigpipe.idempotency keeps keys for a day, whatever the topic.
            body["idempotency_key"] = f"{self._run}-{next(self._keys)}"
        return body

    async def _one(self, index: int) -> tuple[Any, Any]:
        targets = self.targets()
        number = next(self._numbers)
        kind = KINDS[number % len(KINDS)]
        body = self._body(kind, number)
        outcome, call_id = await self._send(targets[index % len(targets)], body, kind)
        if kind is IDEMPOTENT and number % 2:
            again, again_id = await self._send(targets[(index + 1) % len(targets)], body, kind)
            self.mix.resends[_resend_verdict(call_id, again, again_id)] += 1
        return outcome

    async def _send(
        self, node: Bigpipe, body: dict[str, Any], kind: Kind
    ) -> tuple[tuple[Any, Any], str | None]:
        sent_at = time.monotonic()
        outcome, call_id, took = await self._post(node, orjson.dumps(body))
        self.tally.record(outcome, call_id, took)
        if outcome == (200, 0):
            assert call_id is not None
            self.mix.accepted.setdefault(
                call_id, Sent(kind, sent_at, body.get("delay_ms", 0) / 1000)
            )
            if "idempotency_key" in body:
                self.mix.keys[body["idempotency_key"]].add(call_id)
        return outcome, call_id


def _resend_verdict(first: str | None, outcome: tuple[Any, Any], again: str | None) -> str:
    if outcome != (200, 0):
        return "second refused"
    if first is None:
        return "first refused, second accepted"
    return "same id" if again == first else "a new id"


# ---------------------------------------------------------------- accounting
@dataclass
class KindReport:
    accepted: int = 0
    delivered: int = 0
    dead: Counter[str] = field(default_factory=Counter)  # reason -> calls
    unexplained: int = 0  # dead-lettered for a reason the kind does not explain
    skipped_duplicate: int = 0  # an idempotency key's other copy was delivered
    lost: int = 0
    early: int = 0
    late: list[float] = field(default_factory=list)  # s past the due time, delayed calls


def account(mix: Mix, dead_letters: dict[str, str]) -> dict[str, KindReport]:
    """What became of each accepted call, by kind; `dead_letters` is call id -> reason."""
    delivered, excused = mix.delivered(), mix.excused()
    reports: dict[str, KindReport] = defaultdict(KindReport)
    for call_id, sent in mix.accepted.items():
        report = reports[sent.kind.name]
        report.accepted += 1
        if call_id in delivered:
            report.delivered += 1
            if sent.delay:
                _judge_delay(report, sent, mix.first_delivery(call_id))
        elif call_id in dead_letters:
            reason = dead_letters[call_id]
            report.dead[reason] += 1
            report.unexplained += reason not in sent.kind.reasons
        elif call_id in excused:
            report.skipped_duplicate += 1
        else:
            report.lost += 1
    return reports


def _judge_delay(report: KindReport, sent: Sent, first: float | None) -> None:
    assert first is not None
    due = sent.sent_at + sent.delay
    if first < due - EARLY_TOLERANCE:
        report.early += 1
    report.late.append(max(0.0, first - due))


def callbacks_owed(mix: Mix, dead_letters: dict[str, str]) -> dict[str, set[str]]:
    """Call ids whose callback (ok) or failure callback (failed) must reach the receiver."""
    delivered = mix.delivered()
    owed: dict[str, set[str]] = {"ok": set(), "failed": set()}
    for call_id, sent in mix.accepted.items():
        if not sent.kind.callbacks:
            continue
        if call_id in delivered:
            owed["ok"].add(call_id)
        elif call_id in dead_letters:
            owed["failed"].add(call_id)
    return owed


def callbacks_missing(mix: Mix, dead_letters: dict[str, str]) -> int:
    owed = callbacks_owed(mix, dead_letters)
    return sum(len(owed[end] - mix.callbacks.told[end]) for end in owed)
