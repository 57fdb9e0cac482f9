"""Where the state replicas can share lives: circuit breakers, rate limits and budget spend.

LocalState keeps it in the process: breakers and token buckets in memory, the spend in the sqlite file of
`budget.store`. RedisState keeps it in one Redis (`state.backend: redis`), so N replicas act as one service:

- rate limits: one token bucket per client key (a Lua script: refill and take in one step, on Redis' clock);
- circuit breakers: one failure count and open / half-open state per provider; after the cool-down one replica
  gets the probe (a lease, so a replica that dies probing frees it after `timeout_s x retry.attempts + 1` s).
  Each process mirrors the shared state into its own breaker (`CircuitBreaker.mirror`), which routing, metrics and
  readiness read, refreshed by every call and every `retry_s`. A success is sent (off the answer's path) only when
  the mirror was not clean: in a healthy service a chat request waits for two Redis calls, its token and its ticket;
- budget spend: one ledger per period (RedisLedger), written in batches off the request path. A batch carries the
  writer's sequence number and Redis applies each number once, so a batch resent after a lost reply is not counted
  twice. The pacer reads the shared figures as last seen (at most `retry_s` old) plus this process' unwritten spend.

Redis failure: a call that fails or takes over `timeout_s` switches the process to per-process state (the breakers
go on from their mirrored state, buckets are local, the spend is held in memory), logged once and shown by
`router_state_shared` 0. Every `retry_s` Redis is tried again; when it answers, the shared state is used again and
the spend held meanwhile is added to the ledger, exactly once. Provider latency windows stay per process.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

from .auth import RateLimiter
from .budget import SqliteLedger
from .config import BudgetConfig, CircuitConfig, RateLimitConfig, RetryConfig, StateConfig
from .errors import ConfigError
from .metrics import Metrics

if TYPE_CHECKING:  # redis is imported where RedisState needs it: per-process state (and `label`) run without it
    import redis.asyncio

    from .providers import Provider, Ticket

log = logging.getLogger("learned_router.serving")
WRITER_TTL_S = 7 * 86400  # how long Redis remembers a writer's last applied batch
FLUSH_S = 5.0  # at shutdown: the longest wait for the last spend to land
BATCH_S = 0.05  # the spend's writer sends at most one batch per BATCH_S

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function snapshot(key, now, verdict)
  local h = redis.call('HMGET', key, 'n', 'opened', 'cooldown', 'probe')
  local opened, probe = tonumber(h[2]), tonumber(h[4])
  return {verdict, tonumber(h[1]) or 0, opened and (now - opened) or -1, tonumber(h[3]) or 0,
          (probe and probe > now) and 1 or 0}
end
"""
# A token bucket: ARGV rate (tokens per ms), burst. Returns 0 (go) or the ms to wait.
TAKE = (
    _NOW
    + """
local now, rate, burst = now_ms(), tonumber(ARGV[1]), tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = math.min(burst, (tonumber(h[1]) or burst) + math.max(0, now - (tonumber(h[2]) or now)) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1000)
return wait
"""
)
# Breaker scripts return {verdict, failures in a row, ms since opened (-1: closed), cool-down ms, probing 0/1}.
ACQUIRE = (
    _NOW
    + """
local now = now_ms()
local h = redis.call('HMGET', KEYS[1], 'opened', 'cooldown', 'probe')
local verdict, opened, probe = 'closed', tonumber(h[1]), tonumber(h[3])
if opened then
  verdict = 'none'
  if now - opened >= tonumber(h[2]) and not (probe and probe > now) then
    redis.call('HSET', KEYS[1], 'probe', now + tonumber(ARGV[1]))
    verdict = 'probe'
  end
end
return snapshot(KEYS[1], now, verdict)
"""
)
# ARGV: failures that open the circuit, cool-down ms, the provider's Retry-After ms (-1: none).
FAILURE = (
    _NOW
    + """
local now = now_ms()
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
local h = redis.call('HMGET', KEYS[1], 'opened', 'probe')
local probe = tonumber(h[2])
if (probe and probe > now) or (not h[1] and n >= tonumber(ARGV[1])) then
  local cooldown, wait = tonumber(ARGV[2]), tonumber(ARGV[3])
  if wait >= 0 then cooldown = math.min(wait, cooldown) end
  redis.call('HSET', KEYS[1], 'opened', now, 'cooldown', cooldown)
  redis.call('HDEL', KEYS[1], 'probe')
end
return snapshot(KEYS[1], now, 'failure')
"""
)
SUCCESS = (
    _NOW
    + """
redis.call('DEL', KEYS[1])
return snapshot(KEYS[1], now_ms(), 'success')
"""
)
RELEASE = (
    _NOW
    + """
redis.call('HDEL', KEYS[1], 'probe')
return snapshot(KEYS[1], now_ms(), 'release')
"""
)
READ = (
    _NOW
    + """
return snapshot(KEYS[1], now_ms(), 'read')
"""
)
# KEYS: the writer's last applied batch, then one spend hash per period; ARGV: the batch number, then usd, answers
# per period. Applies a batch once; returns each period's usd and answers.
SPEND = """
local seq = tonumber(ARGV[1])
if seq > tonumber(redis.call('GET', KEYS[1]) or '0') then
  for i = 2, #KEYS do
    redis.call('HINCRBYFLOAT', KEYS[i], 'usd', ARGV[2 * i - 2])
    redis.call('HINCRBY', KEYS[i], 'requests', ARGV[2 * i - 1])
  end
  redis.call('SET', KEYS[1], seq, 'EX', tonumber(ARGV[#ARGV]))
end
local out = {}
for i = 2, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'usd', 'requests')
  out[#out + 1] = h[1] or '0'
  out[#out + 1] = h[2] or '0'
end
return out
"""


