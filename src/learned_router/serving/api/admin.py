"""/admin/*: the router in service, and swapping it (reload a folder, roll back); an admin key required."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import RouterError, first_error
from ..auth import authenticate_admin
from ..errors import APIError
from .deps import ServiceDep

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authenticate_admin)])


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    path: str | None = Field(None, min_length=1, max_length=4096)  # a router folder; default: the config's router.path


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


@router.get("/router")
async def admin_router(service: ServiceDep) -> RouterInService:
    """The router in service (version, folder, threshold, calibration mix) and the one a rollback restores."""
    return RouterInService(**service.describe())


@router.post("/reload")
async def admin_reload(request: Request, service: ServiceDep) -> RouterSwapped:
    """Load and check a router folder (default: router.path), then swap it in; requests scoring finish on the old one."""
    raw = await request.body()
    try:
        path = ReloadRequest.model_validate_json(raw).path if raw.strip() else None
    except ValidationError as e:
        loc, msg = first_error(e)
        raise APIError(400, f"{'.'.join(map(str, loc)) or 'body'}: {msg}") from None
    try:
        return RouterSwapped(**await service.reload(path))
    except RouterError as e:
        raise APIError(422, f"reload failed, {service.scoring.version} stays in service: {e}", code="reload_failed") from None


@router.post("/rollback")
async def admin_rollback(service: ServiceDep) -> RouterSwapped:
    """Swap the router of before the last reload back in."""
    try:
        return RouterSwapped(**await service.rollback())
    except RouterError as e:
        raise APIError(409, f"rollback failed, {service.scoring.version} stays in service: {e}", code="rollback_failed") from None
