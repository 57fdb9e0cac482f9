"""The OpenAI-compatible routing service over HTTP: score each request, pick a tier, forward it, account for it.

Clients change only `base_url`. `model="router"` uses the configured threshold; `model="router-0.35"`
sets it for one request. Every answer carries x-router-* headers with the decision, why, and its cost.

`create_app` assembles the app: the endpoints (api/, one router a resource), the middlewares (middleware.py), the
OpenAI-format error handlers, and the lifespan that starts and stops the service and reloads its router on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import RouterError, first_error
from .api import ENDPOINTS, api_router
from .config import load_config
from .errors import APIError, ConfigError, error_body
from .middleware import BodyLimit, RequestMetrics, ServerErrors, redact_access_log
from .service import Service

log = logging.getLogger("learned_router.serving")
CONFIG_ENV = "LEARNED_ROUTER_CONFIG"


def reload_on_hangup(service: Service) -> bool:
    """SIGHUP reloads the router from router.path (its outcome is logged); False where signals cannot be handled here
    (not the main thread, or no SIGHUP on this platform)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def reload() -> None:
        with contextlib.suppress(RouterError):  # reload() logged why; the router in service stays
            await service.reload()

    def hangup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, hangup)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


@asynccontextmanager
async def lifespan(app: FastAPI):
    service: Service = app.state.service
    await service.start()
    redact_access_log()
    log.info(
        "router %s ready: threshold %.4f, tiers %s",
        service.scoring.version,
        service.threshold,
        {t.name: [p.name for p in t.providers] for t in service.config.tiers},
    )
    hup = reload_on_hangup(service)
    try:
        yield
    finally:
        if hup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await service.stop()


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    loc, msg = first_error(exc)
    param = ".".join(map(str, loc))
    return JSONResponse(error_body(f"{param}: {msg}", "invalid_request_error", param), status_code=400)


def create_app(service: Service) -> FastAPI:
    docs = service.config.api_docs  # /docs, /redoc and /openapi.json: off unless the config turns them on
    app = FastAPI(
        title="learned-router",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible LLM router: each request goes to the cheapest tier whose answer will pass.",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        default_response_class=JSONResponse,  # response models encoded by json.dumps, as every other body
        exception_handlers={
            APIError: api_error,
            StarletteHTTPException: http_error,
            RequestValidationError: validation_error,
        },
    )
    app.state.service = service
    app.include_router(api_router)
    app.add_middleware(ServerErrors)
    app.add_middleware(
        BodyLimit, max_bytes=service.config.limits.max_body_bytes, read_seconds=service.config.limits.body_read_seconds
    )
    app.add_middleware(RequestMetrics, metrics=service.metrics, endpoints=ENDPOINTS)
    return app


def create_app_from_env() -> FastAPI:
    """App factory for running uvicorn yourself (`uvicorn --factory`): the config file named by
    $LEARNED_ROUTER_CONFIG."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"{CONFIG_ENV} is not set: it must name the service config file")
    return create_app(Service(load_config(path)))
