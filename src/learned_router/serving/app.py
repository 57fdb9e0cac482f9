"""The OpenAI-compatible routing service over HTTP: score each request, pick a tier, forward it, account for it.

Clients change only `base_url`. `model="router"` uses the configured threshold; `model="router-0.35"`
sets it for one request. Every answer carries x-router-* headers with the decision, why, and its cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import anyio
import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import authenticate_admin, rate_limited
from .config import ClientKey, load_config
from ..errors import RouterError, first_error
from .errors import APIError, ConfigError, error_body
from .metrics import Metrics
from .providers import BadStream, Reply, stream_chunk
from .routing import ROUTER_MODEL, parse_request, router_options
from .service import Decision, Service
from .usage import answer_chars

log = logging.getLogger("learned_router.serving")
CONFIG_ENV = "LEARNED_ROUTER_CONFIG"
ENDPOINTS = {"/v1/chat/completions", "/v1/route", "/v1/models", "/v1/drift", "/v1/drift/reference", "/v1/feedback", "/healthz",
             "/readyz", "/metrics", "/admin/router", "/admin/reload", "/admin/rollback"}
AUTHORIZED = [Depends(rate_limited)]  # a valid client key within its rate limit
Client = Annotated[ClientKey | None, Depends(rate_limited)]
ADMIN = [Depends(authenticate_admin)]


class Feedback(BaseModel):
    """A client's grade of one answer: `score` in [0, 1], or `thumbs` up (1) or down (0)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    request_id: str = Field(min_length=1, max_length=64)  # the x-request-id header of the answer
    score: float | None = Field(None, ge=0.0, le=1.0)
    thumbs: Literal["up", "down"] | None = None

    @model_validator(mode="after")
    def _one(self) -> "Feedback":
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give score (a number in [0, 1]) or thumbs (up or down), one of them")
        return self


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    path: str | None = Field(None, min_length=1, max_length=4096)  # a router folder; default: the config's router.path


def decision_headers(d: Decision, reply: Reply | None = None) -> dict[str, str]:
    h = {
        "x-router-tier": d.tier,
        "x-router-rule": d.rule,
        "x-router-task-type": d.task_type,
        "x-router-pass-chances": ", ".join(f"{t}={p:.4f}" for t, p in d.pass_chances.items()),
        "x-router-threshold": f"{d.threshold:.4f}",
        "x-router-effective-threshold": f"{d.effective_threshold:.4f}",
        "x-router-estimated-cost-usd": f"{d.estimated_cost:.8f}",
        "x-router-version": d.router,
    }
    if d.skipped:
        h["x-router-skipped"] = ", ".join(f"{s.tier}={s.rule}" for s in d.skipped)
    if reply is not None:
        h["x-router-model"] = reply.provider.config.model
        h["x-router-provider"] = reply.provider.name
        h["x-router-fallbacks"] = str(reply.fallbacks)
    return h


class BodyLimit:
    """413 for bodies over `max_bytes` (declared or streamed); the body is read once and replayed to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send, declared.isdigit())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send, True)
            if not message.get("more_body", False):
                break
        first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, numeric: bool):
        if numeric:
            err = APIError(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        else:
            err = APIError(400, "invalid Content-Length header")
        await JSONResponse(err.body(), status_code=err.status, headers={"Connection": "close"})(scope, receive, send)


class ServerErrors:
    """An unexpected error: a complete OpenAI-format 500 when no response has started, so a keep-alive connection
    stays usable; when one had started, its connection is closed (the response cannot be completed honestly)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            log.error("internal error on %s: %s", scope["path"], type(e).__name__)
            log.debug("internal error on %s", scope["path"], exc_info=True)
            if not started:
                await JSONResponse(error_body("internal error", "server_error"), status_code=500)(scope, receive, send)


