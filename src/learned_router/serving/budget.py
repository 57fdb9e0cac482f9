"""Budget pacing: the spend of each UTC calendar period in a ledger, and the controller that moves the threshold.

Every dollar the service spends (upstream usage x configured prices) is added to the ledger: by default a sqlite
file (SqliteLedger), one transaction per answer (WAL journal), so the spend survives restarts and is shared by every
process that opens the same file; with `state.backend: redis`, one Redis for every replica (state.RedisLedger).
The sqlite writes run in one thread off the event loop (SpendWriter): a store locked by another process delays only
the accounting, which is retried until it lands; until then the pacer counts the unwritten dollars itself.

pace = spend so far / (budget x elapsed share of the period): 1 is on track, above 1 is spending too fast.

The controller is spend-rate targeting. The budget left is spread evenly over the requests still expected this
period (the period's request rate so far, held for the rest of it):

    target cost per request = (budget - spent) / (requests so far x (1 - elapsed) / elapsed)

It keeps the last `window` chat requests: each one's pass chances, which tiers could take it, and the estimated
cost on each tier (tokens x prices, scaled per tier by the mean ratio of billed to estimated cost of its last
`window` answers). It then
solves, by bisection, for the largest threshold offset at which those requests, routed again with their own
threshold + offset, would cost at most the target on average. Running ahead of pace leaves less budget for the
requests to come, so the target and the threshold fall (more cheap-tier calls); running behind raises them. Each
request is routed at clip(its threshold + offset, min_threshold, max_threshold), where max_threshold is the request's
own threshold unless the config sets one: by default the budget is a cap, and an under-used budget is not spent on
pricier tiers. The window smooths the estimate;
the offset is re-solved every `RESOLVE_EVERY` requests. Until a period has seen `warmup_requests` requests (and
this process as many), the offset is 0.

The budget keeps a reserve: what the requests still expected would cost on their cheapest eligible tier (the
window's average). A pricier tier is used only when its estimated cost, scaled by the highest billed/estimated
ratio of its recent answers (an answer as long as the longest seen lately), fits in what is left above the
reserve: the last pricey calls of a period neither overrun it nor eat the money its cheap calls need. Once the
budget is spent, only the cheapest eligible tier is used.

Precedence: pacing moves the threshold of `model="router"` requests only. A request's explicit threshold
(`model="router-0.35"`) is an instruction: it is used as given, and a pricier tier is refused only when what is left
of the budget (no reserve kept) cannot pay for it, i.e. once the budget is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..scorer import choose_tier
from .config import BudgetConfig
from .errors import ConfigError

RESOLVE_EVERY = 10
MAX_ANSWER_USD = 1e7  # more than any one answer can cost at bounded usage and prices: a larger amount is a bug
log = logging.getLogger("learned_router.serving")


def period_bounds(period: str, now: float) -> tuple[str, float, float]:
    """The UTC calendar period holding `now` (epoch seconds): its key, start and end."""
    t = datetime.fromtimestamp(now, tz=timezone.utc)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = datetime.fromtimestamp(start.timestamp() + 86400, tz=timezone.utc)
        return start.strftime("%Y-%m-%d"), start.timestamp(), end.timestamp()
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start.strftime("%Y-%m"), start.timestamp(), end.timestamp()


class SpendStore:
    """Dollars and answered requests per period in a sqlite file; safe for threads and processes."""

    def __init__(self, path: str | Path, timeout_s: float = 10.0):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS spend (period TEXT PRIMARY KEY, usd REAL NOT NULL, requests INTEGER NOT NULL)"
            )
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"budget.store: cannot use {path} as the spend store ({e})") from None
        self._lock = threading.Lock()

    def add(
        self, period: str, usd: float, lock: threading.Lock | None = None, committed: Callable[[], None] | None = None
    ) -> None:
        """Add one answer's dollars. `committed` runs with the commit, both holding `lock`: a reader holding it sees
        both or neither. The wait for another process' write lock happens before, without `lock`."""
        if not (math.isfinite(usd) and 0 <= usd <= MAX_ANSWER_USD):
            raise ValueError(f"spend must be a finite amount in [0, {MAX_ANSWER_USD:g}] USD, got {usd!r}")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO spend VALUES (?, ?, 1) ON CONFLICT(period) DO UPDATE SET usd = usd + excluded.usd, requests = requests + 1",
                    (period, usd),
                )
                with lock or contextlib.nullcontext():
                    self._db.execute("COMMIT")
                    if committed is not None:
                        committed()
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def get(self, period: str) -> tuple[float, int]:
        """(dollars, requests) of the period."""
        with self._lock:
            row = self._db.execute("SELECT usd, requests FROM spend WHERE period = ?", (period,)).fetchone()
        return (row[0], row[1]) if row else (0.0, 0)

    def close(self) -> None:
        self._db.close()


