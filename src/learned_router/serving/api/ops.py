"""What operators and clients probe: /healthz, /readyz, /metrics, and /v1/models (the one model this service offers)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from ..auth import rate_limited
from ..routing import ROUTER_MODEL
from .deps import ServiceDep

router = APIRouter(tags=["operations"])


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    router: bool = Field(description="the router scores")
    tiers: dict[str, bool] = Field(description="tier -> one of its providers is ready")
    providers: dict[str, bool] = Field(description="provider -> it answers and its circuit is not open")
    router_check: str = Field(
        description="the router's graph on this CPU against the torch model's outputs that "
        "router.json keeps: 'passed', 'unchecked' (it keeps none) or what drifted (also logged)"
    )
    state: Literal["shared", "per-process"] = Field(
        description="where breakers, rate limits and spend live: Redis (shared), or this process"
    )


@router.get("/v1/models", dependencies=[Depends(rate_limited)])
async def models() -> ModelList:
    return ModelList(data=[Model(id=ROUTER_MODEL, created=0, owned_by="learned-router")])


@router.get("/healthz")
async def healthz() -> Health:
    return Health()


@router.get("/readyz", responses={503: {"model": Readiness, "description": "Not ready"}})
async def readyz(service: ServiceDep, response: Response) -> Readiness:
    """Ready when the router scores and each tier has a provider that answers and whose circuit is not open."""
    ready = await service.upstream.ready(service.config.readiness)
    tiers = {t.name: any(ready[p.name] for p in t.providers) for t in service.config.tiers}
    ok = service.batcher.running and all(tiers.values())
    response.status_code = 200 if ok else 503
    check = getattr(service.router, "check", None)
    drift = "unchecked" if check is None else "passed" if check.passed else "; ".join(check.failures)
    return Readiness(
        status="ready" if ok else "not ready",
        router=service.batcher.running,
        tiers=tiers,
        providers=ready,
        router_check=drift,
        state="shared" if service.state.shared and service.state.up else "per-process",
    )


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.content_type)