class RedactQuery(logging.Filter):
    """Access-log lines show query strings with their values redacted (a key sent as ?api_key= never reaches a log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            path, _, query = args[2].partition("?")
            redacted = "&".join(f"{kv.partition('=')[0]}=[redacted]" for kv in query.split("&"))
            record.args = (*args[:2], f"{path}?{redacted}", *args[3:])
        return True


def redact_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in access.filters):
        access.addFilter(RedactQuery())


class RequestMetrics:
    """Counts requests by endpoint and status, and times them to the first byte of the response.

    A request whose client went away before any response was sent is counted with status 499.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.perf_counter()
        status = 499

        async def timed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()


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


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        redact_access_log()
        log.info("router %s ready: threshold %.4f, tiers %s", service.scoring.version, service.threshold,
                 {t.name: [p.name for p in t.providers] for t in service.config.tiers})
        hup = reload_on_hangup(service)
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await service.stop()

    docs = service.config.api_docs  # /docs, /redoc and /openapi.json: off unless the config turns them on
    app = FastAPI(title="learned-router", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM router: each request goes to the cheapest tier whose answer will pass.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.service = service
    app.add_middleware(ServerErrors)
    app.add_middleware(BodyLimit, max_bytes=service.config.limits.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        loc, msg = first_error(exc)
        param = ".".join(map(str, loc))
        return JSONResponse(error_body(f"{param}: {msg}", "invalid_request_error", param), status_code=400)

    @app.post("/v1/route", dependencies=AUTHORIZED)
    async def route(request: Request) -> dict:
        """The routing decision alone: the tier, the rule that decided and why, pass chances, thresholds, cost, budget."""
        started = time.monotonic()
        req, body = parse_request(await request.body())
        d = await service.route(req, router_options(body, request.headers), started)
        return {
            "tier": d.tier, "provider": d.provider.name, "upstream_model": d.provider.config.model,
            "rule": d.rule, "reason": d.reason, "pass_chances": d.pass_chances,
            "threshold": d.threshold, "effective_threshold": d.effective_threshold,
            "skipped": [s.as_dict() for s in d.skipped], "fallback_chain": [p.name for p in d.chain],
            "estimated_prompt_tokens": d.prompt_tokens, "estimated_cost_usd": d.estimated_cost,
            "task_type": d.task_type, "task_type_source": d.task_type_source,
            "data_class": d.options.data_class, "latency_budget_ms": d.options.latency_budget_ms,
            "budget": d.budget.as_dict() if d.budget else None, "router": d.router,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, client: Client):
        """Route, then forward down the decision's chain of providers; streams pass through as SSE."""
        started = time.monotonic()
        request_id = uuid.uuid4().hex[:16]
        who = client.name if client else None
        req, body = parse_request(await request.body())
        d = await service.route(req, router_options(body, request.headers), started, observe=True)
        try:
            reply = await service.complete(d, body, req.stream)
        except APIError as e:
            log.warning("chat id=%s tier=%s rule=%s task_type=%s status=%d: %s", request_id, d.tier, d.rule, d.task_type, e.status,
                        e.message)
            service.record(d, request_id, who, started, e.status, e.code or "failed")
            raise
        headers = decision_headers(d, reply) | {"x-request-id": request_id}
        if reply.response is None:  # a whole answer, or a client error from the provider passed back
            billed = None
            if reply.status == 200:  # a 200 body is a JSON object with a choices list (providers.py checked)
                billed = service.account(reply.provider, reply.json.get("usage"), answer_chars(reply.json), d)
                headers["x-router-cost-usd"] = f"{billed.usd:.8f}"
            log.info("chat id=%s tier=%s provider=%s status=%d rule=%s task_type=%s threshold=%.4f effective=%.4f fallbacks=%d "
                     "cost_usd=%.8f", request_id, d.tier, reply.provider.name, reply.status, d.rule, d.task_type, d.threshold,
                     d.effective_threshold, reply.fallbacks, billed.usd if billed else 0.0)
            service.record(d, request_id, who, started, reply.status, "ok" if billed else "client_error", reply.provider, billed)
            return Response(reply.raw, status_code=reply.status, media_type="application/json", headers=headers)
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(relay(service, reply, d, request_id, wants_usage, who, started), media_type="text/event-stream",
                                 headers=headers | {"Cache-Control": "no-cache"})

    @app.post("/v1/feedback")
    async def feedback(request: Request, client: Client) -> dict:
        """A client's score of one of its answers (by its x-request-id), stored beside the request; a second replaces it."""
        if service.traffic is None:
            raise APIError(404, "feedback needs the traffic record, which is off in this service (the traffic: block)",
                           code="traffic_off")
        try:
            fb = Feedback.model_validate_json(await request.body())
        except ValidationError as e:
            loc, msg = first_error(e)
            param = ".".join(map(str, loc))
            raise APIError(400, f"{param + ': ' if param else ''}{msg}", param=param or None) from None
        score = fb.score if fb.score is not None else {"up": 1.0, "down": 0.0}[fb.thumbs]
        if not await service.traffic.feedback(fb.request_id, client.name if client else None, score):
            raise APIError(404, f"no recorded request {fb.request_id!r} of this client (unknown, expired, or of a data class "
                           "that is never recorded)", param="request_id", code="unknown_request")
        return {"request_id": fb.request_id, "score": score}

    @app.get("/admin/router", dependencies=ADMIN)
    async def admin_router() -> dict:
        """The router in service (version, folder, threshold, calibration mix) and the one a rollback restores."""
        return service.describe()

    @app.post("/admin/reload", dependencies=ADMIN)
    async def admin_reload(request: Request) -> dict:
        """Load and check a router folder (default: router.path), then swap it in; requests scoring finish on the old one."""
        raw = await request.body()
        try:
            path = ReloadRequest.model_validate_json(raw).path if raw.strip() else None
        except ValidationError as e:
            loc, msg = first_error(e)
            raise APIError(400, f"{'.'.join(map(str, loc)) or 'body'}: {msg}") from None
        try:
            return await service.reload(path)
        except RouterError as e:
            raise APIError(422, f"reload failed, {service.scoring.version} stays in service: {e}", code="reload_failed") from None

    @app.post("/admin/rollback", dependencies=ADMIN)
    async def admin_rollback() -> dict:
        """Swap the router of before the last reload back in."""
        try:
            return await service.rollback()
        except RouterError as e:
            raise APIError(409, f"rollback failed, {service.scoring.version} stays in service: {e}", code="rollback_failed") from None

    @app.get("/v1/models", dependencies=AUTHORIZED)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": ROUTER_MODEL, "object": "model", "created": 0, "owned_by": "learned-router"}]}

    @app.get("/v1/drift", dependencies=AUTHORIZED)
    async def drift() -> dict:
        """Each signal's PSI against the drift reference, the window's and the reference's distributions."""
        return drift_monitor().state()

    @app.post("/v1/drift/reference", dependencies=AUTHORIZED)
    async def drift_reference() -> dict:
        """Make the current window the drift reference (written to drift.reference when set)."""
        return drift_monitor().snapshot()

    def drift_monitor():
        if service.drift is None:
            raise APIError(404, "drift is off in this service (drift.enabled)", code="drift_off")
        return service.drift

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Ready when the router scores and each tier has a provider that answers and whose circuit is not open."""
        ready = await service.upstream.ready(service.config.readiness)
        tiers = {t.name: any(ready[p.name] for p in t.providers) for t in service.config.tiers}
        ok = service.batcher.running and all(tiers.values())
        body = {"status": "ready" if ok else "not ready", "router": service.batcher.running, "tiers": tiers, "providers": ready,
                "state": "shared" if service.state.shared and service.state.up else "per-process"}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    return app


async def relay(service: Service, reply: Reply, d: Decision, request_id: str, wants_usage: bool, client: str | None,
                started: float) -> AsyncIterator[str]:
    """Pass the upstream's SSE lines through; note usage; drop the usage chunk we asked for on the client's behalf.

    A chunk that breaks OpenAI's format, or a stream that ends without `data: [DONE]`, ends the client's stream with an
    error event (`bad_response` or `stream_interrupted`). When the client goes away, Starlette cancels this generator
    and the upstream response is closed with it.
    """
    provider, usage, chars, skip_blank, outcome, done = reply.provider, None, 0, False, "aborted", False
    strip_usage = provider.config.stream_usage and not wants_usage

    async def lines():
        for line in reply.head:
            yield line
        async for line in reply.lines:
            yield line

    try:
        async for line in lines():
            if done:
                continue  # nothing follows [DONE]
            if line.startswith("data:"):
                if (data := line[5:].strip()) == "[DONE]":
                    done = True
                else:
                    chunk, text = stream_chunk(data)
                    chars += text
                    if chunk.get("usage") is not None:
                        usage = chunk["usage"]
                        if strip_usage and not chunk.get("choices"):
                            skip_blank = True
                            continue
            elif skip_blank and not line:
                skip_blank = False
                continue
            yield line + "\n"
        if not done:
            raise BadStream("the stream ended without data: [DONE]", kind="stream_interrupted")
        outcome = "ok"
    except (httpx.HTTPError, BadStream) as e:
        kind = e.kind if isinstance(e, BadStream) else "stream_interrupted"
        outcome = "interrupted" if kind == "stream_interrupted" else kind
        await service.state.failure(provider)
        service.metrics.upstream_errors.labels(provider.name, kind).inc()
        why = e.detail if isinstance(e, BadStream) else type(e).__name__
        err = error_body(f"upstream {provider.name} failed mid-stream ({why})", "upstream_error", code=kind)
        yield f"data: {json.dumps(err)}\n\n"
    finally:
        with anyio.CancelScope(shield=True):  # close the upstream even when the client's disconnect cancelled us
            await reply.response.aclose()
        billed = service.account(provider, usage, chars, d, served=outcome == "ok")
        log.info("chat id=%s tier=%s provider=%s stream=%s rule=%s task_type=%s threshold=%.4f effective=%.4f fallbacks=%d "
                 "cost_usd=%.8f", request_id, d.tier, provider.name, outcome, d.rule, d.task_type, d.threshold,
                 d.effective_threshold, reply.fallbacks, billed.usd)
        service.record(d, request_id, client, started, reply.status, outcome, provider, billed)


def create_app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory` and several workers: reads the config path from $LEARNED_ROUTER_CONFIG."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"{CONFIG_ENV} is not set: it must name the service config file")
    return create_app(Service(load_config(path)))
