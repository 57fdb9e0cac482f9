"""/admin/*: the router in service, and swapping it (reload a folder, roll back); an admin key required.

With several worker processes (`serve --workers N`) a call reaches one of them, so a reload checks router.path's folder
there and then has every worker replaced, one at a time, each loading router.path (202); a reload of another folder and
a rollback, which one worker cannot do for all, are refused (409) with what to do instead."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import RouterError, first_error
from ..auth import authenticate_admin
from ..errors import APIError
from ..service import RouterInService, RouterSwapped
from .deps import ServiceDep

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authenticate_admin)])


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    path: str | None = Field(None, min_length=1, max_length=4096)  # a router folder; default: the config's router.path


def same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):  # not a path this system can name
        return False


@router.get("/router")
async def admin_router(service: ServiceDep) -> RouterInService:
    """The router in service (version, folder, threshold, calibration mix) and the one a rollback restores."""
    return service.describe()


@router.post("/reload", response_model_exclude_none=True)
async def admin_reload(request: Request, response: Response, service: ServiceDep) -> RouterSwapped:
    """Load and check a router folder (default: router.path), then swap it in; requests scoring finish on the old one."""
    raw = await request.body()
    try:
        path = ReloadRequest.model_validate_json(raw).path if raw.strip() else None
    except ValidationError as e:
        loc, msg = first_error(e)
        raise APIError(400, f"{'.'.join(map(str, loc)) or 'body'}: {msg}") from None
    if service.workers is not None and path is not None and not same_folder(path, service.config.router.path):
        raise APIError(
            409,
            f"this service runs {service.workers.count} worker processes, which load router.path "
            f"({service.config.router.path}) when they start: put the new router there (or point router.path at "
            "it) and reload without a path",
            code="reload_needs_router_path",
        )
    try:
        swapped = await service.reload(path)
    except RouterError as e:
        raise APIError(
            422, f"reload failed, {service.scoring.version} stays in service: {e}", code="reload_failed"
        ) from None
    if swapped.workers:
        response.status_code = 202  # the workers are being replaced
    return swapped


@router.post("/rollback", response_model_exclude_none=True)
async def admin_rollback(service: ServiceDep) -> RouterSwapped:
    """Swap the router of before the last reload back in."""
    if service.workers is not None:
        raise APIError(
            409,
            f"this service runs {service.workers.count} worker processes and a rollback reaches one of them: "
            "put the previous router back in router.path and reload",
            code="rollback_unavailable",
        )
    try:
        return await service.rollback()
    except RouterError as e:
        raise APIError(
            409, f"rollback failed, {service.scoring.version} stays in service: {e}", code="rollback_failed"
        ) from None
