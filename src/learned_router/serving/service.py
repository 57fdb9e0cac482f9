"""What one service process holds and does: score a request, decide its tier and fallback chain, account for it."""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
from pydantic import BaseModel, Field

from ..errors import RouterError, RouterFolderError
from ..export import PROBES
from ..manifest import Manifest
from ..outputs import Predictor
from ..scorer import Router
from ..tasktypes import UNKNOWN
from .batcher import ScoreBatcher
from .budget import Pacer
from .config import ServiceConfig
from .decision import Facts, TierDecision, decide
from .drift import DriftMonitor, calibration_reference
from .errors import APIError, ConfigError
from .metrics import Metrics
from .providers import AllProvidersFailed, Provider, Upstream
from .routing import ROUTER_MODEL, ChatRequest, RouterOptions, estimate_tokens, requested_threshold, scored_text
from .state import open_state
from .tasks import TaskTyping
from .traffic import TrafficLog
from .usage import Billed, bill

log = logging.getLogger("learned_router.serving")


class RouterInService(BaseModel):
    router: str = Field(description="its version, name@digest")
    path: str
    models: list[str] = Field(description="its outputs")
    threshold: float
    created_at: str
    calibration: str | None = Field(description="the mix its calibration table was fitted on")
    previous: str | None = Field(description="the version a rollback restores")


class RouterSwapped(BaseModel):
    router: str = Field(description="the version now in service")
    previous: str = Field(description="the version it replaced")
    threshold: float
    seconds: float
    workers: int | None = Field(
        None,
        description="with several worker processes: how many are being replaced, one at a "
        "time, each loading router.path (the answer is then 202)",
    )


class ServedRouter(Predictor, Protocol):
    """What the service needs of a router: a predictor (`predict(prompts) -> Outputs`) with its router.json
    `manifest`, the `models` its pass chances are columns of, and its `default_threshold`. `scorer.Router` is one."""

    manifest: Manifest
    models: list[str]
    default_threshold: float


def pass_chances_of(router: ServedRouter) -> Callable[[list[str]], np.ndarray]:
    return lambda prompts: router.predict(prompts).pass_chances()


class Workers(Protocol):
    """The worker processes of `serve --workers`: how many, and how to have them all replaced."""

    count: int

    def restart(self) -> None: ...


class Scoring:
    """One router as the service uses it: the output each tier reads, the threshold, task typing and the batcher."""

    def __init__(self, config: ServiceConfig, router: ServedRouter, metrics: Metrics):
        self.router = router
        self.columns = score_columns(config, list(router.models))
        self.threshold = resolve_threshold(config, router)
        self.tasks = TaskTyping(config, router) if config.task_types.enabled else None
        self.version = router_version(router.manifest)
        self.batcher = ScoreBatcher(
            self.tasks.score if self.tasks else pass_chances_of(router),
            config.router.max_batch,
            config.router.max_wait_ms / 1000,
            config.router.workers,
            on_batch=metrics.batch_size.observe,
        )

    def probe(self) -> None:
        """Score the probe prompts: RouterFolderError unless every pass chance is a number in [0, 1]."""
        fn = self.tasks.score if self.tasks else pass_chances_of(self.router)
        scores = np.asarray(fn(PROBES), dtype=np.float64).reshape(len(PROBES), -1)[:, : len(self.router.models)]
        if scores.shape[1] != len(self.router.models) or not (
            np.isfinite(scores).all() and (0 <= scores).all() and (scores <= 1).all()
        ):
            raise RouterFolderError(
                f"{self.version}: the probe prompts' pass chances are not numbers in [0, 1] for each of "
                f"its {len(self.router.models)} outputs"
            )


def router_version(manifest) -> str:
    """name@digest: 12 hex of the sha256 of its router.json (which lists its files' sha256 and holds its calibration), so
    a retrained or recalibrated router has a version of its own."""
    record = manifest.model_dump_json() if hasattr(manifest, "model_dump_json") else repr(manifest)
    return f"{getattr(manifest, 'name', 'router')}@{hashlib.sha256(record.encode()).hexdigest()[:12]}"