class SpendWriter:
    """Adds spend to the store from its own thread. A failed write (a lock held elsewhere past `timeout_s`) is logged,
    reported to `on_error` and retried with backoff until it lands; `close` waits up to `flush_s` for the rest."""

    def __init__(self, path: str | Path, timeout_s: float = 1.0, on_error: Callable[[], None] | None = None):
        self._store = SpendStore(path, timeout_s)
        self.on_error = on_error
        self._queue: queue.SimpleQueue[tuple[str, float] | None] = queue.SimpleQueue()
        self._pending: dict[str, tuple[float, int]] = {}
        self.lock = threading.Lock()
        self._give_up_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="router-spend", daemon=True)
        self._thread.start()

    def add(self, period: str, usd: float) -> None:
        with self.lock:
            usd0, n0 = self._pending.get(period, (0.0, 0))
            self._pending[period] = (usd0 + usd, n0 + 1)
        self._queue.put((period, usd))

    def pending(self, period: str) -> tuple[float, int]:
        """Dollars and answers of the period not yet written; call it holding `lock` (then read the store too)."""
        return self._pending.get(period, (0.0, 0))

    def close(self, flush_s: float = 5.0) -> None:
        self._give_up_at = time.monotonic() + flush_s
        self._queue.put(None)
        self._thread.join(flush_s + 2.0)
        if not self._thread.is_alive():
            self._store.close()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            period, usd = item
            delay, written = 0.05, False
            while not written:
                try:
                    self._store.add(period, usd, self.lock, lambda p=period, u=usd: self._written(p, u))
                    written = True
                except sqlite3.Error as e:
                    log.warning("spend store write failed (%s): retrying", e)
                    if self.on_error is not None:
                        self.on_error()
                    if self._give_up_at is not None and time.monotonic() > self._give_up_at:
                        log.error("spend store: %.8f USD of period %s not written at shutdown", usd, period)
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)

    def _written(self, period: str, usd: float) -> None:  # called holding self.lock
        usd0, n0 = self._pending[period]
        self._pending[period] = (usd0 - usd, n0 - 1)


