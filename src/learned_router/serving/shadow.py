"""Shadow grading (`quality:` block): what routing costs in quality, measured on the service's own traffic.

For a sampled share of routed chat requests, once the client has its whole answer, a job is queued (never awaited by
the request): the tier the request did not use answers the same request (the strongest tier, or the cheapest when the
request went to the strongest), and the judge grades both answers as `label` does (`judge.mode`, judge.py). The
graded pair goes to a sqlite store (WAL: every process of a host shares it) with the weak side's pass chance, the
threshold in use and both answers' costs; `learned_router.quality` turns the store into the estimate.

Kept apart from client traffic: shadow calls go through an upstream of their own (own circuit breakers, retries and
metrics), a bounded queue and `quality.concurrency` workers; a slow, failing or lying judge or tier only ends its job,
counted in router_shadow_jobs_total by outcome. Never sampled: clients and tiers in `quality.exclude_*`, requests of a
data class that may not reach the other tier's providers and the judge. Shadow spend is capped per UTC day
(`quality.max_usd_per_day`, all processes together through the store; a job reserves its estimate before it starts)
and counted in router_shadow_cost_usd_total, never in a client's budget.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .. import quality
from ..judge import judge_chat, pairwise_grade, parse_rating, parse_verdict
from ..prices import chat_tokens, prompt_tokens
from .config import QualityConfig, ServiceConfig, TierConfig, api_key
from .errors import ConfigError
from .providers import NoAnswer, Upstream

log = logging.getLogger("learned_router.serving")
SCHEMA = """
CREATE TABLE IF NOT EXISTS graded (
    id TEXT PRIMARY KEY, time REAL, client TEXT, task_type TEXT, text TEXT, router TEXT,
    weak_tier TEXT, strong_tier TEXT, weak_model TEXT, strong_model TEXT, went_weak INTEGER,
    p_weak REAL, threshold REAL, weak_grade REAL, strong_grade REAL, weak_cost REAL, strong_cost REAL,
    judge TEXT, mode TEXT
);
CREATE INDEX IF NOT EXISTS graded_time ON graded(time);
CREATE TABLE IF NOT EXISTS spend (day TEXT PRIMARY KEY, usd REAL NOT NULL);
"""
COLUMNS = (
    "id time client task_type text router weak_tier strong_tier weak_model strong_model went_weak p_weak threshold "
    "weak_grade strong_grade weak_cost strong_cost judge mode"
).split()


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


class ShadowStore:
    """The graded requests and each UTC day's shadow spend, in one sqlite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"quality.store: {self.path}: cannot open it ({e})") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def add(self, row: dict) -> None:
        with self._connect() as db:
            db.execute(
                f"INSERT OR REPLACE INTO graded ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                [row[c] for c in COLUMNS],
            )

    def spend(self, usd: float, now: float) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO spend (day, usd) VALUES (?, ?) ON CONFLICT(day) DO UPDATE SET usd = usd + excluded.usd",
                (day_of(now), usd),
            )

    def spent(self, now: float) -> float:
        with self._connect() as db:
            row = db.execute("SELECT usd FROM spend WHERE day = ?", (day_of(now),)).fetchone()
        return float(row[0]) if row else 0.0

    def prune(self, before: float) -> int:
        """Delete the graded requests (and the spend of the days) older than `before`; how many requests."""
        with self._connect() as db:
            db.execute("DELETE FROM spend WHERE day < ?", (day_of(before),))
            return db.execute("DELETE FROM graded WHERE time < ?", (before,)).rowcount

    def rows(self, since: float | None = None) -> list[dict]:
        with self._connect() as db:
            cur = db.execute(f"SELECT {', '.join(COLUMNS)} FROM graded WHERE time >= ? ORDER BY time", (since or 0.0,))
            return [dict(zip(COLUMNS, r)) for r in cur.fetchall()]


@dataclass
class Job:
    """One sampled request: what the client got, and which tier to ask for the other answer."""

    id: str
    client: str | None
    task_type: str
    text: str  # the scored text: the judge's question
    router: str
    body: dict  # the client's request, sent to the other tier as a whole answer
    served: int  # the tier that answered the client
    other: int  # the tier asked in the shadow
    went_weak: bool  # the client's answer is the weak side's (else the strongest tier's)
    answer: str  # the client's answer
    cost: float  # what the client's answer cost
    p_weak: float
    threshold: float


