"""Upstream calls: one shared httpx.AsyncClient, retries with jittered backoff, circuit breakers, fallback chains.

A request goes down the chain of providers the routing policy made for it. Each provider gets up to
`retry.attempts` tries: timeouts, connection errors, 429 and 5xx are retried after a full-jitter backoff
(at least Retry-After, when the provider sends one no longer than `retry.max_retry_after_s`); 401, 403
and 404 mean the provider is misconfigured and move on at once; any other 4xx is the client's fault and
goes back to the client as is. Consecutive failed attempts open a provider's circuit: it is skipped for
`cooldown_s`, then one request probes it (half-open) and closes or re-opens the circuit. A half-open provider that no
request reaches is probed every `probe_every_s` with GET {base_url}/models. A request whose chain has no other provider
left waits for a half-open provider's probe (up to the probe's own time limit) rather than fail: when the probe
succeeds, the request goes there.

Upstream bodies are read up to `limits.max_upstream_body_bytes` (a stream: all its lines together); a larger body,
a 200 answer that is not a JSON object with a `choices` list, or a stream that breaks its format is a `bad_response`.

A request with a latency budget has a deadline: each attempt's timeout is what is left of it (a cut-off is not
the provider's fault: it opens no circuit), and when it is spent the chain stops.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import email.utils
import json
import logging
import re
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import anyio
import httpx

from ..prices import chat_tokens
from .config import (
    CircuitConfig,
    LatencyConfig,
    ProviderConfig,
    ReadinessConfig,
    RetryConfig,
    ServiceConfig,
    TierConfig,
)
from .latency import LatencyWindow
from .metrics import Metrics
from .routing import reject_constant
from .usage import Billed, answer_chars, answer_text, bill

if TYPE_CHECKING:
    from .state import LocalState

log = logging.getLogger(__name__)

Ticket = Literal["closed", "probe"] | None
PROBE_POLL_S = 0.05  # how often a request waiting for another's probe asks for the verdict


class CircuitBreaker:
    """closed -> (failures in a row) -> open -> (cooldown) -> half-open: one probe -> closed or open.

    The cool-down runs from the failure that opened the circuit (later failures of calls already in flight do not
    restart it); a failure that says how long to wait (a 429's Retry-After) sets a shorter cool-down.
    """

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._cooldown = cooldown_s  # of the current opening
        self._probing = False

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self._cooldown:
            return "half_open"
        return "open"

    def acquire(self) -> Ticket:
        """Whether a request may try the provider now: 'closed', 'probe' (the one half-open try) or None."""
        state = self.state
        if state == "closed":
            return "closed"
        if state == "half_open" and not self._probing:
            self._probing = True
            return "probe"
        return None

    def success(self) -> None:
        self._consecutive, self._opened_at, self._probing = 0, None, False

    def failure(self, retry_after: float | None = None) -> None:
        """A failed attempt; `retry_after`: the provider asked for this wait (capped at the circuit's cool-down)."""
        self._consecutive += 1
        if self._probing or (self._opened_at is None and self._consecutive >= self.failures):
            self._opened_at, self._probing = self._clock(), False
            self._cooldown = self.cooldown_s if retry_after is None else min(max(retry_after, 0.0), self.cooldown_s)

    def release(self, ticket: Ticket) -> None:
        """A probe ended without a verdict (the client went away): let the next request probe."""
        if ticket == "probe":
            self._probing = False

    @property
    def clean(self) -> bool:
        """No failure counted and not open: a success would change nothing."""
        return self._consecutive == 0 and self._opened_at is None and not self._probing

    def mirror(self, consecutive: int, opened_ago: float | None, cooldown: float, probing: bool) -> None:
        """Take the state every replica shares (state.py); `opened_ago`: seconds since the circuit opened, None: closed."""
        self._consecutive, self._probing = consecutive, probing
        self._opened_at = None if opened_ago is None else self._clock() - opened_ago
        self._cooldown = self.cooldown_s if opened_ago is None else cooldown


@dataclass
class Provider:
    config: ProviderConfig
    tier: str
    api_key: str | None = field(repr=False)
    breaker: CircuitBreaker
    latency: LatencyWindow

    @property
    def name(self) -> str:
        return self.config.name

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class AttemptFailed(Exception):
    def __init__(self, kind: str, detail: str, retryable: bool = True, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.retryable, self.retry_after = kind, detail, retryable, retry_after


class BadStream(Exception):
    """The upstream broke its stream's format or size limit after it started (`kind`: bad_response)."""

    def __init__(self, detail: str, kind: str = "bad_response"):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


CREDENTIAL = re.compile(r"(?i)\bbearer\s+\S+|\b(?:sk|pk|rk|ak|key|token)[-_][A-Za-z0-9_\-]{8,}|\b[A-Za-z0-9_\-]{32,}\b")
MESSAGE_CHARS = 300


def client_error_body(status: int, data: object, provider: Provider) -> bytes:
    """A provider's 4xx answer as the client gets it: a status's type, code and a short message, with the provider's
    key and anything that looks like a credential removed."""
    err = data.get("error") if isinstance(data, dict) else None
    err = err if isinstance(err, dict) else {}
    message = err.get("message") if isinstance(err.get("message"), str) else f"HTTP {status} from the provider"
    if provider.api_key:
        message = message.replace(provider.api_key, "[redacted]")
    message = CREDENTIAL.sub("[redacted]", message)[:MESSAGE_CHARS]
    short = lambda v: v if isinstance(v, str) and len(v) <= 64 and not CREDENTIAL.search(v) else None  # noqa: E731
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": short(err.get("type")) or "invalid_request_error",
                "param": short(err.get("param")),
                "code": short(err.get("code")),
            }
        }
    ).encode()