class Service:
    """Router, batcher, upstream chains, keys, limits, metrics and (optionally) the budget pacer and traffic record.

    `router` may be injected (a `ServedRouter`; default: router.path's folder). `clock` (epoch seconds) drives the
    budget periods.
    The router can be swapped while serving (`reload`, `rollback`): requests already scoring finish on the old one.
    `workers`: the worker processes that serve this config (`serve --workers`), each with a router of its own.
    """

    def __init__(
        self,
        config: ServiceConfig,
        router: ServedRouter | None = None,
        clock: Callable[[], float] = time.time,
        workers: Workers | None = None,
    ):
        self.config = config
        self.workers = workers
        self.client_keys = config.client_keys() if config.auth.enabled else {}
        self.admin_keys = config.admin_keys()
        provider_keys = config.provider_keys()  # before the slow part: a missing key variable fails at once
        self.metrics = Metrics()
        self.state = open_state(config.state, config.rate_limit, config.circuit_breaker, self.metrics)  # Redis answers?
        self.traffic = (
            TrafficLog(config.traffic, lambda why: self.metrics.traffic_dropped.labels(why).inc())
            if config.traffic
            else None
        )
        self.scoring = Scoring(
            config,
            router if router is not None else Router.load(config.router.path, threads=config.router.threads),
            self.metrics,
        )
        self.shadow = None
        if config.quality is not None:
            from .shadow import ShadowGrader

            self.shadow = ShadowGrader(config, provider_keys)
            self.shadow.attach(self.metrics)
        self.previous: object | None = None  # the router before the last reload, for rollback
        self._swap = asyncio.Lock()
        self.drift = None
        if config.drift.enabled:
            self.drift = DriftMonitor(config.drift, self.calibration_reference())
            self.metrics.watch_drift(self.drift)
        self.upstream = Upstream.build(
            config.tiers,
            provider_keys,
            config.retry,
            config.circuit_breaker,
            config.latency,
            self.metrics,
            self.state,
            config.limits.max_upstream_body_bytes,
        )
        self.tier_index = {t.name: i for i, t in enumerate(config.tiers)}
        self.data_classes = {k: frozenset(v) for k, v in config.data_classes.items()}
        self.pacer = (
            Pacer(config.budget, len(config.tiers), clock, self.state.ledger(config.budget)) if config.budget else None
        )
        self.metrics.threshold.set_function(lambda: self.threshold)
        self.metrics.router_loaded(self.scoring.version)
        if self.pacer:
            self.metrics.watch_budget(
                self.pacer.state, lambda: self.pacer.effective(self.threshold, self.pacer.state())
            )
        else:
            self.metrics.effective_threshold.set_function(lambda: self.threshold)

    @property
    def router(self):
        return self.scoring.router

    def calibration_reference(self) -> dict | None:
        """The drift reference of the pass chance the monitor watches (the first scored tier's) from the router's
        calibration mix."""
        scored = next((c for c in self.scoring.columns if c is not None), None)
        return None if scored is None else calibration_reference(self.router.manifest, list(self.router.models)[scored])

    @property
    def threshold(self) -> float:
        return self.scoring.threshold

    @property
    def batcher(self) -> ScoreBatcher:
        return self.scoring.batcher

    async def start(self) -> None:
        await self.batcher.start()
        await self.upstream.start()
        await self.state.start()
        if self.pacer:
            await self.pacer.start()
        if self.shadow:
            await self.shadow.start()

    async def stop(self) -> None:
        if self.shadow:
            await self.shadow.stop()
        await self.batcher.stop()
        await self.upstream.stop()
        if self.pacer:
            await self.pacer.aclose()
        await self.state.stop()
        if self.traffic:
            await asyncio.to_thread(self.traffic.close)

    async def reload(self, path: str | None = None) -> RouterSwapped:
        """Load the router folder at `path` (default: router.path), check it (its manifest and files, the outputs the
        tiers read, the threshold, task typing, the probe prompts) and swap it in; the router it replaces is kept for
        `rollback`. RouterError naming the problem when the check fails: the router in service stays.

        With several worker processes the checked folder is not swapped in here: `workers.restart()` has every worker
        replaced, one at a time, each new one loading router.path (the answer has `workers`)."""
        async with self._swap:
            t0 = time.perf_counter()
            try:
                new = await asyncio.to_thread(self._checked, path)
            except RouterError as e:
                self.metrics.reloads.labels("failed").inc()
                log.error("router reload failed, %s stays in service: %s", self.scoring.version, e)
                raise
            if self.workers is not None:
                return self._restart_workers(new, t0)
            return await self._swap_in(new, "reload", t0)

    async def rollback(self) -> RouterSwapped:
        """Swap the router of before the last reload back in (the current one becomes the one to roll back to)."""
        async with self._swap:
            if self.previous is None:
                raise RouterError("there is no previous router to roll back to (the service has not reloaded)")
            t0 = time.perf_counter()
            return await self._swap_in(await asyncio.to_thread(self._scoring, self.previous), "rollback", t0)

    def _restart_workers(self, new: Scoring, t0: float) -> RouterSwapped:
        self.workers.restart()
        self.metrics.reloads.labels("reload").inc()
        log.info(
            "router reload: %s checked; the %d workers are being replaced, each loading %s",
            new.version,
            self.workers.count,
            self.config.router.path,
        )
        return RouterSwapped(
            router=new.version,
            previous=self.scoring.version,
            threshold=new.threshold,
            seconds=round(time.perf_counter() - t0, 3),
            workers=self.workers.count,
        )

    def _checked(self, path: str | None) -> Scoring:
        """The router folder at `path` (default: router.path) loaded and checked for this service; RouterError naming
        the problem."""
        return self._scoring(Router.load(path or self.config.router.path, threads=self.config.router.threads))

    def _scoring(self, router) -> Scoring:
        new = Scoring(self.config, router, self.metrics)
        new.probe()
        return new

    async def _swap_in(self, new: Scoring, kind: str, t0: float) -> RouterSwapped:
        await new.batcher.start()
        old, self.scoring = self.scoring, new
        self.previous = old.router
        await old.batcher.drain()
        if self.drift:
            self.drift.router_changed(self.calibration_reference(), new.version)
        seconds = time.perf_counter() - t0
        self.metrics.reloads.labels(kind).inc()
        self.metrics.router_loaded(new.version, old.version)
        log.info(
            "router %s: %s in service (was %s), threshold %.4f, in %.2f s",
            kind,
            new.version,
            old.version,
            new.threshold,
            seconds,
        )
        return RouterSwapped(
            router=new.version, previous=old.version, threshold=new.threshold, seconds=round(seconds, 3)
        )

    def describe(self) -> RouterInService:
        """The router in service and the one a rollback would restore."""
        m = self.router.manifest
        return RouterInService(
            router=self.scoring.version,
            path=str(getattr(self.router, "path", self.config.router.path)),
            models=list(self.router.models),
            threshold=self.threshold,
            created_at=getattr(m, "created_at", ""),
            calibration=getattr(getattr(m, "calibration", None), "mix", None),
            previous=router_version(self.previous.manifest) if self.previous is not None else None,
        )

    async def route(self, req: ChatRequest, opts: RouterOptions, started: float, observe: bool = False) -> TierDecision:
        """Score the request, decide its tier (decision.decide) and record the decision; `started`
        (time.monotonic()) starts its latency budget.

        `observe`: a chat request, which the budget pacer learns the traffic from.
        """
        t0 = time.perf_counter()
        sc = self.scoring  # this request's router, whatever a reload swaps in meanwhile
        named = self._named_task_type(opts.task_type, sc.tasks)
        allowed = self._allowed(opts.data_class)
        text = scored_text(req.messages, self.config.routing.score_turn)
        try:
            scores = await sc.batcher.score(text) if text else None  # no text at all: every scored tier's chance is 0
        except Exception as e:
            log.error("scoring failed: %s", type(e).__name__)  # one line; the message could quote the prompt
            raise APIError(
                500, "the router could not score this request", type="server_error", code="router_error"
            ) from None
        scores, inferred = sc.tasks.split(scores) if sc.tasks else (scores, UNKNOWN)
        task_type = named or inferred
        budget_s = None if opts.latency_budget_ms is None else opts.latency_budget_ms / 1000
        facts = Facts(
            text=text,
            scores=scores,
            requested=requested_threshold(req.model, sc.threshold),
            paced=req.model == ROUTER_MODEL,  # an explicit router-<t> is not paced (budget.py)
            task_type=task_type,
            task_type_source="request" if named else "inferred" if inferred != UNKNOWN else "none",
            offset=sc.tasks.offsets.get(task_type, 0.0) if sc.tasks else 0.0,
            pin=sc.tasks.min_tier.get(task_type, 0) if sc.tasks else 0,
            tokens=estimate_tokens(req.messages, self.config.routing.chars_per_token),
            max_tokens=req.output_tokens(),
            options=opts,
            allowed=allowed,
            deadline=None if budget_s is None else started + budget_s,
            remaining_s=None if budget_s is None else budget_s - (time.monotonic() - started),
            router=sc.version,
        )
        state = self.pacer.state() if self.pacer else None
        d = decide(self.config, sc.columns, self.upstream.tiers, facts, self.pacer, state)
        self.metrics.routing_seconds.observe(time.perf_counter() - t0)
        for tier, col in zip(self.config.tiers, sc.columns, strict=True):
            if col is not None:
                self.metrics.pass_chance.labels(tier.name).observe(d.pass_chances[tier.name])
        self.metrics.decisions.labels(d.tier, d.rule, d.task_type, d.router).inc()
        if self.drift:
            first = next(
                (d.pass_chances[t.name] for t, col in zip(self.config.tiers, sc.columns) if col is not None), None
            )
            self.drift.observe(None if scores is None else first, task_type, d.tier)
        if observe and self.pacer:
            self.pacer.observe(
                d.threshold,
                np.array(list(d.pass_chances.values())),
                np.array(d.eligible),
                np.array(d.estimated_costs),
            )
        return d

    async def complete(self, d: TierDecision, body: dict, stream: bool):
        """Send the request down the decision's chain; APIError (502, 503 or 504) naming each provider when none answers."""
        try:
            return await self.upstream.complete(d.chain, body, stream, d.deadline)
        except AllProvidersFailed as e:
            what = "; ".join(d.excluded + e.outcomes)
            if e.deadline_passed:
                raise APIError(
                    504,
                    f"the latency budget of {d.options.latency_budget_ms:g} ms was spent: {what}",
                    type="upstream_error",
                    code="latency_budget_exceeded",
                ) from None
            if d.options.data_class is not None:
                raise APIError(
                    503,
                    f"no provider allowed for data class {d.options.data_class!r} answered: {what}",
                    type="upstream_error",
                    code="data_class_unavailable",
                ) from None
            status, code = (502, "upstream_failed") if e.tried else (503, "no_provider_available")
            raise APIError(status, f"every provider failed: {what}", type="upstream_error", code=code) from None

    def account(self, provider: Provider, usage: object, chars: int, d: TierDecision, served: bool = True) -> Billed:
        """Bill one answer: the provider's usage when sane (usage.py), else the estimate; its tokens and dollars.

        `served`: the client got the whole answer (an interrupted stream is billed, not counted as served).
        """
        cfg = provider.config
        billed = bill(cfg, usage, d.prompt_tokens, chars, self.config.routing.chars_per_token)
        if billed.estimated == "insane":
            log.error("provider %s: its cost is not a finite non-negative amount: billed 0", provider.name)
        elif billed.estimated:
            self.metrics.usage_estimated.labels(provider.name, billed.estimated).inc()
            if billed.estimated == "invalid":
                log.warning("provider %s sent invalid usage: billed by the estimate", provider.name)
        cost, prompt_tokens, completion_tokens = billed.usd, billed.prompt_tokens, billed.completion_tokens
        self.metrics.tokens.labels(provider.name, cfg.model, "input").inc(prompt_tokens)
        self.metrics.tokens.labels(provider.name, cfg.model, "output").inc(completion_tokens)
        self.metrics.cost.labels(provider.name, cfg.model, d.task_type).inc(cost)
        if served:
            self.metrics.served.labels(provider.tier, provider.name, cfg.model).inc()
        if self.pacer:
            tier = self.tier_index[provider.tier]
            try:  # the answer is delivered whatever happens to its accounting
                self.pacer.record(cost, tier, d.estimated_costs[tier])
            except Exception as e:
                log.error("budget accounting failed for provider %s: %s", provider.name, type(e).__name__)
        return billed

    def record(
        self,
        d: TierDecision,
        request_id: str,
        client: str | None,
        started: float,
        status: int,
        outcome: str,
        provider: Provider | None = None,
        billed: Billed | None = None,
    ) -> None:
        """Add the request to the traffic record, when there is one and its data class may be recorded."""
        if self.traffic is None:
            return
        text, digest = self.traffic.text_fields(d.text)
        self.traffic.record(
            {
                "id": request_id,
                "time": time.time(),
                "client": client,
                "text": text,
                "text_sha256": digest,
                "pass_chances": d.pass_chances,
                "threshold": d.effective_threshold,
                "tier": provider.tier if provider else d.tier,
                "rule": d.rule,
                "task_type": d.task_type,
                "router": d.router,
                "provider": provider.name if provider else None,
                "model": provider.config.model if provider else None,
                "prompt_tokens": billed.prompt_tokens if billed else None,
                "completion_tokens": billed.completion_tokens if billed else None,
                "cost_usd": billed.usd if billed else 0.0,
                "latency_ms": round((time.monotonic() - started) * 1000, 3),
                "status": status,
                "outcome": outcome,
                "data_class": d.options.data_class,
            },
            d.options.data_class,
        )

    def _named_task_type(self, name: str | None, tasks: TaskTyping | None) -> str | None:
        if name is None:
            return None
        if tasks is None:
            raise APIError(
                400,
                f"task type {name!r}: task types are off in this service (task_types.enabled)",
                param="router.task_type",
                code="unknown_task_type",
            )
        return tasks.check(name)

    def _allowed(self, data_class: str | None) -> frozenset[str] | None:
        if data_class is None:
            return None
        if data_class not in self.data_classes:
            known = ", ".join(sorted(self.data_classes)) or "none"
            raise APIError(
                400,
                f"unknown data class {data_class!r}; configured classes: {known}",
                param="router.data_class",
                code="unknown_data_class",
            )
        return self.data_classes[data_class]


