"""POST /v1/route: the routing decision alone, without forwarding the request."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from ..auth import rate_limited
from ..routing import parse_request, router_options
from ..decision import TierDecision
from .deps import ServiceDep

router = APIRouter(tags=["routing"], dependencies=[Depends(rate_limited)])


class SkippedTier(BaseModel):
    tier: str
    rule: str = Field(description="the rule that skipped it")
    detail: str


class BudgetReport(BaseModel):
    """The budget period's spend and pacing when the decision was made."""

    period: str
    period_start: str = Field(description="ISO 8601, UTC")
    usd: float = Field(description="the budget per period")
    spent_usd: float
    remaining_usd: float
    requests: int
    elapsed_share: float = Field(description="the share of the period gone, in [0, 1]")
    pace: float = Field(description="spent_usd / (usd * elapsed_share)")
    threshold_offset: float = Field(description="added to each request's threshold by budget pacing")
    reserve_usd: float = Field(description="kept for the requests still expected this period")


class RouteDecision(BaseModel):
    """The tier a request goes to, the rule that decided and why, with the pass chances, thresholds and cost behind it."""

    tier: str
    provider: str = Field(description="the provider expected to answer")
    upstream_model: str
    rule: str = Field(description="score, task_type, context, budget, latency, data_class or circuit_open")
    reason: str
    pass_chances: dict[str, float] = Field(description="tier -> pass chance (1.0 for an unscored tier)")
    threshold: float = Field(description="the request's threshold")
    effective_threshold: float = Field(description="after budget pacing")
    skipped: list[SkippedTier] = Field(description="cheaper tiers passed over, and why")
    fallback_chain: list[str] = Field(description="the providers to try, in order")
    estimated_prompt_tokens: int
    estimated_cost_usd: float = Field(description="on the chosen tier's expected provider")
    task_type: str
    task_type_source: str = Field(description="request, inferred or none")
    data_class: str | None
    latency_budget_ms: int | float | None
    budget: BudgetReport | None
    router: str = Field(description="the version of the router that decided")

    @classmethod
    def of(cls, d: TierDecision) -> RouteDecision:
        return cls(
            tier=d.tier,
            provider=d.provider.name,
            upstream_model=d.provider.config.model,
            rule=d.rule,
            reason=d.reason,
            pass_chances=d.pass_chances,
            threshold=d.threshold,
            effective_threshold=d.effective_threshold,
            skipped=[s.as_dict() for s in d.skipped],
            fallback_chain=[p.name for p in d.chain],
            estimated_prompt_tokens=d.prompt_tokens,
            estimated_cost_usd=d.estimated_cost,
            task_type=d.task_type,
            task_type_source=d.task_type_source,
            data_class=d.options.data_class,
            latency_budget_ms=d.options.latency_budget_ms,
            budget=d.budget.as_dict() if d.budget else None,
            router=d.router,
        )


@router.post("/v1/route")
async def route(request: Request, service: ServiceDep) -> RouteDecision:
    """The routing decision alone: the tier, the rule that decided and why, pass chances, thresholds, cost, budget."""
    started = time.monotonic()
    req, body = parse_request(await request.body())
    return RouteDecision.of(await service.route(req, router_options(body, request.headers), started))