def usable_answer(data: object) -> bool:
    """A chat completion with at least one choice, each an object with a message object."""
    choices = data.get("choices") if isinstance(data, dict) else None
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices)
    )


def stream_chunk(data: str) -> tuple[dict, str]:
    """One SSE data payload as a chunk object and the text it adds; BadStream when it is not one."""
    try:
        chunk = json.loads(data, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        raise BadStream("a stream chunk is not JSON") from None
    choices = chunk.get("choices", []) if isinstance(chunk, dict) else None
    if not isinstance(choices, list):
        raise BadStream("a stream chunk is not an object with a choices list")
    text = ""
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else ""
        if delta is None:  # some providers send "delta": null with the finish reason
            delta = {}
        if not isinstance(delta, dict):
            raise BadStream("a stream chunk's choice has no delta object")
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise BadStream("a stream chunk's delta content is not a string")
        text += content or ""
    return chunk, text


async def read_body(response: httpx.Response, limit: int) -> bytes:
    """The whole body, or AttemptFailed(bad_response) once it passes `limit` bytes."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise AttemptFailed(
            "bad_response", f"HTTP {response.status_code} with a body of {declared} bytes, over the {limit} limit"
        )
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise AttemptFailed("bad_response", f"HTTP {response.status_code} with a body over the {limit} bytes limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def bounded_lines(response: httpx.Response, limit: int) -> AsyncIterator[str]:
    """The lines of a stream (UTF-8, bad bytes replaced); BadStream once it passes `limit` bytes in all."""
    decoder, size, pending = codecs.getincrementaldecoder("utf-8")("replace"), 0, []
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise BadStream(f"the stream passed the {limit} bytes limit")
        text = decoder.decode(chunk)
        if "\n" not in text:
            pending.append(text)
            continue
        first, *rest = text.split("\n")
        yield ("".join(pending) + first).rstrip("\r")
        for line in rest[:-1]:
            yield line.rstrip("\r")
        pending = [rest[-1]]
    if tail := "".join(pending) + decoder.decode(b"", final=True):
        yield tail.rstrip("\r")


class AllProvidersFailed(Exception):
    """No provider of the chain answered; `outcomes` says what happened to each ('tier/name: what')."""

    def __init__(self, outcomes: list[str], tried: bool, deadline_passed: bool = False):
        super().__init__("; ".join(outcomes))
        self.outcomes = outcomes
        self.tried = tried  # False: every provider was skipped (circuits open)
        self.deadline_passed = deadline_passed  # the request's latency budget ran out


class NoAnswer(Exception):
    """No provider of a chain gave a whole answer (each failed, or one passed back an HTTP error): what happened."""


@dataclass(frozen=True)
class Answer:
    """A whole answer asked for outside a client's request (labelling, shadow grading) and its bill."""

    provider: Provider
    text: str | None  # the first choice's message content; None when it holds no text
    billed: Billed


@dataclass
class Reply:
    """An upstream answer. A stream holds its open response, the lines read so far and the rest."""

    provider: Provider
    status: int
    seconds: float
    json: object = None  # non-streaming (or an error body passed back to the client)
    raw: bytes = b""  # the body as the provider sent it
    response: httpx.Response | None = None
    head: list[str] = field(default_factory=list)
    lines: AsyncIterator[str] | None = None
    fallbacks: int = 0


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _classify(status: int, headers: httpx.Headers) -> AttemptFailed | None:
    """None: the provider answered (a success, or a client error to pass back); else the failure."""
    if status == 429:
        return AttemptFailed(
            "http_429", "HTTP 429 (rate limited)", retry_after=retry_after_seconds(headers.get("retry-after"))
        )
    if status >= 500 or status == 408:
        return AttemptFailed(f"http_{status}", f"HTTP {status}")
    if status in (401, 403, 404):
        return AttemptFailed(
            f"http_{status}", f"HTTP {status} (check the provider's base_url, model and key)", retryable=False
        )
    return None


class Upstream:
    """`state` keeps the breakers (state.py: each provider's own, or one per provider for every replica in Redis)."""

    def __init__(
        self,
        tiers: list[list[Provider]],
        retry: RetryConfig,
        metrics: Metrics,
        state: LocalState,
        client: httpx.AsyncClient | None = None,
        max_body_bytes: int = 8 << 20,
        probe_every_s: float | None = None,
    ):
        self.tiers = tiers  # cheapest first, each an ordered chain
        self.retry = retry
        self.probe_every_s = probe_every_s
        self._prober: asyncio.Task | None = None
        self.state = state
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.client = client
        self._ready: dict[str, tuple[float, bool]] = {}
        for p in self.providers():
            metrics.watch_provider(p.name, lambda b=p.breaker: b.state, p.latency.p95)
        state.bind(self.providers(), retry)

    @classmethod
    def apart(cls, config: ServiceConfig, tiers: list[TierConfig], keys: dict[str, str | None]) -> Upstream:
        """An upstream beside the clients' (labelling, shadow grading): the config's retries, breakers, latency
        windows and body limit, with metrics and local state of its own, so none of its calls shows in the clients'
        metrics or limits."""
        from .state import LocalState

        quiet = Metrics()
        return cls.build(
            tiers,
            keys,
            config.retry,
            config.circuit_breaker,
            config.latency,
            quiet,
            LocalState(config.rate_limit, quiet),
            config.limits.max_upstream_body_bytes,
        )

    @classmethod
    def build(
        cls,
        tiers: list[TierConfig],
        keys: dict[str, str | None],
        retry: RetryConfig,
        circuit: CircuitConfig,
        latency: LatencyConfig,
        metrics: Metrics,
        state: LocalState,
        max_body_bytes: int = 8 << 20,
    ) -> Upstream:
        return cls(
            [
                [
                    Provider(
                        c,
                        t.name,
                        keys[c.name],
                        CircuitBreaker(circuit.failures, circuit.cooldown_s),
                        LatencyWindow(latency.window, latency.max_age_s, latency.min_samples),
                    )
                    for c in t.providers
                ]
                for t in tiers
            ],
            retry,
            metrics,
            state,
            max_body_bytes=max_body_bytes,
            probe_every_s=circuit.probe_every_s,
        )

    async def start(self) -> None:
        # Timeouts are set per provider on each request; the pool is shared by all of them.
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128), trust_env=False
        )
        if self.probe_every_s is not None:
            self._prober = asyncio.create_task(self._probe_half_open())

    async def stop(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        if self.client is not None:
            await self.client.aclose()

    async def _probe_half_open(self) -> None:
        """Every `probe_every_s`: each provider whose cool-down is over and that no request is probing gets the probe
        ticket and a GET {base_url}/models; an answer below 500 (not 401/403) closes its circuit, anything else
        re-opens it."""
        while True:
            await asyncio.sleep(self.probe_every_s)
            for p in self.providers():
                if p.breaker.state != "half_open":
                    continue
                try:
                    ticket = await self.state.acquire(p)
                    if ticket != "probe":
                        await self.state.release(p, ticket)
                        continue
                    ok = await self.answers_models(p, p.config.timeout_s)
                    await (self.state.success(p) if ok else self.state.failure(p))
                    self.metrics.circuit_probes.labels(p.name, "closed" if ok else "open").inc()
                except Exception as e:  # the timer must outlive any one probe
                    log.warning("circuit probe of %s failed: %s", p.name, type(e).__name__)

    async def _after_probe(self, provider: Provider, deadline: float | None) -> Ticket:
        """Wait for the verdict of the probe another request (or the timer) holds: a ticket once the circuit closes (or
        the probe ends without a verdict), None when it re-opens or the probe's time limit or the deadline passes."""
        limit = time.monotonic() + provider.config.timeout_s * self.retry.attempts + 1.0
        if deadline is not None:
            limit = min(limit, deadline)
        while time.monotonic() < limit:
            await asyncio.sleep(PROBE_POLL_S)
            ticket = await self.state.acquire(provider)
            if ticket is not None or provider.breaker.state != "half_open":
                return ticket
        return None

    def providers(self) -> list[Provider]:
        return [p for chain in self.tiers for p in chain]

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.retry.backoff_max_s, self.retry.backoff_base_s * 2**attempt))

    async def complete(self, chain: list[Provider], body: dict, stream: bool, deadline: float | None = None) -> Reply:
        """The first good answer down `chain`; AllProvidersFailed when there is none. `deadline`: time.monotonic()."""
        outcomes: list[str] = []
        tried = False
        prev: Provider | None = None
        pending = [(p, False) for p in chain]  # (provider, whether it waits for another's probe)
        while pending:
            provider, waits = pending.pop(0)
            if deadline is not None and time.monotonic() >= deadline:
                outcomes.append(f"{provider.tier}/{provider.name}: not tried, the latency budget was spent")
                raise AllProvidersFailed(outcomes, tried, deadline_passed=True)
            ticket = await (self._after_probe(provider, deadline) if waits else self.state.acquire(provider))
            if ticket is None and not waits and provider.breaker.state == "half_open":
                pending.append((provider, True))  # being probed: asked again when the rest of the chain fails
                continue
            if ticket is None:
                self.metrics.circuit_skips.labels(provider.name).inc()
                outcomes.append(f"{provider.tier}/{provider.name}: circuit open")
                prev = provider
                continue
            if prev is not None:
                self.metrics.fallbacks.labels(prev.name, provider.name).inc()
            tried = True
            try:
                reply = await self._try(provider, body, stream, deadline)
            except AttemptFailed as failed:
                outcomes.append(f"{provider.tier}/{provider.name}: {failed.detail}")
                if failed.kind == "latency_budget":
                    raise AllProvidersFailed(outcomes, tried, deadline_passed=True) from None
                prev = provider
                continue
            finally:
                await self.state.release(provider, ticket)  # no-op unless a probe ended with no verdict
            reply.fallbacks = len(outcomes)
            return reply
        raise AllProvidersFailed(outcomes, tried)

    async def failed_mid_stream(self, provider: Provider, kind: str) -> None:
        """A stream this provider began broke off (`kind`): a failure of the provider, counted as an attempt's."""
        self.metrics.upstream_errors.labels(provider.name, kind).inc()
        await self.state.failure(provider)

    async def ask(self, chain: list[Provider], body: dict, chars_per_token: float) -> Answer:
        """The first whole answer down `chain` to the chat request `body`, billed by its usage, else by the estimate
        (the messages' text, the answer's characters); NoAnswer naming why there is none."""
        try:
            reply = await self.complete(chain, body | {"stream": False}, stream=False)
        except AllProvidersFailed as e:
            raise NoAnswer("; ".join(e.outcomes)) from None
        except httpx.HTTPError as e:
            raise NoAnswer(f"{chain[0].tier}/{chain[0].name}: {type(e).__name__}") from None
        provider = reply.provider
        if reply.status != 200:
            raise NoAnswer(f"{provider.tier}/{provider.name}: HTTP {reply.status}")
        estimate = chat_tokens(body.get("messages", []), chars_per_token)
        billed = bill(provider.config, reply.json.get("usage"), estimate, answer_chars(reply.json), chars_per_token)
        return Answer(provider, answer_text(reply.json), billed)

    async def _try(self, provider: Provider, body: dict, stream: bool, deadline: float | None) -> Reply:
        """Up to `retry.attempts` tries of one provider; raises its last AttemptFailed."""
        last: AttemptFailed | None = None
        for attempt in range(self.retry.attempts):
            if attempt and provider.breaker.state == "open":
                break
            start = time.perf_counter()
            try:
                reply = await self._attempt(provider, body, stream, deadline)
            except AttemptFailed as failed:
                last = failed
                self.metrics.upstream_errors.labels(provider.name, failed.kind).inc()
                if failed.kind == "latency_budget":
                    break
                await self.state.failure(provider, failed.retry_after)
                if failed.kind == "timeout":  # as slow as this at least
                    provider.latency.add(time.perf_counter() - start)
                if not failed.retryable or attempt + 1 == self.retry.attempts:
                    break
                delay = self.backoff(attempt)
                if failed.retry_after is not None:
                    if failed.retry_after > self.retry.max_retry_after_s:
                        break
                    delay = max(delay, failed.retry_after)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    break  # no time for another try: the next provider gets what is left
                await asyncio.sleep(delay)
                continue
            await self.state.success(provider)
            provider.latency.add(reply.seconds)
            self.metrics.upstream_seconds.labels(provider.name).observe(reply.seconds)
            return reply
        assert last is not None
        raise last

    async def _attempt(self, provider: Provider, body: dict, stream: bool, deadline: float | None) -> Reply:
        cfg = provider.config
        limit = cfg.timeout_s if deadline is None else min(cfg.timeout_s, deadline - time.monotonic())
        cut = limit < cfg.timeout_s  # the latency budget, not the provider's timeout, bounds this attempt
        if limit <= 0:
            raise AttemptFailed("latency_budget", "not tried, the latency budget was spent", retryable=False)
        payload = {**body, "model": cfg.model}
        if stream and cfg.stream_usage:
            payload["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        timeout = httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s)
        request = self.client.build_request(
            "POST", f"{cfg.base_url}/chat/completions", json=payload, headers=provider.headers(), timeout=timeout
        )
        start = time.perf_counter()
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(limit):
                response = await self.client.send(request, stream=True)
                if response.status_code != 200 or not stream:
                    failed = _classify(response.status_code, response.headers)
                    raw = b"" if failed else await read_body(response, self.max_body_bytes)
                    await response.aclose()
                    if failed:
                        raise failed
                    try:
                        data = json.loads(raw, parse_constant=reject_constant)
                    except (ValueError, RecursionError):
                        raise AttemptFailed(
                            "bad_response", f"HTTP {response.status_code} with a body that is not JSON"
                        ) from None
                    if response.status_code == 200 and not usable_answer(data):
                        raise AttemptFailed(
                            "bad_response",
                            "HTTP 200 with a body that is not a chat completion (no choice with a message object)",
                        )
                    return Reply(provider, response.status_code, time.perf_counter() - start, json=data, raw=raw)
                lines = bounded_lines(response, self.max_body_bytes)
                head = []
                async for line in lines:  # wait for the first event: until then we can still fall back
                    head.append(line)
                    if line.startswith("data:"):
                        if (data := line[5:].strip()) != "[DONE]":
                            stream_chunk(data)
                        break
                else:
                    raise AttemptFailed("bad_response", "the stream ended before its first event")
                return Reply(provider, 200, time.perf_counter() - start, response=response, head=head, lines=lines)
        except BaseException as e:  # a returned stream stays open; anything else is closed here
            if response is not None:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
            if isinstance(e, (TimeoutError, httpx.TimeoutException)):
                if cut and not isinstance(e, httpx.TimeoutException):  # our deadline, not the provider's timeouts
                    raise AttemptFailed(
                        "latency_budget",
                        f"cut off after {limit * 1000:.0f} ms, when the latency budget ran out",
                        retryable=False,
                    ) from None
                raise AttemptFailed("timeout", f"timed out after {cfg.timeout_s:g}s") from None
            if isinstance(e, httpx.TransportError):
                kind = "connect" if isinstance(e, httpx.ConnectError) else "connection"
                raise AttemptFailed(kind, f"{kind} error ({type(e).__name__})") from None
            if isinstance(e, BadStream):
                raise AttemptFailed(e.kind, e.detail) from None
            raise

    async def answers_models(self, p: Provider, timeout_s: float) -> bool:
        """Whether the provider is reachable: GET {base_url}/models answers below 500 and accepts its key (not 401/403)."""
        try:
            r = await self.client.get(f"{p.config.base_url}/models", headers=p.headers(), timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code < 500 and r.status_code not in (401, 403)

    async def ready(self, readiness: ReadinessConfig) -> dict[str, bool]:
        """Provider name -> reachable (answers GET {base_url}/models, circuit not open); cached `cache_s`."""
        now = time.monotonic()

        async def probe(p: Provider) -> bool:
            cached = self._ready.get(p.name)
            if cached and now - cached[0] < readiness.cache_s:
                return cached[1] and p.breaker.state != "open"
            ok = await self.answers_models(p, readiness.probe_timeout_s)
            self._ready[p.name] = (now, ok)
            return ok and p.breaker.state != "open"

        providers = self.providers()
        results = await asyncio.gather(*(probe(p) for p in providers))
        return {p.name: ok for p, ok in zip(providers, results, strict=True)}
