"""Prometheus metrics of one service instance (its own registry, so several apps can share a process)."""

from __future__ import annotations

import math

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "router_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=r
        )
        self.decisions = Counter(
            "router_decisions",
            "Routing decisions by tier, the rule that decided, the task type and the router version that decided",
            ["tier", "rule", "task_type", "router"],
            registry=r,
        )
        self.router_info = Gauge(
            "router_info", "1 for the router version in service, 0 for one it replaced", ["version"], registry=r
        )
        self.reloads = Counter(
            "router_reloads",
            "Router swaps by kind: reload, rollback, or failed (the router stayed)",
            ["kind"],
            registry=r,
        )
        self.traffic_dropped = Counter(
            "router_traffic_dropped",
            "Requests not written to the traffic record (queue full or write failed)",
            ["reason"],
            registry=r,
        )
        self.shadow_jobs = Counter(
            "router_shadow_jobs",
            "Shadow-grading jobs by outcome: graded, or why not (over_cap, tier_failed, judge_failed, unparseable, "
            "queue_full, excluded_client, excluded_tier, data_class, unscored, error)",
            ["outcome"],
            registry=r,
        )
        self.shadow_pending = Gauge("router_shadow_pending", "Shadow-grading jobs queued or being graded", registry=r)
        self.shadow_cost = Counter(
            "router_shadow_cost_usd", "Dollars spent on shadow answers and their judge calls", registry=r
        )
        self.quality_retained = Gauge(
            "router_quality_retained",
            "Quality retained by routing against the strongest tier on shadow-graded traffic: estimate, low, high "
            "(95% interval)",
            ["bound"],
            registry=r,
        )
        self.quality_cost_ratio = Gauge(
            "router_quality_cost_ratio",
            "Cost of routing over sending everything to the strongest tier, on shadow-graded traffic: estimate, low, "
            "high (95% interval)",
            ["bound"],
            registry=r,
        )
        self.quality_graded = Gauge("router_quality_graded", "Shadow-graded requests the estimate reads", registry=r)
        self.quality_target = Gauge("router_quality_target", "quality.target: the retained quality to keep", registry=r)
        self.served = Counter(
            "router_served", "Requests answered by each provider", ["tier", "provider", "model"], registry=r
        )
        self.pass_chance = Histogram(
            "router_pass_chance", "Pass chance of each scored tier", ["tier"], buckets=SCORE_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "router_batch_size", "Prompts per onnxruntime call", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.fallbacks = Counter(
            "router_fallbacks",
            "Moves to the next provider after one failed or was skipped",
            ["from_provider", "to_provider"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "router_upstream_errors", "Failed upstream attempts by provider and kind", ["provider", "kind"], registry=r
        )
        self.circuit_skips = Counter(
            "router_circuit_skips", "Requests that skipped a provider whose circuit was open", ["provider"], registry=r
        )
        self.circuit_probes = Counter(
            "router_circuit_probes",
            "Timer probes of half-open providers, by the circuit they left",
            ["provider", "result"],
            registry=r,
        )
        self.routing_seconds = Histogram(
            "router_routing_seconds",
            "Time to score and route a request (batch wait included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "router_upstream_seconds",
            "Upstream time of successful calls (a stream: to its first chunk)",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "router_request_seconds",
            "Time in the service per request (a stream: to its first byte)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("router_tokens", "Tokens billed by providers", ["provider", "model", "kind"], registry=r)
        self.usage_estimated = Counter(
            "router_usage_estimated",
            "Answers billed by the estimate: usage missing or invalid",
            ["provider", "reason"],
            registry=r,
        )
        self.spend_store_errors = Counter(
            "router_spend_store_errors", "Failed writes to the budget's spend store (retried)", registry=r
        )
        self.state_shared = Gauge(
            "router_state_shared", "1: breakers, rate limits and spend shared in Redis; 0: per process", registry=r
        )
        self.state_errors = Counter(
            "router_state_errors", "Redis calls that failed (the request used per-process state)", registry=r
        )
        self.cost = Counter(
            "router_cost_usd",
            "Dollars spent, from upstream usage and configured prices",
            ["provider", "model", "task_type"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "router_circuit_state",
            "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open",
            ["provider"],
            registry=r,
        )
        self.latency_p95 = Gauge(
            "router_provider_latency_p95_seconds",
            "p95 latency of each provider's recent calls (NaN: too few)",
            ["provider"],
            registry=r,
        )
        self.threshold = Gauge("router_threshold", "The configured threshold", registry=r)
        self.effective_threshold = Gauge(
            "router_effective_threshold", "The configured threshold after budget pacing", registry=r
        )

    def router_loaded(self, version: str, replaced: str | None = None) -> None:
        if replaced is not None and replaced != version:
            self.router_info.labels(replaced).set(0)
        self.router_info.labels(version).set(1)

    def watch_provider(self, provider: str, state, p95) -> None:
        """Report `state()` ('closed', 'half_open' or 'open') and `p95()` (seconds or None) at each scrape."""
        self.circuit_state.labels(provider).set_function(lambda: CIRCUIT_STATES[state()])
        self.latency_p95.labels(provider).set_function(lambda: math.nan if (v := p95()) is None else v)

    def watch_budget(self, state, effective) -> None:
        """Report the budget, spend and pace of `state()` (a BudgetState) and the `effective()` threshold at each scrape."""
        r = self.registry
        Gauge("router_budget_usd", "Budget of the current period", registry=r).set_function(lambda: state().usd)
        Gauge(
            "router_budget_spent_usd", "Spend of the current period (every process sharing the store)", registry=r
        ).set_function(lambda: state().spent)
        Gauge(
            "router_budget_pace", "Spend / (budget x elapsed share of the period); 1 is on track", registry=r
        ).set_function(lambda: state().pace)
        self.effective_threshold.set_function(effective)

    def watch_drift(self, monitor) -> None:
        """Report each signal's PSI against the drift reference (NaN: too few requests or no reference yet)."""
        psi = Gauge(
            "router_drift_psi",
            "Population-stability index of the recent requests against the drift reference, "
            "per signal (pass_chance, task_type, tier)",
            ["signal"],
            registry=self.registry,
        )
        for signal in monitor.psi():
            psi.labels(signal).set_function(lambda s=signal: monitor.psi()[s])
        Gauge(
            "router_drift_threshold",
            "The PSI above which a signal counts as drifted (drift.threshold)",
            registry=self.registry,
        ).set(monitor.cfg.threshold)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def quality_observed(self, estimate: dict) -> None:
        """The gauges of a quality estimate (learned_router.quality.estimate); NaN where there is none yet."""
        self.quality_graded.set(estimate["prompts"])
        now = estimate["in_use"] or {}
        for gauge, key in ((self.quality_retained, "retained_quality"), (self.quality_cost_ratio, "cost_ratio")):
            low, high = now.get(f"{key}_ci") or (math.nan, math.nan)
            for bound, v in (("estimate", now.get(key, math.nan)), ("low", low), ("high", high)):
                gauge.labels(bound).set(math.nan if v is None else v)