class ShadowGrader:
    """Samples finished requests (`offer`) and grades them in the background."""

    def __init__(self, config: ServiceConfig, provider_keys: dict[str, str | None], clock=time.time):
        self.q: QualityConfig = config.quality
        self.judge = config.judge
        self.cfg = config
        self.clock = clock
        self.store = ShadowStore(self.q.store)
        self.tiers = [t.name for t in config.tiers]
        tiers = [*config.tiers, TierConfig(name="judge", providers=[self.judge.provider])]
        self.upstream = Upstream.apart(
            config, tiers, provider_keys | {self.judge.provider.name: api_key(self.judge.provider, "judge.provider")}
        )
        self.chains = self.upstream.tiers
        self.queue: asyncio.Queue[Job] = asyncio.Queue(self.q.queue_size)
        self.reserved = 0.0
        self.pending = 0  # jobs queued or being graded
        self.rng = random.Random()  # which requests are sampled
        self.workers: list[asyncio.Task] = []
        self.latest: dict = quality.estimate(quality.Graded.of([]), self.q.target) | {"computed_at": None}
        self.metrics = None  # the service's, set by `attach`
        self._refresher: asyncio.Task | None = None

    def attach(self, metrics) -> None:
        self.metrics = metrics
        metrics.quality_target.set(self.q.target)
        metrics.shadow_pending.set_function(lambda: self.pending)

    def count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.shadow_jobs.labels(outcome).inc()

    async def start(self) -> None:
        await self.upstream.start()
        self.workers = [asyncio.create_task(self._work()) for _ in range(self.q.concurrency)]
        self._refresher = asyncio.create_task(self._refresh_every())

    async def stop(self) -> None:
        tasks = [*self.workers, *([self._refresher] if self._refresher else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.upstream.stop()

    # -- sampling

    def offer(self, d, request_id: str, client: str | None, body: dict, provider, answer: str, cost: float) -> None:
        """A request whose client has its whole answer: queued for grading when sampled and allowed."""
        if self.rng.random() >= self.q.sample:
            return
        served = self.tiers.index(provider.tier)
        went_weak = served != len(self.tiers) - 1
        other = len(self.tiers) - 1 if went_weak else 0
        weak = served if went_weak else other
        why = None
        if client is not None and client in self.q.exclude_clients:
            why = "excluded_client"
        elif {self.tiers[served], self.tiers[other]} & set(self.q.exclude_tiers):
            why = "excluded_tier"
        elif self.tiers[weak] not in d.pass_chances or self.cfg.tiers[weak].score is None:
            why = "unscored"
        elif d.options.data_class is not None:
            allowed = set(self.cfg.data_classes.get(d.options.data_class, []))
            needed = {p.name for p in self.cfg.tiers[other].providers} | {self.judge.provider.name}
            if not needed <= allowed:
                why = "data_class"
        if why:
            return self.count(why)
        job = Job(
            request_id,
            client,
            d.task_type,
            d.text,
            d.router,
            {k: v for k, v in body.items() if k not in ("stream", "stream_options")},
            served,
            other,
            went_weak,
            answer,
            cost,
            float(d.pass_chances[self.tiers[weak]]),
            float(d.effective_threshold),
        )
        self.pending += 1
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.pending -= 1
            self.count("queue_full")

    # -- grading

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                self.count(await self.grade(job))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a job never takes its worker down
                log.error("shadow grading of %s failed: %s", job.id, type(e).__name__)
                self.count("error")
            finally:
                self.pending -= 1

    def _estimate_usd(self, job: Job) -> float:
        """The other tier's answer at `judge.answer_max_tokens`, and two judge calls reading both answers."""
        cpt, judge = self.cfg.routing.chars_per_token, self.judge
        answer = (
            self.cfg.tiers[job.other]
            .providers[0]
            .cost_usd(prompt_tokens([len(job.text)], cpt), judge.answer_max_tokens)
        )
        other = "x" * int(judge.answer_max_tokens * cpt)
        judged = chat_tokens(judge_chat(judge.mode, job.text, [job.answer, other]), cpt)
        return answer + 2 * judge.provider.cost_usd(judged, judge.max_tokens)

    async def _call(self, chain, body: dict) -> tuple[str | None, float]:
        """(the answer's text or None, its cost)."""
        try:
            answer = await self.upstream.ask(chain, body, self.cfg.routing.chars_per_token)
        except NoAnswer:
            return None, 0.0
        return answer.text, answer.billed.usd

    async def _pay(self, usd: float) -> None:
        if usd > 0:
            await asyncio.to_thread(self.store.spend, usd, self.clock())
            if self.metrics is not None:
                self.metrics.shadow_cost.inc(usd)

    async def grade(self, job: Job) -> str:
        """Ask the other tier, have the judge grade both answers, store the pair; the job's outcome."""
        estimate = self._estimate_usd(job)
        spent = await asyncio.to_thread(self.store.spent, self.clock())
        if spent + self.reserved + estimate > self.q.max_usd_per_day:
            return "over_cap"
        self.reserved += estimate
        try:
            body = job.body | {"max_tokens": job.body.get("max_tokens") or self.judge.answer_max_tokens}
            other, cost = await self._call(self.chains[job.other], body)
            await self._pay(cost)
            if other is None:
                return "tier_failed"
            weak_answer, strong_answer = (job.answer, other) if job.went_weak else (other, job.answer)
            weak_cost, strong_cost = (job.cost, cost) if job.went_weak else (cost, job.cost)
            grades = await self._judge(job.text, weak_answer, strong_answer)
            if isinstance(grades, str):
                return grades
        finally:
            self.reserved -= estimate
        weak, top = (job.served if job.went_weak else job.other), len(self.tiers) - 1
        row = {
            "id": job.id,
            "time": self.clock(),
            "client": job.client,
            "task_type": job.task_type,
            "text": job.text,
            "router": job.router,
            "weak_tier": self.tiers[weak],
            "strong_tier": self.tiers[top],
            "weak_model": self.cfg.tiers[weak].graded_as,
            "strong_model": self.cfg.tiers[top].graded_as,
            "went_weak": int(job.went_weak),
            "p_weak": job.p_weak,
            "threshold": job.threshold,
            "weak_grade": grades[0],
            "strong_grade": grades[1],
            "weak_cost": weak_cost,
            "strong_cost": strong_cost,
            "judge": self.judge.provider.model,
            "mode": self.judge.mode,
        }
        await asyncio.to_thread(self.store.add, row)
        return "graded"

    async def _judge(self, question: str, weak: str, strong: str) -> tuple[float, float] | str:
        """(weak grade, strong grade) in [0, 1]; 'judge_failed' or 'unparseable' when there is none."""
        chain = self.chains[-1]
        ask = lambda messages: self._call(  # noqa: E731
            chain, {"messages": messages, "max_tokens": self.judge.max_tokens, "temperature": 0}
        )
        single = self.judge.mode == "single"  # the strongest's answer alone; pairwise: both orders
        answers = await asyncio.gather(
            ask(judge_chat(self.judge.mode, question, [weak, strong])),
            ask(judge_chat(self.judge.mode, question, [strong] if single else [strong, weak])),
        )
        await self._pay(sum(c for _, c in answers))
        texts = [t for t, _ in answers]
        if None in texts:
            return "judge_failed"
        if single:
            w, s = (parse_rating(t) for t in texts)
            return "unparseable" if w is None or s is None else (w, s)
        first, second = (parse_verdict(t) for t in texts)
        return "unparseable" if first is None or second is None else (pairwise_grade(first, second), 0.5)

    # -- the estimate

    def compute(self) -> dict:
        """The estimate over the window's graded requests (quality.estimate), older ones pruned first."""
        if self.q.retention_days is not None:
            self.store.prune(self.clock() - self.q.retention_days * 86400)
        since = None if self.q.window_days is None else self.clock() - self.q.window_days * 86400
        rows = self.store.rows(since)
        return quality.estimate(quality.Graded.of(rows), self.q.target) | {
            "computed_at": self.clock(),
            "window_days": self.q.window_days,
            "spent_today_usd": self.store.spent(self.clock()),
            "max_usd_per_day": self.q.max_usd_per_day,
        }

    async def refresh(self) -> dict:
        self.latest = await asyncio.to_thread(self.compute)
        if self.metrics is not None:
            self.metrics.quality_observed(self.latest)
        return self.latest

    async def _refresh_every(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:
                log.error("quality estimate failed: %s", type(e).__name__)
            await asyncio.sleep(self.q.refresh_s)