class LocalState:
    """Per-process state: each provider's own breaker, in-memory token buckets, the sqlite spend file."""

    shared = False

    def __init__(self, rate_limit: RateLimitConfig, metrics: Metrics):
        self.limiter = RateLimiter(rate_limit.requests_per_minute, rate_limit.burst)
        self.metrics = metrics

    def bind(self, providers: list[Provider], retry: RetryConfig) -> None:
        """The providers whose breakers this state keeps."""

    def ledger(self, budget: BudgetConfig):
        return SqliteLedger(budget.store, on_error=self.metrics.spend_store_errors.inc)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def take(
        self, client: str, requests_per_minute: float | None = None, burst: int | None = None
    ) -> float | None:
        """None when the client's request may go; else the seconds to wait. `burst`: this bucket's own size."""
        return self.limiter.take(client, requests_per_minute, burst)

    async def acquire(self, p: Provider) -> Ticket:
        return p.breaker.acquire()

    async def success(self, p: Provider) -> None:
        p.breaker.success()

    async def failure(self, p: Provider, retry_after: float | None = None) -> None:
        p.breaker.failure(retry_after)

    async def release(self, p: Provider, ticket: Ticket) -> None:
        p.breaker.release(ticket)


class RedisState(LocalState):
    """Breakers, buckets and spend in one Redis; per-process state (LocalState) while Redis is unreachable."""

    shared = True

    def __init__(self, config: StateConfig, rate_limit: RateLimitConfig, circuit: CircuitConfig, metrics: Metrics):
        super().__init__(rate_limit, metrics)
        self.config, self.circuit = config, circuit
        self._options = dict(
            password=config.password(), socket_timeout=config.timeout_s, socket_connect_timeout=config.timeout_s
        )  # and no retry: a failed call falls back at once
        self.up = self._reachable()
        self.client: redis.asyncio.Redis | None = None
        self._providers: list[Provider] = []
        self._leases: dict[str, int] = {}
        self._ledgers: list[RedisLedger] = []
        self._task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # breaker successes on their way to Redis
        self._lost = asyncio.Event()
        self._closing = False  # the watch ends (redis-py can swallow a task's cancellation, so none is cancelled)
        metrics.state_shared.set(int(self.up))

    def _reachable(self) -> bool:
        """Ping Redis once at start-up; ConfigError when it does not answer, unless starting on local state is allowed."""
        import redis
        import redis.retry
        from redis.backoff import NoBackoff

        try:
            with redis.Redis.from_url(self.config.url, retry=redis.retry.Retry(NoBackoff(), 0), **self._options) as r:
                r.ping()
            return True
        except redis.RedisError as e:
            if self.config.unavailable_at_start == "exit":
                raise ConfigError(
                    f"state.url: cannot use Redis at {self.config.url} ({e}); check it runs and its password, or set "
                    "state.unavailable_at_start: local to start on per-process state"
                ) from None
            log.warning("state: cannot use Redis at %s (%s): starting on per-process state", self.config.url, e)
            return False

    def key(self, *parts: str) -> str:
        return self.config.prefix + ":".join(parts)

    def bind(self, providers: list[Provider], retry: RetryConfig) -> None:
        self._providers = providers
        self._leases = {p.name: int((p.config.timeout_s * retry.attempts + 1) * 1000) for p in providers}

    def ledger(self, budget: BudgetConfig) -> RedisLedger:
        ledger = RedisLedger(self)
        self._ledgers.append(ledger)
        return ledger

    async def start(self) -> None:
        import redis.asyncio
        import redis.asyncio.retry
        from redis.backoff import NoBackoff

        self.client = redis.asyncio.Redis.from_url(
            self.config.url, retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **self._options
        )
        self._scripts = {
            name: self.client.register_script(lua)
            for name, lua in (
                ("take", TAKE),
                ("acquire", ACQUIRE),
                ("failure", FAILURE),
                ("success", SUCCESS),
                ("release", RELEASE),
                ("read", READ),
                ("spend", SPEND),
            )
        }
        self._task = asyncio.create_task(self._watch(), name="router-state")
        for ledger in self._ledgers:
            ledger.start()

    async def stop(self) -> None:
        """Stop the watch and close the client (after the ledgers' aclose: they flush through it)."""
        if self.client is not None:
            self._closing = True
            self._lost.set()
            await asyncio.gather(self._task, *self._background)
            await self.client.aclose()

    async def call(self, script: str, keys: list[str], args: list) -> list | int | None:
        """The script's reply; None when Redis is down or fails now (the caller then uses per-process state)."""
        if not self.up or self.client is None:
            return None
        try:
            return await self._scripts[script](keys=keys, args=args)
        except Exception as e:  # whatever Redis or its client does, the request goes on with per-process state
            self.metrics.state_errors.inc()
            if self.up:
                self.up = False
                self.metrics.state_shared.set(0)
                log.warning(
                    "state: Redis failed (%s: %s): serving with per-process state until it answers again",
                    type(e).__name__,
                    e,
                )
                self._lost.set()
            return None

    async def _watch(self) -> None:
        """While Redis is up: refresh the breakers' mirrors every `retry_s`; while down: try it every `retry_s`."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self.config.retry_s)
            except TimeoutError:
                pass
            if self._closing:
                return
            try:
                if self._lost.is_set():
                    self._lost.clear()
                    await (
                        self.client.connection_pool.disconnect()
                    )  # after a restart, no stale connection fails a request
                if self.up or await self.retry():
                    for p in self._providers:
                        await self._breaker("read", p)
            except Exception as e:  # the watch outlives any one failure
                log.warning("state: Redis watch: %s: %s", type(e).__name__, e)

    async def retry(self) -> bool:
        """Try Redis again; when it answers, the shared state is used from now on."""
        try:
            await self.client.ping()
        except Exception:  # down, refused, timed out: still per-process state
            return False
        if not self.up:
            self.up = True
            self.metrics.state_shared.set(1)
            log.warning("state: Redis answers again: shared breakers, rate limits and spend resumed")
            for ledger in self._ledgers:
                ledger.wake()
        return True

    async def take(
        self, client: str, requests_per_minute: float | None = None, burst: int | None = None
    ) -> float | None:
        rate = (requests_per_minute or self.limiter.requests_per_minute) / 60.0
        if rate <= 0:
            return None
        wait = await self.call(
            "take", [self.key("ratelimit", client)], [repr(rate / 1000), burst or self.limiter.burst]
        )
        if wait is None:
            return self.limiter.take(client, requests_per_minute, burst)
        return wait / 1000 if wait else None

    async def _breaker(self, script: str, p: Provider, *args) -> bool | str:
        """Run a breaker script and mirror its answer into `p.breaker`; False when Redis did not answer."""
        reply = await self.call(script, [self.key("circuit", p.name)], list(args))
        if reply is None:
            return False
        verdict, failures, opened_ms, cooldown_ms, probing = reply
        p.breaker.mirror(
            int(failures), None if int(opened_ms) < 0 else int(opened_ms) / 1000, int(cooldown_ms) / 1000, bool(probing)
        )
        return verdict.decode() if isinstance(verdict, bytes) else verdict

    async def acquire(self, p: Provider) -> Ticket:
        verdict = await self._breaker("acquire", p, self._leases.get(p.name, 60_000))
        if verdict is False:
            return p.breaker.acquire()
        return None if verdict == "none" else verdict

    async def success(self, p: Provider) -> None:
        """Close the circuit here at once and, unless it was clean when last seen, in Redis from a task of its own (the
        answer does not wait for it)."""
        clean = p.breaker.clean
        p.breaker.success()
        if self.up and not clean:
            task = asyncio.create_task(self._breaker("success", p))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def failure(self, p: Provider, retry_after: float | None = None) -> None:
        wait = -1 if retry_after is None else int(max(retry_after, 0.0) * 1000)
        if not await self._breaker("failure", p, self.circuit.failures, int(self.circuit.cooldown_s * 1000), wait):
            p.breaker.failure(retry_after)

    async def release(self, p: Provider, ticket: Ticket) -> None:
        if ticket == "probe" and not await self._breaker("release", p):
            p.breaker.release(ticket)


class RedisLedger:
    """The budget's spend in Redis: `prefix + spend:<period>` holds its usd and answers, for every replica.

    Answers are added to a local tally; one task sends it as numbered batches and keeps the figures Redis returns.
    A batch is resent with its number until Redis acknowledges it, so it counts once whatever happens to replies.
    """

    def __init__(self, state: RedisState):
        self.state = state
        self._writer = state.key("writer", uuid.uuid4().hex)
        self._pending: dict[str, tuple[float, int]] = {}  # not yet sent
        self._batch: tuple[int, dict[str, tuple[float, int]]] | None = None  # sent, not yet acknowledged
        self._seq = 0
        self._shared: dict[str, tuple[float, int]] = {}  # Redis' figures at the last look
        self._watched = ""  # the period the pacer reads
        self._wake = asyncio.Event()
        self._held = False  # a batch failed to land: log when it does
        self._task: asyncio.Task | None = None
        self._closing = False
        self._syncing = asyncio.Lock()

    def add(self, period: str, usd: float) -> None:
        usd0, n0 = self._pending.get(period, (0.0, 0))
        self._pending[period] = (usd0 + usd, n0 + 1)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def spend(self, period: str) -> tuple[float, int]:
        """Dollars and answers of the period: the shared figures as last seen, plus this process' not yet in them."""
        self._watched = period
        if period not in self._shared:  # not read yet (a start, a new period): read it now
            self._wake.set()
        usd, n = self._shared.get(period, (0.0, 0))
        for part in (self._pending, self._batch[1] if self._batch else {}):
            u, k = part.get(period, (0.0, 0))
            usd, n = usd + u, n + k
        return usd, n

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="router-ledger")

    async def read(self, period: str) -> None:
        """Fetch the period's shared figures now (at start-up: before the first request is paced)."""
        self._watched = period
        await self.sync()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.state.config.retry_s)
            except TimeoutError:
                pass
            if self._closing:
                return
            self._wake.clear()
            await self.sync()
            await asyncio.sleep(BATCH_S)  # the answers of the next BATCH_S go in one batch

    async def sync(self) -> bool:
        """Send what is pending, batch by batch (else read the watched period); False when Redis did not answer."""
        async with self._syncing:  # one at a time: the writer task, a start-up read, the last flush
            return await self._sync()

    async def _sync(self) -> bool:
        if self._batch is None and not self._pending:
            return not self._watched or await self._send([self._watched], [0, "0", 0, 1])
        while self._batch is not None or self._pending:
            if self._batch is None:
                self._seq += 1
                self._batch, self._pending = (self._seq, self._pending), {}
            seq, items = self._batch
            if not await self._send(
                list(items), [seq, *(v for usd, n in items.values() for v in (f"{usd:.17g}", n)), WRITER_TTL_S]
            ):
                self._held = True
                return False
            if self._held:
                held = [*items.values(), *self._pending.values()]
                log.warning(
                    "state: %.8f USD of %d answers held while Redis was down go to the shared spend now",
                    sum(u for u, _ in held),
                    sum(n for _, n in held),
                )
                self._held = False
            self._batch = None
        return True

    async def _send(self, periods: list[str], args: list) -> bool:
        """Run the spend script on `periods` and keep the figures it returns."""
        reply = await self.state.call("spend", [self._writer, *(self.state.key("spend", p) for p in periods)], args)
        if reply is None:
            return False
        for i, period in enumerate(periods):
            self._shared[period] = (float(reply[2 * i]), int(reply[2 * i + 1]))
        return True

    async def aclose(self) -> None:
        """Stop the writer, then write what is left, trying for up to FLUSH_S; log what could not be written."""
        if self._task is not None:
            self._closing = True
            self._wake.set()
            await self._task
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_S
        while (self._pending or self._batch) and loop.time() < deadline:
            if not ((self.state.up or await self.state.retry()) and await self.sync()):
                await asyncio.sleep(0.2)
        for period, (usd, n) in [*self._pending.items(), *(self._batch[1].items() if self._batch else [])]:
            log.error("state: %.8f USD of %d answers of period %s not written to Redis at shutdown", usd, n, period)


def open_state(
    config: StateConfig, rate_limit: RateLimitConfig, circuit: CircuitConfig, metrics: Metrics
) -> LocalState:
    if config.backend == "redis":
        return RedisState(config, rate_limit, circuit, metrics)
    return LocalState(rate_limit, metrics)
