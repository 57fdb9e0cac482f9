"""/v1/quality: what routing cost in quality on this service's traffic, from shadow-graded requests (`quality:`
block); a client or an admin key."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..auth import client_or_admin
from ..errors import APIError
from .deps import ServiceDep

router = APIRouter(tags=["quality"])


@router.get("/v1/quality", dependencies=[Depends(client_or_admin)])
async def quality(service: ServiceDep) -> dict:
    """Quality retained and cost against the strongest tier at the thresholds in use, each with its 95% interval,
    per task type; the frontier on the graded requests and the threshold that keeps `quality.target` cheapest. The
    estimate recomputed every `quality.refresh_s` (`computed_at`), so a call costs nothing however large the store."""
    if service.shadow is None:
        raise APIError(404, "quality estimates are off in this service (no quality block)", code="quality_off")
    return service.shadow.latest