class SqliteLedger:
    """The spend ledger in a sqlite file: writes off the event loop (SpendWriter), reads of the shared file."""

    def __init__(self, path: str | Path, on_error: Callable[[], None] | None = None):
        self.store = SpendStore(path, timeout_s=0.2)  # reads: WAL readers do not wait for writers
        self.writer = SpendWriter(path, on_error=on_error)
        self._last_read: tuple[str, float, int] = ("", 0.0, 0)

    def add(self, period: str, usd: float) -> None:
        self.writer.add(period, usd)

    def spend(self, period: str) -> tuple[float, int]:
        """Dollars and answers of the period: the store's (every process') plus this process' not yet written."""
        with self.writer.lock:  # a write commits and leaves the pending figures together (SpendStore.add)
            unwritten, answers = self.writer.pending(period)
            try:
                spent, requests = self.store.get(period)
                self._last_read = (period, spent, requests)
            except sqlite3.Error as e:
                log.warning("spend store read failed (%s): using the last figures", e)
                spent, requests = self._last_read[1:] if self._last_read[0] == period else (0.0, 0)
        return spent + unwritten, requests + answers

    async def read(self, period: str) -> None:
        """Nothing to fetch ahead: `spend` reads the file."""

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Write what is left (blocks) and close the store."""
        self.writer.close()
        self.store.close()


@dataclass(frozen=True)
class BudgetState:
    period: str
    start: float  # epoch seconds
    usd: float
    spent: float
    requests: int
    elapsed: float  # share of the period gone, in [0, 1]
    offset: float  # added to each request's threshold (before clipping)
    reserve: float  # USD kept for the requests still expected, at their cheapest eligible tier

    @property
    def remaining(self) -> float:
        return self.usd - self.spent

    @property
    def pace(self) -> float:
        return self.spent / (self.usd * max(self.elapsed, 1e-9))

    def as_dict(self) -> dict:
        return {
            "period": self.period,
            "period_start": datetime.fromtimestamp(self.start, tz=timezone.utc).isoformat(),
            "usd": self.usd,
            "spent_usd": self.spent,
            "remaining_usd": self.remaining,
            "requests": self.requests,
            "elapsed_share": self.elapsed,
            "pace": self.pace,
            "threshold_offset": self.offset,
            "reserve_usd": self.reserve,
        }


class Pacer:
    """`ledger`: where the spend lives (`add`, `spend`, `read`, `aclose`); default: the sqlite file of `config.store`."""

    def __init__(self, config: BudgetConfig, n_tiers: int, clock: Callable[[], float] = time.time, ledger=None):
        self.config = config
        self.ledger = ledger if ledger is not None else SqliteLedger(config.store)
        self._clock = clock
        self._recent: deque[tuple[float, np.ndarray, np.ndarray, np.ndarray]] = deque(maxlen=config.window)
        self._ratios = [deque(maxlen=config.window) for _ in range(n_tiers)]  # billed / estimated cost, per tier
        self._offset, self._floor, self._period, self._since_solve = 0.0, 0.0, "", 0

    def state(self) -> BudgetState:
        now = self._clock()
        period, start, end = period_bounds(self.config.period, now)
        spent, requests = self.ledger.spend(period)
        elapsed = min(1.0, max(0.0, (now - start) / (end - start)))
        if period != self._period:  # a new period (or the first look): solve now
            self._period, self._since_solve = period, RESOLVE_EVERY
        expected = requests * (1.0 - elapsed) / max(elapsed, 1e-9)  # requests still to come this period
        if self._since_solve >= RESOLVE_EVERY:
            self._since_solve = 0
            if min(requests, len(self._recent)) >= self.config.warmup_requests:
                self._offset, self._floor = self._solve((self.config.usd - spent) / max(expected, 1.0))
            else:
                self._offset, self._floor = 0.0, 0.0
        return BudgetState(
            period, start, self.config.usd, spent, requests, elapsed, self._offset, expected * self._floor
        )

    def effective(self, threshold: float, state: BudgetState) -> float:
        return min(self.ceiling(threshold), max(self.config.min_threshold, threshold + state.offset))

    def ceiling(self, threshold):
        """The highest threshold pacing may set for a request of this threshold (a float or an array of them)."""
        return threshold if self.config.max_threshold is None else self.config.max_threshold

    def affordable(self, tier: int, estimated_usd: float, state: BudgetState, reserve: bool = True) -> bool:
        """Whether a pricier tier's estimate, at its worst recent billed/estimated ratio, fits above the reserve
        (`reserve=False`: in what is left of the budget)."""
        worst = max(self._ratios[tier], default=1.0)
        return estimated_usd * worst <= state.remaining - (state.reserve if reserve else 0.0)

    def observe(
        self, threshold: float, pass_chances: np.ndarray, eligible: np.ndarray, estimated_usd: np.ndarray
    ) -> None:
        """A chat request routed: what the pacer predicts future costs from."""
        self._recent.append((threshold, pass_chances, eligible, estimated_usd))
        self._since_solve += 1

    def record(self, usd: float, tier: int, estimated_usd: float) -> None:
        """Dollars billed for one answer served by `tier`, whose cost was estimated at `estimated_usd` (written off the
        event loop)."""
        if not (math.isfinite(usd) and 0 <= usd <= MAX_ANSWER_USD):
            log.error("spend of %r USD refused: not a finite amount in [0, %g]", usd, MAX_ANSWER_USD)
            return
        self.ledger.add(period_bounds(self.config.period, self._clock())[0], usd)
        if estimated_usd > 0:
            self._ratios[tier].append(usd / estimated_usd)

    async def start(self) -> None:
        """Fetch the spend of the current period before the first request is paced."""
        await self.ledger.read(period_bounds(self.config.period, self._clock())[0])

    async def aclose(self) -> None:
        """Write what is left and close the ledger."""
        await self.ledger.aclose()

    def _solve(self, target: float) -> tuple[float, float]:
        """The largest offset in [-1, 1] at which the recent requests would cost at most `target` on average, and
        their average cost on their cheapest eligible tier."""
        t, p, e, c = (np.array(x) for x in zip(*self._recent, strict=True))
        c = c * np.array([np.mean(r) if r else 1.0 for r in self._ratios])
        rows = np.arange(len(t))
        lo_t, hi_t = self.config.min_threshold, self.ceiling(t)
        p = np.where(e, p, -np.inf)  # an ineligible tier neither clears a threshold nor is the most likely to pass

        def cost(offset: float) -> float:
            return float(c[rows, choose_tier(p, np.clip(t + offset, lo_t, hi_t)[:, None])].mean())

        floor = float(c[rows, e.argmax(1)].mean())
        lo, hi = -1.0, 1.0
        if cost(hi) <= target:
            return hi, floor
        if cost(lo) > target:
            return lo, floor
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
        return lo, floor
