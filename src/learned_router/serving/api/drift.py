"""/v1/drift: the drift of the router's inputs and decisions against a reference (a client key); setting that
reference, which decides what counts as drift, takes an admin key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from ..auth import authenticate_admin, rate_limited
from ..drift import DriftMonitor
from ..errors import APIError
from .deps import ServiceDep

router = APIRouter(tags=["drift"])


def drift_monitor(service: ServiceDep) -> DriftMonitor:
    if service.drift is None:
        raise APIError(404, "drift is off in this service (drift.enabled)", code="drift_off")
    return service.drift


Monitor = Annotated[DriftMonitor, Depends(drift_monitor)]


@router.get("/v1/drift", dependencies=[Depends(rate_limited)])
async def drift(monitor: Monitor) -> dict:
    """Each signal's PSI against the drift reference, the window's and the reference's distributions."""
    return monitor.state()


@router.post("/v1/drift/reference", dependencies=[Depends(authenticate_admin)])
async def drift_reference(monitor: Monitor) -> dict:
    """Make the current window the drift reference (written to drift.reference when set)."""
    return monitor.snapshot()
