"""Client and admin authentication (bearer keys checked by their sha256) and per-key rate limits (token buckets)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .config import ClientKey, hash_key
from .errors import APIError

bearer = HTTPBearer(auto_error=False, description="A client key of this router (not a provider key)")


class RateLimiter:
    """A token bucket per client: `burst` requests at once, refilled at requests_per_minute / 60 per second.

    Full buckets are forgotten when there are more than `max_clients` (clients told apart by address).
    """

    max_clients = 10_000

    def __init__(self, requests_per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.requests_per_minute = requests_per_minute
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill)

    def take(self, client: str, requests_per_minute: float | None = None, burst: int | None = None) -> float | None:
        """None when the request may go; else the seconds to wait before the next one will. `burst`: this bucket's
        own size (default: the limiter's)."""
        rate = (requests_per_minute or self.requests_per_minute) / 60.0
        size = float(burst or self.burst)
        if rate <= 0:
            return None
        now = self._clock()
        if len(self._buckets) > self.max_clients:
            self._forget_full(now, rate)
        tokens, last = self._buckets.get(client, (size, now))
        tokens = min(size, tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return None
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / rate

    def _forget_full(self, now: float, rate: float) -> None:
        self._buckets = {c: (t, last) for c, (t, last) in self._buckets.items() if t + (now - last) * rate < self.burst}


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> ClientKey | None:
    """The client key of the request (None when auth is disabled); 401 without a valid bearer token."""
    service = request.app.state.service
    if not service.config.auth.enabled:
        return None
    if credentials is None:
        raise APIError(
            401,
            "missing bearer token: send Authorization: Bearer <your router key>",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    client = service.client_keys.get(hash_key(credentials.credentials))
    if client is None:
        raise APIError(
            401,
            "invalid API key",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return client


def bucket_of(request: Request, client: ClientKey | None) -> str:
    """Whose rate limit a request counts against: its key's name, or without auth its address."""
    return client.name if client else f"addr:{request.client.host if request.client else '?'}"


async def rate_limited(
    request: Request, client: Annotated[ClientKey | None, Depends(authenticate)]
) -> ClientKey | None:
    """429 with Retry-After when the client's bucket is empty. Without auth, clients are told apart by address."""
    service = request.app.state.service
    wait = await service.state.take(bucket_of(request, client), client.requests_per_minute if client else None)
    if wait is not None:
        raise APIError(
            429,
            f"rate limit exceeded for this key; retry in {wait:.1f}s",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return client


async def authenticate_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> ClientKey:
    """The admin key of the request: 404 when the service has no admin keys, 401 without one of them."""
    keys = request.app.state.service.admin_keys
    if not keys:
        raise APIError(
            404,
            "the admin endpoints are off: no admin keys are configured (admin.keys or admin.keys_env)",
            code="admin_off",
        )
    admin = None if credentials is None else keys.get(hash_key(credentials.credentials))
    if admin is None:
        raise APIError(
            401,
            "missing or invalid admin key: send Authorization: Bearer <an admin key>",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return admin


async def client_or_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """An admin key, or a client key within its rate limit (401, 429 as for a client)."""
    if credentials is not None and hash_key(credentials.credentials) in request.app.state.service.admin_keys:
        return
    await rate_limited(request, await authenticate(request, credentials))
