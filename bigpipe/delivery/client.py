"""Deliver one call to its URL: attempts, retries with backoff, and the group's shields:
its destination's (breaker, Retry-After pause, caps; see bigpipe.delivery.shields), then the group's
rate limit and concurrency."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from bigpipe.calls.envelope import Call
from bigpipe.calls.status import GroupTrail
from bigpipe.config import AclEntry, ConsumerConfig
from bigpipe.delivery.limits import Limits
from bigpipe.delivery.retry import Verdict, backoff_seconds, classify, retry_after_seconds
from bigpipe.delivery.shields import Destination, DestinationShields
from bigpipe.delivery.waits import Expiry
from bigpipe.ingest.compat import GO_CALLER
from bigpipe.ingest.destinations import DestinationRefused, is_public, literal_refusal, refusal
from bigpipe.metrics import LatencyHistogram
from bigpipe.stats import GroupCounters

log = logging.getLogger(__name__)

# Read at most this much of a response: enough to keep the connection reusable for
# ordinary replies and to show the start of an error body in a dead letter.
RESPONSE_READ_LIMIT = 64 * 1024
ERROR_BODY_EXCERPT = 200
# Deadlines are Bigpipe's own (see DeliveryClient.update), not aiohttp's: aiohttp's total
# timeout runs on through the body read and would turn a slow 2xx body into a failure.
NO_AIOHTTP_TIMEOUT = aiohttp.ClientTimeout()


@dataclass(slots=True)
class AttemptResult:
    verdict: Verdict
    status: int | None = None
    error: str = ""
    # Seconds the downstream asked us to wait; with Verdict.HELD, its destination's wait
    retry_after: float | None = None
    # A success's reply, for a result callback (bigpipe.calls.callbacks)
    headers: Mapping[str, str] | None = None
    body: bytes = b""  # up to RESPONSE_READ_LIMIT, and one chunk more when it was cut
    latency_s: float = 0.0  # from sending the request to the end of reading its reply


# The caller's ACL entry by name and call topic, from the config in force now (None: no
# such caller). The topic places calls that name no caller: those the Go original wrote.
CallerLookup = Callable[[str, str], AclEntry | None]


@dataclass(slots=True)
class Outcome:
    delivered: bool
    attempts: int
    last: AttemptResult
    first_attempt_ms: int | None
    wait_s: float | None = None  # not over: the next attempt is due in this many seconds


class DeliveryClient:
    """One per consumer group: a keep-alive pool (and a second, guarded one for denyPrivate
    calls), the group's rate limit and concurrency, its destinations' shields, and the
    callers' destination rules."""

    def __init__(
        self,
        config: ConsumerConfig,
        counters: GroupCounters,
        shields: DestinationShields,
        callers: CallerLookup,
        attempt_seconds: LatencyHistogram,
        trail: GroupTrail,
    ) -> None:
        self._counters = counters
        self._trail = trail  # each attempt's start and end, for the call's status
        self._shields = shields
        self._callers = callers
        self._attempt_seconds = attempt_seconds
        self._limits = Limits(config.rate_limit, config.concurrency)
        self.update(config)
        self._session = _new_session()
        self._guarded_session: aiohttp.ClientSession | None = None  # for denyPrivate calls

    @property
    def limits(self) -> Limits:
        """The group's rate limit and concurrency cap, which bigpipe.delivery.budget sets to this
        member's share of the group's budget."""
        return self._limits

    def update(self, config: ConsumerConfig) -> None:
        """Apply a reloaded config; attempts already under way finish under the old one.

        Not the limits: they are this member's share, which GroupBudget.update sets. Set
        to the group's whole budget here first, they let waiting calls take slots beyond
        the share, and keep them, before the budget cut them back.
        """
        self._config = config
        # The attempt's deadline covers connect, send and the status line: the verdict.
        # The body then gets a deadline of its own, which cannot change that verdict.
        self._timeout = config.timeout_ms / 1000

    async def close(self) -> None:
        await self._session.close()
        if self._guarded_session is not None:
            await self._guarded_session.close()

    def _session_for(self, caller: AclEntry) -> aiohttp.ClientSession:
        if not caller.deny_private:
            return self._session
        if self._guarded_session is None:
            self._guarded_session = _new_session(PublicOnlyResolver())
        return self._guarded_session

    async def deliver(self, call: Call, may_park: bool = True) -> Outcome:
        """Try up to retries + 1 times; return how the last attempt ended. Or, when the
        next attempt is due later than delayThreshold from now, when it is due: after a
        backoff, or, if `may_park`, once the call's destination may be called again (a
        call that may not park is held for its destination in memory, however long)."""
        body = call.data.encode()
        first_attempt_ms = int(time.time() * 1000)
        max_attempts = self._config.retries + 1
        expiry = Expiry(call, self._config.ttl_ms)
        parks_after = self._config.delay_threshold_ms / 1000 if may_park else math.inf
        attempt = call.attempts  # made before the call last waited in Kafka
        while True:
            attempt += 1
            result = await self._attempt_when_allowed(call, body, attempt, expiry, parks_after)
            if isinstance(result, str):  # refused is final, and not an attempt
                failure = AttemptResult(Verdict.FINAL, error=f"destination refused: {result}")
                return Outcome(False, attempt - 1, failure, first_attempt_ms)
            if result.verdict is Verdict.EXPIRED:  # not an attempt either
                return Outcome(False, attempt - 1, result, first_attempt_ms)
            if result.verdict is Verdict.HELD:  # nor a hold: the call waits in Kafka
                wait = expiry.cap(result.retry_after or 0.0)
                if wait > parks_after:  # else its ttl ends sooner: it waits that out here
                    self._counters.parked += 1
                return Outcome(False, attempt - 1, result, first_attempt_ms, wait_s=wait)
            if result.verdict is not Verdict.RETRY or attempt >= max_attempts:
                self._trail.attempt_ended(call, attempt, result, None)
                return Outcome(result.verdict is Verdict.SUCCESS, attempt, result, first_attempt_ms)
            self._counters.rpcRetries += 1
            wait = expiry.cap(self._retry_delay(attempt, result))
            self._trail.attempt_ended(call, attempt, result, int(time.time() * 1000 + wait * 1000))
            if wait * 1000 > self._config.delay_threshold_ms:  # too long to wait in memory
                return Outcome(False, attempt, result, first_attempt_ms, wait_s=wait)
            await asyncio.sleep(wait)

    async def _attempt_when_allowed(
        self, call: Call, body: bytes, attempt: int, expiry: Expiry, parks_after: float
    ) -> AttemptResult | str:
        """One attempt once the shields let it out; or why its destination is refused;
        or, held, that its destination may not be called for over `parks_after` s.

        The destination is judged by the caller's ACL entry in force: before the waits,
        so a refused call does not queue; while its destination holds it, so a reload that
        refuses it frees it at once; and after the waits, just before the request.
        Its expiry is judged before and after the waits too: past it, no attempt.
        The destination's own caps come before the group's, so that calls waiting for a
        slow destination's slot never sit on the group's slots.
        """
        if (refused := self._refusal(call)) is not None:
            return refused
        if expiry.passed():
            return AttemptResult(Verdict.EXPIRED, error=expiry.reason())
        destination = self._shields.get(call.url)
        wait = await destination.admit(
            give_up=lambda: self._refusal(call) is not None or expiry.passed(),
            parks_after=parks_after,
        )
        if wait is not None:
            return AttemptResult(Verdict.HELD, error=f"{destination.name} held", retry_after=wait)
        await destination.acquire()
        try:
            await self._limits.acquire()
            try:
                caller = self._callers(call.caller, self._config.topic)
                if (refused := _refusal(call, caller)) is not None:
                    return refused
                if expiry.passed():  # not an attempt: the destination records nothing
                    return AttemptResult(Verdict.EXPIRED, error=expiry.reason())
                self._trail.attempt_started(call, attempt)
                started = time.perf_counter()
                result = await self._attempt(call, body, attempt, caller, destination)
                result.latency_s = time.perf_counter() - started
            finally:
                self._limits.release()
        finally:
            destination.release()
        most = self._config.backoff_max_ms / 1000
        destination.record(
            result.verdict is Verdict.SUCCESS, result.status, result.retry_after, most
        )
        return result

    def _refusal(self, call: Call) -> str | None:
        return _refusal(call, self._callers(call.caller, self._config.topic))

    def _retry_delay(self, attempt: int, result: AttemptResult) -> float:
        delay = backoff_seconds(attempt, self._config.backoff_base_ms, self._config.backoff_max_ms)
        if result.retry_after is not None and result.status in (429, 503):
            # The downstream knows best when it can take more, up to our cap.
            delay = max(delay, min(result.retry_after, self._config.backoff_max_ms / 1000))
        return delay

    async def _attempt(
        self, call: Call, body: bytes, attempt: int, caller: AclEntry, destination: Destination
    ) -> AttemptResult:
        headers = {
            # Callers' Content-Type is not forwarded; a callback's own (JSON) is kept.
            "Content-Type": "application/octet-stream",
            **call.headers,
            "X-Bigpipe-Call-Id": call.id,
            "X-Bigpipe-Attempt": str(attempt),
        }
        if caller.signer is not None:
            headers.update(caller.signer.headers(call.id, int(time.time()), body))
        if call.redrive:  # sent again by an operator: the downstream may want to know
            headers["X-Bigpipe-Redrive"] = str(call.redrive)
        if call.replay:
            headers["X-Bigpipe-Replay"] = "1"
        self._counters.inFlight += 1
        destination.in_flight += 1
        self._counters.attempts += 1
        started = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._session_for(caller).post(
                        call.url,
                        data=body,
                        headers=headers,
                        allow_redirects=False,
                        timeout=NO_AIOHTTP_TIMEOUT,
                    )
            except TimeoutError:
                error = f"timeout after {self._config.timeout_ms} ms"
                return AttemptResult(Verdict.RETRY, error=error)
            except aiohttp.InvalidURL as exc:
                return AttemptResult(Verdict.FINAL, error=f"invalid url: {exc}")
            except (aiohttp.ClientError, OSError) as exc:
                if isinstance(getattr(exc, "os_error", exc), DestinationRefused):
                    return AttemptResult(Verdict.FINAL, error=f"destination refused: {exc}")
                return AttemptResult(Verdict.RETRY, error=f"{type(exc).__name__}: {exc}")
            finally:
                # The attempt is over at its status line or its failure; the body read is not
                # part of the verdict, so not of the attempt's latency either.
                seconds = time.perf_counter() - started
                self._attempt_seconds.observe(seconds)
                destination.observe(seconds)
            try:
                excerpt = await self._read_body(response)
            finally:
                response.release()
            return _result_of(response, excerpt, self._config.retry_status)
        finally:
            self._counters.inFlight -= 1
            destination.in_flight -= 1

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        """The start of the reply, within its own `timeout`; b"" when it does not come.

        A body that is slow, or breaks off, is cut and its connection closed; the
        status line has already given the verdict.
        """
        if response.content.is_eof():
            # The whole body came with the status line, as a short reply's does: reading it
            # cannot wait, so it needs no timer, which costs a delivery a few % of its CPU.
            return await _read_bounded(response)
        try:
            async with asyncio.timeout(self._timeout):
                return await _read_bounded(response)
        except (TimeoutError, aiohttp.ClientError, OSError):
            response.close()
            return b""