def score_columns(config: ServiceConfig, outputs: list[str]) -> list[int | None]:
    """Each tier's column in the router's output (None: unscored); a name the router does not output is an error."""
    columns = []
    for t, tier in enumerate(config.tiers):
        if tier.score is not None and tier.score not in outputs:
            near = difflib.get_close_matches(tier.score, outputs, n=3, cutoff=0.5)
            raise ConfigError(
                f"tiers[{t}].score: the router outputs no {tier.score!r} ({len(outputs)} outputs"
                + (f"; closest: {', '.join(near)}" if near else "")
                + "; 'generic' scores any model)"
            )
        columns.append(None if tier.score is None else outputs.index(tier.score))
    return columns


def resolve_threshold(config: ServiceConfig, router) -> float:
    """routing.threshold as given; routing.strong_fraction through the router's calibration table for the one scored
    tier's output; else the router's default for its own pair, or the default's share of strong calls for another
    output."""
    r = config.routing
    if r.threshold is not None:
        return r.threshold
    scored = [t.score for t in config.tiers if t.score is not None]
    if r.strong_fraction is None and scored in ([], [router.manifest.weak]):
        return float(router.default_threshold)
    if len(scored) != 1:
        raise ConfigError(
            f"routing.strong_fraction: needs exactly one scored tier, this config scores {len(scored)} "
            "(a multi-tier config sets routing.threshold)"
        )
    fraction = r.strong_fraction
    if fraction is None:
        fraction = router.manifest.strong_fraction_at(router.default_threshold)
    try:
        return float(router.manifest.threshold_for(fraction, scored[0]))
    except (ValueError, IndexError) as e:
        raise ConfigError(
            f"routing.strong_fraction: cannot be resolved with the router's calibration table ({e})"
        ) from None
