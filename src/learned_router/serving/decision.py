"""A request's routing decision as a pure function of what the service knows when the request arrives: each tier's
pass chance, each provider's standing, the threshold and the budget's state, under policy.py's rules.
`Service.route` scores the request, gathers these facts, calls `decide` and records the decision."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .budget import BudgetState, Pacer
from .config import ServiceConfig
from .errors import APIError
from .policy import NoEligibleTier, Skip, Standing, TierOption, choose, fallback_order, pick, standing
from .providers import Provider
from .routing import RouterOptions


@dataclass(frozen=True)
class TierDecision:
    """Where one request goes and why: the policy's choice among the tiers (policy.py) with what it saw."""

    tier: str
    tier_index: int  # its position among the configured tiers, cheapest first
    rule: str  # score, task_type, context, budget, latency, data_class or circuit_open
    reason: str
    pass_chances: dict[str, float]  # tier -> pass chance (1.0 for an unscored tier)
    eligible: list[bool]  # per tier: whether a provider of it can take the request
    threshold: float  # the request's threshold
    effective_threshold: float  # after budget pacing
    skipped: list[Skip]
    chain: list[Provider]  # the providers to try, in order: the chosen tier's, then the fallbacks
    excluded: list[str]  # 'tier/provider: why' for providers this request may reach but that cannot take it
    provider: Provider  # the provider expected to answer
    estimated_costs: list[float]  # USD per tier, on its expected provider
    prompt_tokens: int  # estimated
    output_tokens: int | None  # requested max_tokens, if any
    options: RouterOptions
    task_type: str  # a configured type, or unknown
    task_type_source: str  # request (named by it), inferred, or none
    deadline: float | None  # time.monotonic() when the latency budget runs out
    budget: BudgetState | None
    text: str  # the text the router scored
    router: str  # the version of the router that decided

    @property
    def estimated_cost(self) -> float:
        return self.estimated_costs[self.tier_index]


@dataclass(frozen=True)
class Facts:
    """What the service knows of one request when it decides."""

    text: str  # the text the router scored
    scores: np.ndarray | None  # the router's outputs for it (None: no text)
    requested: float  # the request's threshold (its model name's, else the service's)
    paced: bool  # budget pacing may move the threshold (not for an explicit router-<t>)
    task_type: str
    task_type_source: str  # request, inferred or none
    offset: float  # the task type's threshold offset
    pin: int  # the lowest tier the task type may go to
    tokens: int  # estimated prompt tokens
    max_tokens: int | None  # the request's max_tokens, if any
    options: RouterOptions
    allowed: frozenset[str] | None  # providers the request's data class may reach (None: any)
    deadline: float | None  # time.monotonic() when the latency budget runs out
    remaining_s: float | None  # of the latency budget, now
    router: str  # the version of the router that scored it


def decide(
    config: ServiceConfig,
    columns: list[int | None],
    chains: list[list[Provider]],
    f: Facts,
    pacer: Pacer | None = None,
    state: BudgetState | None = None,
) -> TierDecision:
    """The tier, the rule that decided and why, the fallback chain and the estimates; APIError (a 4xx or 503) when
    no tier can take the request."""
    threshold = min(max(f.requested + f.offset, 0.0), 1.0)
    pinned = f"task type {f.task_type!r} goes to tier {config.tiers[f.pin].name} or above"
    need = f.tokens + (f.max_tokens or 0)
    options = [
        TierOption(
            tier.name,
            1.0 if col is None else 0.0 if f.scores is None else float(f.scores[col]),
            [
                Standing(p, "task_type", pinned)
                if i < f.pin
                else standing(p, need, f.allowed, f.options.data_class, f.remaining_s)
                for p in chain
            ],
        )
        for i, (tier, col, chain) in enumerate(zip(config.tiers, columns, chains, strict=True))
    ]
    out = f.max_tokens if f.max_tokens is not None else config.routing.assumed_output_tokens
    expected = [next((s.provider for s in o.standings if s.rule is None), o.standings[0].provider) for o in options]
    costs = [p.config.cost_usd(f.tokens, out) for p in expected]
    paced = state is not None and f.paced
    effective = pacer.effective(threshold, state) if paced else threshold
    affordable = (lambda i: pacer.affordable(i, costs[i], state, reserve=paced)) if state else None
    try:
        choice = choose(options, threshold, effective, affordable)
    except NoEligibleTier as e:
        raise no_tier_error(e.options, f.options, need) from None
    everything = list(range(len(options)))
    if choice.rule == "score" and pick(options, threshold, everything) != pick(options, f.requested, everything):
        choice = dataclasses.replace(
            choice,
            rule="task_type",
            reason=f"task type {f.task_type!r} moves the threshold from "
            f"{f.requested:.4f} to {threshold:.4f}; {choice.reason}",
        )
    order = fallback_order(choice.index, len(options), config.routing.fallback_to_other_tiers)
    chain = [
        s.provider
        for i in order
        if options[i].eligible
        for s in options[i].standings
        if s.rule in (None, "circuit_open")
    ]
    excluded = [
        f"{o.name}/{s.provider.name}: {s.detail}"
        for o in options
        for s in o.standings
        if s.rule not in (None, "data_class", "task_type") and s.provider not in chain
    ]
    return TierDecision(
        tier=options[choice.index].name,
        tier_index=choice.index,
        rule=choice.rule,
        reason=choice.reason,
        pass_chances={o.name: o.pass_chance for o in options},
        eligible=[o.eligible for o in options],
        threshold=threshold,
        effective_threshold=effective,
        skipped=choice.skipped,
        chain=chain,
        excluded=excluded,
        provider=expected[choice.index],
        estimated_costs=costs,
        prompt_tokens=f.tokens,
        output_tokens=f.max_tokens,
        options=f.options,
        task_type=f.task_type,
        task_type_source=f.task_type_source,
        deadline=f.deadline,
        budget=state,
        text=f.text,
        router=f.router,
    )


def no_tier_error(options: list[TierOption], opts: RouterOptions, need: int) -> APIError:
    """No tier can take the request: 400 when it fits no context window, else 503 naming each provider and why."""
    standings = [(o, s) for o in options for s in o.standings if s.rule not in ("data_class", "task_type")]
    what = "; ".join(f"{o.name}/{s.provider.name}: {s.detail}" for o, s in standings)
    rules = {s.rule for _, s in standings}
    if rules == {"context"}:
        return APIError(
            400,
            f"the request (~{need} tokens with max_tokens) fits no provider's context window: {what}",
            param="messages",
            code="context_length_exceeded",
        )
    if opts.data_class is not None:
        return APIError(
            503,
            f"no provider allowed for data class {opts.data_class!r} can take this request: {what}",
            type="upstream_error",
            code="data_class_unavailable",
        )
    if "latency" in rules:
        return APIError(
            503,
            f"no provider fits the latency budget of {opts.latency_budget_ms:g} ms: {what}",
            type="upstream_error",
            code="latency_budget_unmet",
        )
    return APIError(
        503, f"no provider can take this request: {what}", type="upstream_error", code="no_provider_available"
    )
