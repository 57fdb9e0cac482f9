"""What the endpoints depend on: the app's service and the request's client key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..auth import rate_limited
from ..config import ClientKey
from ..service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
Client = Annotated[
    ClientKey | None, Depends(rate_limited)
]  # a valid client key within its rate limit; None: auth is off