def _refusal(call: Call, caller: AclEntry | None) -> str | None:
    """Why the call may not go to its URL under its caller's entry in force, or None.

    A caller removed from the ACL has lost every right it had: its calls are refused.
    """
    if caller is None and call.caller == GO_CALLER:
        return "a call of the Go original, and no caller in kafka.producer.acl writes its topic"
    if caller is None:
        return f"caller {call.caller!r} is no longer in kafka.producer.acl"
    if not caller.allow and not caller.deny_private:
        return None  # the common case: no rules, nothing to parse
    try:
        url = URL(call.url)
    except ValueError:
        return None  # not a URL: the attempt fails on it as an invalid url
    return refusal(caller.name, caller.allow, caller.deny_private, url)


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, but refuses non-public addresses.

    Here, not in bigpipe.ingest.destinations: the config imports that module, and the
    supervisor, which reads the config, must not load aiohttp (bigpipe.node.workers).
    """

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


def _new_session(resolver: aiohttp.abc.AbstractResolver | None = None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        # Limits caps the requests in flight, and can change on reload: the pool can't.
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, resolver=resolver),
        auto_decompress=False,
    )


def _result_of(
    response: aiohttp.ClientResponse, excerpt: bytes, retry_status: frozenset[int]
) -> AttemptResult:
    verdict = classify(response.status, retry_status)
    if verdict is Verdict.SUCCESS:
        return AttemptResult(verdict, response.status, headers=response.headers, body=excerpt)
    text = excerpt[:ERROR_BODY_EXCERPT].decode("utf-8", "replace")
    return AttemptResult(
        verdict,
        response.status,
        error=f"HTTP {response.status}: {text}".rstrip(": "),
        retry_after=retry_after_seconds(response.headers.get("Retry-After"), time.time()),
    )


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    """Read the reply up to a limit; a longer one is cut and its connection dropped."""
    if response.content_length is not None and response.content_length <= RESPONSE_READ_LIMIT:
        return await response.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > RESPONSE_READ_LIMIT:
            response.close()
            break
    return b"".join(chunks)
